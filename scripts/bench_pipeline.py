#!/usr/bin/env python
"""Pipeline benchmarks against MONAI's own DeepEdit path, as ratios measured in one run.

- guidance encoding at 128^3: ours (local Gaussian windows) vs MONAI's `AddGuidanceSignalDeepEditd`
  (full-volume separable convolution), same clicks, values compared;
- dataset cache memory: our network-resolution cache vs the bundle's full-resolution cache of the
  same 512x512xZ cases (bytes held by MONAI's CacheDataset items).

Writes benchmarks/results.json (merged with keys other benchmarks own) and benchmarks/pipeline.md.
Usage: .venv/bin/python scripts/bench_pipeline.py [--repeats 7] [--cases 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_guidance(repeats: int) -> dict:
    from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd

    from trainer.clicks import guidance_channels

    shape = (128, 128, 128)
    rng = np.random.default_rng(0)
    clicks = {
        "spleen": [tuple(int(v) for v in rng.integers(0, 128, 3)) for _ in range(3)],
        "background": [tuple(int(v) for v in rng.integers(0, 128, 3)) for _ in range(2)],
    }
    image = np.zeros((1, *shape), np.float32)
    monai_t = AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", sigma=3)

    def reference():
        return monai_t({"image": image, "guidance": {k: [list(p) for p in v] for k, v in clicks.items()}})["image"]

    def ours():
        return guidance_channels(clicks, shape, 3.0)

    t_ref, _ = _median_time(reference, repeats)
    t_ours, _ = _median_time(ours, repeats)
    max_abs = float(np.abs(np.asarray(reference())[1:] - ours()).max())
    return {"reference_s": t_ref, "ours_s": t_ours, "speedup": t_ref / t_ours, "max_abs_diff": max_abs,
            "clicks": sum(len(v) for v in clicks.values())}


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def bench_cache_memory(n_cases: int, data_dir: Path) -> dict:
    from monai import transforms as mt
    from monai.data import CacheDataset

    from trainer.config import TrainConfig
    from trainer.transforms import cache_transforms

    items = [{"image": str(p), "label": str(data_dir / "labelsTr" / p.name)} for p in sorted((data_dir / "imagesTr").glob("*.nii.gz"))][:n_cases]
    # The bundle's deterministic part (spec §2): everything before its first random transform is cached
    # at full resolution; the resize to 128^3 runs every iteration after the random flips/rotations.
    bundle_chain = mt.Compose([
        mt.LoadImaged(keys=["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    ])
    ref = CacheDataset(items, transform=bundle_chain, cache_rate=1.0, num_workers=1, progress=False)
    ours = CacheDataset(items, transform=cache_transforms(TrainConfig(profile="bundle")), cache_rate=1.0, num_workers=1, progress=False)
    ref_bytes = sum(_nbytes(x) for x in ref._cache)
    our_bytes = sum(_nbytes(x) for x in ours._cache)
    shapes = [list(np.asarray(x["image"]).shape[1:]) for x in ref._cache]
    return {"cases": len(items), "shapes": shapes, "reference_bytes": ref_bytes, "ours_bytes": our_bytes,
            "ratio": ref_bytes / our_bytes, "reference_mb_per_case": ref_bytes / len(items) / 2**20,
            "ours_mb_per_case": our_bytes / len(items) / 2**20}


def write_results(results: dict) -> None:
    out_dir = ROOT / "benchmarks"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", type=int, default=3, help="512x512xZ phantoms for the cache benchmark")
    args = parser.parse_args()
    torch.set_num_threads(2)

    g = bench_guidance(args.repeats)
    print(f"guidance 128^3: MONAI {g['reference_s']*1e3:.1f} ms, ours {g['ours_s']*1e3:.2f} ms -> {g['speedup']:.0f}x (max |diff| {g['max_abs_diff']:.1e})")
    with tempfile.TemporaryDirectory() as tmp:
        from trainer.synth import write_dataset

        write_dataset(tmp, args.cases, seed=0, test_cases=0, shape=(512, 512, 100))
        c = bench_cache_memory(args.cases, Path(tmp))
    print(f"cache: bundle {c['reference_mb_per_case']:.0f} MB/case, ours {c['ours_mb_per_case']:.1f} MB/case -> {c['ratio']:.1f}x smaller")

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}"
    import monai

    results = {
        "guidance_speedup": round(g["speedup"], 1),
        "cache_memory_ratio": round(c["ratio"], 1),
        "details_guidance": g,
        "details_cache": c,
        "machine": machine,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__},
    }
    write_results(results)
    md = [
        "# Pipeline benchmarks (ours vs MONAI's DeepEdit path)",
        "",
        f"Machine: {machine}; torch {torch.__version__}, MONAI {monai.__version__}. Medians of {args.repeats} runs after a warm-up.",
        f"Command: `.venv/bin/python scripts/bench_pipeline.py --repeats {args.repeats} --cases {args.cases}`",
        "",
        "| benchmark | reference (MONAI / bundle) | ours | ratio | goal |",
        "|---|---|---|---|---|",
        f"| guidance encoding at 128³, {g['clicks']} clicks (max abs diff {g['max_abs_diff']:.1e}) | {g['reference_s']*1e3:.1f} ms | {g['ours_s']*1e3:.2f} ms | {g['speedup']:.0f}× faster | ≥ 100× |",
        f"| dataset cache memory, {c['cases']} cases of 512×512×100 | {c['reference_mb_per_case']:.0f} MB/case | {c['ours_mb_per_case']:.1f} MB/case | {c['ratio']:.1f}× smaller | ≥ 10× |",
        "",
    ]
    (ROOT / "benchmarks" / "pipeline.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
