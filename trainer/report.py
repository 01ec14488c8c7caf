"""The evaluation report: the summary of per-case results, `per_case.csv`, `summary.json`'s values, the
terminal table and the PNG plots (matplotlib, optional), and the training log they plot."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import DataError

if TYPE_CHECKING:
    from .evaluate import CaseResult

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("case", "clicks", "spleen_dice", "dice_with_background", "hd95_mm", "click")


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
        "dice_by_clicks_min": dice.min(axis=0).tolist(),
        **click_effect(results, dice),
        "hd95_mm_auto": _finite_mean([r.hd95_mm[0] for r in results]),
        "hd95_mm_final": _finite_mean([r.hd95_mm[-1] for r in results]),
        "seconds_per_case": float(np.mean([r.seconds for r in results])),
    }


#: A click "fixes what it touches" when it makes at least this share of its error piece right...
PIECE_FIXED_SHARE = 0.5
#: ...counted for pieces of at least this many voxels (smaller ones are boundary slivers).
PIECE_MIN_VOXELS = 200


def click_effect(results: Sequence[CaseResult], dice: np.ndarray) -> dict[str, Any]:
    """What each click did: the mean Dice gain of the first five clicks, the largest fall of the mean from
    one click to the next, and the share of clicks in an error piece of >= PIECE_MIN_VOXELS voxels that
    made >= PIECE_FIXED_SHARE of it right (issue 17's targets)."""
    means = dice.mean(axis=0)
    gains = np.diff(means)
    big = [
        (n, f)
        for r in results
        for n, f in zip(r.piece_voxels, r.piece_fixed)
        if n is not None and f is not None and n >= PIECE_MIN_VOXELS
    ]
    return {
        "gain_per_click_first5": float(gains[:5].mean()) if len(gains) else None,
        "largest_fall": float(max(0.0, -gains.min())) if len(gains) else 0.0,
        "big_piece_clicks": len(big),
        "big_piece_fixed_share": float(np.mean([f >= PIECE_FIXED_SHARE for _, f in big])) if big else None,
    }


def json_safe(value: Any) -> Any:
    """nan / inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6f}"


def write_per_case_csv(results: Sequence[CaseResult], path: Path) -> None:
    """One row per case and click count; empty hd95_mm where not computed or undefined."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            for count, (d, dbg, hd, click) in enumerate(
                zip(r.spleen_dice, r.dice_with_background, r.hd95_mm, r.clicks)
            ):
                where = "" if click is None else f"{click[0]}:{','.join(str(v) for v in click[1])}"
                writer.writerow([r.case, count, _fmt(d), _fmt(dbg), _fmt(hd), where])


def format_table(summary: dict[str, Any]) -> str:
    """Compact terminal table: clicks -> mean spleen Dice, std, the bundle's background-inclusive Dice."""
    lines = [
        f"{summary['cases']} case(s), split {summary.get('split', '?')}: spleen-only Dice (primary)",
        f"{'clicks':>6}  {'spleen Dice':>11}  {'std':>6}  {'Dice incl. bg':>13}",
    ]
    for n, (d, s, b) in enumerate(
        zip(summary["dice_by_clicks"], summary["dice_by_clicks_std"], summary["dice_with_background_by_clicks"])
    ):
        lines.append(f"{n:>6}  {d:>11.4f}  {s:>6.4f}  {b:>13.4f}")
    if summary.get("big_piece_fixed_share") is not None:
        lines.append(
            f"clicks in error pieces >= {PIECE_MIN_VOXELS} voxels that fixed >= half of them: "
            f"{summary['big_piece_fixed_share']:.0%} of {summary['big_piece_clicks']}; "
            f"mean gain of the first 5 clicks {summary['gain_per_click_first5']:.4f}"
        )
    hd_auto, hd_final = summary["hd95_mm_auto"], summary["hd95_mm_final"]
    lines.append(
        "HD95: auto "
        + ("n/a" if hd_auto is None else f"{hd_auto:.1f} mm")
        + f", after {len(summary['dice_by_clicks']) - 1} clicks "
        + ("n/a" if hd_final is None else f"{hd_final:.1f} mm")
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
    ax.fill_between(
        x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="tab:blue", alpha=0.25, label="±1 std"
    )
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


def write_plots(results: Sequence[CaseResult], training: list[dict[str, Any]] | None, out: Path) -> list[str]:
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
