"""Evaluation: spleen Dice versus the number of simulated corrective clicks.

Reports what the bundle's single "mean Dice 0.97" hides (spec §7.3, §7.4): the **spleen-only** Dice of
the automatic pass (0 clicks) and after 1..N corrective clicks, each click placed where the current
mask is most wrong, as in DeepEdit training (Diaz-Pinto et al., MICCAI DALI 2022; spec §4). The
bundle's background-inclusive mean Dice is kept as a second, labelled number; Hausdorff-95 (mm) is
computed on the automatic and the final mask.

Masks come from the one `Predictor` (nnU-Net's rule: evaluation reuses inference), compared with the
label in the original voxel space; clicks are original voxel indices, exactly what a user would send.
The clicks are `trainer.clicks.next_click`, the metrics `trainer.metrics`, the files and plots
`trainer.report`; the command is `trainer.cli`'s.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .clicks import Point, next_click
from .config import CLICK_CHANNELS, DEFAULT_VAL_FRACTION, EVAL_SPLITS, ConfigError, EvaluateConfig
from .data import DataError, check_arrays, list_dataset, load_volume
from .metrics import hd95_mm, mean_dice_with_background, spleen_dice
from .network import load_model
from .predictor import Predictor
from .report import format_table, json_safe, read_metrics_log, summarize, write_per_case_csv, write_plots
from .storage import fetch

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class CaseResult:
    """Metrics of one case at 0..max_clicks clicks (list index = number of clicks).

    Attributes:
        case: case name (image file name without the NIfTI suffix).
        spleen_dice: spleen-only Dice (the primary metric).
        dice_with_background: the bundle's mean of background and spleen Dice (secondary).
        hd95_mm: 95th-percentile Hausdorff distance in mm; None where not computed (only the automatic
            and the final mask are), nan where undefined (an empty mask).
        clicks: the click added to reach each count, as (label, (i, j, k)); None at 0 clicks and after
            the mask became exact (later counts repeat the last values).
        piece_voxels: per click count, the size of the error piece the click was placed in (None at 0
            clicks and after the mask became exact).
        piece_fixed: per click count, the fraction of that piece the click's mask got right.
        seconds: wall time spent on the case.
    """

    case: str
    spleen_dice: list[float] = field(default_factory=list)
    dice_with_background: list[float] = field(default_factory=list)
    hd95_mm: list[float | None] = field(default_factory=list)
    clicks: list[tuple[str, Point] | None] = field(default_factory=list)
    piece_voxels: list[int | None] = field(default_factory=list)
    piece_fixed: list[float | None] = field(default_factory=list)
    seconds: float = 0.0


def _case_seed(seed: int, name: str) -> np.random.Generator:
    # Seeded by the case name, not its position: a case gets the same clicks in any split or order.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _case_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dicom_image_path(image: str | Path) -> Path:
    """Where a NIfTI image's DICOM series lies in a dataset (`synth --dicom`'s layout):
    `DATA/imagesTr/case.nii.gz` -> `DATA/dicom/imagesTr/case/`."""
    image = Path(image)
    return image.parent.parent / "dicom" / image.parent.name / _case_name(image)


def with_dicom_images(cases: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """`cases` with each image replaced by its DICOM series folder (labels stay NIfTI); DataError if one is missing."""
    out = []
    for pair in cases:
        folder = dicom_image_path(pair["image"])
        if not folder.is_dir():
            raise DataError(
                f"{str(folder)!r} is missing: --dicom reads each image from DATA/dicom/<imagesTr|imagesTs>/<case>/ "
                "(one CT series per case, as `spleen-deepedit synth --dicom` writes it); put the series there"
            )
        out.append({**pair, "image": str(folder)})
    return out


def _label_on_grid(label: np.ndarray, label_affine: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label flipped/permuted onto an image grid of the same voxels in another array order (a DICOM
    series sorts its slices along the normal, which may reverse the NIfTI's k); no resampling."""
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.io_orientation(label_affine), ornt.io_orientation(affine))
    if (transform == [[0, 1], [1, 1], [2, 1]]).all():
        return label, label_affine
    moved = ornt.apply_orientation(label, transform)
    return moved, label_affine @ ornt.inv_ornt_aff(transform, label.shape)


