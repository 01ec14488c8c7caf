"""Hostile uploads for the serving tests and `scripts/bench_hostile.py`, built in memory (no files).

Each builder returns the bytes a hostile client would send; sizes are parameters so tests use small
ones and the benchmark the sizes of issue 15's table.
"""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def _header(shape, datatype: int, bitpix: int, vox_offset: float, *, sform=None, extension: bool = False) -> bytearray:
    """A NIfTI-1 header (348 bytes) + extension flag, written field by field (nibabel refuses some of these)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr["datatype"] = datatype
    hdr["bitpix"] = bitpix
    hdr["vox_offset"] = vox_offset
    hdr.set_sform(np.eye(4) if sform is None else sform, code=1)
    hdr.set_qform(None, code=0)
    raw = bytearray(hdr.binaryblock)
    raw += bytes([1 if extension else 0, 0, 0, 0])
    return raw


def extension_records_bomb(n_records: int, gz: bool = True) -> bytes:
    """2x2x2 int16 whose `vox_offset` holds `n_records` 16-byte header-extension records."""
    offset = 352 + 16 * n_records
    raw = _header((2, 2, 2), 4, 16, offset, extension=True)
    record = struct.pack("<ii", 16, 0) + b"\0" * 8
    body = bytes(raw) + record * n_records + np.zeros(8, "<i2").tobytes()
    return gzip.compress(body, compresslevel=9) if gz else body


def empty_members_bomb(n_members: int, payload: bytes | None = None) -> bytes:
    """`n_members` empty gzip members (20 bytes each), then `payload` (a valid .nii.gz) if given."""
    empty = gzip.compress(b"", mtime=0)
    return empty * n_members + (payload or b"")


def declared_zeros_bomb(shape=(512, 512, 1024), datatype: int = 64, itemsize: int = 8, full: bool = True) -> bytes:
    """A .nii.gz declaring `shape` voxels (float64 by default) of zeros: a few MB that inflate to GiB.

    `full=False` sends only the header and a few KB of zeros (the decoder must refuse from the header).
    """
    head = bytes(_header(shape, datatype, itemsize * 8, 352))
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [comp.compress(head)]
    total = int(np.prod(shape)) * itemsize if full else 4096
    chunk = b"\0" * (1 << 24)
    while total > 0:
        n = min(total, len(chunk))
        out.append(comp.compress(chunk[:n]))
        total -= n
    out.append(comp.flush())
    return b"".join(out)


def sheared_sform_nifti(shape=(8, 8, 8)) -> bytes:
    """A NIfTI whose sheared sform has det 1e-7 (not singular) but two nearly parallel axes, so that
    nibabel's `io_orientation` drops one (before issue 15: OrientationError in preprocessing, a 500)."""
    sform = np.array([[1e3, 1e3, 0, 0], [0, 1e-13, 0, 0], [0, 0, 1e3, 0], [0, 0, 0, 1.0]])
    raw = _header(shape, 4, 16, 352, sform=sform)
    return gzip.compress(bytes(raw) + np.zeros(int(np.prod(shape)), "<i2").tobytes())


def header_with(
    shape=(8, 8, 8),
    datatype: int = 4,
    bitpix: int = 16,
    vox_offset: float = 352,
    data_bytes: int | None = None,
    sform=None,
    **fields,
) -> bytes:
    """A NIfTI-1 upload with arbitrary header fields (for malformed-header cases)."""
    raw = _header(shape, datatype, bitpix, vox_offset, sform=sform)
    import nibabel as nib

    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])), check=False)
    for key, value in fields.items():
        hdr[key] = value
    raw[:348] = hdr.binaryblock
    n = int(np.prod([s for s in shape if s > 0])) * max(bitpix // 8, 1) if data_bytes is None else data_bytes
    return gzip.compress(bytes(raw) + b"\0" * max(0, min(n, 1 << 22)))


def many_clicks_body(n: int, shape=(64, 64, 32), duplicate: bool = False) -> bytes:
    """A clicks JSON body with `n` spleen clicks (all the same voxel if `duplicate`)."""
    import json

    rng = np.random.default_rng(0)
    if duplicate:
        pts = [[1, 1, 1]] * n
    else:
        pts = np.stack([rng.integers(0, s, n) for s in shape], axis=1).tolist()
    return json.dumps({"spleen": pts, "background": []}).encode()
