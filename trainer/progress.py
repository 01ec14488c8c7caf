"""The per-epoch progress line that rank 0 prints, and its parser: one format, written once.

`trainer.train` prints it; Ray forwards it to the job log, where `k8s rayjob status/follow` reads the
latest epoch and validation Dice back with `latest_progress`. Standard library only: the k8s CLI
imports this module without loading torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: The line, possibly behind Ray's "(RayTrainWorker pid=...)" prefix; `-` for an epoch without validation.
EPOCH_LINE = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<epochs>\d+)\s+loss (?P<loss>[-0-9.naif]+).*?val spleen dice (?P<val>[0-9.]+|-)"
)


def format_epoch_line(metrics: Mapping[str, Any], epochs: int) -> str:
    """`epoch 3/60  loss 0.4120  train dice 0.7010  val spleen dice 0.8123  12.0s  2.00 samples/s`.

    Args:
        metrics: one epoch's metrics as `trainer.train` records them (`epoch` is 1-based;
            `val_dice` None when the epoch did not validate).
        epochs: the job's number of epochs.
    """
    val = metrics.get("val_dice")
    vd = "-" if val is None else f"{val:.4f}"
    return (
        f"epoch {metrics['epoch']}/{epochs}  loss {metrics['loss']:.4f}  train dice {metrics['train_dice']:.4f}"
        f"  val spleen dice {vd}  {metrics['epoch_seconds']:.1f}s  {metrics['samples_per_s']:.2f} samples/s"
    )


def latest_progress(logs: str) -> dict[str, Any]:
    """The last epoch line in a log: epoch, epochs, loss and the last validation Dice seen."""
    out: dict[str, Any] = {}
    for match in EPOCH_LINE.finditer(logs):
        out.update(epoch=int(match["epoch"]), epochs=int(match["epochs"]), loss=_float(match["loss"]))
        if match["val"] != "-":
            out["val_dice"] = float(match["val"])
    return out


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # a malformed number, e.g. a line cut by the log's tail
        return None
