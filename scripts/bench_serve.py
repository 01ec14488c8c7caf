#!/usr/bin/env python
"""Serving benchmark: HTTP overhead over the in-process predictor, and a session click versus a full upload.

    python scripts/bench_serve.py                      # random-init `cpu` profile, synthetic 128x128x64 and 384x384x96 CTs
    python scripts/bench_serve.py --checkpoint runs/x/checkpoints/best.pt --reps 20

Starts a local Ray + Serve on loopback (`trainer.serve.cli.start_local`), then measures, sequentially
and after warm-up, the median of:
  * in-process: decode the .nii.gz + `Predictor.predict` + encode the mask (the work a request does),
    with the replica's torch thread count;
  * HTTP `POST /v1/segment` (full upload, same clicks) -> overhead = http / in-process - 1;
  * HTTP session click `POST /v1/sessions/{id}/segment` (no upload, no preprocess);
for each volume shape, and a bounded load test (scripts/loadtest.py) at concurrency 4 on the first. Writes benchmarks/serve_results.json
and benchmarks/serve.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _volume(shape) -> tuple[bytes, dict]:
    import nibabel as nib
    import numpy as np

    from trainer.synth import generate_case

    case = generate_case(np.random.default_rng(0), shape=tuple(shape))
    body = gzip.compress(nib.Nifti1Image(case.image, case.affine).to_bytes(), compresslevel=1)
    idx = np.argwhere(case.label > 0)
    return body, {"spleen": [idx[len(idx) // 2].tolist()], "background": [[2, 2, 2]]}


def _measure(shape, predictor, api, reps: int) -> dict:
    """Interleaved in-process / HTTP full upload / HTTP session click timings for one volume."""
    from trainer.serve.codecs import VolumeLimits, decode_nifti, encode_nifti

    body, clicks = _volume(shape)
    limits = VolumeLimits()
    server_s: dict[str, list[float]] = {"http_full": [], "http_click": []}

    def in_process():
        image, affine = decode_nifti(body, limits)
        pred = predictor.predict(image, affine, clicks)
        encode_nifti(pred.mask, pred.affine)

    def http_full():
        server_s["http_full"].append(sum(api.segment(body, clicks).server_timing.values()))

    sess = api.session(body)

    def http_click():
        server_s["http_click"].append(sum(sess.click(clicks).server_timing.values()))

    fns = {"in_process": in_process, "http_full": http_full, "http_click": http_click}
    for fn in fns.values():  # warm-up
        fn()
    # Interleaved, so background load on a shared machine hits all three alike.
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_median_time(fn, 1)[0])
    sess.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Server-side stage time (Server-Timing) versus the client's round trip: the rest is transport
    # (proxy, replica hop, body transfer) and queueing.
    server_med = {k: statistics.median(v[1:]) for k, v in server_s.items()}  # v[0] is the warm-up
    return {
        "volume_shape": list(shape),
        "upload_bytes": len(body),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "http_overhead_fraction": round(med["http_full"] / med["in_process"] - 1, 4),
        "server_stage_time_median_s": {k: round(v, 4) for k, v in server_med.items()},
        "transport_overhead_median_s": {k: round(med[k] - server_med[k], 4) for k in server_med},
        "session_click_vs_full_upload": round(med["http_click"] / med["http_full"], 4),
        "samples_s": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ray Serve DeepEdit benchmark (loopback only)")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint to serve (default: a random-init checkpoint of --profile)"
    )
    p.add_argument("--profile", default="cpu", help="profile of the random-init checkpoint")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=[(128, 128, 64), (384, 384, 96)],
        type=lambda t: tuple(int(v) for v in t.split("x")),
        help="synthetic CT shapes, e.g. 128x128x64",
    )
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    p.add_argument(
        "--load-requests", type=int, default=24, help="requests of each load test (concurrency 4, first shape)"
    )
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = p.parse_args(argv)

    import httpx
    import loadtest
    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import get_profile
    from trainer.network import build_network
    from trainer.predictor import Predictor
    from trainer.serve.cli import start_local, stop_local
    from trainer.serve.client import DeepEditClient

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ckpt = args.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = str(tmp / f"random_{args.profile}.pt")
        save_checkpoint(
            Checkpoint(model=build_network(get_profile(args.profile)).state_dict(), profile=args.profile, epoch=0), ckpt
        )
    url = start_local(ckpt, port=args.port, num_cpus=2, max_upload_bytes=1024**3)
    runs = []
    try:
        info = httpx.get(f"{url}/v1/info", timeout=30).json()
        threads = int(info["model"]["torch_threads"])
        torch.set_num_threads(threads)  # in-process runs with the replica's thread count
        predictor = Predictor.from_checkpoint(ckpt)
        api = DeepEditClient(url)
        for n, shape in enumerate(args.shapes):
            runs.append(_measure(shape, predictor, api, args.reps))
            if n == 0:
                body, clicks = _volume(shape)
                runs[0]["loadtest_segment_c4"] = loadtest.run(
                    url, body, requests=args.load_requests, concurrency=4, mode="segment", clicks=clicks
                )
                runs[0]["loadtest_session_click_c4"] = loadtest.run(
                    url, body, requests=args.load_requests, concurrency=4, mode="session", clicks=clicks
                )
    finally:
        stop_local()

    results = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": "cpu",
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "note": "shared 2-core machine; other jobs ran concurrently, so absolute times are noisy",
        },
        "setup": {
            "profile": info["model"]["profile"],
            "spatial_size": info["model"]["spatial_size"],
            "torch_threads": threads,
            "reps": args.reps,
            "checkpoint": os.path.basename(ckpt),
        },
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [
        "# Serving benchmark (scripts/bench_serve.py)",
        "",
        f"{results['date_utc']}, {results['machine']['platform']}, {results['machine']['cpus']} CPUs shared with other jobs "
        f"(load average {results['machine']['load_average_1m_at_end']} at the end), CPU inference, profile "
        f"`{results['setup']['profile']}` (random init), {threads} torch thread(s) in the replica and in-process, "
        f"medians of {args.reps} interleaved repetitions.",
        "",
        "| volume | upload | in-process (decode + predict + encode) | HTTP full upload | HTTP overhead | server stages / transport | session click | click / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m, srv = r["median_s"], r["server_stage_time_median_s"]
        md.append(
            f"| {'×'.join(map(str, r['volume_shape']))} | {r['upload_bytes'] / 1e6:.1f} MB | {m['in_process'] * 1000:.0f} ms "
            f"| {m['http_full'] * 1000:.0f} ms | {r['http_overhead_fraction'] * 100:+.1f} % "
            f"| {srv['http_full'] * 1000:.0f} / {r['transport_overhead_median_s']['http_full'] * 1000:.0f} ms "
            f"| {m['http_click'] * 1000:.0f} ms | {r['session_click_vs_full_upload']:.2f}× |"
        )
    md += [
        "",
        "HTTP overhead goal: ≤ 10 %. A session click skips the upload, decode and preprocessing: it costs one "
        "forward pass plus the inverse resize, so its advantage grows with the volume.",
        "",
    ]
    for key, label in (("loadtest_segment_c4", "full upload"), ("loadtest_session_click_c4", "session clicks")):
        t = runs[0][key]
        md.append(
            f"- Load test, {label}, {t['requests']} requests at concurrency 4 ({'×'.join(map(str, runs[0]['volume_shape']))}): "
            f"p50 {t.get('p50_s', 0) * 1000:.0f} ms, p95 {t.get('p95_s', 0) * 1000:.0f} ms, "
            f"p99 {t.get('p99_s', 0) * 1000:.0f} ms, {t['throughput_rps']:.2f} req/s, {t['errors']} errors."
        )
    md.append("")
    (out / "serve.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
