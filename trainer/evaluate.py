"""Evaluation: spleen Dice versus the number of simulated corrective clicks.

Reports what the bundle's single "mean Dice 0.97" hides (spec §7.3, §7.4): the **spleen-only** Dice of
the automatic pass (0 clicks) and after 1..N corrective clicks, each click placed where the current
mask is most wrong, as in DeepEdit training (Diaz-Pinto et al., MICCAI DALI 2022; spec §4). The
bundle's background-inclusive mean Dice is kept as a second, labelled number; Hausdorff-95 (mm) is
computed on the automatic and the final mask.

Masks come from the one `Predictor` (nnU-Net's rule: evaluation reuses inference), compared with the
label in the original voxel space; clicks are original voxel indices, exactly what a user would send.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .clicks import Point, _sample_deep_point, as_point
from .config import CLICK_CHANNELS, ConfigError
from .data import DataError, check_arrays, list_dataset
from .metrics import mean_dice_with_background, spleen_dice
from .predictor import Predictor, load_volume
from .storage import fetch

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("val", "test", "all")
CSV_COLUMNS: tuple[str, ...] = ("case", "clicks", "spleen_dice", "dice_with_background", "hd95_mm", "click")


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
        seconds: wall time spent on the case.
    """

    case: str
    spleen_dice: list[float] = field(default_factory=list)
    dice_with_background: list[float] = field(default_factory=list)
    hd95_mm: list[float | None] = field(default_factory=list)
    clicks: list[tuple[str, Point] | None] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- click simulation


