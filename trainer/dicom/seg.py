"""Writing a mask as a DICOM Segmentation (highdicom) that references the series it was read from.

See the package docstring for what the SEG holds; highdicom loads when a function here runs.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DicomError
from .series import SeriesMeta

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

SEG_SERIES_NUMBER = 9901
SEG_LABEL = "Spleen"


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
        raise DicomError(
            "dicom_unavailable", "writing DICOM SEG needs highdicom: pip install 'spleen-deepedit[dicom]'", 501
        ) from None
    expected = (int(meta.datasets[0].Columns), int(meta.datasets[0].Rows), meta.n_slices)
    if tuple(mask.shape) != expected:
        raise DicomError("mask_shape", f"mask of shape {tuple(mask.shape)} does not fit the series grid {expected}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=info.algorithm_name, version=info.model_version[:64], family=codes.cid7162.ArtificialIntelligence
    )
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
_SITE_ATTRIBUTES = (
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence",
    "StationName",
    "DeviceSerialNumber",
    "OperatorsName",
)
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