def _load_case(pair: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, affine and boolean label of one case, checked as training checks them (same grid, 0/1).

    The image may be a DICOM series folder (`--dicom`); its label is then brought to the series' array order."""
    if Path(pair["image"]).is_dir():
        from .dicom import read_volume_any

        image, affine, _ = read_volume_any(pair["image"])
        label, label_affine = load_volume(pair["label"])
        label, label_affine = _label_on_grid(label, label_affine, affine)
    else:
        image, affine = load_volume(pair["image"])
        label, label_affine = load_volume(pair["label"])
    check_arrays(image, label, affine, label_affine, pair["image"], pair["label"])
    return image, affine, label > 0.5


def evaluate_case(predictor: Any, pair: dict[str, str], *, max_clicks: int, rng: np.random.Generator) -> CaseResult:
    """Automatic pass, then up to `max_clicks` corrective clicks, one forward each."""
    t0 = time.perf_counter()
    image, affine, label = _load_case(pair)
    spacing = nib.affines.voxel_sizes(affine)
    prepared = predictor.preprocess(image, affine)
    result = CaseResult(case=_case_name(pair["image"]))
    clicks: dict[str, list[Point]] = {name: [] for name in CLICK_CHANNELS}
    mask = predictor.predict_prepared(prepared, clicks).mask
    exact = False
    for count in range(max_clicks + 1):
        click = next_click(mask, label, rng) if count > 0 and not exact else None
        if count > 0 and click is None:  # exact mask: nothing left to correct, repeat the last values
            exact = True
            result.spleen_dice.append(result.spleen_dice[-1])
            result.dice_with_background.append(result.dice_with_background[-1])
        else:
            piece = None
            if click is not None:
                piece = error_piece(mask, label, click)
                clicks[click[0]].append(click[1])
                mask = predictor.predict_prepared(prepared, clicks).mask
            result.spleen_dice.append(float(spleen_dice(mask, label)[0]))
            result.dice_with_background.append(float(mean_dice_with_background(mask, label)[0]))
        result.clicks.append(click)
        result.piece_voxels.append(None if piece is None else int(piece.sum()))
        result.piece_fixed.append(None if piece is None or click is None else piece_fixed(mask, piece, click[0]))
        result.hd95_mm.append(hd95_mm(mask, label, spacing) if count in (0, max_clicks) else None)
    result.seconds = time.perf_counter() - t0
    return result


def error_piece(mask: np.ndarray, label: np.ndarray, click: tuple[str, Point]) -> np.ndarray:
    """The connected piece of the error a click was placed in (missed spleen for a spleen click,
    over-segmentation for a background click), 26-connected, as a boolean mask."""
    from scipy import ndimage

    error = (label & ~(mask > 0)) if click[0] == "spleen" else ((mask > 0) & ~label)
    pieces, _ = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    return pieces == pieces[tuple(click[1])]


def piece_fixed(mask: np.ndarray, piece: np.ndarray, name: str) -> float:
    """The share of an error piece that `mask` now gets right (spleen for a spleen click)."""
    return float((mask[piece] > 0).mean() if name == "spleen" else (mask[piece] == 0).mean())


def evaluate(predictor: Any, cases: Sequence[dict[str, str]], *, max_clicks: int, seed: int = 0) -> list[CaseResult]:
    """Evaluate `predictor` on labelled cases with 0..max_clicks simulated clicks.

    Args:
        predictor: a `Predictor` (or anything with its `preprocess` / `predict_prepared`).
        cases: `[{"image": path, "label": path}]`.
        max_clicks: corrective clicks after the automatic pass (0: automatic only).
        seed: seed of the click sampling; each case draws from its own generator.

    Returns:
        One CaseResult per case, in the given order.
    """
    if max_clicks < 0:
        raise ConfigError(f"max_clicks must be >= 0, got {max_clicks}")
    if not cases:
        raise DataError("no cases to evaluate")
    results = []
    for n, pair in enumerate(cases, 1):
        name = _case_name(pair["image"])
        res = evaluate_case(predictor, pair, max_clicks=max_clicks, rng=_case_seed(seed, name))
        log.info(
            "case %d/%d %s: auto %.4f, %d clicks %.4f (%.1fs)",
            n,
            len(cases),
            name,
            res.spleen_dice[0],
            max_clicks,
            res.spleen_dice[-1],
            res.seconds,
        )
        results.append(res)
    return results


@dataclass(frozen=True, slots=True)
class BlobClick:
    """One background click at the centre of a false-positive blob (`trainer.synth.blobs`).

    Attributes:
        case: case name.
        before: blob voxels the automatic mask takes for spleen.
        after: blob voxels still spleen after the click.
        spleen_before: spleen Dice of the automatic mask, blob excluded.
        spleen_after: the same after the click (what the click did to the spleen itself).
    """

    case: str
    before: int
    after: int
    spleen_before: float
    spleen_after: float


def blob_clicks(
    predictor: Any, cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], *, taken_per_case: int = 2
) -> list[BlobClick]:
    """Put spleen-like blobs beside the spleen of each `(name, image, affine, bool label)` case, and for each
    one the automatic mask takes for spleen (at least 30 % of it; up to `taken_per_case` per case), click
    background at its centre: how much of the blob goes, and what happens to the spleen."""
    from .synth.blobs import false_positive_blobs

    clicks = []
    for i, (name, image, affine, label) in enumerate(cases):
        taken = 0
        for with_blob, blob, centre in false_positive_blobs(image, affine, label, np.random.default_rng(i)):
            auto = predictor.predict(with_blob, affine).mask.astype(bool)
            before = int((auto & blob).sum())
            if before < 0.3 * blob.sum():  # not taken for spleen: no false positive here
                continue
            clicked = predictor.predict(with_blob, affine, {"background": [centre]}).mask.astype(bool)
            clicks.append(
                BlobClick(
                    case=name,
                    before=before,
                    after=int((clicked & blob).sum()),
                    spleen_before=float(spleen_dice(auto & ~blob, label)[0]),
                    spleen_after=float(spleen_dice(clicked & ~blob, label)[0]),
                )
            )
            taken += 1
            if taken == taken_per_case:
                break
    return clicks


