"""DICOM in and out: a CT series (folder, zip or uploaded files) -> volume + RAS affine; mask -> DICOM SEG.

Reading (pydicom; pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg and pyjpegls decode JPEG, JPEG 2000,
JPEG-LS and JPEG lossless transfer syntaxes when installed, `pip install 'spleen-deepedit[dicom]'`):

1. The files are listed and counted, and their sizes summed, against `SeriesLimits` before any is read.
2. Headers only (`stop_before_pixels`) are read: one series, CT, single-frame, decodable transfer
   syntax, the same grid on every slice, geometry present. Slices are sorted along the slice normal
   (`row cosine x column cosine` of `ImageOrientationPatient`), and duplicate, missing and unevenly
   spaced slices and a gantry tilt are refused. The voxel count is checked here, before anything large
   is allocated.
3. Pixels are decoded slice by slice into one float32 array with `RescaleSlope`/`RescaleIntercept`
   applied (Hounsfield units).

The array is indexed `[column, row, slice]` (the NIfTI convention for DICOM: i along the row cosine,
j along the column cosine, k along the sorted slices), and the affine maps those indices to RAS mm:
DICOM's patient coordinates are LPS, so the first two rows of the LPS affine are negated.

Writing: `seg_dataset` builds a binary DICOM Segmentation (highdicom) of the mask on the same grid,
one segment "Spleen" (SNOMED CT 78961009) in the category "Anatomical Structure", referencing every
source slice, with the algorithm (name, family, model version) identified. highdicom copies the
patient, study and frame-of-reference attributes the standard requires a derived object to share with
its source, and nothing else of them. Nothing here logs a header value.

Every problem raises `DicomError` (a `DataError`, so the CLI prints `error: ...` and exits 2), whose
`code` names the problem for the HTTP API and whose message names the file or value and the fix.
pydicom and highdicom are imported only when a function here runs, so `import trainer` does not need them.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import DicomError as DicomError

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

#: LPS (DICOM patient coordinates) -> RAS (NIfTI, nibabel, MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Modalities accepted: the model was trained on CT only.
SUPPORTED_MODALITIES = ("CT",)
#: File names never part of a series (a DICOMDIR index, macOS and Windows droppings).
IGNORED_NAMES = frozenset({"DICOMDIR", "Thumbs.db", "desktop.ini"})
#: Zip files start with this; DICOM files have `DICM` after a 128-byte preamble.
ZIP_MAGIC = b"PK\x03\x04"
DICM_MAGIC = b"DICM"
SEG_SERIES_NUMBER = 9901
SEG_LABEL = "Spleen"



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


# ----------------------------------------------------------------------------- sources

#: One file of a series: its name and a function opening it as a binary stream.
Member = tuple[str, int, Callable[[], IO[bytes]]]


def _ignored(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] in IGNORED_NAMES


def _open_file(path: Path) -> IO[bytes]:
    return open(path, "rb")


def _dir_members(root: Path) -> list[Member]:
    out: list[Member] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not _ignored(rel):
            out.append((rel, path.stat().st_size, functools.partial(_open_file, path)))
    return out


def _zip_members(zf: zipfile.ZipFile, label: str) -> list[Member]:
    out: list[Member] = []
    for info in zf.infolist():
        if info.is_dir() or _ignored(info.filename):
            continue
        # ZipExtFile never yields more than the declared file_size, so the sizes summed below bound the reads.
        out.append((info.filename, info.file_size, functools.partial(zf.open, info)))
    if not out:
        raise DicomError("empty_upload", f"{label} holds no files: zip the .dcm files of one CT series")
    return out


def _open_zip(source: str | os.PathLike | bytes, label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DicomError("bad_zip", f"{label} is not a readable zip archive ({exc}): zip the .dcm files of one CT series") from None


def is_dicom_bytes(data: bytes) -> bool:
    """True for the bytes of a zip archive or of a DICOM Part 10 file (for sniffing an upload)."""
    return data[:4] == ZIP_MAGIC or data[128:132] == DICM_MAGIC


def is_dicom_source(path: str | os.PathLike) -> bool:
    """True for a folder, a `.zip` or a `.dcm` file: the inputs `read_series` takes (a NIfTI file is none)."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix.lower() in (".zip", ".dcm"))


