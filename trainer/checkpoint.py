"""Checkpoints: atomic, checksummed save and `weights_only` load.

A checkpoint is one `torch.save` file holding a dict: `format`, `model` (DynUNet state_dict),
`optimizer`, `scaler`, `epoch`, `profile`, `config`, `metrics` and `sha256`, a digest of everything
else (tensors by dtype, shape and bytes). A file is written to a temporary name in the same folder,
fsynced and renamed, so a crash never leaves a half-written checkpoint under the real name; a file
whose digest does not match is refused with an error naming it.

A plain state_dict (the model-zoo bundle's `models/model.pt`) also loads, as model weights only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError as CheckpointError

FORMAT = "spleen-deepedit/1"


@dataclass(kw_only=True, slots=True)
class Checkpoint:
    model: dict[str, torch.Tensor]
    profile: str | None = None
    epoch: int = -1
    optimizer: dict | None = None
    scaler: dict | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    plain_state_dict: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "profile": self.profile,
            "epoch": self.epoch,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "config": self.config,
            "metrics": self.metrics,
        }


def _update_digest(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _update_digest(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        for item in obj:
            _update_digest(h, item)
    else:
        h.update(repr(obj).encode())


def digest(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _update_digest(h, payload)
    return h.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> str:
    """Write `ckpt` atomically to `path`; returns its sha256 digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = ckpt.payload()
    payload["sha256"] = digest(payload)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return payload["sha256"]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and verify a checkpoint (ours or a plain DynUNet state_dict) with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist: pass the path of a .pt file written by training"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip errors, unpickling errors, truncated files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable or corrupted ({type(exc).__name__}); restore it from storage or retrain"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        expected = obj.pop("sha256", None)
        if expected is None or digest(obj) != expected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} failed its checksum: the file is corrupted; use another checkpoint"
            )
        return Checkpoint(
            model=obj["model"],
            profile=obj.get("profile"),
            epoch=int(obj.get("epoch", -1)),
            optimizer=obj.get("optimizer"),
            scaler=obj.get("scaler"),
            config=obj.get("config") or {},
            metrics=obj.get("metrics") or {},
        )
    if "input_block.conv1.conv.weight" in obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(model=obj, plain_state_dict=True)
    raise CheckpointError(f"checkpoint {str(path)!r} is neither a spleen-deepedit checkpoint nor a DynUNet state_dict")


def save_state_dict(model_state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a plain state_dict (the bundle's `models/model.pt` format) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model_state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
