"""The per-case stages, run in Ray tasks and actors: read -> preprocess -> forward -> write.

Every stage catches its case's errors and returns a failed row (`failed_row`), so one bad case never
fails the job. Arrays travel between stages pickled in the row's `PAYLOAD` column.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from ..errors import SpleenDeepEditError
from .job import PAYLOAD, ReviewThresholds
from .output import case_stats, mask_uri, public_row, put_file, write_row


def _dump(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def failed_row(row: dict[str, Any], stage: str, exc: BaseException) -> dict[str, Any]:
    """`row` marked failed at `stage` with the error's message (no payload)."""
    # A user-facing error (bad data, settings, storage) says itself what to fix; anything else gets its type for the log.
    user = isinstance(exc, (SpleenDeepEditError, FileNotFoundError))
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
            from ..data import DataError

            raise DataError(
                f"{row['source']}: --format dcm writes a DICOM SEG that references its source "
                "series, and this case is NIfTI: use --format nii.gz for NIfTI inputs"
            )
        with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
            path = _local_case(row, input_uri, Path(scratch))
            if row["kind"] == "nifti":
                from ..predictor import load_volume

                image, affine = load_volume(path)
                meta = None
            else:
                from ..dicom import read_series

                image, affine, meta = read_series(path)
        payload = {"image": image, "affine": affine, "meta": meta if fmt == "dcm" else None}
        return {
            **row,
            "shape": "x".join(str(s) for s in image.shape),
            "read_s": time.perf_counter() - t0,
            PAYLOAD: _dump(payload),
        }
    except Exception as exc:  # noqa: BLE001 - one bad case is a failed row
        return failed_row(row, "read", exc)


_HELPERS: dict[str, Any] = {}


def _stage_predictor(profile: str):
    """A Predictor for the CPU stages, which use only its preprocessing and postprocessing (no weights):
    built once per worker process, with a placeholder network."""
    if profile not in _HELPERS:
        import torch

        from ..config import get_profile
        from ..predictor import Predictor

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
        out = {
            "prepared": {
                "image": prepared.image.numpy(),
                "orig_shape": prepared.orig_shape,
                "orig_affine": prepared.orig_affine,
                "to_ras": prepared.to_ras,
                "ras_shape": prepared.ras_shape,
                "index_to_ras": prepared.index_to_ras,
            },
            "meta": payload["meta"],
        }
        return {**row, "preprocess_s": time.perf_counter() - t0, PAYLOAD: _dump(out)}
    except Exception as exc:  # noqa: BLE001
        return failed_row(row, "preprocess", exc)


def _prepared(state: dict[str, Any]):
    import torch

    from ..predictor import Prepared

    return Prepared(**{**state, "image": torch.from_numpy(state["image"])})


class Forward:
    """Stage 3 (actor pool): the network on a batch of prepared volumes -> spleen probability."""

    def __init__(self, checkpoint: str, profile: str, use_gpu: bool):
        import torch

        from ..predictor import Predictor

        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.predictor = Predictor.from_checkpoint(checkpoint, profile=profile, device=device)

    def _run(self, rows: list[dict[str, Any]]) -> None:
        """Forward `rows` together; the rows change only if the whole batch succeeded."""
        from ..clicks import empty_clicks

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
                        todo[i].update(failed_row(r, "forward", exc))
        return pd.DataFrame(rows, columns=list(batch.columns))


def write_case(
    row: dict[str, Any], *, output: str, fmt: str, profile: str, model_version: str, review: ReviewThresholds
) -> dict[str, Any]:
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
                    from ..dicom import SegInfo, write_seg

                    write_seg(local, mask, state["meta"], SegInfo(model_version=model_version))
                else:
                    from ..predictor import write_mask

                    write_mask(local, mask, prepared.orig_affine)
                put_file(local, target)
            row.update(status="ok", output=target, stage="done", write_s=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            row = failed_row(row, "write", exc)
    write_row(public_row(row), output)
    return {**row, PAYLOAD: b""}
