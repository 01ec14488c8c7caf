"""What a run leaves behind: per-case measurements and review flags, mask and row files, the manifest.

A row file is written last (after its mask), so its presence with status `ok` marks a finished case;
`finished_rows` reads them back to resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from .job import MANIFEST, MASKS, ROW_DEFAULTS, ROWS, ReviewThresholds

log = logging.getLogger(__name__)


def case_stats(mask: np.ndarray, affine: np.ndarray, prob: np.ndarray, review: ReviewThresholds) -> dict[str, Any]:
    """Volume, components, edge contact, confidence and review flags of one mask."""
    from scipy import ndimage

    voxels = int(np.count_nonzero(mask))
    ml = voxels * abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    flags = []
    components, largest, touches = 0, float("nan"), False
    if voxels:
        box = tuple(
            slice(
                int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]),
                int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1,
            )
            for d in range(3)
        )
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
    return {
        "spleen_ml": round(ml, 3),
        "components": int(components),
        "largest_share": largest,
        "touches_edge": bool(touches),
        "confidence": confidence,
        "flags": ";".join(flags),
    }


def put_file(local: Path, uri: str) -> None:
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


def _plain(value: Any) -> Any:
    """numpy scalars (rows that went through pandas) as JSON values."""
    return value.item() if hasattr(value, "item") else str(value)


def write_row(row: dict[str, Any], output: str) -> None:
    """The row file, last: its presence with status ok means the mask is complete."""
    try:
        with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
            local = Path(scratch) / "row.json"
            local.write_text(json.dumps(row, default=_plain))
            put_file(local, row_uri(output, row["case_id"]))
    except Exception as exc:  # noqa: BLE001 - the manifest still gets the row
        log.warning("could not write the row of case %s: %s", row["case_id"], exc)


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
        if (
            row.get("status") == "ok"
            and row.get("model_version") == version
            and row.get("format") == fmt
            and present(row)
        ):
            done[row["case_id"]] = {**ROW_DEFAULTS, **row, "resumed": True}
    return done


def write_manifest(rows: list[dict[str, Any]], output: str) -> tuple[str, str]:
    """`manifest.parquet` (all columns) and `manifest.csv`, written whole (temp file, then rename/upload)."""
    import pandas as pd

    frame = pd.DataFrame([public_row(r) for r in rows], columns=list(ROW_DEFAULTS)).sort_values("case_id")
    out = (storage.join(output, f"{MANIFEST}.parquet"), storage.join(output, f"{MANIFEST}.csv"))
    with tempfile.TemporaryDirectory(prefix="annotate-") as scratch:
        parquet, csv = Path(scratch) / "m.parquet", Path(scratch) / "m.csv"
        frame.to_parquet(parquet, index=False)
        frame.to_csv(csv, index=False, float_format="%.4g")
        put_file(parquet, out[0])
        put_file(csv, out[1])
    return out
