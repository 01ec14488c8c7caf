"""Typed arguments of the Serve application (the `args:` of a `serve run` / RayService config).

`build_app(ServeArgs)` in `app.py` turns them into deployment options; the checkpoint URI goes into
the deployment's `user_config`, so changing it in a RayService (or with `serve deploy`) swaps the
model in place without restarting replicas.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ServeArgs(BaseModel):
    """Arguments of the DeepEdit Serve application. Unknown keys are rejected (typos fail loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(min_length=1, description="checkpoint URI: local path or s3://bucket/key")
    profile: str | None = Field(default=None, description="override the checkpoint's profile (tiny, cpu, bundle)")
    device: str | None = Field(default=None, description="torch device; default cuda when the replica has a GPU, else cpu")
    click_radius: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                       description="click locality radius in network-grid voxels, 0 = off (default: the profile's)")
    model_name: str = Field(default="deepedit_spleen", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
                            description="model name in MONAI Label /info/ (plus <name>_seg for automatic)")
    # ---- throughput and backpressure
    num_replicas: int = Field(default=1, ge=1, description="replicas of the deployment")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (1 on a GPU node)")
    max_batch_size: int = Field(default=4, ge=1, le=64, description="volumes per batched forward (@serve.batch)")
    # 0: a lone request never waits; requests that arrive while a forward runs form the next batch.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=5, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(default=8, ge=1, description="requests a replica runs concurrently")
    max_queued_requests: int = Field(default=32, ge=-1, description="requests queued per caller before 503 (-1: unbounded)")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After seconds on 503 (overload, timeout)")
    request_timeout_s: float = Field(default=120.0, gt=0, description="a request still running after this gets 503")
    # ---- limits
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_voxels: int = Field(default=512 * 512 * 1024, ge=8, description="largest volume in voxels (413 beyond)")
    max_dim: int = Field(default=2048, ge=2, description="largest size of one axis (413 beyond)")
    # ---- sessions
    session_ttl_s: float = Field(default=3600.0, gt=0, description="a session expires this long after its last use")
    session_max_bytes: int = Field(default=2 * 1024**3, ge=1024, description="memory cap of cached volumes per replica (LRU)")
    # ---- security
    auth_token_env: str | None = Field(default=None, description="name of the env var holding the bearer token (unset: no auth)")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (empty: CORS off)")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_uri(cls, value: str) -> str:
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError(f"checkpoint {value!r}: only local paths, file:// and s3:// URIs are supported")
        return value

    @field_validator("auth_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_RE.match(value):
            raise ValueError(f"auth_token_env {value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _batching_fits(self) -> "ServeArgs":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    def auth_token(self) -> str | None:
        """The bearer token, read from the environment of the process that calls this (the replica)."""
        if self.auth_token_env is None:
            return None
        token = os.environ.get(self.auth_token_env, "")
        if not token:
            raise ValueError(f"auth_token_env is {self.auth_token_env!r} but that environment variable is empty or unset")
        return token

    def user_config(self) -> dict[str, str | None]:
        return {"checkpoint": self.checkpoint, "profile": self.profile}
