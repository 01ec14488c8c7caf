#!/usr/bin/env python
"""`annotate` throughput against a shell loop of `spleen-deepedit infer` calls on the same scans.

Both sides start from nothing, as a user would: the loop runs one `python -m trainer infer` process
per scan (what `for f in *; do spleen-deepedit infer ...; done` does), `annotate` one process that
starts a local Ray with `--num-cpus` CPUs. Same checkpoint (the `cpu` profile, random weights: the
time does not depend on the weights), same scans (synthetic phantoms, half as NIfTI files and half as
DICOM series folders), same 2 CPU cores (both sides are pinned with `taskset` when it exists).

Where the time goes: for the loop, the wall time of a process that only imports the inference code
and loads the checkpoint (paid once per scan); for `annotate`, the per-stage seconds summed from its
manifest, against the whole wall time (Ray start, worker start-up, scheduling).

Writes benchmarks/annotate.json and prints a summary.
Usage: .venv/bin/python scripts/bench_annotate.py [--cases 20] [--shape 160 160 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pinned(cmd: list[str], cpus: int) -> list[str]:
    taskset = shutil.which("taskset")
    n = os.cpu_count() or cpus
    return [taskset, "-c", ",".join(str(c) for c in range(min(cpus, n)))] + cmd if taskset else cmd


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_cohort(work: Path, cases: int, shape: tuple[int, int, int]) -> tuple[Path, Path]:
    import nibabel as nib
    import numpy as np
    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import get_profile
    from trainer.dicom import write_ct_series
    from trainer.network import build_network
    from trainer.synth import generate_case

    cohort = work / "cohort"
    for i in range(cases):
        case = generate_case(np.random.default_rng(1000 + i), shape=shape)
        if i % 2:
            write_ct_series(cohort / f"series{i:02d}", case.image, case.affine, seed=i)
        else:
            cohort.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(case.image, case.affine), cohort / f"scan{i:02d}.nii.gz")
    torch.manual_seed(0)
    ckpt = work / "cpu.pt"
    save_checkpoint(Checkpoint(model=build_network(get_profile("cpu")).state_dict(), profile="cpu", epoch=0), ckpt)
    return cohort, ckpt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 160, 64))
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "annotate.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-annotate-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(args.cpus),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        cohort, ckpt = make_cohort(work, args.cases, tuple(args.shape))
        sources = sorted(cohort.iterdir())
        py = [sys.executable, "-m", "trainer"]

        # Fixed cost of one `infer` process: interpreter, imports, checkpoint load (no scan).
        startup = _run(
            _pinned(
                [
                    sys.executable,
                    "-c",
                    "import sys; sys.path.insert(0, '.');"
                    "from trainer.predictor import Predictor; from trainer import dicom;"
                    f"Predictor.from_checkpoint({str(ckpt)!r})",
                ],
                args.cpus,
            ),
            env,
        )
        loop_out = work / "loop"
        t0 = time.perf_counter()
        per_call = []
        for src in sources:
            per_call.append(
                _run(
                    _pinned(
                        py
                        + [
                            "infer",
                            "--checkpoint",
                            str(ckpt),
                            "--image",
                            str(src),
                            "--device",
                            "cpu",
                            "--output",
                            str(loop_out / f"{src.name.split('.')[0]}.nii.gz"),
                        ],
                        args.cpus,
                    ),
                    env,
                )
            )
        loop_s = time.perf_counter() - t0

        ann_out = work / "annotate"
        ann_s = _run(
            _pinned(
                py
                + [
                    "annotate",
                    "--input",
                    str(cohort),
                    "--output",
                    str(ann_out),
                    "--checkpoint",
                    str(ckpt),
                    "--num-cpus",
                    str(args.cpus),
                    "--batch-size",
                    str(args.batch_size),
                ],
                args.cpus,
            ),
            env,
        )
        import pandas as pd

        manifest = pd.read_parquet(ann_out / "manifest.parquet")
        if (manifest["status"] != "ok").any():
            raise SystemExit(f"annotate failed cases:\n{manifest[manifest.status != 'ok'][['case_id', 'error']]}")
        stages = {k: round(float(manifest[k].sum()), 2) for k in ("read_s", "preprocess_s", "forward_s", "write_s")}
        result = {
            "cases": args.cases,
            "shape": list(args.shape),
            "cpus": args.cpus,
            "profile": "cpu",
            "batch_size": args.batch_size,
            "load_average_at_start": os.getloadavg()[0],
            "infer_loop": {
                "wall_s": round(loop_s, 1),
                "scans_per_min": round(60 * args.cases / loop_s, 2),
                "per_call_s": [round(x, 2) for x in per_call],
                "startup_only_s": round(startup, 2),
            },
            "annotate": {
                "wall_s": round(ann_s, 1),
                "scans_per_min": round(60 * args.cases / ann_s, 2),
                "stage_seconds_summed": stages,
                "outside_stages_s": round(ann_s - sum(stages.values()), 1),
            },
            "speedup": round(loop_s / ann_s, 2),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
