"""Batch pre-annotation of a cohort on Ray Data: `spleen-deepedit annotate`.

    list (driver) -> read (parallel tasks) -> preprocess (CPU tasks) -> forward (actor pool, batched,
    GPU when asked) -> postprocess, measure and write (CPU tasks) -> manifest (driver)

A case is a NIfTI file, a `.zip` of a DICOM series, or a folder holding DICOM files, under a local
folder or an `s3://` prefix. Each case yields a mask (`masks/<case>.nii.gz` or a DICOM SEG
`masks/<case>.dcm`) and a row (`rows/<case>.json`, written after the mask, so a row marks a finished
case); the manifest (`manifest.parquet`, `manifest.csv`) collects the rows of all runs. Masks are the
ones `infer` writes: the same `Predictor` stages run in each step.

Resumable: a case whose row says `ok` for the same model version (checkpoint name, epoch and file
digest) and format, with its mask present, is skipped and its row carried into the new manifest.
One bad case is a failed row (status `failed`, the error's message), never a failed job: every stage
catches its case's errors, and a case whose Ray task died (e.g. out of memory) is reported as failed
too. Failed cases are retried by the next run.

Per case the row holds: spleen volume (ml), connected components (26-connected) and the share of
the largest, whether the mask touches the scan's edge, a confidence (mean spleen probability inside
the mask on the network grid, i.e. the mean max-class probability there), the time of each stage, and
review flags (`ReviewThresholds`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import storage
from .config import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("nii.gz", "dcm")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASKS, ROWS = "masks", "rows"
MANIFEST = "manifest"
#: Columns of a manifest row, with the value a case has before a stage fills it in.
ROW_DEFAULTS: dict[str, Any] = {
    "case_id": "", "source": "", "kind": "", "keys": "", "status": "pending", "error": "", "stage": "",
    "output": "", "model_version": "", "format": "", "resumed": False,
    "shape": "", "spleen_ml": float("nan"), "components": -1, "largest_share": float("nan"),
    "touches_edge": False, "confidence": float("nan"), "flags": "",
    "read_s": 0.0, "preprocess_s": 0.0, "forward_s": 0.0, "write_s": 0.0,
}
PAYLOAD = "payload"  # pickled arrays passed between stages; dropped before the manifest
DEFAULT_BATCH_SIZE = 2
DEFAULT_CONCURRENCY = 1
ACTOR_RESTARTS = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class ReviewThresholds:
    """When a case is flagged for review (the flags column).

    Attributes:
        min_ml, max_ml: a spleen volume outside this range (ml) is flagged `small_volume` or
            `large_volume` (adult spleens are ~100-400 ml; splenomegaly reaches ~2000).
        min_largest_share: fewer voxels than this share in the largest component: `fragmented`.
        min_confidence: mean spleen probability inside the mask below this: `low_confidence`.
    """

    min_ml: float = 30.0
    max_ml: float = 1500.0
    min_largest_share: float = 0.95
    min_confidence: float = 0.8


@dataclass(frozen=True, kw_only=True, slots=True)
class AnnotateConfig:
    """One `annotate` run.

    Attributes:
        input: folder or s3:// prefix of cases (NIfTI files, DICOM series folders, .zip series).
        output: folder or s3:// prefix for masks, rows and the manifest.
        checkpoint: model checkpoint (path or s3://).
        format: `nii.gz` (any input) or `dcm` (DICOM SEG; DICOM inputs only).
        batch_size: volumes per forward pass.
        concurrency: forward actors.
        num_gpus: GPUs per forward actor (0: CPU).
        read_concurrency: most read/preprocess/write tasks at once (None: as many as the cluster fits).
        num_cpus: CPUs of a local Ray started for this run (None: the machine's).
        profile: override the checkpoint's profile.
        redo: ignore finished cases and annotate everything again.
    """

    input: str
    output: str
    checkpoint: str
    format: str = "nii.gz"
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    num_gpus: float = 0.0
    read_concurrency: int | None = None
    num_cpus: int | None = None
    profile: str | None = None
    redo: bool = False
    review: ReviewThresholds = field(default_factory=ReviewThresholds)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r}: use one of {list(FORMATS)}")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise ConfigError(f"--read-concurrency {self.read_concurrency}: must be at least 1")
        if not 0 <= self.num_gpus <= 8:
            raise ConfigError(f"--num-gpus {self.num_gpus}: must be between 0 and 8 (a fraction shares a GPU)")
        if _inside(self.output, self.input):  # a rerun would take the masks for new cases
            raise ConfigError(f"--output {self.output!r} is inside --input {self.input!r}: write the masks outside the "
                              "input folder (or prefix)")


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or under it (local paths resolved; s3:// URIs compared as prefixes)."""
    if storage.is_s3(path) or storage.is_s3(root):
        return storage.is_s3(path) and storage.is_s3(root) and f"{path.rstrip('/')}/".startswith(f"{root.rstrip('/')}/")
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


# ----------------------------------------------------------------------------- listing


def _case_id(rel: str) -> str:
    for suffix in (*NIFTI_SUFFIXES, ".zip"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    return rel.strip("/").replace("/", "__") or "series"


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def group_cases(rel_paths: list[str]) -> list[dict[str, Any]]:
    """Relative file paths -> cases: each NIfTI or .zip file is one; the other files of a folder are
    one DICOM series. Returns rows with `case_id`, `source` (relative), `kind` and `keys` (JSON list)."""
    cases: dict[str, dict[str, Any]] = {}
    series: dict[str, list[str]] = {}
    for rel in sorted(rel_paths):
        if _hidden(rel):
            continue
        low = rel.lower()
        if low.endswith(NIFTI_SUFFIXES) or low.endswith(".zip"):
            kind = "nifti" if low.endswith(NIFTI_SUFFIXES) else "dicom_zip"
            cases[rel] = {"source": rel, "kind": kind, "keys": json.dumps([rel])}
        else:
            series.setdefault(rel.rpartition("/")[0], []).append(rel)
    for folder, files in series.items():
        cases[folder + "/"] = {"source": folder, "kind": "dicom_dir", "keys": json.dumps(files)}
    from .data import DataError

    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for key in sorted(cases):
        case_id = _case_id(cases[key]["source"])
        if case_id in seen:
            raise DataError(f"{seen[case_id]!r} and {cases[key]['source']!r} would both be case {case_id!r}: rename one")
        seen[case_id] = cases[key]["source"]
        out.append({**ROW_DEFAULTS, **cases[key], "case_id": case_id})
    return out


def list_cases(input_uri: str) -> list[dict[str, Any]]:
    """The cases under a local folder or an s3:// prefix (see `group_cases`)."""
    if storage.is_s3(input_uri):
        rels = list(storage.list_objects(input_uri))
    else:
        root = Path(input_uri)
        if not root.is_dir():
            raise FileNotFoundError(f"--input {input_uri!r} is not a folder: pass a folder (or s3:// prefix) of NIfTI "
                                    "files and DICOM series")
        rels = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    cases = group_cases(rels)
    if not cases:
        from .data import DataError

        raise DataError(f"no cases under {input_uri}: expected .nii/.nii.gz files, .zip DICOM series or DICOM series folders")
    return cases


# ----------------------------------------------------------------------------- stages (run in Ray tasks)


def _dump(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _failed(row: dict[str, Any], stage: str, exc: BaseException) -> dict[str, Any]:
    from .data import DataError

    # A user-facing error (bad data) says itself what to fix; anything else gets its type for the log.
    user = isinstance(exc, (DataError, ConfigError, FileNotFoundError))
    message = str(exc) if user else f"{type(exc).__name__}: {exc}"
    return {**row, "status": "failed", "stage": stage, "error": message[:2000], PAYLOAD: b""}


def _local_case(row: dict[str, Any], input_uri: str, scratch: Path) -> Path:
    """The case's source as a local path (s3:// objects downloaded into `scratch`)."""
    keys = json.loads(row["keys"])
    if not storage.is_s3(input_uri):
        return Path(input_uri) / row["source"]
    for key in keys:
        storage.fetch(storage.join(input_uri, key), scratch / key)
    return scratch / row["source"]


def read_case(row: dict[str, Any], *, input_uri: str, fmt: str) -> dict[str, Any]:
    """Stage 1: the volume (+ DICOM headers) of one case."""
    t0 = time.perf_counter()
    try:
        if row["kind"] == "nifti" and fmt == "dcm":
            from .data import DataError

            raise DataError(f"{row['source']}: --format dcm writes a DICOM SEG that references its source "
                            "series, and this case is NIfTI: use --format nii.gz for NIfTI inputs")
        with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
            path = _local_case(row, input_uri, Path(scratch))
            if row["kind"] == "nifti":
                from .predictor import load_volume

                image, affine = load_volume(path)
                meta = None
            else:
                from .dicom import read_series

                image, affine, meta = read_series(path)
        payload = {"image": image, "affine": affine, "meta": meta if fmt == "dcm" else None}
        return {**row, "shape": "x".join(str(s) for s in image.shape), "read_s": time.perf_counter() - t0,
                PAYLOAD: _dump(payload)}
    except Exception as exc:  # noqa: BLE001 - one bad case is a failed row
        return _failed(row, "read", exc)


_HELPERS: dict[str, Any] = {}


def _stage_predictor(profile: str):
    """A Predictor for the CPU stages, which use only its preprocessing and postprocessing (no weights):
    built once per worker process, with a placeholder network."""
    if profile not in _HELPERS:
        import torch

        from .config import get_profile
        from .predictor import Predictor

        _HELPERS[profile] = Predictor(torch.nn.Identity(), get_profile(profile), device=torch.device("cpu"))
    return _HELPERS[profile]


def preprocess_case(row: dict[str, Any], *, profile: str) -> dict[str, Any]:
    """Stage 2: the network-grid tensor and the geometry to go back (a `Prepared`, as arrays)."""
    if row["status"] == "failed":
        return row
    t0 = time.perf_counter()
    try:
        payload = pickle.loads(row[PAYLOAD])
        prepared = _stage_predictor(profile).preprocess(payload["image"], payload["affine"])
        out = {"prepared": {"image": prepared.image.numpy(), "orig_shape": prepared.orig_shape,
                            "orig_affine": prepared.orig_affine, "to_ras": prepared.to_ras,
                            "ras_shape": prepared.ras_shape, "index_to_ras": prepared.index_to_ras},
               "meta": payload["meta"]}
        return {**row, "preprocess_s": time.perf_counter() - t0, PAYLOAD: _dump(out)}
    except Exception as exc:  # noqa: BLE001
        return _failed(row, "preprocess", exc)


def _prepared(state: dict[str, Any]):
    import torch

    from .predictor import Prepared

    return Prepared(**{**state, "image": torch.from_numpy(state["image"])})


class Forward:
    """Stage 3 (actor pool): the network on a batch of prepared volumes -> spleen probability."""

    def __init__(self, checkpoint: str, profile: str, use_gpu: bool):
        import torch

        from .predictor import Predictor

        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.predictor = Predictor.from_checkpoint(checkpoint, profile=profile, device=device)

    def _run(self, rows: list[dict[str, Any]]) -> None:
        """Forward `rows` together; the rows change only if the whole batch succeeded."""
        from .clicks import empty_clicks

        t0 = time.perf_counter()
        states = [pickle.loads(r[PAYLOAD]) for r in rows]
        prob = self.predictor.forward([_prepared(s["prepared"]) for s in states], [empty_clicks() for _ in rows])
        probs = prob.detach().float().cpu().numpy()
        each = (time.perf_counter() - t0) / len(rows)
        for r, s, p in zip(rows, states, probs):
            s["prob"] = p
            s["prepared"]["image"] = None  # not needed any more: keep the object store light
            r.update({PAYLOAD: _dump(s), "forward_s": each})

    def __call__(self, batch):
        import pandas as pd

        rows = batch.to_dict("records")
        todo = [r for r in rows if r["status"] != "failed"]
        if todo:
            try:
                self._run(todo)
            except Exception:  # noqa: BLE001 - find the culprit: one at a time
                for i, r in enumerate(todo):
                    try:
                        self._run([r])
                    except Exception as exc:  # noqa: BLE001
                        todo[i].update(_failed(r, "forward", exc))
        return pd.DataFrame(rows, columns=list(batch.columns))


def case_stats(mask: np.ndarray, affine: np.ndarray, prob: np.ndarray, review: ReviewThresholds) -> dict[str, Any]:
    """Volume, components, edge contact, confidence and review flags of one mask."""
    from scipy import ndimage

    voxels = int(np.count_nonzero(mask))
    ml = voxels * abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    flags = []
    components, largest, touches = 0, float("nan"), False
    if voxels:
        box = tuple(slice(int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]),
                          int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1)
                    for d in range(3))
        labels, components = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
        largest = float(np.bincount(labels.ravel())[1:].max() / voxels)
        touches = any(b.start == 0 or b.stop == n for b, n in zip(box, mask.shape))
    inside = prob > 0.5
    confidence = float(prob[inside].mean()) if inside.any() else float("nan")
    if not voxels:
        flags.append("empty")
    else:
        if ml < review.min_ml:
            flags.append("small_volume")
        if ml > review.max_ml:
            flags.append("large_volume")
        if largest < review.min_largest_share:
            flags.append("fragmented")
        if touches:
            flags.append("touches_edge")
        if not math.isnan(confidence) and confidence < review.min_confidence:
            flags.append("low_confidence")
    return {"spleen_ml": round(ml, 3), "components": int(components), "largest_share": largest,
            "touches_edge": bool(touches), "confidence": confidence, "flags": ";".join(flags)}


def _put(local: Path, uri: str) -> None:
    """Move a finished local file to its place (rename locally, upload to s3://)."""
    if storage.is_s3(uri):
        storage.upload(local, uri)
        local.unlink(missing_ok=True)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, uri)


def mask_uri(output: str, case_id: str, fmt: str) -> str:
    return storage.join(output, MASKS, f"{case_id}.{fmt}")


def row_uri(output: str, case_id: str) -> str:
    return storage.join(output, ROWS, f"{case_id}.json")


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k, v) for k, v in ROW_DEFAULTS.items()}


