"""Typed arguments of the Serve application (the `args:` of a `serve run` / RayService config).

`build_app(ServeArgs)` in `app.py` turns them into deployment options; the checkpoint URI goes into
the deployment's `user_config`, so changing it in a RayService (or with `serve deploy`) swaps the
model in place without restarting replicas.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer import env

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Shortest accepted bearer token (e.g. `openssl rand -hex 32` gives 64 characters).
MIN_TOKEN_CHARS = 32


def check_token(token: str, source: str) -> str:
    """The token, stripped; ValueError naming the source if it is empty or shorter than `MIN_TOKEN_CHARS`."""
    token = token.strip()
    if not token:
        raise ValueError(f"the bearer token from {source} is empty or unset")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"the bearer token from {source} has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}: "
            "generate one with `openssl rand -hex 32`"
        )
    return token


def read_token_file(path: str) -> str:
    """The token held in `path` (a mounted Secret); ValueError naming the file if unreadable or short."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth_token_file {path!r} cannot be read ({type(exc).__name__})") from None
    return check_token(text, f"auth_token_file {path!r}")


class ServeArgs(BaseModel):
    """Arguments of the DeepEdit Serve application. Unknown keys are rejected (typos fail loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(min_length=1, description="checkpoint URI: local path or s3://bucket/key")
    profile: str | None = Field(default=None, description="override the checkpoint's profile (tiny, cpu, bundle)")
    device: str | None = Field(
        default=None, description="torch device; default cuda when the replica has a GPU, else cpu"
    )
    refine: bool | None = Field(
        default=None,
        description="answer clicks with a click-centred window at a fine "
        "spacing (trainer.refine); None: when the checkpoint was trained with windows",
    )
    click_radius: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="click locality radius in network-grid voxels, 0 = off (default: the profile's)",
    )
    model_name: str = Field(
        default="deepedit_spleen",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="model name in MONAI Label /info/ (plus <name>_seg for automatic)",
    )
    # ---- throughput and backpressure
    num_replicas: int = Field(default=1, ge=1, description="replicas of the deployment")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (1 on a GPU node)")
    max_batch_size: int = Field(default=4, ge=1, le=64, description="volumes per batched forward (@serve.batch)")
    # 0: a lone request never waits; requests that arrive while a forward runs form the next batch.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=5, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(default=8, ge=1, description="requests a replica runs concurrently")
    max_queued_requests: int = Field(
        default=32, ge=-1, description="requests queued per caller before 503 (-1: unbounded)"
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After seconds on 503 (overload, timeout)")
    request_timeout_s: float = Field(default=120.0, gt=0, description="a request still running after this gets 503")
    # ---- limits
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_voxels: int = Field(default=512 * 512 * 1024, ge=8, description="largest volume in voxels (413 beyond)")
    max_dim: int = Field(default=2048, ge=2, description="largest size of one axis (413 beyond)")
    max_volume_bytes: int = Field(
        default=1024**3, ge=1024, description="largest declared voxel data, voxels x bytes per voxel (413 beyond)"
    )
    max_extension_bytes: int = Field(
        default=1024 * 1024, ge=0, description="largest NIfTI header-extension area; skipped, never parsed (413 beyond)"
    )
    max_gzip_members: int = Field(default=4096, ge=1, description="most gzip members in one upload (413 beyond)")
    max_json_bytes: int = Field(default=64 * 1024, ge=1024, description="largest clicks / params JSON (413 beyond)")
    max_clicks_per_label: int = Field(
        default=512, ge=1, le=100_000, description="most clicks per label in one request (400 beyond)"
    )
    # ---- memory-aware admission
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=64 * 1024**2,
        description="bytes of decode + preprocess in flight per replica (default: half the replica's memory limit)",
    )
    admission_wait_s: float = Field(
        default=2.0, ge=0, le=60, description="how long a request waits for budget before 503"
    )
    # ---- sessions
    session_ttl_s: float = Field(default=3600.0, gt=0, description="a session expires this long after its last use")
    session_max_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="memory cap of cached volumes per replica (LRU)"
    )
    caller_max_sessions: int = Field(
        default=32, ge=1, description="sessions + datastore images one caller holds (its own LRU goes first)"
    )
    caller_max_share: float = Field(
        default=0.5, gt=0, le=1, description="fraction of session_max_bytes one caller may hold"
    )
    # ---- security
    auth_token_env: str | None = Field(
        default=None, description="name of the env var holding the bearer token (unset: no auth)"
    )
    auth_token_file: str | None = Field(
        default=None,
        description="file holding the bearer token, re-read when it changes "
        "(a mounted Secret rotates without a restart)",
    )
    auth_token_rate_per_min: int = Field(
        default=10, ge=1, description="POST /auth/token attempts per client address per minute (429 beyond)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (empty: CORS off)")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_uri(cls, value: str) -> str:
        from trainer.storage import check_uri

        return check_uri(value)  # a StorageError is a ValueError: pydantic reports it

    @field_validator("auth_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_RE.match(value):
            raise ValueError(f"auth_token_env {value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _batching_fits(self) -> ServeArgs:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeArgs:
        if self.auth_token_env is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token_env or auth_token_file, not both")
        return self

    def auth_token(self) -> str | None:
        """The bearer token from the environment or the file, in the process that calls this (the replica).

        Raises:
            ValueError: the variable or file is empty, unreadable, or the token is shorter than
                `MIN_TOKEN_CHARS` (a short token can be guessed).
        """
        if self.auth_token_file is not None:
            return read_token_file(self.auth_token_file)
        if self.auth_token_env is None:
            return None
        return check_token(env.named(self.auth_token_env), f"environment variable {self.auth_token_env}")

    def user_config(self) -> dict[str, str | None]:
        return {"checkpoint": self.checkpoint, "profile": self.profile}


def serve_default(name: str) -> Any:
    """The default of one `ServeArgs` field: the one home of every serve setting's default."""
    return ServeArgs.model_fields[name].default
