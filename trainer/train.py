"""The training loop, written once. Launchers (CLI, torchrun, MONAI bundle, Ray Train) pass a Runtime."""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from tqdm.auto import tqdm

from . import env
from .checkpoint import Checkpoint
from .config import ConfigError, TrainConfig
from .data import DataError, list_dataset
from .engine import make_loss, train_step, unwrap, validate_item
from .errors import TrainingDiverged as TrainingDiverged
from .network import build_network, load_weights, read_checkpoint
from .progress import format_epoch_line
from .runtime import Runtime
from .schedule import Budget, learning_rate
from .transforms import augment_transforms, cache_transforms

log = logging.getLogger(__name__)


def _data_error_in(exc: BaseException | None) -> DataError | None:
    """MONAI wraps errors raised inside transforms in RuntimeError("applying transform ..."); find ours."""
    while exc is not None:
        if isinstance(exc, DataError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def build_datasets(cfg: TrainConfig, data_dir: str, rank: int = 0, world_size: int = 1, progress: bool = True):
    """Network-resolution caches of the training and validation cases (validation sharded by rank).

    Raises:
        DataError: a case is unusable (the message names its file).
    """
    try:
        return _build_datasets(cfg, data_dir, rank, world_size, progress)
    except RuntimeError as exc:
        err = _data_error_in(exc)
        if err is None:
            raise
        raise err from None


def _build_datasets(cfg: TrainConfig, data_dir: str, rank: int, world_size: int, progress: bool):
    ds = list_dataset(data_dir)
    val_items: list[dict[str, Any]]
    train_items, val_items = ds.split(cfg.val_fraction)
    val_items = [dict(item, index=i) for i, item in enumerate(val_items)][rank::world_size]
    cache = cache_transforms(cfg)
    train_cache = cache_transforms(cfg, fine=cfg.window_probability > 0)
    train_ds = CacheDataset(
        train_items,
        transform=Compose(list(train_cache.transforms) + list(augment_transforms(cfg).transforms)),
        cache_rate=1.0,
        num_workers=cfg.cache_workers,
        progress=progress,
    )
    val_ds = CacheDataset(val_items, transform=cache, cache_rate=1.0, num_workers=cfg.cache_workers, progress=progress)
    return train_ds, val_ds


def _restore(model, optimizer, scaler, ckpt: Checkpoint, cfg: TrainConfig, source: str) -> None:
    if ckpt.profile is not None and ckpt.profile != cfg.profile:
        raise ConfigError(
            f"checkpoint {source} was trained with profile {ckpt.profile!r}, this job uses {cfg.profile!r}: "
            f"pass --profile {ckpt.profile} or start from scratch"
        )
    load_weights(unwrap(model), ckpt, cfg.profile, source)
    if optimizer is not None and ckpt.optimizer:
        optimizer.load_state_dict(ckpt.optimizer)
    if scaler is not None and ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)


#: The divergence rule: stop once DIVERGED_SKIPPED_SHARE of the last DIVERGED_WINDOW_STEPS steps (or
#: that many of the steps so far, early in a run) were skipped for a non-finite loss or gradient. bf16
#: on CPU skips ~2 % of steps, and a tiny model in its first steps can skip a short epoch (4 steps) by
#: chance; a diverged run skips everything, and one skipping most of its steps makes no progress either.
DIVERGED_WINDOW_STEPS = 50
DIVERGED_SKIPPED_SHARE = 0.5


