#!/usr/bin/env python
"""The main job on embedded defaults: synthesise -> train (cpu profile) -> evaluate -> serve -> segment over HTTP.

Everything runs locally: synthetic phantoms, local storage under runs/demo/, a local Ray for Serve.
Usage: .venv/bin/python scripts/demo.py [--minutes 9.5] [--cases 160] [--test-cases 64] [--workdir runs/demo] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def synthesise(data: Path, cases: int, test_cases: int) -> None:
    from trainer.synth import write_dataset

    if (data / "dataset.json").is_file():
        meta = json.loads((data / "dataset.json").read_text())
        if (meta["numTraining"], meta["numTest"]) == (cases, test_cases):
            print(f"reusing {data}")
            return
        shutil.rmtree(data)  # another size: start clean (no stale files from the old one)
    t0 = time.perf_counter()
    meta = write_dataset(data, cases, seed=0, test_cases=test_cases)
    print(
        f"wrote {meta['numTraining']} labelled + {meta['numTest']} held-out phantoms in {time.perf_counter() - t0:.1f}s"
    )


def train(data: Path, out: Path, minutes: float) -> Path:
    from trainer.config import TrainConfig
    from trainer.runtime import LocalRuntime
    from trainer.train import train as run

    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(profile="cpu", max_train_seconds=minutes * 60)
    print(f"profile cpu: {cfg.profile_spec.description}; up to {cfg.num_epochs} epochs or {minutes:g} min")
    t0 = time.perf_counter()
    metrics = run(cfg, str(data), LocalRuntime(out))
    print(
        f"trained {metrics['epoch']} epochs in {time.perf_counter() - t0:.0f}s; last validation spleen Dice {metrics['val_dice']:.3f}"
    )
    # The final weights, not `best.pt`: the cosine schedule ends on its smallest steps, while the
    # best validation epoch of 6 cases is often an earlier, noisier high-rate one (measured on the
    # held-out phantoms: 0.912 automatic for last.pt against 0.897 for best.pt).
    return out / "checkpoints" / "last.pt"


def evaluate(checkpoint: Path, data: Path, out: Path) -> dict:
    from trainer.config import EvaluateConfig
    from trainer.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(
        EvaluateConfig(checkpoint=checkpoint, data_dir=data, output_dir=out, split="test", max_clicks=10)
    )
    print(
        f"held-out spleen Dice: automatic {summary['dice_auto']:.3f}, after 5 clicks {summary['dice_by_clicks'][5]:.3f}"
    )
    return summary


def serve_and_segment(checkpoint: Path, data: Path, port: int, clicks: int = 5) -> None:
    """Serve the checkpoint on a local Ray Serve and segment a held-out volume over HTTP.

    Automatic first (one upload), then an interactive session: the volume is uploaded once and each
    simulated corrective click costs one forward on the server.
    """
    import nibabel as nib
    import numpy as np

    from trainer.evaluate import next_click
    from trainer.metrics import spleen_dice
    from trainer.serve.cli import start_local, stop_local
    from trainer.serve.client import DeepEditClient

    image = sorted((data / "imagesTs").glob("*.nii.gz"))[0]
    label = np.asanyarray(nib.load(str(data / "labelsTs" / image.name)).dataobj).astype(bool)
    url = start_local(str(checkpoint), port=port)
    print(f"serving {checkpoint.name} at {url}")
    try:
        client = DeepEditClient(url)
        auto = client.segment(image)
        print(
            f"{image.name}: automatic  spleen Dice {float(spleen_dice(auto.mask, label)):.3f}  "
            f"round trip {auto.seconds * 1000:.0f} ms"
        )
        rng = np.random.default_rng(0)
        given: dict[str, list] = {"spleen": [], "background": []}
        mask = auto.mask
        with client.session(image) as session:
            for n in range(1, clicks + 1):
                click = next_click(mask, label, rng)
                if click is None:
                    break
                name, point = click
                given[name].append([int(v) for v in point])
                res = session.click(given)
                mask = res.mask
                print(
                    f"{image.name}: {n} click(s) spleen Dice {float(spleen_dice(mask, label)):.3f}  "
                    f"round trip {res.seconds * 1000:.0f} ms  ({name} click at {list(point)})"
                )
        client.close()
    finally:
        stop_local()
        print("server stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.5, help="training wall-time budget")
    # 160, not 30: phantoms are free, and with 24 training phantoms the model overfit (train Dice
    # 0.94, validation 0.90; automatic Dice on 24 held-out phantoms 0.877 with 24, 0.880 with 64 and
    # 0.912 with 128 training phantoms, single runs of 9.5 min).
    parser.add_argument("--cases", type=int, default=160, help="labelled phantoms (20%% validate)")
    # 64, not 24 (nor 6): the mean of a few phantoms swings with which ones they are. Two models whose
    # automatic Dice on 400 fresh phantoms was 0.894 and 0.897 scored 0.844 and 0.912 on 24 (one
    # whole-organ miss costs 0.04 there); a 64-phantom mean has a spread of about 0.01.
    parser.add_argument("--test-cases", type=int, default=64, help="held-out phantoms for the evaluation")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--no-serve", action="store_true", help="skip the HTTP part")
    parser.add_argument("--port", type=int, default=8000, help="local HTTP port of Ray Serve (loopback)")
    args = parser.parse_args()
    work = Path(args.workdir)
    data, run_dir = work / "data", work / "train"
    t0 = time.perf_counter()
    step("1/4 synthesise a Decathlon-layout dataset")
    synthesise(data, args.cases, args.test_cases)
    step("2/4 train the cpu profile")
    checkpoint = train(data, run_dir, args.minutes)
    step("3/4 evaluate on held-out volumes (Dice vs clicks)")
    evaluate(checkpoint, data, run_dir / "eval")
    if not args.no_serve:
        step("4/4 serve over HTTP and segment a held-out volume")
        serve_and_segment(checkpoint, data, args.port)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
