"""Click locality and the nudge: how a click edits the mask of a predictor without refinement.

For checkpoints trained without windows (`trainer.refine`), a click is answered by the whole-scan
grid. The network answers it with its whole output, and a small model trained for minutes also moves
the boundary tens of millimetres away (measured: the median changed voxel lay 20-35 mm from the
click, a third to two thirds of the changes wrong). With `click_radius` R > 0 the returned
probability is the automatic one plus, near spleen clicks, what the clicked pass adds, and minus,
near background clicks, what it removes, weighted by exp(-d^2 / 2R^2) (d in grid voxels):
`p = a + w_spleen * max(c - a, 0) - w_background * max(a - c, 0)`. The weight is also 1 on the whole
connected piece of the change that contains the click (for spleen clicks after an opening, so a
shell one or two voxels thick, the boundary moving out all round, is not a piece): a click in a
wholly missed spleen takes all of it, a click in a false-positive blob removes all of it.

Then the nudge: most remaining errors of a good mask are sheets thinner than one grid voxel along the
boundary, which the network's answer seldom flips. Where the clicked voxel (its exact, fractional grid
position) still has the wrong label, the logit is shifted near it, by a Gaussian of width 1.5 R, just
far enough that the clicked voxel crosses the threshold by `NUDGE_MARGIN`.

Checkpoints trained with windows refine instead (`Predictor(refine=True)`): measured on fresh
phantoms, see docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .clicks import Clicks, click_weight
from .config import CLICK_CHANNELS
from .geometry import LOGIT_EPS

#: Clicks as exact (fractional) network-grid coordinates, for the nudge.
GridPoints = dict[str, list[tuple[float, ...]]]
#: Width of the nudge per unit of click radius (R 2 -> sigma 3 grid voxels: chosen on the held-out
#: set of the demo; sigma 2 left a fall of 0.002 in the mean).
NUDGE_SIGMA_PER_RADIUS = 1.5
#: How far past the threshold a nudged click lands, in logit units (0.2: probability 0.55).
NUDGE_MARGIN = 0.2


def has_clicks(clicks: Mapping[str, list]) -> bool:
    return any(len(points) for points in clicks.values())


def localize(
    auto: torch.Tensor, clicked: torch.Tensor, clicks: Clicks, exact: GridPoints | None, radius: float
) -> torch.Tensor:
    """The automatic probability `auto` (S, S, S) edited near `clicks` by the clicked pass `clicked`."""
    gain, loss = (clicked - auto).clamp(min=0), (auto - clicked).clamp(min=0)
    result = auto.clone()
    if clicks.get("spleen"):
        result += piece_weight(clicks["spleen"], (clicked > 0.5) & (auto <= 0.5), radius, opening=True) * gain
    if clicks.get("background"):
        result -= piece_weight(clicks["background"], (auto > 0.5) & (clicked <= 0.5), radius, opening=False) * loss
    if exact is not None:
        result = nudge(result, exact, NUDGE_SIGMA_PER_RADIUS * radius)
    return result


def piece_weight(
    points: list,
    changed: torch.Tensor,
    radius: float,
    *,
    opening: bool,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Where clicks of one label may change the mask: a Gaussian of `radius` around each click, and
    all of each connected piece of `changed` (what the clicked pass adds, or removes) that contains a
    click. With `opening`, thin parts of `changed` are opened away first. `radius` is in voxels, or
    in mm with `spacing` (the voxel size per axis, `clicks.click_weight`). A click outside `changed`'s
    array takes no piece (its Gaussian still counts)."""
    device, region = changed.device, changed.cpu().numpy()
    weight = click_weight(points, region.shape, radius, spacing=spacing)
    if region.any():
        _take_clicked_pieces(weight, points, region, opening)
    return torch.from_numpy(weight).to(device)


def _take_clicked_pieces(weight: np.ndarray, points: list, changed: np.ndarray, opening: bool) -> None:
    from scipy import ndimage

    cube = np.ones((3, 3, 3), bool)
    # For spleen clicks, an opening first: a shell one or two voxels thick (the clicked pass moving
    # the boundary out all round) is not a piece; a missed spleen is thick and stays. Background
    # clicks take their piece as it is: opened, it left 21 % of false-positive blobs instead of
    # 8 % (tests/test_clicks_work.py's check), for falls of at most 0.0006 (docs/evaluation.md).
    pieces, _ = ndimage.label(ndimage.binary_opening(changed, cube) if opening else changed, structure=cube)
    # The voxel holding each (fractional) click; one outside the array (a window's click beyond its
    # box) holds none. Grid clicks always lie inside their grid.
    rounded = [tuple(int(round(float(v))) for v in q[-3:]) for q in points]
    voxels = [r for r in rounded if all(0 <= v < n for v, n in zip(r, changed.shape))]
    hit = {int(pieces[v]) for v in voxels} - {0}
    if hit:
        weight[np.isin(pieces, sorted(hit))] = 1.0


def nudge(prob: torch.Tensor, points: GridPoints, sigma: float, margin: float = NUDGE_MARGIN) -> torch.Tensor:
    """Shift the logit near each click whose voxel still has the wrong label, so that it has the
    right one by `margin`.

    Args:
        prob: (S, S, S) spleen probability on the network grid.
        points: clicks as fractional grid coordinates (`Predictor.grid_points`).
        sigma: Gaussian width of the shift, in grid voxels.
        margin: how far past the threshold (logit 0) the clicked voxel lands.

    Where clicks of one label overlap, the larger shift counts; spleen and background shifts add.
    """
    from scipy import ndimage

    if sigma <= 0 or not has_clicks(points):
        return prob
    logit = torch.logit(prob.detach().float().clamp(LOGIT_EPS, 1 - LOGIT_EPS)).cpu().numpy()
    sign = {"spleen": 1.0, "background": -1.0}
    shift = {}
    for name in CLICK_CHANNELS:
        wrong, amounts = [], []
        for point in points.get(name, []):
            here = float(ndimage.map_coordinates(logit, np.reshape(point, (3, 1)), order=1, mode="nearest")[0])
            if margin - sign[name] * here > 0:
                wrong.append(point)
                amounts.append(margin - sign[name] * here)
        shift[name] = click_weight(wrong, logit.shape, sigma, scales=amounts, truncate=3.0)
    if not any(s.any() for s in shift.values()):
        return prob
    logit += shift["spleen"] - shift["background"]
    return torch.sigmoid(torch.from_numpy(logit)).to(prob.device, prob.dtype)
