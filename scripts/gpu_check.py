#!/usr/bin/env python
"""GPU check for the Ray training job: step time, peak memory and throughput at the bundle profile.

1. One Ray Train worker (`TorchTrainer`, `use_gpu=True`) runs the project's own training step
   (`trainer.engine.train_step`: simulated clicks + forward/backward) on a synthetic 128^3 case at
   the `bundle` profile with AMP (fp16 autocast + `torch.amp.GradScaler`), after warm-up steps, and
   reports the median step time, peak GPU memory and samples/s. `--no-ray` runs the same in-process.
2. With two or more GPUs: a 2-process NCCL all-reduce (correctness and bus bandwidth).
3. Inference parity on CUDA (`--parity`): tests/test_model_zoo_parity.py at 128^3 with our predictor
   on the GPU, fp16 autocast as the model zoo's evaluator (which also runs on the GPU there).

On a machine without CUDA it prints why and exits 0 (nothing to check). `--cpu-smoke` runs step 1 on
the CPU at the tiny profile, only to exercise this script.

    python scripts/gpu_check.py [--steps 20] [--warmup 3] [--batch-size 1] [--no-ray] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _synthetic_batch(size: tuple[int, int, int], batch_size: int):
    """A CT-like volume with an ellipsoid 'spleen' inside an ellipsoid 'body' (enough for clicks)."""
    import torch

    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij"))
    body = ((grid**2).sum(0) < 0.8).float()
    spleen = ((((grid[0] - 0.3) / 0.25) ** 2 + ((grid[1] + 0.2) / 0.2) ** 2 + (grid[2] / 0.35) ** 2) < 1).float()
    gen = torch.Generator().manual_seed(0)
    image = (0.4 * body + 0.3 * spleen + 0.05 * torch.randn(size, generator=gen)).clamp(0, 1)
    expand = lambda t: t[None, None].repeat(batch_size, 1, 1, 1, 1)  # noqa: E731
    return {"image": expand(image), "label": expand(spleen), "body": expand(body)}


def benchmark(profile: str, steps: int, warmup: int, batch_size: int, device=None) -> dict:
    """Median step time, peak memory and samples/s of the real training step on `device`."""
    import numpy as np
    import torch

    from trainer.config import TrainConfig
    from trainer.engine import make_loss, train_step
    from trainer.network import build_network

    in_ray = device is None
    if in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
    cfg = TrainConfig(profile=profile, amp=device.type == "cuda", batch_size=batch_size)
    model = build_network(cfg.profile_spec)
    model = ray.train.torch.prepare_model(model) if in_ray else model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp)
    loss_fn = make_loss()
    batch = _synthetic_batch(cfg.spatial_size, batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + steps):
        rngs = [np.random.default_rng([step, b]) for b in range(batch_size)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = train_step(model, batch, optimizer, scaler, loss_fn, rngs, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out = {
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "profile": profile,
        "spatial_size": list(cfg.spatial_size),
        "amp": cfg.amp,
        "batch_size": batch_size,
        "steps": steps,
        "step_seconds_median": median,
        "step_seconds_min": min(times),
        "samples_per_s": batch_size / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "last_loss": result.loss,
        "ray_worker": in_ray,
    }
    return out  # on Ray: rank 0's return value is the run's `Result.return_value`


def benchmark_on_ray(profile: str, steps: int, warmup: int, batch_size: int, use_gpu: bool) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        lambda config: benchmark(**config),
        train_loop_config={"profile": profile, "steps": steps, "warmup": warmup, "batch_size": batch_size},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=f"gpu-check-{int(time.time())}", storage_path=tempfile.mkdtemp(prefix="gpu-check-")
        ),
    )
    return dict(trainer.fit().return_value)


def _allreduce_worker(rank: int, world: int, port: int, size_mib: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.full((size_mib * 2**20 // 4,), float(rank + 1), device=f"cuda:{rank}")
    for _ in range(3):  # warm-up (NCCL communicator setup)
        dist.all_reduce(t)
    t.fill_(float(rank + 1))
    dist.all_reduce(t)
    ok = bool(torch.allclose(t, torch.full_like(t, world * (world + 1) / 2)))
    iters = 20
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / iters
    if rank == 0:
        # Bus bandwidth as nccl-tests defines it for all-reduce: 2 (n-1)/n * bytes / time.
        busbw = 2 * (world - 1) / world * t.numel() * 4 / seconds / 1e9
        queue.put({"nccl_allreduce_ok": ok, "size_mib": size_mib, "seconds": seconds, "bus_bandwidth_gb_s": busbw})
    dist.destroy_process_group()


def nccl_allreduce(size_mib: int = 256) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_allreduce_worker, args=(2, port, size_mib, queue), nprocs=2, join=True, start_method="spawn")
    return queue.get()


def cuda_parity() -> dict:
    """The model-zoo parity test (its inference.json vs our bundle profile) with both on the GPU."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"SPLEEN_DEEPEDIT_PARITY_DEVICE": "cuda"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "tests/test_model_zoo_parity.py", "-k", "128"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-2000:])
    return {"ok": proc.returncode == 0, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (cuDNN autotuning, allocator)")
    p.add_argument("--batch-size", type=int, default=1, help="volumes per step")
    p.add_argument("--no-ray", action="store_true", help="run the step benchmark in this process, not in a Ray worker")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="no GPU: run the benchmark on CPU at the tiny profile (tests this script)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--parity", action="store_true", help="also run the model-zoo inference parity test on CUDA")
    args = p.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.cpu_smoke:
        print(
            f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "nothing to check. Run it on a GPU node."
        )
        return 0
    profile = "bundle" if gpus else "tiny"
    results: dict = {"gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.no_ray:
        device = torch.device("cuda", 0) if gpus else torch.device("cpu")
        results["train_step"] = benchmark(profile, args.steps, args.warmup, args.batch_size, device=device)
    else:
        results["train_step"] = benchmark_on_ray(profile, args.steps, args.warmup, args.batch_size, use_gpu=gpus > 0)
    step = results["train_step"]
    mem = step.get("peak_memory_gib")
    print(
        f"train step ({step['profile']} {step['spatial_size']}, AMP {step['amp']}, batch {step['batch_size']}, "
        f"{'Ray worker' if step.get('ray_worker') else 'in-process'} on {step.get('gpu_name') or step['device']}): "
        f"{step['step_seconds_median'] * 1000:.0f} ms/step median, {step['samples_per_s']:.2f} samples/s"
        + (f", peak GPU memory {mem:.2f} GiB" if mem is not None else "")
    )
    if gpus >= 2:
        results["nccl"] = nccl_allreduce()
        n = results["nccl"]
        print(
            f"NCCL all-reduce, 2 processes, {n['size_mib']} MiB: {'OK' if n['nccl_allreduce_ok'] else 'WRONG RESULT'}, "
            f"{n['seconds'] * 1000:.1f} ms, bus bandwidth {n['bus_bandwidth_gb_s']:.1f} GB/s"
        )
    elif gpus == 1:
        print("NCCL all-reduce: skipped (needs 2 GPUs; 1 visible)")
    if args.parity and gpus:
        results["parity"] = cuda_parity()
        print(
            f"model-zoo parity on CUDA (fp16): {'OK' if results['parity']['ok'] else 'FAILED'} in {results['parity']['seconds']:.0f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if "parity" in results and not results["parity"]["ok"]:
        return 1
    if "nccl" in results and not results["nccl"]["nccl_allreduce_ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
