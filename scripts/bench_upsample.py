"""How faithfully each `upsample` mode maps a grid answer back to the scan, with a perfect network.

For each phantom, the label is area-resized to the profile's grid in RAS (the probability a network
reproducing its soft target would give) and resized back with each mode: `area` (the model zoo's
Invertd), `probability` (trilinear on the probability) and `logit` (trilinear on the logit). The
spleen Dice against the original label is the ceiling of each mode: no model can do better than its
resize back. Usage: `python scripts/bench_upsample.py [--cases 40] [--out benchmarks/upsample.json]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import UPSAMPLE_MODES, get_profile  # noqa: E402
from trainer.metrics import spleen_dice  # noqa: E402
from trainer.predictor import Predictor  # noqa: E402
from trainer.synth import generate_case  # noqa: E402


class _Unused(torch.nn.Module):
    def forward(self, x):  # the benchmark never runs the network
        raise NotImplementedError


def _soft_label(predictor: Predictor, label: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, object]:
    prepared = predictor.preprocess(label.astype(np.float32), affine)
    size = predictor.profile.spatial_size
    ras = torch.from_numpy(
        np.ascontiguousarray(nib.orientations.apply_orientation(label.astype(np.float32), prepared.to_ras))
    )
    soft = F.interpolate(ras[None, None], size=size, mode="area")[0]
    return soft, prepared


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[192, 192, 80], help="phantom grid (a scan larger than the grids)"
    )
    parser.add_argument("--out", default="benchmarks/upsample.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results: dict[str, dict[str, float]] = {}
    for profile_name in ("cpu", "bundle"):
        scores: dict[str, list[float]] = {mode: [] for mode in UPSAMPLE_MODES}
        for i in range(args.cases):
            case = generate_case(np.random.default_rng([args.seed, i]), shape=tuple(args.shape))
            label = case.label > 0
            for mode in UPSAMPLE_MODES:
                profile = dataclasses.replace(get_profile(profile_name), upsample=mode)
                predictor = Predictor(_Unused(), profile, device=torch.device("cpu"))
                soft, prepared = _soft_label(predictor, label, case.affine)
                prob = torch.cat([1 - soft, soft]) if mode == "area" else soft
                mask = predictor.postprocess(prob, prepared).astype(bool)
                scores[mode].append(float(spleen_dice(torch.from_numpy(mask)[None], torch.from_numpy(label)[None])[0]))
        results[profile_name] = {mode: float(np.mean(v)) for mode, v in scores.items()}
        results[profile_name] |= {f"{mode}_min": float(np.min(v)) for mode, v in scores.items()}
        print(profile_name, json.dumps(results[profile_name]))
    out = {
        "cases": args.cases,
        "seed": args.seed,
        "shape": args.shape,
        "machine": platform.processor() or platform.machine(),
        "mean_dice_of_a_perfect_grid_answer": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
