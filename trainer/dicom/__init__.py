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

Every problem raises `DicomError` (trainer/errors.py; a `DataError`, so the CLI prints `error: ...` and exits 2), whose
`code` names the problem for the HTTP API and whose message names the file or value and the fix.
pydicom and highdicom are imported only when a function here runs, so `import trainer` does not need them.

Modules: `series` (limits, metadata, the files of a folder, zip or upload), `read` (header and pixel
passes), `seg` (the SEG writer), `synth` (synthetic CT series for tests and demos). Everything public
is re-exported here, so `from trainer.dicom import read_series` is the import to use.
"""

from __future__ import annotations

from ..errors import DicomError as DicomError
from .read import SUPPORTED_MODALITIES as SUPPORTED_MODALITIES
from .read import SeriesScan as SeriesScan
from .read import decode_scan as decode_scan
from .read import read_files as read_files
from .read import read_members as read_members
from .read import read_series as read_series
from .read import read_series_bytes as read_series_bytes
from .read import read_volume_any as read_volume_any
from .read import scan_members as scan_members
from .seg import SEG_LABEL as SEG_LABEL
from .seg import SEG_SERIES_NUMBER as SEG_SERIES_NUMBER
from .seg import SegInfo as SegInfo
from .seg import seg_bytes as seg_bytes
from .seg import seg_dataset as seg_dataset
from .seg import write_seg as write_seg
from .series import DICM_MAGIC as DICM_MAGIC
from .series import IGNORED_NAMES as IGNORED_NAMES
from .series import LPS_TO_RAS as LPS_TO_RAS
from .series import ZIP_MAGIC as ZIP_MAGIC
from .series import DicomVolume as DicomVolume
from .series import Member as Member
from .series import SeriesLimits as SeriesLimits
from .series import SeriesMeta as SeriesMeta
from .series import is_dicom_bytes as is_dicom_bytes
from .series import is_dicom_source as is_dicom_source
from .series import upload_members as upload_members
from .synth import SYNTH_SYNTAXES as SYNTH_SYNTAXES
from .synth import write_ct_series as write_ct_series
from .synth import write_dicom_dataset as write_dicom_dataset
