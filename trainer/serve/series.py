"""DICOM series over HTTP: a zip of `.dcm` files (or the files as multipart parts) in, DICOM SEG out.

An upload is a series when its bytes start like a zip archive or a DICOM Part 10 file (`DICM` after
the 128-byte preamble); anything else goes to the NIfTI decoder. Reading follows the NIfTI path's
rule that cost is known before work (see `codecs.py`):

1. `scan_upload` lists the files (a zip's central directory; declared sizes are summed against the
   byte limit before anything is inflated, and a member never inflates past its declared size, so a
   zip bomb is a 413), reads their headers only and checks the series (one CT series, regular grid,
   voxel limits of `ServeArgs`). Its `SeriesScan.n_voxels` prices the request for the admission budget.
2. `decode_upload` decodes the pixels, slice by slice, into one float32 volume.

Every `DicomError` becomes an `ApiError` with its status and code; the detail may name an uploaded
file (which can hold a patient's name), so it goes to the client and is never logged here (`ApiError`s
are not logged by the service either).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .codecs import WORK_BYTES_PER_VOXEL, VolumeLimits
from .errors import ApiError

#: Bytes a slice's header may take beyond its pixels in the byte limit of an upload (`SeriesLimits.max_bytes`).
HEADER_BYTES_PER_FILE = 256 * 1024
#: Memory charged per cached slice header (pixels dropped) of a DICOM session, kept for its SEG.
CACHED_HEADER_BYTES = 16 * 1024
#: Where a DICOM session keeps its series headers (`Entry.extra`).
META_KEY = "dicom_meta"
#: Media type of a DICOM SEG reply (DICOM Part 10 file).
DICOM_MEDIA_TYPE = "application/dicom"


def is_series_upload(data: Any) -> bool:
    """True for several files (multipart parts) or bytes that start like a zip or a DICOM file."""
    if isinstance(data, list):
        return True
    from trainer.dicom import is_dicom_bytes

    return is_dicom_bytes(data)


def series_limits(limits: VolumeLimits):
    """The NIfTI upload limits applied to a series: the same voxels and axis sizes; at most `max_dim`
    files (one per slice) whose sizes, inflated, sum to at most `max_volume_bytes` of voxels plus
    `HEADER_BYTES_PER_FILE` per file."""
    from trainer.dicom import SeriesLimits

    return SeriesLimits(
        max_files=limits.max_dim,
        max_bytes=limits.max_volume_bytes + limits.max_dim * HEADER_BYTES_PER_FILE,
        max_voxels=limits.max_voxels,
        max_dim=limits.max_dim,
        min_slices=limits.min_dim,
    )


def seg_needs_series() -> ApiError:
    """The 400 of a DICOM SEG asked for a volume that was not uploaded as a DICOM series."""
    return ApiError(
        400,
        "bad_format",
        "a DICOM SEG (format=dcm, output=dicom_seg) answers a DICOM series upload only: "
        "upload the series (a zip or the .dcm files) or ask for another format (nii.gz, nii, nrrd)",
    )


def _api_error(exc: Exception) -> ApiError:
    from trainer.dicom import DicomError

    if isinstance(exc, DicomError):
        return ApiError(exc.status, exc.code, str(exc)[:500])
    # Anything else a corrupt upload makes the readers raise; its message stays out of logs too.
    return ApiError(
        422,
        "bad_dicom",
        f"the DICOM upload cannot be read ({type(exc).__name__}): upload the .dcm files of one CT series, unmodified",
    )


def scan_upload(data: bytes | Sequence[tuple[str, bytes]], limits: VolumeLimits):
    """Header pass of a series upload -> `trainer.dicom.SeriesScan` (no pixel decoded); 4xx ApiError."""
    from trainer.dicom import scan_members, upload_members

    try:
        return scan_members(upload_members(data), "the upload", series_limits(limits))
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure is the upload's fault, reported as 4xx
        raise _api_error(exc) from None


def work_bytes(scan) -> int:
    """Estimated peak memory of decode + preprocess: as for NIfTI per voxel, plus one inflated file."""
    return scan.n_voxels * WORK_BYTES_PER_VOXEL + scan.max_file_bytes


def decode_upload(scan) -> tuple[np.ndarray, np.ndarray, Any]:
    """Scanned series -> (float32 volume, RAS affine, SeriesMeta); 4xx ApiError on undecodable pixels."""
    from trainer.dicom import decode_scan

    try:
        vol = decode_scan(scan)
    except Exception as exc:  # noqa: BLE001
        raise _api_error(exc) from None
    if not np.isfinite(vol.image).all():
        raise ApiError(
            422, "non_finite", "the series' rescaled voxels are not finite (RescaleSlope/Intercept out of range)"
        )
    return vol.image, vol.affine, vol.meta


def seg_body(mask: np.ndarray, meta, model_version: str) -> bytes:
    """The DICOM SEG of `mask`, referencing the uploaded series, the algorithm version = the model's."""
    from trainer.dicom import SegInfo, seg_bytes

    try:
        return seg_bytes(mask, meta, SegInfo(model_version=model_version))
    except Exception as exc:  # noqa: BLE001
        raise _api_error(exc) from None


def meta_bytes(meta) -> int:
    """Memory charged for keeping a series' headers in a session."""
    return meta.n_slices * CACHED_HEADER_BYTES