class SkipWindow:
    """The outcomes (skipped or not) of the last `size` optimisation steps, across epochs.

    Every rank records the same outcomes (the skip decision is agreed, see `engine.train_step`), so
    every rank trips at the same step.
    """

    def __init__(self, size: int = DIVERGED_WINDOW_STEPS, share: float = DIVERGED_SKIPPED_SHARE):
        self.size, self.limit = size, max(1, math.ceil(share * size))
        self.outcomes: collections.deque[bool] = collections.deque(maxlen=size)

    def record(self, skipped: bool) -> bool:
        """Record one step; True when the run counts as diverged."""
        self.outcomes.append(bool(skipped))
        return self.skipped >= self.limit

    @property
    def skipped(self) -> int:
        return sum(self.outcomes)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for one random stream, e.g. (job seed, rank, epoch): distinct parts, distinct streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _train_epoch(
    model, loader, optimizer, scaler, loss_fn, cfg, runtime, epoch, clock, window, first_step: int = 0
) -> dict[str, Any]:
    """One pass over the loader from `first_step` (a resumed unfinished epoch), or less if the time
    budget runs out (`stats["out_of_time"]`) or the run diverges (`stats["diverged"]`)."""
    device = runtime.device
    losses, dices, samples, skipped, done, out_of_time, diverged = [], [], 0, 0, first_step, False, False
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not runtime.is_main, leave=False, unit="it")
    for step, batch in enumerate(bar):
        if step < first_step:
            continue  # fetched all the same: the augmentation stream advances as in the first attempt
        elapsed = clock.elapsed()
        if clock.budget.out_of_time(elapsed):
            out_of_time = True
            break
        progress = clock.budget.progress(epoch * len(loader) + step, elapsed)
        lr = learning_rate(cfg.schedule, cfg.lr, progress, anneal=cfg.lr_anneal_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seeds = np.random.SeedSequence([cfg.seed, runtime.rank, epoch, step]).spawn(batch["image"].shape[0])
        rngs = [np.random.default_rng(s) for s in seeds]
        res = train_step(model, batch, optimizer, scaler, loss_fn, rngs, cfg, device, agree=runtime.all_true)
        done = step + 1
        if window.record(res.skipped):
            diverged = True
            break
        if res.skipped:
            skipped += 1
            continue
        losses.append(res.loss)
        dices.append(res.dice)
        samples += batch["image"].shape[0]
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", dice=f"{np.mean(dices):.3f}", lr=f"{lr:.1e}")
    bar.close()
    seconds = time.perf_counter() - t0
    loss_sum, dice_sum, n, total_samples = runtime.all_reduce_sum([sum(losses), sum(dices), len(losses), samples])
    n = max(n, 1)
    # All ranks step (or skip) together: the counts of one rank are the job's.
    steps = done - first_step - skipped
    return {
        "loss": loss_sum / n if steps else float("nan"),
        "train_dice": dice_sum / n if steps else float("nan"),
        "epoch_seconds": seconds,
        "samples_per_s": total_samples / max(seconds, 1e-9),
        "skipped_steps": skipped,
        "steps": steps,  # optimisation steps taken (each by all ranks together)
        "epoch_steps_done": done,  # position in the epoch's batches, for resuming an unfinished epoch
        "epoch_complete": done == len(loader),
        "out_of_time": out_of_time,
        "diverged": diverged,
    }


def make_loader(train_ds, cfg: TrainConfig, rank: int, world_size: int) -> DataLoader:
    """The training loader: this rank's share of a shuffle that depends only on (seed, epoch).

    A `DistributedSampler` also for one process, so a resumed run visits the cases in the same order
    as an uninterrupted one (a plain shuffle draws from torch's global generator). The generator
    seeds the workers' augmentation streams (`seed_epoch`).
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler: DistributedSampler[Any] = DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed
    )
    return DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.loader_workers,
        drop_last=len(sampler) >= cfg.batch_size,
        generator=torch.Generator(),
    )


def seed_epoch(loader, cfg: TrainConfig, rank: int, epoch: int) -> None:
    """Make the epoch's augmentation streams functions of (seed, rank, epoch) alone (the shuffle is
    the sampler's, set by `Runtime.set_epoch`).

    Each rank draws its own augmentation (MONAI's DataLoader re-seeds the dataset from torch's
    global generator, which is seeded alike on every rank: every rank drew the same flips), and a
    run resumed at epoch E draws what an uninterrupted run draws there. Without workers the
    dataset's transforms are seeded here; with workers, each worker seeds them from the loader's
    generator (MONAI's `worker_init_fn`: base seed + worker id).
    """
    from monai.data.utils import set_rnd

    seed = stream_seed(cfg.seed, rank, epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    if not getattr(loader, "num_workers", 0):
        set_rnd(loader.dataset, seed=seed % (2**32))


def use_deterministic_kernels() -> None:
    """Deterministic kernels for this process (MONAI's `set_determinism` does the same switches).

    cuBLAS needs its workspace setting before its first call; kernels without a deterministic
    version warn instead of failing (a run should not die on an op PyTorch adds later).
    """
    env.cublas_deterministic()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _resume_position(ckpt: Checkpoint) -> tuple[int, int]:
    """(epoch, step) to continue from: the next epoch, or the same one where a time budget cut it."""
    if ckpt.metrics.get("epoch_complete", True):
        return ckpt.epoch + 1, 0
    return ckpt.epoch, int(ckpt.metrics.get("epoch_steps_done", 0))


class _Clock:
    """Elapsed training time, agreed by all ranks when there is a time budget.

    Every rank must take the same stop decision (or the others would wait forever in a collective)
    and set the same learning rate, so with a budget the ranks' clocks are averaged each step: one
    scalar all-reduce, ~1 ms next to a ~1 s step.
    """

    def __init__(self, budget: Budget, runtime):
        self.budget, self.runtime, self.start = budget, runtime, time.perf_counter()

    def elapsed(self) -> float:
        mine = time.perf_counter() - self.start
        if self.budget.seconds <= 0 or self.runtime.world_size == 1:
            return mine
        return self.runtime.all_reduce_sum([mine])[0] / self.runtime.world_size


def _validate(model, val_ds, cfg, runtime) -> float:
    total, count = 0.0, 0
    for i in range(len(val_ds)):
        item = val_ds[i]
        batch = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
        # Seeded by the case only: identical clicks, hence a comparable Dice, every epoch.
        rng = np.random.default_rng([cfg.seed, 10_000 + int(item["index"])])
        total += validate_item(model, batch, rng, cfg, runtime.device)
        count += 1
    total, count = runtime.all_reduce_sum([total, count])
    return total / count if count else float("nan")


def _start_position(cfg: TrainConfig, runtime: Runtime, model, optimizer, scaler) -> tuple[int, int, float]:
    """(epoch, step, best validation Dice so far) to start from: the runtime's checkpoint to resume,
    else `init_from`'s weights at the start, else a fresh start."""
    ckpt = runtime.resume_checkpoint(cfg.resume)
    if ckpt is None:
        if cfg.init_from:
            _restore(model, None, None, read_checkpoint(cfg.init_from)[1], cfg, repr(cfg.init_from))
        return 0, 0, float("-inf")
    _restore(model, optimizer, scaler, ckpt, cfg, "last")
    start_epoch, first_step = _resume_position(ckpt)
    best = float(ckpt.metrics.get("best_val_dice", float("-inf")))
    if runtime.is_main:
        where = f"epoch {start_epoch + 1}" + (f", step {first_step + 1}" if first_step else "")
        log.info("resumed at %s (best validation Dice %.4f)", where, best)
    return start_epoch, first_step, best


def _diverged(epoch: int, window: SkipWindow, optimizer) -> TrainingDiverged:
    return TrainingDiverged(
        f"epoch {epoch + 1}: {window.skipped} of the last {len(window.outcomes)} steps had a non-finite "
        f"loss or gradient and were skipped (learning rate {optimizer.param_groups[0]['lr']:.2e}). "
        "Lower --learning-rate, or train with --no-amp; --resume continues from the last checkpoint"
    )


def _checkpoint(model, optimizer, scaler, cfg: TrainConfig, epoch: int, metrics: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        model={k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        profile=cfg.profile,
        epoch=epoch,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        config=cfg.to_dict(),
        metrics={k: v for k, v in metrics.items() if v is not None},
    )


def _setup(cfg: TrainConfig, runtime: Runtime):
    """Seeded model (prepared by the runtime: device, DDP), optimizer and gradient scaler."""
    if cfg.deterministic:
        use_deterministic_kernels()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = runtime.prepare_model(build_network(cfg.profile_spec))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.device.type == "cuda" and cfg.amp)
    return model, optimizer, scaler


def _epoch_metrics(epoch, stats, val_dice, best, optimizer, elapsed: float, start_epoch: int) -> dict[str, Any]:
    """One epoch's record: metrics.jsonl, the checkpoint's metrics and the printed epoch line."""
    return {
        "epoch": epoch + 1,
        **stats,
        "val_dice": val_dice,
        "best_val_dice": best if best > float("-inf") else None,
        "lr": optimizer.param_groups[0]["lr"],
        "elapsed_s": elapsed,
        "resumed_from": start_epoch,
        "time": time.time(),
    }


def train(cfg: TrainConfig, data_dir: str, runtime: Runtime) -> dict[str, Any]:
    """Train `cfg` on the Decathlon dataset at `data_dir`; returns the last epoch's metrics.

    Checkpoints, metrics and resumption go through `runtime`.
    """
    model, optimizer, scaler = _setup(cfg, runtime)
    start_epoch, first_step, best = _start_position(cfg, runtime, model, optimizer, scaler)
    runtime.start(cfg.to_dict() | {"data": str(data_dir)})

    train_ds, val_ds = build_datasets(cfg, data_dir, runtime.rank, runtime.world_size, progress=runtime.is_main)
    loader = runtime.prepare_loader(make_loader(train_ds, cfg, runtime.rank, runtime.world_size))
    if first_step >= len(loader):  # the cut epoch had no steps left (or the dataset shrank): the next one
        start_epoch, first_step = start_epoch + 1, 0
    loss_fn = make_loss()
    clock = _Clock(Budget(total_steps=cfg.num_epochs * len(loader), seconds=cfg.max_train_seconds), runtime)
    metrics: dict[str, Any] = {"epoch": start_epoch, "resumed_from": start_epoch}
    window = SkipWindow()
    for epoch in range(start_epoch, cfg.num_epochs):
        runtime.set_epoch(loader, epoch)
        seed_epoch(loader, cfg, runtime.rank, epoch)
        stats = _train_epoch(
            model,
            loader,
            optimizer,
            scaler,
            loss_fn,
            cfg,
            runtime,
            epoch,
            clock,
            window,
            first_step if epoch == start_epoch else 0,
        )
        last_epoch = epoch + 1 == cfg.num_epochs
        if stats.pop("diverged"):
            raise _diverged(epoch, window, optimizer)  # before writing: the weights are the last checkpoint's
        # Out of time during this epoch, or too late to start another one.
        over_time = stats.pop("out_of_time") or clock.budget.out_of_time(clock.elapsed())
        if over_time and stats["steps"] == 0:
            break  # the budget ran out during the previous epoch's validation: nothing new to save
        validate = (epoch + 1) % cfg.val_every == 0 or last_epoch or over_time
        val_dice = _validate(model, val_ds, cfg, runtime) if validate else None
        is_best = val_dice is not None and val_dice > best
        best = val_dice if is_best and val_dice is not None else best
        metrics = _epoch_metrics(epoch, stats, val_dice, best, optimizer, clock.elapsed(), start_epoch)
        if runtime.is_main:
            print(format_epoch_line(metrics, cfg.num_epochs), flush=True)
        runtime.on_epoch_end(
            metrics=metrics, checkpoint=_checkpoint(model, optimizer, scaler, cfg, epoch, metrics), is_best=is_best
        )
        if over_time and not last_epoch:
            if runtime.is_main:
                print(f"stopping in epoch {epoch + 1}: max_train_seconds={cfg.max_train_seconds} reached", flush=True)
            break
    runtime.finish()
    return metrics