# ----------------------------------------------------------------------------- reading


def _import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomError("dicom_unavailable", "reading DICOM needs pydicom: pip install 'spleen-deepedit[dicom]'", 501) from None
    return pydicom


def _check_counts(members: Sequence[Member], label: str, limits: SeriesLimits) -> None:
    if not members:
        raise DicomError("empty_upload", f"{label} holds no DICOM files: pass the folder (or zip) of one CT series")
    if len(members) > limits.max_files:
        raise DicomError("too_many_files", f"{label} holds {len(members)} files, over the limit of {limits.max_files}: "
                         "upload one series at a time", 413)
    total = sum(size for _, size, _ in members)
    if total > limits.max_bytes:
        raise DicomError("too_large", f"{label} holds {total} bytes of files, over the limit of {limits.max_bytes}: "
                         "upload one series at a time", 413)


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """A dataset read without file meta (a raw PACS export, no `DICM` preamble) gets the transfer
    syntax its encoding was read in, so its pixels can be decoded."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _read_header(pydicom, name: str, opener: Callable[[], IO[bytes]]) -> Dataset:
    from pydicom.errors import InvalidDicomError

    not_dicom = DicomError("not_dicom", f"{name} is not a DICOM file (no DICOM header): upload only the .dcm files of "
                           "one CT series (a zip, a folder, or the files)")
    try:
        with opener() as f:
            return pydicom.dcmread(f, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception as exc:  # truncated or corrupt headers raise many types
        raise DicomError("bad_dicom", f"{name} is not a readable DICOM file ({type(exc).__name__}): re-export the series") from None
    # No preamble: a raw dataset is still DICOM if it parses to an image with a SOP class.
    try:
        with opener() as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if "SOPClassUID" not in ds or "Rows" not in ds:
            raise not_dicom
        return _with_transfer_syntax(ds)
    except DicomError:
        raise
    except Exception:  # noqa: BLE001 - junk parsed as DICOM fails in many ways
        raise not_dicom from None


def _check_decodable(ts: str, name: str) -> None:
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        from pydicom.uid import UID

        raise DicomError("unsupported_transfer_syntax",
                         f"{name} uses transfer syntax {UID(ts).name} ({ts}), which this server cannot decode: "
                         "send it uncompressed (e.g. `gdcmconv --raw` or `dcmdjpeg`) or install the decoders with "
                         "pip install 'spleen-deepedit[dicom]'", 415)


def _floats(ds: Dataset, keyword: str, n: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DicomError("missing_geometry", f"{name}: {keyword} is missing or malformed ({value!r}); the volume's "
                         "geometry cannot be known: re-export the series with its image plane module")
    return arr


def _check_slice(ds: Dataset, name: str) -> None:
    modality = str(ds.get("Modality", ""))
    if modality not in SUPPORTED_MODALITIES:
        raise DicomError("unsupported_modality", f"{name} has modality {modality or 'none'!r}: the model segments CT "
                         "only; upload a CT series")
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        raise DicomError("multi_frame", f"{name} is a multi-frame image ({int(frames)} frames, e.g. Enhanced CT), which "
                         "is not supported: convert it to single-frame slices (e.g. dcm4che's emf2sf) and upload those")
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError("no_image", f"{name} is a DICOM file without an image ({ds.get('SOPClassUID', 'unknown class')}): "
                         "upload only the CT slices")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in (
            "MONOCHROME1", "MONOCHROME2"):
        raise DicomError("not_grayscale", f"{name} is not a grayscale image: upload the original CT slices")
    tilt = ds.get("GantryDetectorTilt")
    if tilt is not None and abs(float(tilt)) > 1e-3:
        raise DicomError("gantry_tilt", f"{name}: gantry tilt of {float(tilt)} degrees; tilted slices do not form a "
                         "regular grid: resample the series to an untilted grid (e.g. with dcm2niix) first")


def _one_series(headers: list[tuple[str, Dataset]], label: str) -> None:
    series: dict[str, list[str]] = {}
    for name, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(name)
    if len(series) > 1:
        parts = ", ".join(f"{len(names)} file(s) like {names[0]}" for names in series.values())
        raise DicomError("several_series", f"{label} holds {len(series)} series ({parts}): upload exactly one series "
                         "(one folder or zip per series)")


def _geometry(headers: list[tuple[str, Dataset]], limits: SeriesLimits, label: str):
    """Sort the slices along the normal and check the grid; -> (order, LPS affine, spacing)."""
    name0, ds0 = headers[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, name0)
    row_cos, col_cos = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_cos) - 1) > 1e-2 or abs(np.linalg.norm(col_cos) - 1) > 1e-2 or abs(row_cos @ col_cos) > 1e-2:
        raise DicomError("bad_orientation", f"{name0}: ImageOrientationPatient {iop.tolist()} is not two orthonormal "
                         "directions: the file is corrupt; re-export the series")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    spacing = _floats(ds0, "PixelSpacing", 2, name0)  # [between rows, between columns]
    if (spacing <= 0).any():
        raise DicomError("missing_geometry", f"{name0}: PixelSpacing {spacing.tolist()} must be positive: re-export the series")
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    positions = []
    for name, ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise DicomError("inconsistent_slices", f"{name} is {int(ds.Rows)}x{int(ds.Columns)} pixels, {name0} is "
                             f"{shape0[0]}x{shape0[1]}: the files are not one series; upload one series")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, name), iop, atol=1e-4) or not np.allclose(
                _floats(ds, "PixelSpacing", 2, name), spacing, rtol=1e-4):
            raise DicomError("inconsistent_slices", f"{name} differs from {name0} in orientation or pixel spacing: "
                             "the files are not one regular series; upload one series")
        positions.append(_floats(ds, "ImagePositionPatient", 3, name))
    pos = np.asarray(positions)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    pos, dist = pos[order], dist[order]
    names = [headers[i][0] for i in order]
    n = len(order)
    if n < limits.min_slices:
        raise DicomError("too_few_slices", f"{label} holds {n} slice(s): a volume needs at least {limits.min_slices}; "
                         "upload the whole series")
    gaps = np.diff(dist)
    scale = max(float(np.median(gaps)), 0.0)
    dup = np.flatnonzero(gaps <= max(1e-3, 1e-3 * scale))
    if dup.size:
        i = int(dup[0])
        raise DicomError("duplicate_slices", f"{names[i]} and {names[i + 1]} lie at the same position "
                         f"({dist[i]:.3f} mm along the slice normal): remove duplicate slices (or a second series "
                         "reconstructed at the same positions) and upload again")
    dev = np.abs(gaps - scale) / scale
    bad = np.flatnonzero(dev > limits.spacing_tolerance)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / scale
        if ratio > 1.5 and abs(ratio - round(ratio)) <= limits.spacing_tolerance:
            raise DicomError("missing_slices", f"{int(round(ratio)) - 1} slice(s) missing between {names[i]} and "
                             f"{names[i + 1]} (gap {gaps[i]:.3f} mm, usual spacing {scale:.3f} mm): upload the whole series")
        raise DicomError("uneven_spacing", f"slice spacing varies: {gaps[i]:.3f} mm between {names[i]} and {names[i + 1]}, "
                         f"usually {scale:.3f} mm (tolerance {limits.spacing_tolerance:.0%}): resample the series to "
                         "even spacing (e.g. with dcm2niix) first")
    # Sideways drift of the slice positions: a tilted gantry or sheared stack, not a regular grid.
    lateral = (pos - pos[0]) - np.outer(dist - dist[0], normal)
    drift = np.linalg.norm(lateral, axis=1)
    # Floor: a quarter pixel, so positions rounded to 0.1 mm (as some scanners write them) pass.
    limit = limits.tilt_tolerance * np.abs(dist - dist[0]) + 0.25 * float(spacing.min())
    if (drift > limit).any():
        i = int(np.argmax(drift - limit))
        raise DicomError("gantry_tilt", f"{names[i]} is offset {drift[i]:.3f} mm sideways from the slice normal through "
                         f"{names[0]}: the slices are tilted or sheared (gantry tilt); resample the series to an "
                         "untilted grid (e.g. with dcm2niix) first")
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # i: along a row, columns apart
    lps[:3, 1] = col_cos * spacing[0]  # j: down a column, rows apart
    lps[:3, 2] = (pos[-1] - pos[0]) / (n - 1)
    lps[:3, 3] = pos[0]
    return order, lps, (float(spacing[1]), float(spacing[0]), float(np.linalg.norm(lps[:3, 2])))


def _decode(pydicom, name: str, opener: Callable[[], IO[bytes]], shape: tuple[int, int]) -> tuple[np.ndarray, Dataset]:
    try:
        with opener() as f:
            ds = _with_transfer_syntax(pydicom.dcmread(f, force=True))  # the header pass vetted the file
        pixels = ds.pixel_array
    except Exception as exc:  # truncated pixel data, codec errors
        raise DicomError("undecodable", f"{name}: the pixel data cannot be decoded ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); re-export the series uncompressed") from None
    if pixels.shape != shape:
        raise DicomError("inconsistent_slices", f"{name}: pixel data of shape {pixels.shape}, expected {shape}: "
                         "the file is corrupt; re-export the series")
    del ds.PixelData  # keep the header only (for the SEG's references)
    # Read from a stream (a zip member, bytes), pydicom keeps the stream as `buffer`: drop it, so the
    # header holds no closed file and can be pickled (Ray passes it between tasks).
    ds.buffer, ds.filename = None, name
    return pixels, ds


@dataclass(kw_only=True, slots=True)
class SeriesScan:
    """A series after its header pass, before any pixel is decoded: enough to price the decode.

    `order` sorts `members` along the slice normal; `lps` is the index -> LPS affine."""

    members: Sequence[Member]
    label: str
    order: np.ndarray
    lps: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]  # (columns, rows, slices): the volume's array shape
    transfer_syntax: str

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def max_file_bytes(self) -> int:
        """Bytes of the largest file (one is inflated at a time while decoding)."""
        return max(size for _, size, _ in self.members)


def scan_members(members: Sequence[Member], label: str, limits: SeriesLimits | None = None) -> SeriesScan:
    """Step 1 and 2 of reading (counts, headers, geometry, voxel limits); no pixel is decoded."""
    limits = limits or SeriesLimits()
    _check_counts(members, label, limits)
    pydicom = _import_pydicom()
    headers = [(name, _read_header(pydicom, name, opener)) for name, _, opener in members]
    for name, ds in headers:
        _check_slice(ds, name)
    _one_series(headers, label)
    ts = str(headers[0][1].file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    for name, ds in headers:
        _check_decodable(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")), name)
    order, lps, spacing = _geometry(headers, limits, label)
    rows, cols, n = int(headers[0][1].Rows), int(headers[0][1].Columns), len(order)
    if max(rows, cols, n) > limits.max_dim or rows * cols * n > limits.max_voxels:
        raise DicomError("volume_too_large", f"{label}: volume of {cols}x{rows}x{n} voxels is over the limits "
                         f"({limits.max_voxels} voxels, {limits.max_dim} per axis): crop or downsample the series", 413)
    return SeriesScan(members=members, label=label, order=order, lps=lps, spacing=spacing, shape=(cols, rows, n),
                      transfer_syntax=ts)


def decode_scan(scan: SeriesScan) -> DicomVolume:
    """Step 3 of reading: decode the scanned series' pixels into one float32 volume (HU)."""
    pydicom = _import_pydicom()
    cols, rows, n = scan.shape
    # (slices, rows, columns) in C order, returned as its transpose: (columns, rows, slices), no copy.
    volume = np.empty((n, rows, cols), dtype=np.float32)
    datasets, names = [], []
    for k, idx in enumerate(scan.order):
        name, _, opener = scan.members[int(idx)]
        pixels, ds = _decode(pydicom, name, opener, (rows, cols))
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(pixels, slope, out=volume[k], casting="unsafe")
        volume[k] += intercept
        if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":  # brighter is lower: not CT, but be exact
            volume[k] *= -1
        datasets.append(ds)
        names.append(name)
    meta = SeriesMeta(datasets=datasets, names=names, transfer_syntax=scan.transfer_syntax, spacing=scan.spacing)
    return DicomVolume(volume.transpose(2, 1, 0), LPS_TO_RAS @ scan.lps, meta)


