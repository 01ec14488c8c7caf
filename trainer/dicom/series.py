"""What a DICOM series is to this project, and where its files come from.

The bounds on one series (`SeriesLimits`), what reading keeps besides the voxels (`SeriesMeta`,
`DicomVolume`), and the files of a series as `Member`s: a folder, a zip archive (on disk or uploaded),
one file, or the parts of a multipart upload. Nothing here parses DICOM (that is `trainer.dicom.read`).
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import DicomError

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

#: LPS (DICOM patient coordinates) -> RAS (NIfTI, nibabel, MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: File names never part of a series (a DICOMDIR index, macOS and Windows droppings).
IGNORED_NAMES = frozenset({"DICOMDIR", "Thumbs.db", "desktop.ini"})
#: Zip files start with this; DICOM files have `DICM` after a 128-byte preamble.
ZIP_MAGIC = b"PK\x03\x04"
DICM_MAGIC = b"DICM"


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesLimits:
    """Bounds on one series, checked before the work they bound.

    Attributes:
        max_files: most files in one upload or folder.
        max_bytes: most bytes of all files together (uncompressed, for a zip).
        max_voxels: most voxels of the volume (columns x rows x slices); the serve default.
        max_dim: most voxels along any axis.
        min_slices: fewest slices (a single slice is a 2D image).
        spacing_tolerance: largest deviation of a slice gap from the median gap, as a fraction of it.
        tilt_tolerance: largest sideways offset of a slice from the normal through the first one
            (perpendicular to it), as a fraction of their distance along it, beyond a quarter pixel.
    """

    max_files: int = 4096
    max_bytes: int = 2 * 1024**3
    max_voxels: int = 512 * 512 * 1024
    max_dim: int = 2048
    min_slices: int = 2
    spacing_tolerance: float = 0.1
    tilt_tolerance: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_files", "max_bytes", "max_voxels", "max_dim", "min_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"SeriesLimits.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.spacing_tolerance < 0.5 or not 0 < self.tilt_tolerance < 0.5:
            raise ValueError("SeriesLimits tolerances must lie in (0, 0.5)")


@dataclass(kw_only=True, slots=True)
class SeriesMeta:
    """What a DICOM series keeps besides its voxels: the sorted slice headers (no pixel data), for the SEG."""

    datasets: list[Dataset]
    names: list[str]  # the file name of each sorted slice (for messages)
    transfer_syntax: str
    spacing: tuple[float, float, float]  # column, row, slice spacing in mm

    @property
    def n_slices(self) -> int:
        return len(self.datasets)


class DicomVolume(NamedTuple):
    image: np.ndarray  # float32 (columns, rows, slices), Hounsfield units
    affine: np.ndarray  # 4x4 index -> RAS mm
    meta: SeriesMeta


# ----------------------------------------------------------------------------- files of a series

#: One file of a series: its name and a function opening it as a binary stream.
Member = tuple[str, int, Callable[[], IO[bytes]]]


def is_ignored(name: str) -> bool:
    """True for a file that is never part of a series (hidden, `__MACOSX`, `IGNORED_NAMES`)."""
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] in IGNORED_NAMES


def _open_file(path: Path) -> IO[bytes]:
    return open(path, "rb")


def dir_members(root: Path) -> list[Member]:
    """The files under a folder (recursively, sorted), ignored ones left out."""
    out: list[Member] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not is_ignored(rel):
            out.append((rel, path.stat().st_size, functools.partial(_open_file, path)))
    return out


def zip_members(zf: zipfile.ZipFile, label: str) -> list[Member]:
    """The files of an open zip archive; a DicomError if it holds none."""
    out: list[Member] = []
    for info in zf.infolist():
        if info.is_dir() or is_ignored(info.filename):
            continue
        # ZipExtFile never yields more than the declared file_size, so the sizes summed below bound the reads.
        out.append((info.filename, info.file_size, functools.partial(zf.open, info)))
    if not out:
        raise DicomError("empty_upload", f"{label} holds no files: zip the .dcm files of one CT series")
    return out


def open_zip(source: str | os.PathLike | bytes, label: str) -> zipfile.ZipFile:
    """A zip archive from a path or bytes; a DicomError naming `label` if it is not one."""
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DicomError(
            "bad_zip", f"{label} is not a readable zip archive ({exc}): zip the .dcm files of one CT series"
        ) from None


def is_dicom_bytes(data: bytes) -> bool:
    """True for the bytes of a zip archive or of a DICOM Part 10 file (for sniffing an upload)."""
    return data[:4] == ZIP_MAGIC or data[128:132] == DICM_MAGIC


def is_dicom_source(path: str | os.PathLike) -> bool:
    """True for a folder, a `.zip` or a `.dcm` file: the inputs `read_series` takes (a NIfTI file is none)."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix.lower() in (".zip", ".dcm"))


def upload_members(data: bytes | Sequence[tuple[str, bytes]], label: str = "the upload") -> list[Member]:
    """The files of an upload: a zip archive's members, one DICOM file, or (name, bytes) pairs (multipart).

    A zip stays open while its members are read (the archive lives in memory; nothing to close)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if bytes(data[:4]) == ZIP_MAGIC:
            return zip_members(open_zip(bytes(data), label), label)
        data = [("upload.dcm", bytes(data))]
    return [(name, len(blob), functools.partial(io.BytesIO, blob)) for name, blob in data if not is_ignored(name)]
