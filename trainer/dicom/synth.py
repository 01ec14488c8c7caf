"""Synthetic DICOM CT series written from NIfTI volumes, for tests, benchmarks and demos (`synth --dicom`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomError
from .read import import_pydicom
from .series import LPS_TO_RAS


def write_ct_series(
    out_dir: str | os.PathLike,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    transfer_syntax: str | None = None,
    seed: int = 0,
    intercept: float = -1024.0,
) -> list[Path]:
    """Write a volume (`[i, j, k]` array of HU, RAS affine without shear) as single-frame CT slices.

    For tests, benchmarks and demos (synthetic phantoms as a scanner would export them): slice k holds
    `image[:, :, k]` with rows along j, so reading the series back gives the same grid (up to the
    order of k, which is sorted along the slice normal). Pixels are stored unsigned with
    `RescaleIntercept` (the common CT encoding), optionally compressed (`transfer_syntax`, e.g.
    JPEG 2000 Lossless, when pydicom has an encoder for it). File names are shuffled by `seed`, so a
    reader cannot rely on their order. Returns the files written.
    """
    import_pydicom()  # a clear error without the dicom extra
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
SYNTH_SYNTAXES = {
    "uncompressed": None,
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "rle": "1.2.840.10008.1.2.5",
}


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
            write_ct_series(
                target, np.asanyarray(img.dataobj), img.affine, transfer_syntax=SYNTH_SYNTAXES[syntax], seed=len(out)
            )
            out.append(target)
    return out
