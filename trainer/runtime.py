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
from .network import default_device as default_device  # re-exported: its old home


class Runtime(Protocol):
    """What `trainer.train.train` needs from where it runs: one process, torch.distributed, Ray Train."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
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


class SingleProcess:
    """The collectives of a job of one process: every reduction is the identity."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | None = None):
        self.device = device or default_device()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    def set_epoch(self, loader: Any, epoch: int) -> None:
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

    def all_gather(self, value: str) -> list[str]:
        """Every rank's `value`, in rank order."""
        return [value]


class TorchProcessGroup(SingleProcess):
    """The collectives of a torch.distributed process group: DDP model, all-reduce, all-gather.

    Joins the group a launcher already set up (Ray Train initialises one on every worker), else, when
    `create`, initialises one from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    gloo on CPU, NCCL on GPU. Without a group and without `create`, it is one process.
    """

    def __init__(self, device: torch.device | None = None, *, create: bool = True):
        import torch.distributed as dist

        if device is None:
            device = torch.device("cuda", env.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Only a group this object created is torn down by `finish` (Ray tears its own down).
        self._owns_group = create and not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        SingleProcess.__init__(self, device)
        if dist.is_initialized():
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

        if self.world_size == 1:
            return list(values)
        # float64 on CPU works with gloo; on NCCL the tensor must live on the GPU.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, value: str) -> list[str]:
        import torch.distributed as dist

        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return [str(v) for v in out]

    def finish(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.barrier()  # no rank leaves while another still writes or reduces
            dist.destroy_process_group()


class LocalRuntime(SingleProcess):
    """A single process writing checkpoints and the metrics log into `output_dir`.

    Layout: `checkpoints/last.pt` (every epoch), `checkpoints/best.pt` (best validation Dice),
    `metrics.jsonl` (one JSON object per epoch), `config.yaml` (the job's settings).
    """

    def __init__(self, output_dir: str | os.PathLike, device: torch.device | None = None):
        SingleProcess.__init__(self, device)
        self.output_dir = Path(output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

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


class TorchDistributedRuntime(TorchProcessGroup, LocalRuntime):
    """torch.distributed from torchrun's environment: the group's collectives, `LocalRuntime`'s files.

    DDP model; DistributedSampler; files written by rank 0 only.
    """

    def __init__(self, output_dir: str | os.PathLike, device: torch.device | None = None):
        TorchProcessGroup.__init__(self, device)
        self.output_dir = Path(output_dir)


class DelegatingRuntime:
    """A Runtime that forwards everything to the one it wraps; subclasses override the hooks they extend."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    @property
    def rank(self) -> int:
        return self._runtime.rank

    @property
    def world_size(self) -> int:
        return self._runtime.world_size

    @property
    def device(self) -> torch.device:
        return self._runtime.device

    @property
    def is_main(self) -> bool:
        return self._runtime.is_main

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._runtime.prepare_model(model)

    def prepare_loader(self, loader: Any) -> Any:
        return self._runtime.prepare_loader(loader)

    def set_epoch(self, loader: Any, epoch: int) -> None:
        self._runtime.set_epoch(loader, epoch)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self._runtime.all_reduce_sum(values)

    def all_true(self, ok: bool) -> bool:
        return self._runtime.all_true(ok)

    def resume_checkpoint(self, resume: bool) -> Checkpoint | None:
        return self._runtime.resume_checkpoint(resume)

    def start(self, config: dict[str, Any]) -> None:
        self._runtime.start(config)

    def on_epoch_end(self, *, metrics: dict[str, Any], checkpoint: Checkpoint, is_best: bool) -> None:
        self._runtime.on_epoch_end(metrics=metrics, checkpoint=checkpoint, is_best=is_best)

    def finish(self) -> None:
        self._runtime.finish()
