"""Every exception the project raises on purpose, in one hierarchy.

A `SpleenDeepEditError` is a failure the user can fix: its message names the offending value and the
fix. The CLI catches the base class and prints that message on one line (exit status 2); anything else
is a bug and keeps its traceback. The classes also derive from the builtin that callers and libraries
already catch: the user-input errors are `ValueError`s (pydantic reports a `StorageError` raised in a
validator; `except ValueError` sites parse numbers and clicks), the run-time failures `RuntimeError`s.

The modules that raise them re-export them (`from trainer.data import DataError` keeps working). The
HTTP service's `ApiError` lives in `trainer.serve.errors` beside the response shape it carries, and
derives from the base too.

This module imports nothing from the project, so every module (including `k8s`) may import it.
"""

from __future__ import annotations


class SpleenDeepEditError(Exception):
    """Base of the project's errors: a failure the user can fix; the message says how."""


class ConfigError(SpleenDeepEditError, ValueError):
    """A user-supplied setting is invalid; the message names the value and the fix."""


class StorageError(SpleenDeepEditError, ValueError):
    """A storage location is unusable (unreachable, missing bucket or object, no credentials, a scheme
    other than a local path, `file://` or `s3://`); the message names the URI."""


class DataError(SpleenDeepEditError, ValueError):
    """The dataset or an input image is unusable; the message names the file and what to fix."""


class DicomError(DataError):
    """A DICOM upload cannot be used.

    Attributes:
        code: a short stable name of the problem, for API error bodies (`not_dicom`, `mixed_series`...).
        status: the HTTP status the API should answer (413 for limits, else 422).
    """

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


class CheckpointError(SpleenDeepEditError, ValueError):
    """A checkpoint is missing, unreadable, corrupted or of the wrong kind; the message names it."""


class ClickError(SpleenDeepEditError, ValueError):
    """Clicks are malformed or outside the volume; the message names the value."""


class TrainingDiverged(SpleenDeepEditError, RuntimeError):
    """Most recent steps had a non-finite loss or gradient: the run cannot make progress."""


class K8sError(SpleenDeepEditError, RuntimeError):
    """A Kubernetes operation failed for a reason the user can fix; the message says how.

    Attributes:
        status: the API server's HTTP status when there was one (a 5xx one may pass: `follow` waits it out).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
