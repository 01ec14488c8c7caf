"""Ray Train (V2) launcher: the same training loop on N DDP workers, checkpoints in object storage.

`fit()` wires a `TorchTrainer` (scaling, storage, failure and checkpoint policy); `train_func` runs on
every worker and calls `train.train()` with a `RayRuntime`, which maps the loop's runtime hooks onto
Ray Train: DDP model and distributed sampler from `ray.train.torch`, collectives through the
`torch.distributed` group Ray has initialised (gloo on CPU, NCCL on GPU), resumption from
`ray.train.get_checkpoint()`, and one `ray.train.report` per epoch carrying the metrics and rank 0's
checkpoint.

Recovery (see docs/ray.md): a worker failure restarts the worker group from the latest reported
checkpoint (`FailureConfig(max_failures)`); a resubmitted job with the same run name and storage
finds the run snapshot in storage and resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import env, storage
from .checkpoint import Checkpoint, CheckpointError, digest, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .faults import FaultSpec, FaultyLoader
from .runtime import TorchProcessGroup

log = logging.getLogger(__name__)

#: File names inside each checkpoint directory that Ray uploads to `<storage>/<run>/checkpoint_epoch_NNNN/`.
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(kw_only=True, slots=True)
class RayJobConfig:
    """How the training job runs on Ray (the model and loop settings stay in `TrainConfig`).

    Attributes:
        storage: where the run lives: a local path (shared by all nodes) or `s3://bucket/prefix`.
        run_name: stable name of the run; resubmitting with the same name and storage resumes it.
        num_workers: DDP ranks (Ray Train workers).
        use_gpu: one GPU per worker and NCCL; otherwise gloo on CPU.
        cpus_per_worker: CPUs reserved per worker.
        placement_strategy: `SPREAD` puts workers on different nodes where possible.
        max_failures: worker-group restarts from the latest checkpoint before the run fails.
        num_to_keep: checkpoints kept in storage (best by validation Dice, plus always the latest);
            None keeps all.
        fault: test hook only, never set from the command line: `rank=R,epoch=E,step=S[,mode=raise|kill]`
            makes rank R fail at step S of (0-based) epoch E, but only in an attempt that started
            before epoch E, so the restarted attempt passes.
    """

    storage: str
    run_name: str
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "SPREAD"
    max_failures: int = 2
    num_to_keep: int | None = 3
    fault: str | None = None

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(
                f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}"
            )
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be -1 (unlimited) or >= 0, got {self.max_failures}")
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ConfigError(f"num_to_keep must be at least 1 or None, got {self.num_to_keep}")
        if self.fault is not None:
            FaultSpec.parse(self.fault)

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.run_name)

    @classmethod
    def for_output(
        cls,
        output: str | os.PathLike,
        *,
        storage: str | None = None,
        run_name: str | None = None,
        num_workers: int | None = None,
        use_gpu: bool = False,
    ) -> RayJobConfig:
        """The job of `train --ray --output OUTPUT`: storage `<output>/ray` and the run named after the
        output folder (or `$SPLEEN_DEEPEDIT_RUN_NAME`) unless given; one worker unless given."""
        out = Path(output).resolve()
        return cls(
            storage=storage or str(out / "ray"),
            run_name=run_name or env.run_name() or out.name,
            num_workers=num_workers or 1,
            use_gpu=use_gpu,
        )


class _TrainGauges:
    """Loss and Dice as Ray metrics (exported on each node's metrics port for Prometheus)."""

    _SPEC = {
        "loss": ("deepedit_train_loss", "Mean training loss (Dice + cross-entropy) of the last epoch"),
        "train_dice": ("deepedit_train_dice", "Mean training spleen Dice of the last epoch"),
        "val_dice": ("deepedit_val_dice", "Spleen validation Dice of the last validated epoch"),
        "epoch": ("deepedit_epoch", "Epochs completed"),
        "epoch_seconds": ("deepedit_epoch_seconds", "Wall time of the last training epoch"),
        "samples_per_s": ("deepedit_samples_per_second", "Training samples per second over all workers"),
    }

    def __init__(self, run_name: str):
        from ray.util.metrics import Gauge

        self._tags = {"run": run_name}
        self._gauges = {
            key: Gauge(name, description=text, tag_keys=("run",)) for key, (name, text) in self._SPEC.items()
        }

    def update(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]), tags=self._tags)