def read_members(members: Sequence[Member], label: str, limits: SeriesLimits | None = None) -> DicomVolume:
    """Read one CT series from its files (see the module docstring for the checks and their order)."""
    return decode_scan(scan_members(members, label, limits))


def read_series(source: str | os.PathLike, limits: SeriesLimits | None = None) -> DicomVolume:
    """Read a CT series from a folder (all files under it) or a `.zip` file (a single file is read as a
    one-file series, which fails with the reason).

    Raises:
        DicomError: the source is not one readable, regular CT series; the message says why and what to do.
        FileNotFoundError: `source` does not exist.
    """
    path = Path(source)
    if path.is_dir():
        return read_members(_dir_members(path), str(path), limits)
    if path.is_file():
        with open(path, "rb") as f:
            is_zip = f.read(4) == ZIP_MAGIC
        if not is_zip:  # one DICOM file: refused as a single slice, or as not DICOM, with that reason
            return read_members([(path.name, path.stat().st_size, lambda: open(path, "rb"))], str(path), limits)
        with _open_zip(str(path), str(path)) as zf:
            return read_members(_zip_members(zf, str(path)), str(path), limits)
    raise FileNotFoundError(f"{str(path)!r} does not exist: pass a DICOM series folder or a .zip of one")


def read_series_bytes(data: bytes, limits: SeriesLimits | None = None, label: str = "the upload") -> DicomVolume:
    """Read a CT series from the bytes of a zip archive, or of a single DICOM file (which then fails
    as a one-slice volume with a message saying so). For the HTTP API; `label` names it in messages."""
    if data[:4] == ZIP_MAGIC:
        with _open_zip(data, label) as zf:
            return read_members(_zip_members(zf, label), label, limits)
    return read_files([("upload.dcm", data)], limits, label)


def upload_members(data: bytes | Sequence[tuple[str, bytes]], label: str = "the upload") -> list[Member]:
    """The files of an upload: a zip archive's members, one DICOM file, or (name, bytes) pairs (multipart).

    A zip stays open while its members are read (the archive lives in memory; nothing to close)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if bytes(data[:4]) == ZIP_MAGIC:
            return _zip_members(_open_zip(bytes(data), label), label)
        data = [("upload.dcm", bytes(data))]
    return [(name, len(blob), functools.partial(io.BytesIO, blob)) for name, blob in data if not _ignored(name)]


def read_files(files: Iterable[tuple[str, bytes]], limits: SeriesLimits | None = None,
               label: str = "the upload") -> DicomVolume:
    """Read a CT series from (file name, bytes) pairs, e.g. the parts of a multipart upload."""
    members = [(name, len(data), lambda d=data: io.BytesIO(d)) for name, data in files if not _ignored(name)]
    return read_members(members, label, limits)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True, kw_only=True, slots=True)
class SegInfo:
    """Who made a segmentation, for the SEG's equipment and algorithm identification."""

    model_version: str
    algorithm_name: str = "spleen-deepedit"
    manufacturer: str = "spleen-deepedit"
    model_name: str = "DeepEdit DynUNet"
    software_version: str = field(default_factory=lambda: _package_version())
    series_description: str = "Spleen segmentation (spleen-deepedit, research use)"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spleen-deepedit")
    except PackageNotFoundError:
        return "0+unknown"


def seg_dataset(mask: np.ndarray, meta: SeriesMeta, info: SegInfo) -> Dataset:
    """A binary DICOM Segmentation of `mask` (same `[column, row, slice]` grid as the series read).

    The SEG is a new series in the source's study, references every source slice, and carries one
    segment, "Spleen" (SNOMED CT 78961009, category Anatomical Structure 91723000), made by the
    automatic algorithm `info.algorithm_name` version `info.model_version`.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise DicomError("dicom_unavailable", "writing DICOM SEG needs highdicom: pip install 'spleen-deepedit[dicom]'", 501) from None
    expected = (int(meta.datasets[0].Columns), int(meta.datasets[0].Rows), meta.n_slices)
    if tuple(mask.shape) != expected:
        raise DicomError("mask_shape", f"mask of shape {tuple(mask.shape)} does not fit the series grid {expected}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=info.algorithm_name, version=info.model_version[:64], family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEG_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Spleen,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id="spleen",
    )
    frames = np.ascontiguousarray((np.asarray(mask) > 0).transpose(2, 1, 0), dtype=np.uint8)  # (slices, rows, columns)
    seg = hd.seg.Segmentation(
        source_images=meta.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=info.manufacturer,
        manufacturer_model_name=info.model_name,
        software_versions=info.software_version,
        device_serial_number="none",
        content_label="SPLEEN",
        content_description="automatic spleen segmentation",
        series_description=info.series_description,
        # Keep empty slices: an empty mask is still a valid answer, and readers see the full grid.
        omit_empty_frames=False,
    )
    _drop_optional_copies(seg)
    return seg


#: Where a device stands: not copied into the SEG's contributing equipment.
_SITE_ATTRIBUTES = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                    "InstitutionalDepartmentTypeCodeSequence", "StationName", "DeviceSerialNumber", "OperatorsName")
#: Optional attributes kept anyway: the de-identification flag, which its required dependents name.
_KEEP_OPTIONAL = frozenset({"PatientIdentityRemoved"})


def _drop_optional_copies(seg: Dataset) -> None:
    """Remove the patient and study attributes the standard does not require of a SEG.

    highdicom copies every root attribute of the source's Patient and Study modules (Type 3 ones such
    as PatientComments, and the optional Patient Study and Clinical Trial modules: age, weight, ...).
    The SEG keeps only the Type 1, 1C, 2 and 2C attributes of its mandatory modules (Patient, General
    Study): names, IDs, birth date, sex, study UID, date, time, ID, accession number, referring
    physician; de-identification attributes stay when present.
    """
    try:  # highdicom's table of the standard (pinned minor version: see pyproject's dicom extra)
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    except ImportError:  # pragma: no cover - a newer highdicom moved it: keep its behaviour
        return
    attributes = get_module_attribute_map()
    for module in get_iod_module_map()[get_sop_class_iod_map()[seg.SOPClassUID]]:
        if module["ie"] not in ("Patient", "Study"):
            continue
        for item in attributes[module["key"]]:
            if item["path"]:
                continue
            required = module["usage"] == "M" and item["type"] in ("1", "1C", "2", "2C")
            if not required and item["keyword"] not in _KEEP_OPTIONAL and item["keyword"] in seg:
                delattr(seg, item["keyword"])
    # highdicom also lists the source's scanner as contributing equipment (optional): keep what it
    # was (manufacturer, model, software), not where it stands (institution, station, serial number).
    for item in seg.get("ContributingEquipmentSequence", []):
        for keyword in _SITE_ATTRIBUTES:
            if keyword in item:
                delattr(item, keyword)


def seg_bytes(mask: np.ndarray, meta: SeriesMeta, info: SegInfo) -> bytes:
    """The DICOM Part 10 bytes of `seg_dataset(...)` (for the HTTP API)."""
    buf = io.BytesIO()
    seg_dataset(mask, meta, info).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_seg(path: str | os.PathLike, mask: np.ndarray, meta: SeriesMeta, info: SegInfo) -> None:
    """Write the SEG to `path` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = seg_bytes(mask, meta, info)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_volume_any(source: str | os.PathLike, limits: SeriesLimits | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """A NIfTI file, a DICOM series folder or a `.zip` of one -> (float32 image, RAS affine, SeriesMeta or None)."""
    if is_dicom_source(source):
        vol = read_series(source, limits)
        return vol.image, vol.affine, vol.meta
    from .data import load_volume

    image, affine = load_volume(Path(source))
    return image, affine, None


# ----------------------------------------------------------------------------- synthetic series


def write_ct_series(out_dir: str | os.PathLike, image: np.ndarray, affine: np.ndarray, *, transfer_syntax: str | None = None,
                    seed: int = 0, intercept: float = -1024.0) -> list[Path]:
    """Write a volume (`[i, j, k]` array of HU, RAS affine without shear) as single-frame CT slices.

    For tests, benchmarks and demos (synthetic phantoms as a scanner would export them): slice k holds
    `image[:, :, k]` with rows along j, so reading the series back gives the same grid (up to the
    order of k, which is sorted along the slice normal). Pixels are stored unsigned with
    `RescaleIntercept` (the common CT encoding), optionally compressed (`transfer_syntax`, e.g.
    JPEG 2000 Lossless, when pydicom has an encoder for it). File names are shuffled by `seed`, so a
    reader cannot rely on their order. Returns the files written.
    """
    _import_pydicom()  # a clear error without the dicom extra
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row_cos, col_cos = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    stored = np.clip(np.rint(np.asarray(image, dtype=np.float64) - intercept), 0, 65535).astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    n = image.shape[2]
    names = np.random.default_rng(seed).permutation(n)
    written = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Synthetic", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series, 1
        ds.PatientPosition, ds.BodyPartExamined = "FFS", "ABDOMEN"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.Manufacturer = "spleen-deepedit synthetic phantom"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientOrientation = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * slice_step]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{np.linalg.norm(row_step):.6f}", f"{np.linalg.norm(col_step):.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(slice_step):.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", "1", "HU"
        ds.KVP, ds.AcquisitionNumber = "120", 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows along j, columns along i
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        path = out / f"IM{int(names[k]):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


#: `synth --dicom` choices -> transfer syntax UIDs (None: Explicit VR Little Endian, uncompressed).
SYNTH_SYNTAXES = {"uncompressed": None, "jpeg2000": "1.2.840.10008.1.2.4.90", "jpegls": "1.2.840.10008.1.2.4.80",
                  "rle": "1.2.840.10008.1.2.5"}


def write_dicom_dataset(root: str | os.PathLike, syntax: str = "uncompressed") -> list[Path]:
    """Write each image of a Decathlon-layout dataset (`imagesTr/`, `imagesTs/`) also as a DICOM CT
    series, `root/dicom/<folder>/<case>/`, in the transfer syntax `syntax` (a `SYNTH_SYNTAXES` key).
    The series keep each phantom's orientation (RAS, LPS or LAS). Returns the series folders."""
    import nibabel as nib

    if syntax not in SYNTH_SYNTAXES:
        raise DicomError("bad_syntax", f"--dicom {syntax!r}: use one of {sorted(SYNTH_SYNTAXES)}")
    root = Path(root)
    out: list[Path] = []
    for folder in ("imagesTr", "imagesTs"):
        for path in sorted((root / folder).glob("*.nii.gz")) if (root / folder).is_dir() else []:
            img: Any = nib.load(path)
            target = root / "dicom" / folder / path.name[: -len(".nii.gz")]
            write_ct_series(target, np.asanyarray(img.dataobj), img.affine, transfer_syntax=SYNTH_SYNTAXES[syntax],
                            seed=len(out))
            out.append(target)
    return out
