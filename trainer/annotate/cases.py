"""The cases of a cohort: NIfTI files, `.zip` DICOM series and DICOM series folders, local or under s3://."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import storage
from .job import NIFTI_SUFFIXES, ROW_DEFAULTS


def _case_id(rel: str) -> str:
    for suffix in (*NIFTI_SUFFIXES, ".zip"):
        if rel.lower().endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    return rel.strip("/").replace("/", "__") or "series"


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def group_cases(rel_paths: list[str]) -> list[dict[str, Any]]:
    """Relative file paths -> cases: each NIfTI or .zip file is one; the other files of a folder are
    one DICOM series. Returns rows with `case_id`, `source` (relative), `kind` and `keys` (JSON list)."""
    cases: dict[str, dict[str, Any]] = {}
    series: dict[str, list[str]] = {}
    for rel in sorted(rel_paths):
        if _hidden(rel):
            continue
        low = rel.lower()
        if low.endswith(NIFTI_SUFFIXES) or low.endswith(".zip"):
            kind = "nifti" if low.endswith(NIFTI_SUFFIXES) else "dicom_zip"
            cases[rel] = {"source": rel, "kind": kind, "keys": json.dumps([rel])}
        else:
            series.setdefault(rel.rpartition("/")[0], []).append(rel)
    for folder, files in series.items():
        cases[folder + "/"] = {"source": folder, "kind": "dicom_dir", "keys": json.dumps(files)}
    from ..data import DataError

    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for key in sorted(cases):
        case_id = _case_id(cases[key]["source"])
        if case_id in seen:
            raise DataError(
                f"{seen[case_id]!r} and {cases[key]['source']!r} would both be case {case_id!r}: rename one"
            )
        seen[case_id] = cases[key]["source"]
        out.append({**ROW_DEFAULTS, **cases[key], "case_id": case_id})
    return out


def list_cases(input_uri: str) -> list[dict[str, Any]]:
    """The cases under a local folder or an s3:// prefix (see `group_cases`)."""
    if storage.is_s3(input_uri):
        rels = list(storage.list_objects(input_uri))
    else:
        root = Path(input_uri)
        if not root.is_dir():
            raise FileNotFoundError(
                f"--input {input_uri!r} is not a folder: pass a folder (or s3:// prefix) of NIfTI "
                "files and DICOM series"
            )
        rels = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    cases = group_cases(rels)
    if not cases:
        from ..data import DataError

        raise DataError(
            f"no cases under {input_uri}: expected .nii/.nii.gz files, .zip DICOM series or DICOM series folders"
        )
    return cases