def _storage_name(ray_checkpoint, name: str) -> str:
    """`s3://bucket/run/checkpoint_epoch_0003/checkpoint.pt` (or the local path) for messages."""
    fs_type = getattr(ray_checkpoint.filesystem, "type_name", "local")
    path = f"{ray_checkpoint.path}/{name}"
    return path if fs_type == "local" else f"{fs_type}://{path}"


class RayRuntime(TorchProcessGroup):
    """The loop's runtime inside a Ray Train worker: the collectives of the torch.distributed group
    Ray Train set up (`TorchProcessGroup`), Ray's DDP model and sampler, and storage through Ray.

    Nothing is written to a local output directory. Rank 0 writes each epoch's checkpoint
    (`checkpoint.pt`, checksummed) and the metrics history (`metrics.jsonl`) into a temporary
    directory that `ray.train.report` uploads to storage; every rank reports (the call is a
    barrier), with the digests of all ranks' weights so a divergence between DDP replicas shows in
    the metrics (`weights_in_sync`).
    """

    def __init__(self, *, run_name: str, fault: FaultSpec | None = None):
        import ray.train.torch

        # Ray Train owns the group (and tears it down): join it, never create one.
        super().__init__(ray.train.torch.get_device(), create=False)
        self.run_name = run_name
        self.epoch = 0
        self.start_epoch = 0
        self._fault = fault
        self._history: list[dict[str, Any]] = []
        self._gauges = _TrainGauges(run_name) if self.is_main else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: Any) -> Any:
        import ray.train.torch

        # The engine moves each batch itself (dicts with click metadata, not just tensors).
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        return FaultyLoader(loader, self, self._fault) if self._fault else loader

    def set_epoch(self, loader: Any, epoch: int) -> None:
        self.epoch = epoch
        super().set_epoch(loader, epoch)

    def resume_checkpoint(self, resume: bool) -> Checkpoint | None:
        """The run's latest checkpoint in storage, if Ray has one (after a failure or on resubmission).

        Under Ray, resumption is decided by the run name, not by `--resume`.
        """
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is None:
            return None
        # A private download per rank, not `as_directory()`: on one node that shares a single temporary
        # directory, and a rank that takes its lock after another finished downloads again over the files
        # the other is still reading (a truncated checkpoint.pt; seen once in CI with two workers).
        with tempfile.TemporaryDirectory(prefix=f"deepedit-resume-{self.rank}-", ignore_cleanup_errors=True) as tmp:
            local = reported.to_directory(tmp)
            local_file = os.path.join(local, CHECKPOINT_FILE)
            try:
                ckpt = load_checkpoint(local_file)
            except CheckpointError as exc:
                raise CheckpointError(str(exc).replace(local_file, _storage_name(reported, CHECKPOINT_FILE))) from None
            history = Path(local, METRICS_FILE)
            if self.is_main and history.is_file():
                self._history = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        self.start_epoch = ckpt.epoch + 1
        return ckpt

    def start(self, config: dict[str, Any]) -> None:
        pass  # the settings travel in every checkpoint (`Checkpoint.config`) and the run's Ray metadata

    def on_epoch_end(self, *, metrics: dict[str, Any], checkpoint: Checkpoint, is_best: bool) -> None:
        import ray.train

        digests = self.all_gather(digest(checkpoint.model))
        report = {k: v for k, v in metrics.items() if v is not None}
        # Ray ranks checkpoints by `score`: the validation Dice, or -1 for an epoch without validation.
        report["score"] = metrics["val_dice"] if metrics.get("val_dice") is not None else -1.0
        report.update(is_best=is_best, weight_digests=digests, weights_in_sync=len(set(digests)) == 1)
        if not self.is_main:
            ray.train.report(report, checkpoint=None)
            return
        self._history.append(metrics)
        if self._gauges is not None:  # set on the main rank, the only one that gets here
            self._gauges.update(metrics)
        with tempfile.TemporaryDirectory(prefix="deepedit-ckpt-", ignore_cleanup_errors=True) as tmp:
            save_checkpoint(checkpoint, os.path.join(tmp, CHECKPOINT_FILE))
            with open(os.path.join(tmp, METRICS_FILE), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in self._history)
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                # Named by epoch: a checkpoint re-reported after a restart replaces, never duplicates.
                checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}",
            )


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point on every worker: settings -> data -> the one training loop."""
    import ray.train

    from .train import train

    cfg = TrainConfig.from_dict(config["train"], source="train_loop_config")
    fault = FaultSpec.parse(config["fault"]) if config.get("fault") else None
    runtime = RayRuntime(run_name=config["run_name"], fault=fault)
    data_dir = storage.sync_dataset(config["data"])  # once per node for s3://
    if cfg.init_from and ray.train.get_checkpoint() is None:
        cfg = cfg.replace(init_from=storage.fetch(cfg.init_from))
    return train(cfg, data_dir, runtime)


def fit(cfg: TrainConfig, data: str, job: RayJobConfig, *, loop: Callable[[dict[str, Any]], Any] = train_func):
    """Run (or resume) the Ray Train job; returns the `ray.train.Result`.

    `loop` is what every worker runs (`train_func`; tests wrap it to instrument the workers).

    Joins the cluster at `RAY_ADDRESS` (or the one this process is connected to); starts a local one
    otherwise. Raises StorageError within seconds if the storage is unusable.
    """
    storage.check_storage(job.storage)
    if storage.is_s3(data):
        if not storage.list_objects(data):  # fail fast here rather than in every worker
            raise storage.StorageError(
                f"no objects under {data}: upload the dataset (imagesTr/, labelsTr/, dataset.json) there"
            )
    else:
        data = str(Path(data).resolve())
    env.ray_train_defaults()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    if not storage.is_s3(job.storage):
        job_storage = str(Path(job.storage).resolve())
    else:
        job_storage = job.storage
    trainer = TorchTrainer(
        loop,
        train_loop_config={"train": cfg.to_dict(), "data": data, "run_name": job.run_name, "fault": job.fault},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker},
            placement_strategy=job.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=job_storage,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.num_to_keep,
                checkpoint_score_attribute="score",
                checkpoint_score_order="max",
            ),
        ),
    )
    return trainer.fit()


def export_result(result, output: str | os.PathLike, job: RayJobConfig) -> dict[str, Any]:
    """Copy the latest checkpoint and metrics history next to the user (`--output`), for evaluate/infer."""
    output = Path(output)
    summary: dict[str, Any] = {"run": job.run_name, "storage": job.run_uri, "metrics": dict(result.metrics or {})}
    if result.checkpoint is not None:
        summary["checkpoint"] = _storage_name(result.checkpoint, CHECKPOINT_FILE)
        with result.checkpoint.as_directory() as local:
            (output / "checkpoints").mkdir(parents=True, exist_ok=True)
            ckpt = load_checkpoint(os.path.join(local, CHECKPOINT_FILE))  # verify before handing it out
            save_checkpoint(ckpt, output / "checkpoints" / "last.pt")
            if os.path.isfile(os.path.join(local, METRICS_FILE)):
                shutil.copyfile(os.path.join(local, METRICS_FILE), output / METRICS_FILE)
    (output / "ray_run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_ray_training(cfg: TrainConfig, data: str, output: str | os.PathLike, job: RayJobConfig) -> dict[str, Any]:
    """`spleen-deepedit train --ray ...`: fit, then export the result to `output`."""
    print(f"ray train: run {job.run_name!r}, {job.num_workers} worker(s), storage {job.run_uri}", flush=True)
    result = fit(cfg, data, job)
    summary = export_result(result, output, job)
    keys = ("epoch", "loss", "train_dice", "val_dice", "best_val_dice", "resumed_from")
    print(json.dumps({k: summary["metrics"].get(k) for k in keys} | {"checkpoint": summary.get("checkpoint")}))
    return summary
