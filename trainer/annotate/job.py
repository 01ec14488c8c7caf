"""What one `annotate` run is: its settings (`AnnotateConfig`, `ReviewThresholds`) and the columns of a row."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import storage
from ..config import ConfigError

FORMATS = ("nii.gz", "dcm")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASKS, ROWS = "masks", "rows"
MANIFEST = "manifest"
#: Columns of a manifest row, with the value a case has before a stage fills it in.
ROW_DEFAULTS: dict[str, Any] = {
    "case_id": "",
    "source": "",
    "kind": "",
    "keys": "",
    "status": "pending",
    "error": "",
    "stage": "",
    "output": "",
    "model_version": "",
    "format": "",
    "resumed": False,
    "shape": "",
    "spleen_ml": float("nan"),
    "components": -1,
    "largest_share": float("nan"),
    "touches_edge": False,
    "confidence": float("nan"),
    "flags": "",
    "read_s": 0.0,
    "preprocess_s": 0.0,
    "forward_s": 0.0,
    "write_s": 0.0,
}
PAYLOAD = "payload"  # pickled arrays passed between stages; dropped before the manifest
DEFAULT_BATCH_SIZE = 2
DEFAULT_CONCURRENCY = 1
ACTOR_RESTARTS = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class ReviewThresholds:
    """When a case is flagged for review (the flags column).

    Attributes:
        min_ml, max_ml: a spleen volume outside this range (ml) is flagged `small_volume` or
            `large_volume` (adult spleens are ~100-400 ml; splenomegaly reaches ~2000).
        min_largest_share: fewer voxels than this share in the largest component: `fragmented`.
        min_confidence: mean spleen probability inside the mask below this: `low_confidence`.
    """

    min_ml: float = 30.0
    max_ml: float = 1500.0
    min_largest_share: float = 0.95
    min_confidence: float = 0.8


@dataclass(frozen=True, kw_only=True, slots=True)
class AnnotateConfig:
    """One `annotate` run.

    Attributes:
        input: folder or s3:// prefix of cases (NIfTI files, DICOM series folders, .zip series).
        output: folder or s3:// prefix for masks, rows and the manifest.
        checkpoint: model checkpoint (path or s3://).
        format: `nii.gz` (any input) or `dcm` (DICOM SEG; DICOM inputs only).
        batch_size: volumes per forward pass.
        concurrency: forward actors.
        num_gpus: GPUs per forward actor (0: CPU).
        read_concurrency: most read/preprocess/write tasks at once (None: as many as the cluster fits).
        num_cpus: CPUs of a local Ray started for this run (None: the machine's).
        profile: override the checkpoint's profile.
        redo: ignore finished cases and annotate everything again.
    """

    input: str
    output: str
    checkpoint: str
    format: str = "nii.gz"
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    num_gpus: float = 0.0
    read_concurrency: int | None = None
    num_cpus: int | None = None
    profile: str | None = None
    redo: bool = False
    review: ReviewThresholds = field(default_factory=ReviewThresholds)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r}: use one of {list(FORMATS)}")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise ConfigError(f"--read-concurrency {self.read_concurrency}: must be at least 1")
        if not 0 <= self.num_gpus <= 8:
            raise ConfigError(f"--num-gpus {self.num_gpus}: must be between 0 and 8 (a fraction shares a GPU)")
        if _inside(self.output, self.input):  # a rerun would take the masks for new cases
            raise ConfigError(
                f"--output {self.output!r} is inside --input {self.input!r}: write the masks outside the "
                "input folder (or prefix)"
            )


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or under it (local paths resolved; s3:// URIs compared as prefixes)."""
    if storage.is_s3(path) or storage.is_s3(root):
        return storage.is_s3(path) and storage.is_s3(root) and f"{path.rstrip('/')}/".startswith(f"{root.rstrip('/')}/")
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents
