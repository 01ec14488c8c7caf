"""Reading a DICOM CT series: counts, headers and geometry first, then the pixels (see `trainer.dicom`).

`scan_members` is the header pass (steps 1 and 2 of the package docstring), `decode_scan` the pixel
pass (step 3); the HTTP API prices the decode between them. pydicom loads when a function here runs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..errors import DicomError
from .series import (
    LPS_TO_RAS,
    ZIP_MAGIC,
    DicomVolume,
    Member,
    SeriesLimits,
    SeriesMeta,
    dir_members,
    is_dicom_source,
    is_ignored,
    open_zip,
    zip_members,
)

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

#: Modalities accepted: the model was trained on CT only.
SUPPORTED_MODALITIES = ("CT",)


def import_pydicom():
    """pydicom, or a DicomError saying to install the `dicom` extra."""
    try:
        import pydicom
    except ImportError:
        raise DicomError(
            "dicom_unavailable", "reading DICOM needs pydicom: pip install 'spleen-deepedit[dicom]'", 501
        ) from None
    return pydicom


def _check_counts(members: Sequence[Member], label: str, limits: SeriesLimits) -> None:
    if not members:
        raise DicomError("empty_upload", f"{label} holds no DICOM files: pass the folder (or zip) of one CT series")
    if len(members) > limits.max_files:
        raise DicomError(
            "too_many_files",
            f"{label} holds {len(members)} files, over the limit of {limits.max_files}: upload one series at a time",
            413,
        )
    total = sum(size for _, size, _ in members)
    if total > limits.max_bytes:
        raise DicomError(
            "too_large",
            f"{label} holds {total} bytes of files, over the limit of {limits.max_bytes}: upload one series at a time",
            413,
        )


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """A dataset read without file meta (a raw PACS export, no `DICM` preamble) gets the transfer
    syntax its encoding was read in, so its pixels can be decoded."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _read_header(pydicom, name: str, opener: Callable[[], IO[bytes]]) -> Dataset:
    from pydicom.errors import InvalidDicomError

    not_dicom = DicomError(
        "not_dicom",
        f"{name} is not a DICOM file (no DICOM header): upload only the .dcm files of "
        "one CT series (a zip, a folder, or the files)",
    )
    try:
        with opener() as f:
            return pydicom.dcmread(f, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception as exc:  # truncated or corrupt headers raise many types
        raise DicomError(
            "bad_dicom", f"{name} is not a readable DICOM file ({type(exc).__name__}): re-export the series"
        ) from None
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

        raise DicomError(
            "unsupported_transfer_syntax",
            f"{name} uses transfer syntax {UID(ts).name} ({ts}), which this server cannot decode: "
            "send it uncompressed (e.g. `gdcmconv --raw` or `dcmdjpeg`) or install the decoders with "
            "pip install 'spleen-deepedit[dicom]'",
            415,
        )


def _floats(ds: Dataset, keyword: str, n: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DicomError(
            "missing_geometry",
            f"{name}: {keyword} is missing or malformed ({value!r}); the volume's "
            "geometry cannot be known: re-export the series with its image plane module",
        )
    return arr


def _check_slice(ds: Dataset, name: str) -> None:
    modality = str(ds.get("Modality", ""))
    if modality not in SUPPORTED_MODALITIES:
        raise DicomError(
            "unsupported_modality",
            f"{name} has modality {modality or 'none'!r}: the model segments CT only; upload a CT series",
        )
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        raise DicomError(
            "multi_frame",
            f"{name} is a multi-frame image ({int(frames)} frames, e.g. Enhanced CT), which "
            "is not supported: convert it to single-frame slices (e.g. dcm4che's emf2sf) and upload those",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError(
            "no_image",
            f"{name} is a DICOM file without an image ({ds.get('SOPClassUID', 'unknown class')}): "
            "upload only the CT slices",
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise DicomError("not_grayscale", f"{name} is not a grayscale image: upload the original CT slices")
    tilt = ds.get("GantryDetectorTilt")
    if tilt is not None and abs(float(tilt)) > 1e-3:
        raise DicomError(
            "gantry_tilt",
            f"{name}: gantry tilt of {float(tilt)} degrees; tilted slices do not form a "
            "regular grid: resample the series to an untilted grid (e.g. with dcm2niix) first",
        )


def _one_series(headers: list[tuple[str, Dataset]], label: str) -> None:
    series: dict[str, list[str]] = {}
    for name, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(name)
    if len(series) > 1:
        parts = ", ".join(f"{len(names)} file(s) like {names[0]}" for names in series.values())
        raise DicomError(
            "several_series",
            f"{label} holds {len(series)} series ({parts}): upload exactly one series (one folder or zip per series)",
        )


def _orientation(ds0: Dataset, name0: str) -> tuple[np.ndarray, np.ndarray]:
    """The first slice's ImageOrientationPatient (checked orthonormal) and PixelSpacing (checked positive)."""
    iop = _floats(ds0, "ImageOrientationPatient", 6, name0)
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-2
        or abs(np.linalg.norm(col_cos) - 1) > 1e-2
        or abs(row_cos @ col_cos) > 1e-2
    ):
        raise DicomError(
            "bad_orientation",
            f"{name0}: ImageOrientationPatient {iop.tolist()} is not two orthonormal "
            "directions: the file is corrupt; re-export the series",
        )
    spacing = _floats(ds0, "PixelSpacing", 2, name0)  # [between rows, between columns]
    if (spacing <= 0).any():
        raise DicomError(
            "missing_geometry", f"{name0}: PixelSpacing {spacing.tolist()} must be positive: re-export the series"
        )
    return iop, spacing


def _positions(headers: list[tuple[str, Dataset]], iop: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Each slice's ImagePositionPatient, after checking it shares the first slice's grid."""
    name0, ds0 = headers[0]
    shape0 = (int(ds0.Rows), int(ds0.Columns))
    positions = []
    for name, ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise DicomError(
                "inconsistent_slices",
                f"{name} is {int(ds.Rows)}x{int(ds.Columns)} pixels, {name0} is "
                f"{shape0[0]}x{shape0[1]}: the files are not one series; upload one series",
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, name), iop, atol=1e-4) or not np.allclose(
            _floats(ds, "PixelSpacing", 2, name), spacing, rtol=1e-4
        ):
            raise DicomError(
                "inconsistent_slices",
                f"{name} differs from {name0} in orientation or pixel spacing: "
                "the files are not one regular series; upload one series",
            )
        positions.append(_floats(ds, "ImagePositionPatient", 3, name))
    return np.asarray(positions)


def _check_gaps(dist: np.ndarray, names: list[str], limits: SeriesLimits) -> None:
    """Refuse duplicate, missing and unevenly spaced slices (`dist`: sorted positions along the normal)."""
    gaps = np.diff(dist)
    scale = max(float(np.median(gaps)), 0.0)
    dup = np.flatnonzero(gaps <= max(1e-3, 1e-3 * scale))
    if dup.size:
        i = int(dup[0])
        raise DicomError(
            "duplicate_slices",
            f"{names[i]} and {names[i + 1]} lie at the same position "
            f"({dist[i]:.3f} mm along the slice normal): remove duplicate slices (or a second series "
            "reconstructed at the same positions) and upload again",
        )
    dev = np.abs(gaps - scale) / scale
    bad = np.flatnonzero(dev > limits.spacing_tolerance)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / scale
        if ratio > 1.5 and abs(ratio - round(ratio)) <= limits.spacing_tolerance:
            raise DicomError(
                "missing_slices",
                f"{int(round(ratio)) - 1} slice(s) missing between {names[i]} and "
                f"{names[i + 1]} (gap {gaps[i]:.3f} mm, usual spacing {scale:.3f} mm): upload the whole series",
            )
        raise DicomError(
            "uneven_spacing",
            f"slice spacing varies: {gaps[i]:.3f} mm between {names[i]} and {names[i + 1]}, "
            f"usually {scale:.3f} mm (tolerance {limits.spacing_tolerance:.0%}): resample the series to "
            "even spacing (e.g. with dcm2niix) first",
        )


def _check_tilt(
    pos: np.ndarray, dist: np.ndarray, normal: np.ndarray, names: list[str], pixel: float, limits: SeriesLimits
) -> None:
    """Refuse sideways drift of the slice positions: a tilted gantry or sheared stack, not a regular grid."""
    lateral = (pos - pos[0]) - np.outer(dist - dist[0], normal)
    drift = np.linalg.norm(lateral, axis=1)
    # Floor: a quarter pixel, so positions rounded to 0.1 mm (as some scanners write them) pass.
    limit = limits.tilt_tolerance * np.abs(dist - dist[0]) + 0.25 * pixel
    if (drift > limit).any():
        i = int(np.argmax(drift - limit))
        raise DicomError(
            "gantry_tilt",
            f"{names[i]} is offset {drift[i]:.3f} mm sideways from the slice normal through "
            f"{names[0]}: the slices are tilted or sheared (gantry tilt); resample the series to an "
            "untilted grid (e.g. with dcm2niix) first",
        )


def _geometry(headers: list[tuple[str, Dataset]], limits: SeriesLimits, label: str):
    """Sort the slices along the normal and check the grid; -> (order, LPS affine, spacing)."""
    iop, spacing = _orientation(headers[0][1], headers[0][0])
    row_cos, col_cos = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_cos, col_cos)
    pos = _positions(headers, iop, spacing)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    pos, dist = pos[order], dist[order]
    names = [headers[i][0] for i in order]
    n = len(order)
    if n < limits.min_slices:
        raise DicomError(
            "too_few_slices",
            f"{label} holds {n} slice(s): a volume needs at least {limits.min_slices}; upload the whole series",
        )
    _check_gaps(dist, names, limits)
    _check_tilt(pos, dist, normal, names, float(spacing.min()), limits)
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
        raise DicomError(
            "undecodable",
            f"{name}: the pixel data cannot be decoded ({type(exc).__name__}: "
            f"{str(exc)[:200]}); re-export the series uncompressed",
        ) from None
    if pixels.shape != shape:
        raise DicomError(
            "inconsistent_slices",
            f"{name}: pixel data of shape {pixels.shape}, expected {shape}: the file is corrupt; re-export the series",
        )
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
    pydicom = import_pydicom()
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
        raise DicomError(
            "volume_too_large",
            f"{label}: volume of {cols}x{rows}x{n} voxels is over the limits "
            f"({limits.max_voxels} voxels, {limits.max_dim} per axis): crop or downsample the series",
            413,
        )
    return SeriesScan(
        members=members, label=label, order=order, lps=lps, spacing=spacing, shape=(cols, rows, n), transfer_syntax=ts
    )


def decode_scan(scan: SeriesScan) -> DicomVolume:
    """Step 3 of reading: decode the scanned series' pixels into one float32 volume (HU)."""
    pydicom = import_pydicom()
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
        return read_members(dir_members(path), str(path), limits)
    if path.is_file():
        with open(path, "rb") as f:
            is_zip = f.read(4) == ZIP_MAGIC
        if not is_zip:  # one DICOM file: refused as a single slice, or as not DICOM, with that reason
            return read_members([(path.name, path.stat().st_size, lambda: open(path, "rb"))], str(path), limits)
        with open_zip(str(path), str(path)) as zf:
            return read_members(zip_members(zf, str(path)), str(path), limits)
    raise FileNotFoundError(f"{str(path)!r} does not exist: pass a DICOM series folder or a .zip of one")


def read_series_bytes(data: bytes, limits: SeriesLimits | None = None, label: str = "the upload") -> DicomVolume:
    """Read a CT series from the bytes of a zip archive, or of a single DICOM file (which then fails
    as a one-slice volume with a message saying so). For the HTTP API; `label` names it in messages."""
    if data[:4] == ZIP_MAGIC:
        with open_zip(data, label) as zf:
            return read_members(zip_members(zf, label), label, limits)
    return read_files([("upload.dcm", data)], limits, label)


def read_files(
    files: Iterable[tuple[str, bytes]], limits: SeriesLimits | None = None, label: str = "the upload"
) -> DicomVolume:
    """Read a CT series from (file name, bytes) pairs, e.g. the parts of a multipart upload."""
    members = [(name, len(data), lambda d=data: io.BytesIO(d)) for name, data in files if not is_ignored(name)]
    return read_members(members, label, limits)


def read_volume_any(
    source: str | os.PathLike, limits: SeriesLimits | None = None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """A NIfTI file, a DICOM series folder or a `.zip` of one -> (float32 image, RAS affine, SeriesMeta or None)."""
    if is_dicom_source(source):
        vol = read_series(source, limits)
        return vol.image, vol.affine, vol.meta
    from ..data import load_volume

    image, affine = load_volume(Path(source))
    return image, affine, None
