"""Volumes over HTTP: NIfTI in (`.nii` or `.nii.gz`), NIfTI or NRRD out, every cost bounded before work.

Decoding is two steps so that a request's cost is known before anything large is allocated:

1. `read_header` inflates at most one header (540 bytes) and checks everything the header declares:
   shape, voxel type, `vox_offset` (extension bytes at most `max_extension_bytes`), voxels and voxel
   bytes. It returns a `NiftiPlan` whose `work_bytes` is what decoding and preprocessing will hold.
2. `decode_volume` inflates exactly the bytes the header declares (never more; trailing data is
   ignored), views the voxels in place and makes the one float32 copy.

Header extensions are never parsed (nibabel parses each 16-byte record in Python: 8 M records in a
250 KB upload cost minutes), and gzip is inflated in time linear in its input, with a cap on members.
Every problem with an upload becomes an `ApiError` (4xx) whose detail names the value and the fix:
not NIfTI (415), truncated or corrupt (400), not 3D, not finite or unusable geometry (422), too large
(413, naming the setting).
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from .errors import ApiError
from .settings import serve_default

GZIP_MAGIC = b"\x1f\x8b"
#: File extensions a mask can be written as (MONAI Label's `result_extension`).
MASK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
#: Mask dtypes a client may ask for (MONAI Label's `result_dtype`).
MASK_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}
#: Header sizes of NIfTI-1 and NIfTI-2 (`sizeof_hdr`), and the 4-byte extension flag after them.
NIFTI1_HEADER, NIFTI2_HEADER, EXTENSION_FLAG = 348, 540, 4
#: Bytes of working memory per voxel beyond the inflated file: the float32 copy the decoder makes and
#: about three float32 copies in preprocessing (orientation, windowing, resize input). Measured peak
#: of a 256x256x128 int16 upload: see benchmarks/hostile.md.
WORK_BYTES_PER_VOXEL = 16
#: Largest ratio of the longest to the shortest voxel axis of the affine: past it the orientation
#: (nibabel's `io_orientation`) drops an axis, and the volume cannot be resampled.
MAX_AFFINE_CONDITION = 1e6
_NONZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True, kw_only=True, slots=True)
class VolumeLimits:
    """Upload limits (one home for their defaults: `ServeArgs` passes its fields through).

    Attributes:
        max_voxels: largest accepted volume (voxel count).
        max_dim: largest accepted size of any one axis.
        min_dim: smallest accepted size of any axis (a 1-voxel-thick slab is a 2D image).
        max_volume_bytes: largest declared voxel data (voxels x bytes per voxel), checked from the
            header before anything is inflated or allocated.
        max_extension_bytes: largest header extension area (`vox_offset` minus the header); the
            extensions are skipped, never parsed.
        max_gzip_members: most gzip members in one upload (a normal `.nii.gz` has one; BGZF-style
            files have one per 64 KiB).
    """

    max_voxels: int = serve_default("max_voxels")
    max_dim: int = serve_default("max_dim")
    min_dim: int = 2
    max_volume_bytes: int = serve_default("max_volume_bytes")
    max_extension_bytes: int = serve_default("max_extension_bytes")
    max_gzip_members: int = serve_default("max_gzip_members")

    def __post_init__(self) -> None:
        values = (self.max_voxels, self.max_dim, self.min_dim, self.max_volume_bytes, self.max_gzip_members)
        if min(values) < 1 or self.max_extension_bytes < 0:
            raise ValueError("volume limits must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class NiftiPlan:
    """What a checked header declares: enough to price the request before decoding it."""

    header: Any  # nib.Nifti1Header or nib.Nifti2Header (extensions not read)
    shape: tuple[int, int, int]
    dtype: np.dtype
    offset: int
    gzipped: bool

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def file_bytes(self) -> int:
        """Bytes of the (inflated) file the decoder reads: header, extensions, voxels."""
        return self.offset + self.n_voxels * self.dtype.itemsize

    @property
    def work_bytes(self) -> int:
        """Estimated peak memory of decode + preprocess (the admission budget charges this)."""
        return (self.file_bytes if self.gzipped else 0) + self.n_voxels * WORK_BYTES_PER_VOXEL


def _inflate(data: bytes, limit: int, max_members: int) -> bytearray:
    """The first `limit` bytes of a gzip stream (fewer if it ends first), multi-member included.

    Linear in the bytes it reads: each member is fed in growing slices of a memoryview (1 KiB first,
    so a tiny member costs about 1 KiB), never by copying the rest of the input; zero padding between
    members is skipped with one regex search. More than `max_members` members is 413.
    """
    view = memoryview(data)
    out = bytearray()
    pos = members = 0
    try:
        while len(out) < limit:
            nonzero = _NONZERO.search(data, pos)
            if nonzero is None:
                break
            pos = nonzero.start()
            members += 1
            if members > max_members:
                raise ApiError(
                    413,
                    "too_many_gzip_members",
                    f"the gzip stream has more than {max_members} members (max_gzip_members): "
                    "recompress the volume as one gzip stream (gzip, pigz or nibabel do)",
                )
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            step = 1024
            while not d.eof and len(out) < limit:
                if pos >= len(data):
                    raise ApiError(400, "truncated_gzip", "the gzip stream is truncated: upload the whole .nii.gz file")
                chunk = view[pos : pos + step]
                out += d.decompress(chunk, limit - len(out))
                pos += len(chunk) - len(d.unconsumed_tail) - len(d.unused_data)
                step = min(step * 2, 1 << 20)
    except zlib.error as exc:
        raise ApiError(
            400,
            "corrupt_gzip",
            f"the body starts like gzip but does not inflate ({exc}): upload the .nii.gz file unmodified",
        ) from None
    return out


def _header_class(raw: bytes | bytearray):
    """NIfTI-1 or NIfTI-2 by `sizeof_hdr` (either byte order); None if neither."""
    if len(raw) < 4:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(bytes(raw[:4]), dtype=f"{order}i4")[0])
        if size == NIFTI1_HEADER:
            return nib.Nifti1Header
        if size == NIFTI2_HEADER:
            return nib.Nifti2Header
    return None


def read_header(data: bytes, limits: VolumeLimits) -> NiftiPlan:
    """Check what an upload's header declares, inflating at most the header itself.

    Raises:
        ApiError: 4xx naming the value, the limit (and its setting) or the fix.
    """
    gzipped = data[:2] == GZIP_MAGIC
    header, shape, dtype, offset, hdr_size = _parse_header(data, gzipped, limits)
    _check_shape(shape, limits)
    _check_voxels_and_offset(shape, dtype, offset, hdr_size, limits)
    plan = NiftiPlan(header=header, shape=shape, dtype=dtype, offset=offset, gzipped=gzipped)
    if not gzipped and len(data) < plan.file_bytes:
        raise ApiError(
            400,
            "truncated_nifti",
            f"the NIfTI data is truncated: {len(data)} bytes, {plan.file_bytes} expected "
            f"for shape {list(shape)} {dtype}: upload the whole file",
        )
    return plan


def _parse_header(data: bytes, gzipped: bool, limits: VolumeLimits):
    """(header, 3D shape, dtype, vox_offset, header size) of a NIfTI-1 or -2 upload."""
    if not data:
        raise ApiError(
            400, "empty_body", "no volume: send a .nii or .nii.gz file as the body or as the multipart field 'file'"
        )
    raw = _inflate(data, NIFTI2_HEADER, limits.max_gzip_members) if gzipped else data[:NIFTI2_HEADER]
    cls = _header_class(raw)
    if cls is None:
        raise ApiError(
            415,
            "not_nifti",
            "the body is not a NIfTI volume (.nii or .nii.gz): its header size field is not 348 or 540",
        )
    hdr_size = NIFTI1_HEADER if cls is nib.Nifti1Header else NIFTI2_HEADER
    if len(raw) < hdr_size:
        raise ApiError(
            400,
            "truncated_nifti",
            f"the NIfTI header is truncated ({len(raw)} of {hdr_size} bytes): upload the whole file",
        )
    try:
        # Only the header bytes: nibabel finds no extension flag, so it parses no extensions.
        header = cls.from_fileobj(io.BytesIO(bytes(raw[:hdr_size])), check=False)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises several types for garbage headers
        raise ApiError(
            400, "bad_nifti_header", f"the NIfTI header is invalid ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    # A trailing singleton axis (x, y, z, 1) is still a 3D volume.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return header, shape, dtype, offset, hdr_size


def _check_shape(shape: tuple[int, ...], limits: VolumeLimits) -> None:
    if len(shape) != 3:
        raise ApiError(422, "not_3d", f"expected a 3D volume, got shape {list(shape)}")
    if any(s < limits.min_dim for s in shape):
        raise ApiError(422, "not_3d", f"volume shape {list(shape)} has an axis shorter than {limits.min_dim} voxels")
    if max(shape) > limits.max_dim:
        raise ApiError(
            413,
            "volume_too_large",
            f"volume shape {list(shape)} has an axis over the limit of {limits.max_dim} voxels (max_dim)",
        )
    n_vox = math.prod(shape)
    if n_vox > limits.max_voxels:
        raise ApiError(
            413,
            "volume_too_large",
            f"volume shape {list(shape)} has {n_vox} voxels, over the limit of {limits.max_voxels} (max_voxels)",
        )


def _check_voxels_and_offset(shape: tuple[int, ...], dtype, offset: int, hdr_size: int, limits: VolumeLimits) -> None:
    n_vox = math.prod(shape)
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise ApiError(422, "bad_dtype", f"voxel type {dtype} is not supported: use an integer or float type")
    if n_vox * dtype.itemsize > limits.max_volume_bytes:
        raise ApiError(
            413,
            "volume_too_large",
            f"volume shape {list(shape)} of {dtype.name} declares {n_vox * dtype.itemsize} bytes of voxels, over the "
            f"limit of {limits.max_volume_bytes} (max_volume_bytes): send int16 or float32 voxels, or crop the volume",
        )
    if offset < hdr_size:
        raise ApiError(
            422,
            "bad_vox_offset",
            f"vox_offset {offset} points inside the {hdr_size}-byte header: a single-file NIfTI "
            f"stores its voxels after the header (vox_offset >= {hdr_size + EXTENSION_FLAG})",
        )
    if offset - hdr_size - EXTENSION_FLAG > limits.max_extension_bytes:
        raise ApiError(
            413,
            "extensions_too_large",
            f"vox_offset {offset} leaves {offset - hdr_size - EXTENSION_FLAG} bytes of header extensions, over the "
            f"limit of {limits.max_extension_bytes} (max_extension_bytes): strip the extensions (e.g. nibabel: "
            "img.header.extensions.clear())",
        )


def _affine(header) -> np.ndarray:
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:
        raise ApiError(
            422, "bad_affine", f"the volume's sform/qform cannot be read ({type(exc).__name__}): write a valid sform"
        ) from None
    if not np.isfinite(affine).all():
        raise ApiError(422, "bad_affine", "the volume's affine (sform/qform) is not finite: write a finite sform")
    spacing = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if (
        spacing[-1] < 1e-12
        or spacing[0] / spacing[-1] > MAX_AFFINE_CONDITION
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise ApiError(
            422,
            "bad_affine",
            "the volume's affine (sform/qform) is singular or nearly so (its axes collapse "
            f"onto fewer than 3 directions, axis ratio over {MAX_AFFINE_CONDITION:g}): write the scanner's sform",
        )
    ornt = nib.orientations.io_orientation(affine)
    if np.isnan(ornt).any() or len(set(ornt[:, 0].tolist())) != 3:
        raise ApiError(
            422,
            "bad_affine",
            "the volume's affine (sform/qform) has no orientation for every axis (sheared so "
            "that an axis is dropped): write the scanner's sform",
        )
    return affine


def decode_volume(data: bytes, plan: NiftiPlan, limits: VolumeLimits) -> tuple[np.ndarray, np.ndarray]:
    """Upload bytes + checked header -> (float32 3D array in the file's array order, 4x4 affine).

    Inflates exactly `plan.file_bytes` (trailing data is ignored), so memory is what the header
    declared: the inflated file (gzip only) plus one float32 copy.
    """
    raw = _inflate(data, plan.file_bytes, limits.max_gzip_members) if plan.gzipped else data
    if len(raw) < plan.file_bytes:
        raise ApiError(
            400,
            "truncated_nifti",
            f"the NIfTI data is truncated: {len(raw)} bytes, {plan.file_bytes} expected "
            f"for shape {list(plan.shape)} {plan.dtype}: upload the whole file",
        )
    try:
        slope, inter = plan.header.get_slope_inter()
    except Exception:
        raise ApiError(
            422, "bad_scaling", "the header's scl_inter is not finite: set scl_slope/scl_inter to finite values"
        ) from None
    voxels = np.frombuffer(raw, dtype=plan.dtype, count=plan.n_voxels, offset=plan.offset).reshape(
        plan.shape, order="F"
    )
    with np.errstate(over="ignore", invalid="ignore"):
        image = voxels.astype(np.float32)
        if slope is not None and (slope != 1.0 or inter != 0.0):
            image *= np.float32(slope)
            image += np.float32(inter)
    del voxels, raw
    if not np.isfinite(image).all():
        raise ApiError(
            422, "non_finite", "the volume contains NaN or Inf voxels (or voxels out of float32 range): replace them"
        )
    return image, _affine(plan.header)


def decode_nifti(data: bytes, limits: VolumeLimits) -> tuple[np.ndarray, np.ndarray]:
    """`read_header` then `decode_volume` (for callers that need no admission step between them)."""
    return decode_volume(data, read_header(data, limits), limits)


def encode_nifti(mask: np.ndarray, affine: np.ndarray, *, gzipped: bool = True, dtype=np.uint8) -> bytes:
    """A mask as NIfTI-1 bytes with the image's affine as both sform and qform."""
    img = nib.Nifti1Image(np.asarray(mask).astype(dtype, copy=False), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    # mtime=0: the same mask always encodes to the same bytes.
    return gzip.compress(raw, compresslevel=1, mtime=0) if gzipped else raw


def encode_nrrd(mask: np.ndarray, affine: np.ndarray, *, dtype=np.uint8) -> bytes:
    """A mask as gzip-encoded NRRD in LPS space, as 3D Slicer writes and reads it.

    The NIfTI affine is RAS; NRRD's `space directions` are the LPS columns of the same matrix.
    """
    import nrrd  # pynrrd: only the NRRD path needs it

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    header = {
        "type": np.dtype(dtype).name,
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    buf = io.BytesIO()
    nrrd.write(buf, np.asarray(mask).astype(dtype, copy=False), header, compression_level=1)
    return buf.getvalue()


def encode_mask(mask: np.ndarray, affine: np.ndarray, extension: str, dtype_name: str = "uint8") -> bytes:
    """Encode by file extension (`.nii.gz`, `.nii`, `.nrrd`) and dtype name; ApiError 400 otherwise."""
    if dtype_name not in MASK_DTYPES:
        raise ApiError(
            400, "bad_result_dtype", f"result_dtype {dtype_name!r} is not supported: use one of {sorted(MASK_DTYPES)}"
        )
    dtype = MASK_DTYPES[dtype_name]
    if extension.endswith(".nrrd"):
        return encode_nrrd(mask, affine, dtype=dtype)
    if extension in (".nii.gz", ".nii"):
        return encode_nifti(mask, affine, gzipped=extension == ".nii.gz", dtype=dtype)
    raise ApiError(
        400,
        "bad_result_extension",
        f"result_extension {extension!r} is not supported: use one of {list(MASK_EXTENSIONS)}",
    )