# ----------------------------------------------------------------------------- cases


def select_cases(
    data_dir: str | Path, split: str = "val", val_fraction: float = DEFAULT_VAL_FRACTION
) -> list[dict[str, str]]:
    """Labelled cases of a split: `val` (the training split's validation part), `test`
    (imagesTs with labels from labelsTs/ of the same file name) or `all` (every labelled case)."""
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    ds = list_dataset(data_dir)
    if split == "val":
        return ds.split(val_fraction)[1]
    if split == "all":
        if not ds.labelled:
            raise DataError(f"{ds.root}: no labelled cases in imagesTr/labelsTr")
        return list(ds.labelled)
    labels_dir = ds.root / "labelsTs"
    if not labels_dir.is_dir():
        raise DataError(
            f"{str(labels_dir)!r} is missing: the test split needs labels for imagesTs/ in labelsTs/ (same file names)"
        )
    if not ds.test:
        raise DataError(f"{ds.root}: no test images in imagesTs/")
    cases = []
    for image in ds.test:
        label = labels_dir / Path(image).name
        if not label.is_file():
            raise DataError(f"{image}: no label {str(label)!r} in labelsTs/")
        cases.append({"image": str(image), "label": str(label)})
    return cases


# ----------------------------------------------------------------------------- entry points


def _training_log(
    checkpoint: str | Path, metrics_log: str | Path | None
) -> tuple[Path | None, list[dict[str, Any]] | None]:
    """The metrics log named by the user (must exist), else `<checkpoint dir>/../metrics.jsonl` if any."""
    if metrics_log is not None:
        path = Path(metrics_log)
        if not path.is_file():
            raise DataError(f"metrics log {str(path)!r} does not exist: pass the metrics.jsonl written by training")
    else:
        path = Path(checkpoint).resolve().parent.parent / "metrics.jsonl"
        if not path.is_file():
            return None, None
    return path, read_metrics_log(path)


def _device(name: str | None) -> torch.device | None:
    try:
        return torch.device(name) if name else None
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device ({exc}): use cpu, cuda or cuda:N") from None


def evaluate_checkpoint(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split and write the report into `config.output_dir`.

    Writes `per_case.csv`, `summary.json`, `dice_vs_clicks.png` and, when a training metrics log is
    found, `training_curves.png`; prints a compact table.

    Returns:
        The summary written to `summary.json` (nan as None).
    """
    c = config
    device = _device(c.device)
    # Everything a user can get wrong is checked before the (long) evaluation starts.
    local = fetch(c.checkpoint)  # local, file:// or s3://: the training log is looked for beside the file
    loaded = load_model(local, profile=c.profile)
    val_fraction = c.val_fraction
    if val_fraction is None:  # the split training validated on, not a restated default
        val_fraction = float((loaded.checkpoint.config or {}).get("val_fraction") or DEFAULT_VAL_FRACTION)
    cases = select_cases(c.data_dir, c.split, val_fraction)
    if c.dicom:
        cases = with_dicom_images(cases)
    log_path, training = _training_log(local, c.metrics_log)
    predictor = Predictor.from_loaded(loaded, device=device, click_radius=c.click_radius, refine=c.refine)
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    results = evaluate(predictor, cases, max_clicks=c.max_clicks, seed=c.seed)
    summary = summarize(
        results,
        split=c.split,
        checkpoint=str(c.checkpoint),
        model_version=predictor.version,
        profile=predictor.profile.name,
        click_radius=predictor.click_radius,
        refine=predictor.refine,
        upsample=predictor.profile.upsample,
        max_clicks=c.max_clicks,
        seed=c.seed,
        metrics_log=None if log_path is None else str(log_path),
    )
    write_per_case_csv(results, out / "per_case.csv")
    summary["plots"] = write_plots(results, training, out)
    summary = json_safe(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary
