"""The driver: list the cases, skip the finished ones, run the Ray Data pipeline, write the manifest."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import env, storage
from ..config import ConfigError
from .cases import list_cases
from .job import ACTOR_RESTARTS, AnnotateConfig
from .output import finished_rows, public_row, write_manifest
from .stages import Forward, failed_row, preprocess_case, read_case, write_case

log = logging.getLogger(__name__)


def model_version(checkpoint: str, predictor_version: str) -> str:
    """`<name>@epoch<n>#<sha256 of the file, 12 hex>`: two different files never share a version."""
    h = hashlib.sha256()
    with open(storage.fetch(checkpoint), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{predictor_version}#{h.hexdigest()[:12]}"


def _start_ray(num_cpus: int | None) -> bool:
    """Join RAY_ADDRESS's cluster (its dashboard shows the Data job) or start a local one; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    env.quiet_ray()
    if env.ray_address():
        ray.init(configure_logging=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    return True


def _check_gpus(cfg: AnnotateConfig, autoscaling: bool) -> None:
    """Fail fast when the forward actors ask for GPUs this Ray does not have (Ray Data would wait forever).
    A cluster may add GPU nodes on demand, so there it is only a warning."""
    import ray

    need, have = cfg.num_gpus * cfg.concurrency, float(ray.cluster_resources().get("GPU", 0))
    if need and need > have:
        message = (
            f"--num-gpus {cfg.num_gpus:g} x --concurrency {cfg.concurrency} needs {need:g} GPU(s); "
            f"this Ray cluster has {have:g}"
        )
        if not autoscaling:
            raise ConfigError(f"{message}: use --num-gpus 0 to run the model on CPUs")
        log.warning("%s now; the job waits until the cluster adds them", message)


def build_dataset(cases: list[dict[str, Any]], cfg: AnnotateConfig, profile: str, version: str):
    """The Ray Data pipeline over `cases` (lazy: nothing runs until it is iterated)."""
    import ray.data

    # One block per case, so a crashed task loses one case, and tasks spread over the cluster.
    ds = ray.data.from_items(cases, override_num_blocks=len(cases))
    limit = {"concurrency": cfg.read_concurrency} if cfg.read_concurrency else {}
    ds = ds.map(read_case, fn_kwargs={"input_uri": cfg.input, "fmt": cfg.format}, num_cpus=1, **limit)
    ds = ds.map(preprocess_case, fn_kwargs={"profile": profile}, num_cpus=1, **limit)
    ds = ds.map_batches(
        Forward,
        fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "profile": profile, "use_gpu": cfg.num_gpus > 0},
        batch_size=cfg.batch_size,
        batch_format="pandas",
        concurrency=cfg.concurrency,
        num_gpus=cfg.num_gpus or None,
        num_cpus=None if cfg.num_gpus else 1,
        # A crashed actor restarts a bounded number of times (Ray Data's default is forever, which a
        # case that kills the process would turn into a loop). Being a remote argument the tasks do
        # not share, it also keeps Ray Data from fusing the read and preprocess tasks into the model
        # actor, so they run as parallel tasks instead of serially inside it.
        max_restarts=ACTOR_RESTARTS,
    )
    return ds.map(
        write_case,
        fn_kwargs={
            "output": cfg.output,
            "fmt": cfg.format,
            "profile": profile,
            "model_version": version,
            "review": cfg.review,
        },
        num_cpus=1,
        **limit,
    )


@dataclass(kw_only=True, slots=True)
class AnnotateResult:
    rows: list[dict[str, Any]]
    manifest: tuple[str, str]
    model_version: str
    seconds: float

    def count(self, status: str, resumed: bool | None = None) -> int:
        return sum(r["status"] == status and (resumed is None or bool(r["resumed"]) == resumed) for r in self.rows)


def annotate(cfg: AnnotateConfig, *, progress: bool = True) -> AnnotateResult:
    """Run the whole job (see the module docstring). Raises only for problems of the job itself
    (no cases, bad checkpoint, unusable storage); a bad case is a failed row."""
    t0 = time.perf_counter()
    import torch

    from ..predictor import Predictor

    storage.check_storage(cfg.output)
    cases = list_cases(cfg.input)
    # Fail fast on the checkpoint, and learn its profile and version, before any cluster work.
    probe = Predictor.from_checkpoint(cfg.checkpoint, profile=cfg.profile, device=torch.device("cpu"))
    profile, version = probe.profile.name, model_version(cfg.checkpoint, probe.version)
    del probe
    done = {} if cfg.redo else finished_rows(cfg.output, version, cfg.format)
    todo = [c for c in cases if c["case_id"] not in done]
    rows = [done[c["case_id"]] for c in cases if c["case_id"] in done]
    log.info("%d case(s): %d finished earlier with model %s, %d to annotate", len(cases), len(rows), version, len(todo))
    if todo:
        started = _start_ray(cfg.num_cpus)
        try:
            _check_gpus(cfg, autoscaling=bool(env.ray_address()))
            rows += list(_collect(build_dataset(todo, cfg, profile, version), todo, progress))
        finally:
            if started:
                import ray

                ray.shutdown()
    manifest = write_manifest(rows, cfg.output)
    return AnnotateResult(
        rows=sorted(rows, key=lambda r: r["case_id"]),
        manifest=manifest,
        model_version=version,
        seconds=time.perf_counter() - t0,
    )


def _collect(ds, todo: list[dict[str, Any]], progress: bool) -> Iterator[dict[str, Any]]:
    """Stream the finished rows (with a progress bar); cases whose task died become failed rows."""
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    saved, ctx.max_errored_blocks = ctx.max_errored_blocks, len(todo)  # a dead task costs its own case, not the job
    seen = set()
    try:
        with tqdm(total=len(todo), desc="annotate", unit="case", disable=not progress) as bar:
            for row in ds.iter_rows():
                row = public_row(row)
                seen.add(row["case_id"])
                bar.update(1)
                yield row
    finally:
        ctx.max_errored_blocks = saved
    for case in todo:
        if case["case_id"] not in seen:
            yield public_row(
                failed_row(
                    case, "ray", RuntimeError("the Ray task of this case died (e.g. out of memory); rerun to retry")
                )
            )
