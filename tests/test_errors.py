"""One error hierarchy (trainer/errors.py): every project exception derives from its base, has one home,
and the CLI turns each into a one-line message with exit status 2."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from trainer import errors
from trainer.cli import EXIT_USER_ERROR, main
from trainer.errors import SpleenDeepEditError

ROOT = Path(__file__).resolve().parents[1]
#: The homes of exception classes: the hierarchy, and the HTTP error shape beside the code that renders it.
HOMES = {"trainer/errors.py", "trainer/serve/errors.py"}
#: Private control flow that never leaves its module (caught a few lines below where it is raised).
PRIVATE = {("trainer/serve/ingress.py", "_BodyTooLarge")}


def _project_errors() -> list[type[BaseException]]:
    from trainer.serve.errors import ApiError

    found = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    return [*found, ApiError]


def _example(cls: type[BaseException]) -> BaseException:
    """An instance with a message; the classes with extra fields take them first."""
    if cls.__name__ == "DicomError":
        return cls("bad_dicom", f"{cls.__name__}: the value 'x' is wrong; pass 'y'")
    if cls.__name__ == "ApiError":
        return cls(422, "bad", f"{cls.__name__}: the value 'x' is wrong; pass 'y'")
    return cls(f"{cls.__name__}: the value 'x' is wrong; pass 'y'")


@pytest.mark.parametrize("cls", _project_errors(), ids=lambda c: c.__name__)
def test_every_project_error_derives_from_the_base(cls):
    assert issubclass(cls, SpleenDeepEditError)
    assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} needs a docstring saying when it is raised"


def test_old_import_paths_still_work():
    from k8s.rayjobs import K8sError
    from trainer.checkpoint import CheckpointError
    from trainer.clicks import ClickError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.dicom import DicomError
    from trainer.storage import StorageError
    from trainer.train import TrainingDiverged

    assert (
        ConfigError,
        StorageError,
        DataError,
        DicomError,
        CheckpointError,
        ClickError,
        TrainingDiverged,
        K8sError,
    ) == (
        errors.ConfigError,
        errors.StorageError,
        errors.DataError,
        errors.DicomError,
        errors.CheckpointError,
        errors.ClickError,
        errors.TrainingDiverged,
        errors.K8sError,
    )


def test_user_input_errors_stay_value_errors():
    # pydantic reports a ValueError raised in a validator (serve settings' check_uri -> StorageError);
    # click and number parsers catch ValueError.
    for cls in (
        errors.ConfigError,
        errors.StorageError,
        errors.DataError,
        errors.DicomError,
        errors.CheckpointError,
        errors.ClickError,
    ):
        assert issubclass(cls, ValueError), cls


def test_exception_classes_live_in_one_home():
    """A new exception class goes into trainer/errors.py, not beside the code that raises it."""
    stray = []
    for path in sorted([*ROOT.glob("trainer/**/*.py"), *ROOT.glob("k8s/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.ClassDef) and any(_looks_like_exception(b) for b in node.bases):
                if (rel, node.name) not in PRIVATE:
                    stray.append(f"{rel}:{node.lineno} {node.name}")
    assert not stray, f"define these in trainer/errors.py (and re-export them): {stray}"


def _looks_like_exception(base: ast.expr) -> bool:
    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
    return name.endswith(("Error", "Exception", "Diverged")) or name in {"Exception", "BaseException"}


@pytest.mark.parametrize("cls", _project_errors(), ids=lambda c: c.__name__)
def test_cli_turns_each_into_one_line_and_exit_2(cls, monkeypatch, capsys, tmp_path):
    exc = _example(cls)

    def fake_check_data(args):  # a fake subcommand: raises the error under test
        raise exc

    monkeypatch.setattr("trainer.cli.cmd_check_data", fake_check_data)
    code = main(["check-data", "--data", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR == 2
    assert err == f"error: {exc}"
    assert "\n" not in err and "Traceback" not in err
