"""Volumes over HTTP: NIfTI in (`.nii` or `.nii.gz`), NIfTI or NRRD out, with limits checked early.

Every problem with an upload becomes an `ApiError` (4xx) whose detail names the value: not NIfTI (415),
truncated or corrupt (400), not 3D or not finite (422), too large (413). The header is checked before
the voxel data is touched, and a gzip stream is inflated with a cap, so a small "zip bomb" cannot
allocate more than the voxel limit allows.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .errors import ApiError

GZIP_MAGIC = b"\x1f\x8b"
#: File extensions a mask can be written as (MONAI Label's `result_extension`).
MASK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
#: Mask dtypes a client may ask for (MONAI Label's `result_dtype`).
MASK_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


@dataclass(frozen=True, kw_only=True, slots=True)
class VolumeLimits:
    """Upload limits.

    Attributes:
        max_voxels: largest accepted volume (voxel count).
        max_dim: largest accepted size of any one axis.
        min_dim: smallest accepted size of any axis (a 1-voxel-thick slab is a 2D image).
    """

    max_voxels: int = 512 * 512 * 1024
    max_dim: int = 2048
    min_dim: int = 2

    def __post_init__(self) -> None:
        if self.max_voxels < 1 or self.max_dim < 1 or self.min_dim < 1:
            raise ValueError("volume limits must be positive")


def _inflate(data: bytes, cap: int) -> bytes:
    """Gunzip `data`, refusing to produce more than `cap` bytes (multi-member streams included)."""
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += d.decompress(rest, cap + 1 - len(out))
            if len(out) > cap:
                raise ApiError(413, "volume_too_large", f"the gzip stream inflates to more than {cap} bytes, over the voxel limit")
            if not d.eof:
                if d.unconsumed_tail:  # stopped by the cap
                    raise ApiError(413, "volume_too_large", f"the gzip stream inflates to more than {cap} bytes, over the voxel limit")
                raise ApiError(400, "truncated_gzip", "the gzip stream is truncated: upload the whole .nii.gz file")
            rest = d.unused_data.lstrip(b"\x00")
    except zlib.error as exc:
        raise ApiError(400, "corrupt_gzip", f"the body starts like gzip but does not inflate ({exc})") from None
    return bytes(out)


def _header_class(raw: bytes):
    """NIfTI-1 or NIfTI-2 by `sizeof_hdr` (either byte order); None if neither."""
    if len(raw) < 4:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0])
        if size == 348:
            return nib.Nifti1Image
        if size == 540:
            return nib.Nifti2Image
    return None


def decode_nifti(data: bytes, limits: VolumeLimits) -> tuple[np.ndarray, np.ndarray]:
    """Upload bytes -> (float32 3D array in the file's array order, 4x4 affine).

    Raises:
        ApiError: 4xx naming the problem.
    """
    if not data:
        raise ApiError(400, "empty_body", "no volume: send a .nii or .nii.gz file as the body or as the multipart field 'file'")
    cap = limits.max_voxels * 8 + 1024 * 1024  # float64 voxels + header and extensions
    raw = _inflate(data, cap) if data[:2] == GZIP_MAGIC else data
    cls = _header_class(raw)
    if cls is None:
        raise ApiError(415, "not_nifti", "the body is not a NIfTI volume (.nii or .nii.gz): its header size field is not 348 or 540")
    hdr_size = 348 if cls is nib.Nifti1Image else 540
    if len(raw) < hdr_size:
        raise ApiError(400, "truncated_nifti", f"the NIfTI header is truncated ({len(raw)} of {hdr_size} bytes)")
    try:
        header = cls.header_class.from_fileobj(io.BytesIO(raw[:hdr_size]), check=False)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
    except Exception as exc:  # nibabel raises several types for garbage headers
        raise ApiError(400, "bad_nifti_header", f"the NIfTI header is invalid ({type(exc).__name__}: {exc})") from None
    # A trailing singleton axis (x, y, z, 1) is still a 3D volume.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ApiError(422, "not_3d", f"expected a 3D volume, got shape {list(shape)}")
    if any(s < limits.min_dim for s in shape):
        raise ApiError(422, "not_3d", f"volume shape {list(shape)} has an axis shorter than {limits.min_dim} voxels")
    if max(shape) > limits.max_dim:
        raise ApiError(413, "volume_too_large", f"volume shape {list(shape)} has an axis over the limit of {limits.max_dim} voxels")
    n_vox = int(np.prod(shape))
    if n_vox > limits.max_voxels:
        raise ApiError(413, "volume_too_large", f"volume shape {list(shape)} has {n_vox} voxels, over the limit of {limits.max_voxels}")
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise ApiError(422, "bad_dtype", f"voxel type {dtype} is not supported: use an integer or float type")
    needed = int(header.get_data_offset()) + n_vox * dtype.itemsize
    if len(raw) < needed:
        raise ApiError(400, "truncated_nifti", f"the NIfTI data is truncated: {len(raw)} bytes, {needed} expected for shape {list(shape)} {dtype}")
    try:
        img = cls.from_bytes(raw)
        image = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise ApiError(400, "bad_nifti", f"the NIfTI volume cannot be read ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(image).all():
        raise ApiError(422, "non_finite", "the volume contains NaN or Inf voxels")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ApiError(422, "bad_affine", "the volume's affine (sform/qform) is not finite and invertible")
    return image, affine


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
        raise ApiError(400, "bad_result_dtype", f"result_dtype {dtype_name!r} is not supported: use one of {sorted(MASK_DTYPES)}")
    dtype = MASK_DTYPES[dtype_name]
    if extension.endswith(".nrrd"):
        return encode_nrrd(mask, affine, dtype=dtype)
    if extension in (".nii.gz", ".nii"):
        return encode_nifti(mask, affine, gzipped=extension == ".nii.gz", dtype=dtype)
    raise ApiError(400, "bad_result_extension", f"result_extension {extension!r} is not supported: use one of {list(MASK_EXTENSIONS)}")
