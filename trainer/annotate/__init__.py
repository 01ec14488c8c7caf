"""Batch pre-annotation of a cohort on Ray Data: `spleen-deepedit annotate`.

    list (driver) -> read (parallel tasks) -> preprocess (CPU tasks) -> forward (actor pool, batched,
    GPU when asked) -> postprocess, measure and write (CPU tasks) -> manifest (driver)

A case is a NIfTI file, a `.zip` of a DICOM series, or a folder holding DICOM files, under a local
folder or an `s3://` prefix. Each case yields a mask (`masks/<case>.nii.gz` or a DICOM SEG
`masks/<case>.dcm`) and a row (`rows/<case>.json`, written after the mask, so a row marks a finished
case); the manifest (`manifest.parquet`, `manifest.csv`) collects the rows of all runs. Masks are the
ones `infer` writes: the same `Predictor` stages run in each step.

Resumable: a case whose row says `ok` for the same model version (checkpoint name, epoch and file
digest) and format, with its mask present, is skipped and its row carried into the new manifest.
One bad case is a failed row (status `failed`, the error's message), never a failed job: every stage
catches its case's errors, and a case whose Ray task died (e.g. out of memory) is reported as failed
too. Failed cases are retried by the next run.

Per case the row holds: spleen volume (ml), connected components (26-connected) and the share of
the largest, whether the mask touches the scan's edge, a confidence (mean spleen probability inside
the mask on the network grid, i.e. the mean max-class probability there), the time of each stage, and
review flags (`ReviewThresholds`).

Modules: `job` (settings, row columns), `cases` (listing), `stages` (the per-case Ray stages), `output`
(measurements, mask and row files, manifest, resuming), `pipeline` (the driver), `cli` (the subcommand).
Everything public is re-exported here.
"""

from __future__ import annotations

from .cases import group_cases as group_cases
from .cases import list_cases as list_cases
from .cli import add_parser as add_parser
from .cli import cmd_annotate as cmd_annotate
from .job import ACTOR_RESTARTS as ACTOR_RESTARTS
from .job import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .job import DEFAULT_CONCURRENCY as DEFAULT_CONCURRENCY
from .job import FORMATS as FORMATS
from .job import MANIFEST as MANIFEST
from .job import MASKS as MASKS
from .job import PAYLOAD as PAYLOAD
from .job import ROW_DEFAULTS as ROW_DEFAULTS
from .job import ROWS as ROWS
from .job import AnnotateConfig as AnnotateConfig
from .job import ReviewThresholds as ReviewThresholds
from .output import case_stats as case_stats
from .output import finished_rows as finished_rows
from .output import mask_uri as mask_uri
from .output import public_row as public_row
from .output import row_uri as row_uri
from .output import write_manifest as write_manifest
from .pipeline import AnnotateResult as AnnotateResult
from .pipeline import annotate as annotate
from .pipeline import build_dataset as build_dataset
from .pipeline import model_version as model_version
from .stages import Forward as Forward
from .stages import preprocess_case as preprocess_case
from .stages import read_case as read_case
from .stages import write_case as write_case
