#!/usr/bin/env python
"""One background click on a false-positive blob beside the spleen: how much of the blob goes, and what
the click does to the spleen, refined and with whole-scan click locality (`trainer.evaluate.blob_clicks`).

The blobs are spleen-like nodules 0-5 mm from the spleen (`trainer.synth.blobs`), put into the labelled
cases of a dataset's split; a case contributes up to 2 blobs its automatic mask takes for spleen.
Usage: `python scripts/blob_clicks.py --checkpoint C --data D [--split test] [--cases 12] [--refine-radius-mm 0]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import load_volume  # noqa: E402
from trainer.evaluate import blob_clicks, select_cases  # noqa: E402
from trainer.network import load_model  # noqa: E402
from trainer.predictor import Predictor  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", type=int, default=12, help="the first N cases of the split")
    parser.add_argument("--refine-radius-mm", type=float, default=None, help="refinement's click locality (mm)")
    args = parser.parse_args(argv)
    cases = []
    for pair in select_cases(args.data, args.split)[: args.cases]:
        image, affine = load_volume(pair["image"])
        cases.append((Path(pair["image"]).name, image, affine, load_volume(pair["label"])[0] > 0.5))
    loaded = load_model(args.checkpoint)
    for refine in (True, False):
        predictor = Predictor.from_loaded(loaded, refine=refine, device=torch.device("cpu"))
        if refine and args.refine_radius_mm is not None:
            predictor.refine_radius_mm = args.refine_radius_mm
        clicks = blob_clicks(predictor, cases)
        lost = np.array([c.spleen_before - c.spleen_after for c in clicks])
        left = sum(c.after for c in clicks) / max(sum(c.before for c in clicks), 1)
        print(
            f"{'refined' if refine else f'whole-scan, click radius {predictor.click_radius:g}'}: {len(clicks)} blobs taken "
            f"for spleen; one click left "
            f"{left:.0%} of their voxels; the spleen lost > 0.02 Dice on {int((lost > 0.02).sum())} "
            f"(mean {lost.mean() if len(lost) else 0:.3f}, largest {lost.max() if len(lost) else 0:.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
