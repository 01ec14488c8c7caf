"""One home for each default: the charts, the k8s CLI and the serve decorator restate none of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from trainer.config import DEFAULT_VAL_FRACTION, PROFILES, TrainConfig

CHARTS = Path(__file__).resolve().parents[1] / "charts"
SERVE = CHARTS / "spleen-deepedit-serve"
TRAIN = CHARTS / "spleen-deepedit-train"

#: Serve chart keys whose ServeArgs field is not the key in snake_case.
SERVE_CHART_FIELDS = {"replicas": "num_replicas", "cpusPerReplica": "num_cpus", "gpusPerReplica": "num_gpus"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _profile_enums(schema: object) -> list[list]:
    """Every `profile` property's enum in a JSON schema."""
    found = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "profile" and isinstance(value, dict) and "enum" in value:
                found.append(value["enum"])
            found += _profile_enums(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _profile_enums(value)
    return found


def test_the_chart_schemas_list_exactly_the_trainer_profiles():
    for chart in (SERVE, TRAIN):
        enums = _profile_enums(json.loads((chart / "values.schema.json").read_text()))
        assert enums, chart
        for enum in enums:
            assert sorted(v for v in enum if v is not None) == sorted(PROFILES), chart.name


def test_the_k8s_cli_offers_the_trainer_profiles():
    import argparse

    from k8s.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    choices = set()
    for action in parser._actions:  # the k8s subcommands' --profile flags
        for sub in getattr(action, "choices", None) or {}:
            for inner in action.choices[sub]._actions:
                for name, subparser in (getattr(inner, "choices", None) or {}).items():
                    for flag in subparser._actions:
                        if "--profile" in flag.option_strings:
                            choices.add((name, tuple(sorted(flag.choices))))
    assert choices and all(c == tuple(sorted(PROFILES)) for _, c in choices), choices


def test_the_serve_chart_defaults_are_serve_args_defaults():
    from trainer.serve.settings import ServeArgs

    values = yaml.safe_load((SERVE / "values.yaml").read_text())["serve"]
    fields = ServeArgs.model_fields
    shared = {key: value for key, value in values.items() if _snake(key) in fields and key != "checkpoint"}
    assert len(shared) >= 10, shared  # the mapping camelCase -> snake_case still finds them
    for key, value in shared.items():
        field = fields[_snake(key)]
        default = field.default_factory() if field.default_factory is not None else field.default
        assert value == default, key


def test_the_serve_batch_decorator_starts_from_serve_args():
    from trainer.serve.core import _SERVE_DEFAULTS
    from trainer.serve.settings import ServeArgs

    assert _SERVE_DEFAULTS == {
        name: ServeArgs.model_fields[name].default for name in ("max_batch_size", "batch_wait_timeout_s")
    }


def test_the_validation_fraction_has_one_home():
    from trainer.cli import build_parser
    from trainer.data import Dataset

    assert TrainConfig(profile="tiny").val_fraction == DEFAULT_VAL_FRACTION
    assert build_parser().parse_args(["check-data", "--data", "d"]).val_fraction == DEFAULT_VAL_FRACTION
    import inspect

    assert inspect.signature(Dataset.split).parameters["val_fraction"].default == DEFAULT_VAL_FRACTION


def test_the_serve_limits_start_from_serve_args():
    """The codecs' limits and the ingress guard's placeholders are ServeArgs' defaults, not copies."""
    import dataclasses

    from trainer.serve.codecs import VolumeLimits
    from trainer.serve.ingress import RUNTIME
    from trainer.serve.settings import ServeArgs

    defaults = {name: field.default for name, field in ServeArgs.model_fields.items()}
    limits = VolumeLimits()
    for field in dataclasses.fields(limits):
        if field.name in defaults:
            assert getattr(limits, field.name) == defaults[field.name], field.name
    assert RUNTIME.max_upload_bytes == defaults["max_upload_bytes"]
    assert RUNTIME.max_json_bytes == defaults["max_json_bytes"]
    assert RUNTIME.auth_limiter.per_min == defaults["auth_token_rate_per_min"]


def _field_bounds(field) -> dict:
    """A pydantic field's constraints in JSON-schema words (`ge` -> minimum, ...)."""
    words = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum", "pattern": "pattern"}
    found = {}
    for meta in field.metadata:
        for attr, word in words.items():
            if getattr(meta, attr, None) is not None:
                found[word] = getattr(meta, attr)
    return found


def test_the_serve_chart_schema_bounds_are_serve_args_bounds():
    """The schema refuses at `helm install` exactly what ServeArgs would refuse in the replica."""
    from trainer.serve.settings import ServeArgs

    schema = json.loads((SERVE / "values.schema.json").read_text())["properties"]["serve"]["properties"]
    fields = ServeArgs.model_fields
    checked = 0
    for key, prop in schema.items():
        name = SERVE_CHART_FIELDS.get(key, _snake(key))
        if name not in fields:
            continue
        bounds = _field_bounds(fields[name])
        # A pattern only where ServeArgs has one (the chart may check a device name more closely).
        words = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") + (
            ("pattern",) if "pattern" in bounds else ()
        )
        mine = {word: prop[word] for word in words if word in prop}
        assert mine == bounds, (key, mine, bounds)
        checked += 1
    assert checked >= 12, checked  # the mapping still finds the limits


def test_the_batch_wait_has_one_default():
    """ServeArgs, the @serve.batch decorator and the serve chart start from the same batch wait."""
    from trainer.serve.core import _SERVE_DEFAULTS
    from trainer.serve.settings import serve_default

    values = yaml.safe_load((SERVE / "values.yaml").read_text())["serve"]
    assert (
        values["batchWaitTimeoutS"] == _SERVE_DEFAULTS["batch_wait_timeout_s"] == serve_default("batch_wait_timeout_s")
    )


def test_the_two_default_profiles_are_the_trainer_s_and_the_bundle_s():
    """`cpu` for the trainer (any machine), `bundle` for the model zoo's recipe: the bundle and the train chart."""
    from trainer.bundle import BUNDLE_PROFILE, resolve_profile

    assert TrainConfig().profile == "cpu"
    assert resolve_profile(None).name == BUNDLE_PROFILE == "bundle"
    assert yaml.safe_load((TRAIN / "values.yaml").read_text())["training"]["profile"] == BUNDLE_PROFILE


def test_environment_variables_are_read_in_one_module():
    """trainer/env.py names every variable the project reads or sets; no other module touches os.environ."""
    root = Path(__file__).resolve().parents[1]
    readers = [
        str(path.relative_to(root))
        for package in ("trainer", "k8s")
        for path in (root / package).rglob("*.py")
        if path.name != "env.py" and re.search(r"os\.environ|os\.getenv|os\.putenv", path.read_text())
    ]
    assert readers == [], readers
