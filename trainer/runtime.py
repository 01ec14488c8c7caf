"""Where the training loop runs: one process, or torch.distributed (torchrun), or Ray Train.

The loop in `train.py` only talks to a `Runtime`; launchers differ in how they wrap the model and
loader, reduce numbers across ranks, find a checkpoint to resume and persist checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from . import env
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Runtime(Protocol):
    """What `trainer.train.train` needs from where it runs: one process, torch.distributed, Ray Train."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def prepare_loader(self, loader: Any) -> Any: ...
    def set_epoch(self, loader: Any, epoch: int) -> None: ...
    def all_reduce_sum(self, values: list[float]) -> list[float]: ...
    def all_true(self, ok: bool) -> bool: ...
    def resume_checkpoint(self, resume: bool) -> Checkpoint | None: ...
    def start(self, config: dict[str, Any]) -> None: ...
    def on_epoch_end(self, *, metrics: dict[str, Any], checkpoint: Checkpoint, is_best: bool) -> None: ...
    def finish(self) -> None: ...


class LocalRuntime:
    """A single process writing checkpoints and the metrics log into `output_dir`.

    Layout: `checkpoints/last.pt` (every epoch), `checkpoints/best.pt` (best validation Dice),
    `metrics.jsonl` (one JSON object per epoch), `config.yaml` (the job's settings).
    """

    rank = 0
    world_size = 1

    def __init__(self, output_dir: str | os.PathLike, device: torch.device | None = None):
        self.output_dir = Path(output_dir)
        self.device = device or default_device()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def set_epoch(self, loader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_true(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank: one scalar all-reduce, so all ranks take one decision."""
        if self.world_size == 1:
            return bool(ok)
        return self.all_reduce_sum([0.0 if ok else 1.0])[0] == 0.0

    def barrier(self) -> None:
        pass

    def resume_checkpoint(self, resume: bool) -> Checkpoint | None:
        """The `last` checkpoint when resuming and one exists."""
        last = self.checkpoint_dir / "last.pt"
        if resume and last.is_file():
            return load_checkpoint(last)
        return None

    def start(self, config: dict[str, Any]) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))

    def on_epoch_end(self, *, metrics: dict[str, Any], checkpoint: Checkpoint, is_best: bool) -> None:
        if not self.is_main:
            return
        save_checkpoint(checkpoint, self.checkpoint_dir / "last.pt")
        if is_best:
            save_checkpoint(checkpoint, self.checkpoint_dir / "best.pt")
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def finish(self) -> None:
        pass


class TorchDistributedRuntime(LocalRuntime):
    """torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    gloo on CPU, NCCL on GPU; DDP model; DistributedSampler; files written by rank 0 only.
    """

    def __init__(self, output_dir: str | os.PathLike, device: torch.device | None = None):
        import torch.distributed as dist

        local_rank = env.local_rank()
        if device is None:
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        super().__init__(output_dir, device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        # float64 on CPU works with gloo; on NCCL the tensor must live on the GPU.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def finish(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