def write_case(row: dict[str, Any], *, output: str, fmt: str, profile: str, model_version: str,
               review: ReviewThresholds) -> dict[str, Any]:
    """Stage 4: the mask in the original geometry, its measurements, the mask file, then the row file."""
    row = {**row, "model_version": model_version, "format": fmt}
    if row["status"] != "failed":
        t0 = time.perf_counter()
        try:
            import torch

            state = pickle.loads(row[PAYLOAD])
            helper = _stage_predictor(profile)
            prepared = _prepared({**state["prepared"], "image": np.zeros(1, np.float32)})
            prob = state["prob"]
            mask = helper.postprocess(torch.from_numpy(prob), prepared)
            # The spleen channel: the last one of the bundle profile's (background, spleen) softmax too.
            row.update(case_stats(mask, prepared.orig_affine, prob[-1], review))
            target = mask_uri(output, row["case_id"], fmt)
            with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
                local = Path(scratch) / f"mask.{fmt}"
                if fmt == "dcm":
                    from .dicom import SegInfo, write_seg

                    write_seg(local, mask, state["meta"], SegInfo(model_version=model_version))
                else:
                    from .predictor import write_mask

                    write_mask(local, mask, prepared.orig_affine)
                _put(local, target)
            row.update(status="ok", output=target, stage="done", write_s=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            row = _failed(row, "write", exc)
    _write_row(public_row(row), output)
    return {**row, PAYLOAD: b""}


def _plain(value: Any) -> Any:
    """numpy scalars (rows that went through pandas) as JSON values."""
    return value.item() if hasattr(value, "item") else str(value)


def _write_row(row: dict[str, Any], output: str) -> None:
    """The row file, last: its presence with status ok means the mask is complete."""
    try:
        with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
            local = Path(scratch) / "row.json"
            local.write_text(json.dumps(row, default=_plain))
            _put(local, row_uri(output, row["case_id"]))
    except Exception as exc:  # noqa: BLE001 - the manifest still gets the row
        log.warning("could not write the row of case %s: %s", row["case_id"], exc)


# ----------------------------------------------------------------------------- driver


def model_version(checkpoint: str, predictor_version: str) -> str:
    """`<name>@epoch<n>#<sha256 of the file, 12 hex>`: two different files never share a version."""
    h = hashlib.sha256()
    with open(storage.fetch(checkpoint), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{predictor_version}#{h.hexdigest()[:12]}"


def finished_rows(output: str, version: str, fmt: str) -> dict[str, dict[str, Any]]:
    """Rows of earlier runs whose mask exists for this model version and format: {case_id: row}."""
    if storage.is_s3(output):
        names = storage.list_objects(storage.join(output, ROWS))
        masks = set(storage.list_objects(storage.join(output, MASKS)))
        rows = []
        with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
            for name in names:
                local = storage.fetch(storage.join(output, ROWS, name), Path(scratch) / name)
                rows.append(Path(local).read_text())
        present = lambda r: f"{r['case_id']}.{fmt}" in masks  # noqa: E731
    else:
        folder = Path(output) / ROWS
        rows = [p.read_text() for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        present = lambda r: Path(mask_uri(output, r["case_id"], fmt)).is_file()  # noqa: E731
    done = {}
    for text in rows:
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue  # a torn row file: redo the case
        if row.get("status") == "ok" and row.get("model_version") == version and row.get("format") == fmt and present(row):
            done[row["case_id"]] = {**ROW_DEFAULTS, **row, "resumed": True}
    return done


def _start_ray(num_cpus: int | None) -> bool:
    """Join RAY_ADDRESS's cluster (its dashboard shows the Data job) or start a local one; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
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
        message = (f"--num-gpus {cfg.num_gpus:g} x --concurrency {cfg.concurrency} needs {need:g} GPU(s); "
                   f"this Ray cluster has {have:g}")
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
        Forward, fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "profile": profile, "use_gpu": cfg.num_gpus > 0},
        batch_size=cfg.batch_size, batch_format="pandas", concurrency=cfg.concurrency,
        num_gpus=cfg.num_gpus or None, num_cpus=None if cfg.num_gpus else 1,
        # A crashed actor restarts a bounded number of times (Ray Data's default is forever, which a
        # case that kills the process would turn into a loop). Being a remote argument the tasks do
        # not share, it also keeps Ray Data from fusing the read and preprocess tasks into the model
        # actor, so they run as parallel tasks instead of serially inside it.
        max_restarts=ACTOR_RESTARTS)
    return ds.map(write_case, fn_kwargs={"output": cfg.output, "fmt": cfg.format, "profile": profile,
                                         "model_version": version, "review": cfg.review}, num_cpus=1, **limit)


def write_manifest(rows: list[dict[str, Any]], output: str) -> tuple[str, str]:
    """`manifest.parquet` (all columns) and `manifest.csv`, written whole (temp file, then rename/upload)."""
    import pandas as pd

    frame = pd.DataFrame([public_row(r) for r in rows], columns=list(ROW_DEFAULTS)).sort_values("case_id")
    out = (storage.join(output, f"{MANIFEST}.parquet"), storage.join(output, f"{MANIFEST}.csv"))
    with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
        parquet, csv = Path(scratch) / "m.parquet", Path(scratch) / "m.csv"
        frame.to_parquet(parquet, index=False)
        frame.to_csv(csv, index=False, float_format="%.4g")
        _put(parquet, out[0])
        _put(csv, out[1])
    return out


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

    from .predictor import Predictor

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
            _check_gpus(cfg, autoscaling=bool(os.environ.get("RAY_ADDRESS")))
            rows += list(_collect(build_dataset(todo, cfg, profile, version), todo, progress))
        finally:
            if started:
                import ray

                ray.shutdown()
    manifest = write_manifest(rows, cfg.output)
    return AnnotateResult(rows=sorted(rows, key=lambda r: r["case_id"]), manifest=manifest, model_version=version,
                          seconds=time.perf_counter() - t0)


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
            yield public_row(_failed(case, "ray", RuntimeError("the Ray task of this case died (e.g. out of memory); "
                                                                "rerun to retry")))


# ----------------------------------------------------------------------------- CLI


def cmd_annotate(args) -> int:
    """`spleen-deepedit annotate`: run the job and print a one-line summary."""
    cfg = AnnotateConfig(input=args.input, output=args.output, checkpoint=args.checkpoint, format=args.format,
                         batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus,
                         read_concurrency=args.read_concurrency, num_cpus=args.num_cpus, profile=args.profile,
                         redo=args.redo)
    result = annotate(cfg)
    ok, failed = result.count("ok", resumed=False), result.count("failed")
    print(f"annotated {len(result.rows)} case(s) in {result.seconds:.1f}s with {result.model_version}: {ok} ok, "
          f"{result.count('ok', resumed=True)} finished earlier, {failed} failed; manifest {result.manifest[0]}")
    for row in result.rows:
        if row["status"] == "failed":
            print(f"  failed {row['case_id']} ({row['stage']}): {row['error']}")
    return 0


def add_parser(sub) -> None:
    """The `annotate` subcommand (argparse only; Ray loads when it runs)."""
    from .cli import _positive_int as positive  # the CLI's one check (cli imports this module lazily)
    from .config import PROFILES

    p = sub.add_parser("annotate", help="pre-annotate a cohort (NIfTI files, DICOM series) on Ray Data; resumable")
    p.add_argument("--input", required=True, help="folder or s3:// prefix: .nii/.nii.gz files, DICOM series folders, .zip series")
    p.add_argument("--output", required=True, help="folder or s3:// prefix: masks/, rows/, manifest.parquet, manifest.csv")
    p.add_argument("--checkpoint", required=True, help="checkpoint URI: local path or s3://")
    p.add_argument("--format", choices=FORMATS, default="nii.gz", help="mask format: nii.gz, or dcm (DICOM SEG; DICOM inputs)")
    p.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE, help="volumes per forward pass")
    p.add_argument("--concurrency", type=positive, default=DEFAULT_CONCURRENCY, help="forward actors")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per forward actor (0: CPU)")
    p.add_argument("--read-concurrency", type=positive, default=None, help="most read/preprocess/write tasks at once")
    p.add_argument("--num-cpus", type=positive, default=None, help="CPUs of the local Ray (without RAY_ADDRESS)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="override the checkpoint's profile")
    p.add_argument("--redo", action="store_true", help="annotate every case again, even those finished with this model")
    p.set_defaults(func=cmd_annotate)
