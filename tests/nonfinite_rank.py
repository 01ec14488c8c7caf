"""Test helper (not a test module): make one rank's loss non-finite on chosen steps, and record a
digest of every rank's weights after every step.

Installed into a real training process (torchrun: run this file; Ray Train: `install()` inside the
worker's loop), it wraps `trainer.train.make_loss` and `trainer.train.train_step`, the names the loop
calls, so the production code runs unchanged. Faults: `nan` (loss and gradients NaN) and
`inf_loss` (the loss is +inf while its gradients stay finite: only an agreed vote makes every rank
skip that step).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def install(faults: dict[int, str], rank: int, out_dir: str) -> None:
    """faults: {0-based step of this process: "nan" | "inf_loss"}, applied on `rank` only."""
    import torch

    import trainer.train as loop
    from trainer.engine import unwrap

    real_make_loss, real_step = loop.make_loss, loop.train_step
    calls = {"n": 0}
    digests: list[str] = []

    class FaultyLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = real_make_loss()

        def forward(self, logits, target):
            loss = self.inner(logits, target)
            kind = faults.get(calls["n"]) if _rank() == rank else None
            if kind == "nan":
                return loss * float("nan")
            if kind == "inf_loss":
                return loss - loss.detach() + float("inf")  # value inf, gradient that of `loss`
            return loss

    def recording_step(model, *args, **kwargs):
        result = real_step(model, *args, **kwargs)
        calls["n"] += 1
        h = hashlib.sha256()
        for p in unwrap(model).parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        digests.append(h.hexdigest())
        Path(out_dir, f"digests_rank{_rank()}.json").write_text(json.dumps(digests))
        return result

    loop.make_loss = FaultyLoss
    loop.train_step = recording_step


def main() -> None:
    """torchrun entry: `nonfinite_rank.py DATA OUTPUT FAULTS_JSON` trains the tiny profile for 2 epochs."""
    data, output, faults = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from trainer.config import TrainConfig
    from trainer.runtime import TorchDistributedRuntime
    from trainer.train import train

    runtime = TorchDistributedRuntime(output)
    install({int(k): v for k, v in faults.items()}, rank=1, out_dir=output)
    cfg = TrainConfig(profile="tiny", epochs=2, cache_workers=1, amp=False, seed=5, val_every=2)
    metrics = train(cfg, data, runtime)
    if runtime.is_main:
        Path(output, "final.json").write_text(json.dumps(metrics, default=str))
    runtime.finish()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