def next_click(mask: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[str, Point] | None:
    """The corrective click a user would make next, or None when the mask is exact.

    A user clicks on the biggest mistake: the largest connected piece of missed spleen (label and not
    mask; a "spleen" click) or of over-segmentation (mask and not label; a "background" click), not
    a scattered union of thin boundary slivers. The voxel is sampled deep inside that piece, with
    probability proportional to exp(d) - 1 (d: chessboard distance to its edge), as the training
    clicks are (spec §4). Ties go to the missed spleen.
    """
    mask = mask.astype(bool, copy=False)
    label = label.astype(bool, copy=False)
    missed = _largest_piece(label & ~mask)
    extra = _largest_piece(mask & ~label)
    n_missed, n_extra = int(missed.sum()), int(extra.sum())
    if n_missed == 0 and n_extra == 0:
        return None
    name, region = ("spleen", missed) if n_missed >= n_extra else ("background", extra)
    point = _sample_deep_point(region, rng)
    return name, as_point(point)  # the region is not empty: a point


def _largest_piece(region: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself if it has one or none)."""
    from scipy import ndimage

    comps, n = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return region
    sizes = np.bincount(comps.ravel())[1:]
    return comps == int(np.argmax(sizes)) + 1


def hd95_mm(mask: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI); nan if either mask is empty."""
    from monai.metrics import compute_hausdorff_distance

    mask = np.asarray(mask, dtype=bool)
    label = np.asarray(label, dtype=bool)
    if not mask.any() or not label.any():
        return float("nan")
    pred_t = torch.from_numpy(mask)[None, None]
    label_t = torch.from_numpy(label)[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated `get_mask_edges(always_return_as_numpy=...)` internally.
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            pred_t, label_t, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return float(value.reshape(-1)[0])


def _case_seed(seed: int, name: str) -> np.random.Generator:
    # Seeded by the case name, not its position: a case gets the same clicks in any split or order.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _case_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load_case(pair: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, affine and boolean label of one case, checked as training checks them (same grid, 0/1)."""
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
            if click is not None:
                clicks[click[0]].append(click[1])
                mask = predictor.predict_prepared(prepared, clicks).mask
            result.spleen_dice.append(float(spleen_dice(mask, label)[0]))
            result.dice_with_background.append(float(mean_dice_with_background(mask, label)[0]))
        result.clicks.append(click)
        result.hd95_mm.append(hd95_mm(mask, label, spacing) if count in (0, max_clicks) else None)
    result.seconds = time.perf_counter() - t0
    return result


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
        log.info("case %d/%d %s: auto %.4f, %d clicks %.4f (%.1fs)", n, len(cases), name,
                 res.spleen_dice[0], max_clicks, res.spleen_dice[-1], res.seconds)
        results.append(res)
    return results


# ----------------------------------------------------------------------------- cases


def select_cases(data_dir: str | Path, split: str = "val", val_fraction: float = 0.2) -> list[dict[str, str]]:
    """Labelled cases of a split: `val` (the training split's validation part), `test`
    (imagesTs with labels from labelsTs/ of the same file name) or `all` (every labelled case)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    ds = list_dataset(data_dir)
    if split == "val":
        return ds.split(val_fraction)[1]
    if split == "all":
        if not ds.labelled:
            raise DataError(f"{ds.root}: no labelled cases in imagesTr/labelsTr")
        return list(ds.labelled)
    labels_dir = ds.root / "labelsTs"
    if not labels_dir.is_dir():
        raise DataError(f"{str(labels_dir)!r} is missing: the test split needs labels for imagesTs/ in labelsTs/ (same file names)")
    if not ds.test:
        raise DataError(f"{ds.root}: no test images in imagesTs/")
    cases = []
    for image in ds.test:
        label = labels_dir / Path(image).name
        if not label.is_file():
            raise DataError(f"{image}: no label {str(label)!r} in labelsTs/")
        cases.append({"image": str(image), "label": str(label)})
    return cases


# ----------------------------------------------------------------------------- report


def _finite_mean(values: Sequence[float | None]) -> float | None:
    good = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(good)) if good else None


def summarize(results: Sequence[CaseResult], **meta: Any) -> dict[str, Any]:
    """Means over cases per click count; `meta` (split, checkpoint, ...) is added as is."""
    dice = np.array([r.spleen_dice for r in results], dtype=np.float64)
    with_bg = np.array([r.dice_with_background for r in results], dtype=np.float64)
    return {
        **meta,
        "cases": len(results),
        "case_names": [r.case for r in results],
        "primary_metric": "spleen-only Dice",
        "dice_auto": float(dice[:, 0].mean()),
        "dice_final": float(dice[:, -1].mean()),
        "dice_by_clicks": dice.mean(axis=0).tolist(),
        "dice_by_clicks_std": dice.std(axis=0).tolist(),
        # The bundle's "mean Dice" (background and spleen averaged): secondary, not comparable.
        "dice_with_background_by_clicks": with_bg.mean(axis=0).tolist(),
        "hd95_mm_auto": _finite_mean([r.hd95_mm[0] for r in results]),
        "hd95_mm_final": _finite_mean([r.hd95_mm[-1] for r in results]),
        "seconds_per_case": float(np.mean([r.seconds for r in results])),
    }


def _json_safe(value: Any) -> Any:
    """nan / inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6f}"


def write_per_case_csv(results: Sequence[CaseResult], path: Path) -> None:
    """One row per case and click count; empty hd95_mm where not computed or undefined."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            for count, (d, dbg, hd, click) in enumerate(zip(r.spleen_dice, r.dice_with_background, r.hd95_mm, r.clicks)):
                where = "" if click is None else f"{click[0]}:{','.join(str(v) for v in click[1])}"
                writer.writerow([r.case, count, _fmt(d), _fmt(dbg), _fmt(hd), where])


def format_table(summary: dict[str, Any]) -> str:
    """Compact terminal table: clicks -> mean spleen Dice, std, the bundle's background-inclusive Dice."""
    lines = [
        f"{summary['cases']} case(s), split {summary.get('split', '?')}: spleen-only Dice (primary)",
        f"{'clicks':>6}  {'spleen Dice':>11}  {'std':>6}  {'Dice incl. bg':>13}",
    ]
    for n, (d, s, b) in enumerate(zip(summary["dice_by_clicks"], summary["dice_by_clicks_std"],
                                      summary["dice_with_background_by_clicks"])):
        lines.append(f"{n:>6}  {d:>11.4f}  {s:>6.4f}  {b:>13.4f}")
    hd_auto, hd_final = summary["hd95_mm_auto"], summary["hd95_mm_final"]
    lines.append(
        "HD95: auto " + ("n/a" if hd_auto is None else f"{hd_auto:.1f} mm")
        + f", after {len(summary['dice_by_clicks']) - 1} clicks " + ("n/a" if hd_final is None else f"{hd_final:.1f} mm")
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by Agg, without pyplot's global state (matplotlib is optional)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def plot_dice_vs_clicks(results: Sequence[CaseResult], path: Path) -> None:
    """Mean spleen Dice per click count with the +-1 std band and the min-max range."""
    dice = np.array([r.spleen_dice for r in results], dtype=np.float64)
    x = np.arange(dice.shape[1])
    mean, std = dice.mean(axis=0), dice.std(axis=0)
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    ax.fill_between(x, dice.min(axis=0), dice.max(axis=0), color="tab:blue", alpha=0.12, label="min-max")
    ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="tab:blue", alpha=0.25, label="±1 std")
    ax.plot(x, mean, "o-", color="tab:blue", label=f"mean ({len(results)} cases)")
    ax.set(xlabel="simulated corrective clicks", ylabel="spleen Dice", ylim=(0, 1.02), title="Spleen Dice vs clicks")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """Epoch records of a training `metrics.jsonl`; a resumed run's repeated epochs keep the last."""
    path = Path(path)
    by_epoch: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{n}: not a metrics record (one JSON object with 'epoch' per line)") from None
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_training_curves(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Three panels, as on the bundle's model card: loss, train Dice, validation Dice per epoch."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10.0, 3.0)
    panels = (("loss", "training loss"), ("train_dice", "train Dice"), ("val_dice", "validation spleen Dice"))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-" if len(points) < 30 else "-", markersize=3)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _write_plots(results: Sequence[CaseResult], training: list[dict[str, Any]] | None, out: Path) -> list[str]:
    try:
        import matplotlib  # noqa: F401  (optional dependency: the `plots` extra)
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'spleen-deepedit[plots]'): no PNG plots")
        return []
    written = ["dice_vs_clicks.png"]
    plot_dice_vs_clicks(results, out / "dice_vs_clicks.png")
    if training:
        plot_training_curves(training, out / "training_curves.png")
        written.append("training_curves.png")
    return written


# ----------------------------------------------------------------------------- entry points


def _training_log(checkpoint: str | Path, metrics_log: str | Path | None) -> tuple[Path | None, list[dict[str, Any]] | None]:
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


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    split: str = "val",
    max_clicks: int = 10,
    profile: str | None = None,
    device: torch.device | None = None,
    metrics_log: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    click_radius: float | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset split and write the report into `output_dir`.

    Writes `per_case.csv`, `summary.json`, `dice_vs_clicks.png` and, when a training metrics log is
    found, `training_curves.png`; prints a compact table.

    Args:
        checkpoint: our checkpoint or a bundle `model.pt`.
        data_dir: Decathlon dataset directory.
        output_dir: report directory (created).
        split: `val`, `test` or `all` (see `select_cases`).
        max_clicks: corrective clicks after the automatic pass.
        profile: override the checkpoint's profile.
        device: torch device (default: CUDA if available).
        click_radius: click locality radius in grid voxels (default: the profile's; 0 = off).
        metrics_log: training `metrics.jsonl` to plot (default: `<checkpoint dir>/../metrics.jsonl`).
        seed: click-sampling seed.
        val_fraction: validation fraction of the `val` split (as in training).

    Returns:
        The summary written to `summary.json` (nan as None).
    """
    if max_clicks < 0:
        raise ConfigError(f"max_clicks must be >= 0, got {max_clicks}")
    # Everything a user can get wrong is checked before the (long) evaluation starts.
    cases = select_cases(data_dir, split, val_fraction)
    local = fetch(checkpoint)  # local, file:// or s3://: the training log is looked for beside the file
    log_path, training = _training_log(local, metrics_log)
    predictor = Predictor.from_checkpoint(local, profile=profile, device=device, click_radius=click_radius)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    results = evaluate(predictor, cases, max_clicks=max_clicks, seed=seed)
    summary = summarize(
        results,
        split=split,
        checkpoint=str(checkpoint),
        model_version=predictor.version,
        profile=predictor.profile.name,
        click_radius=predictor.click_radius,
        upsample=predictor.profile.upsample,
        max_clicks=max_clicks,
        seed=seed,
        metrics_log=None if log_path is None else str(log_path),
    )
    write_per_case_csv(results, out / "per_case.csv")
    summary["plots"] = _write_plots(results, training, out)
    summary = _json_safe(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    return summary


def cmd_evaluate(args) -> int:
    """`spleen-deepedit evaluate`: run `evaluate_checkpoint` with the parsed arguments."""
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as exc:
        raise ConfigError(f"--device {args.device!r} is not a torch device ({exc})") from None
    evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.output,
        split=args.split,
        max_clicks=args.max_clicks,
        profile=args.profile,
        device=device,
        metrics_log=args.metrics_log,
        click_radius=args.click_radius,
    )
    print(f"report written to {args.output}", flush=True)
    return 0
