"""What a session click costs with click-centred refinement, as a ratio to one whole-scan grid forward.

For each scan size, a volume is prepared once (as a session upload is) and its automatic pass made;
then each click is timed as the session route runs it: click validation and mapping, the whole-scan
pass (cached), the window forward and the blend back at scan resolution (`Predictor.predict_prepared`).
The reference is one forward of the same network on the whole-scan grid, timed just before each
click (the ratio is the median over the pairs).
Weights are random and their answer is replaced by a fake one, a spleen-sized ball in the middle of
whatever the network saw (`BallAnswer`), so the resize back costs what it costs for a real spleen (a
random network marks half the scan). Usage:
`python scripts/bench_refine.py [--profile cpu] [--repeats 5] [--out benchmarks/refine.json]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.clicks import empty_clicks  # noqa: E402
from trainer.config import get_profile  # noqa: E402
from trainer.network import build_network  # noqa: E402
from trainer.predictor import Predictor  # noqa: E402

#: (name, shape, spacing mm): a compact phantom and two clinical scans (0.7 mm in-plane, 2.5 and 1.25 mm slices).
SCANS = (
    ("compact 112x112x48", (112, 112, 48), (3.5, 3.5, 5.0)),
    ("clinical 512x512x160", (512, 512, 160), (0.7, 0.7, 2.5)),
    ("clinical 512x512x320", (512, 512, 320), (0.7, 0.7, 1.25)),
)


class BallAnswer(torch.nn.Module):
    """A fake network for timing: runs the real one, then answers a ball of a fifth of the view's width."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        axes = [torch.linspace(-1, 1, n) for n in x.shape[-3:]]
        r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        spleen = (0.2 - r2.sqrt()) * 50 + 0 * out[:, 1]
        return torch.stack([-spleen, spleen], dim=1)


def _scan(shape, spacing, rng):
    image = rng.integers(-200, 300, size=shape).astype(np.int16)
    return image, np.diag([*spacing, 1.0])


def measure(profile_name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    profile = get_profile(profile_name)
    predictor = Predictor(BallAnswer(build_network(profile)), profile, device=torch.device("cpu"), refine=True)
    rng = np.random.default_rng(0)
    rows = []
    for name, shape, spacing in SCANS:
        image, affine = _scan(shape, spacing, rng)
        prepared = predictor.preprocess(image, affine)
        predictor.predict_prepared(prepared, None)  # the session's automatic pass (and warm-up)
        clicks = {"spleen": [], "background": []}
        grid_times, click_times, stages = [], [], []
        for k in range(repeats):
            # Each click paired with a grid forward just before it: on a shared machine the speed
            # drifts over seconds, and the ratio of a pair is steadier than a ratio of two medians.
            t0 = time.perf_counter()
            predictor.network([prepared], [empty_clicks()])
            grid_times.append(time.perf_counter() - t0)
            label = "spleen" if k % 2 == 0 else "background"
            clicks[label].append([int(s * (0.4 + 0.05 * k)) for s in shape])
            t0 = time.perf_counter()
            pred = predictor.predict_prepared(prepared, clicks)
            click_times.append(time.perf_counter() - t0)
            stages.append(pred.timings)
        grid, click = statistics.median(grid_times), statistics.median(click_times)
        rows.append(
            {
                "scan": name,
                "grid_forward_s": round(grid, 4),
                "click_round_trip_s": round(click, 4),
                "ratio": round(statistics.median(c / g for c, g in zip(click_times, grid_times)), 3),
                "window_s": round(statistics.median(s["window"] for s in stages), 4),
                "postprocess_s": round(statistics.median(s["postprocess"] for s in stages), 4),
                "fine_volume_mb": round(prepared.fine.element_size() * prepared.fine.nelement() / 2**20, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/refine.json")
    args = parser.parse_args(argv)
    rows = measure(args.profile, args.repeats)
    result = {
        "profile": args.profile,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "target": "click round trip <= 1.5x one grid forward",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Session click with refinement vs one grid forward ({args.profile} profile, {result['torch_threads']} threads)",
        "",
        "| scan | grid forward (s) | click round trip (s) | ratio (median of click / the forward before it) | window (s) | blend + upsample (s) | fine volume (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['scan']} | {r['grid_forward_s']} | {r['click_round_trip_s']} | {r['ratio']} | {r['window_s']} | "
        f"{r['postprocess_s']} | {r['fine_volume_mb']} |"
        for r in rows
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
