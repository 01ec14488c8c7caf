"""What the MONAI bundle configs (`configs/*.json`) call: thin adapters onto the one training loop
(`trainer.train.train`), the one evaluation (`trainer.evaluate.evaluate_checkpoint`) and the one
predictor (`trainer.predictor.Predictor`), so the model-zoo commands run our code (spec §6).

Two rules shape this module:

- Each hyperparameter keeps its single home in `trainer.config.TrainConfig`. The configs list the
  tunable keys with the value `null` ("the Python default") only so that `--epochs 1` works on the
  `python -m monai.bundle run` command line; `train_config` passes on the keys a user set, nothing
  else. The bundle's own choices (profile `bundle`, float32 `_trans` masks) live in this module or in
  the one JSON file that uses them.
- Objects built from the configs are cheap and touch no file until `run()`: MONAI's
  `ConfigWorkflow.check_properties()` instantiates them, and model-zoo CI calls it without data or
  weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from . import env
from .checkpoint import Checkpoint, save_state_dict
from .config import CLICK_CHANNELS, PROFILES, ConfigError, EvaluateConfig, Profile, TrainConfig, get_profile
from .data import NIFTI_SUFFIXES, DataError, list_dataset
from .network import check_fits, load_model, read_checkpoint
from .runtime import DelegatingRuntime, LocalRuntime, Runtime

log = logging.getLogger(__name__)

#: The profile a bundle command uses when `--profile` is not given: the model-zoo bundle's network.
BUNDLE_PROFILE = "bundle"


# ----------------------------------------------------------------------------- settings


def local_device() -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is available (torchrun sets LOCAL_RANK; 0 otherwise), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank())
    return torch.device("cpu")


def resolve_profile(profile: str | None, spatial_size: Sequence[int] | None = None) -> Profile:
    """The named profile (`bundle` when None).

    `spatial_size` is accepted for model-zoo users who type `--spatial_size`: the network grid is a
    property of the profile, so any other value than the profile's is refused with the choices.
    """
    prof = get_profile(BUNDLE_PROFILE if profile is None else profile)
    if spatial_size is not None:
        try:
            requested = tuple(int(s) for s in spatial_size)
        except (TypeError, ValueError):
            raise ConfigError(f"spatial_size must be three integers, got {spatial_size!r}") from None
        if requested != tuple(prof.spatial_size):
            choices = ", ".join(f"{p.name} {list(p.spatial_size)}" for p in PROFILES.values())
            raise ConfigError(
                f"spatial_size {list(requested)} does not match profile {prof.name!r} {list(prof.spatial_size)}: "
                f"the network grid is chosen with --profile ({choices})"
            )
    return prof


def train_config(*, spatial_size: Sequence[int] | None = None, **settings: Any) -> TrainConfig:
    """A TrainConfig from the bundle's keys: None means "the Python default", profile None `bundle`.

    Raises:
        ConfigError: an unknown key or an invalid value, named in the message.
    """
    given = {key: value for key, value in settings.items() if value is not None}
    given["profile"] = resolve_profile(given.get("profile"), spatial_size).name
    return TrainConfig.from_dict(given, source="bundle config")


def network(profile: str | None = None, spatial_size: Sequence[int] | None = None) -> torch.nn.Module:
    """The DynUNet of a profile (`bundle`: MONAI's DynUNet with the model-zoo bundle's arguments)."""
    from .network import build_network

    return build_network(resolve_profile(profile, spatial_size))


def case_name(path: str | os.PathLike) -> str:
    """File name without its NIfTI suffix: `spleen_1.nii.gz` -> `spleen_1`."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- datasets


class SplitCases(Dataset):
    """The labelled cases on one side of the training split, as `{"image", "label"}` paths.

    The bundle's `train#dataset` / `validate#dataset`: the cases `trainer.train` and
    `trainer.evaluate` select from the same folder with the same `val_fraction`. The folder is read
    on first access, not when the config is parsed.

    Args:
        dataset_dir: a Decathlon dataset (imagesTr/, labelsTr/ or dataset.json).
        part: `train` or `val`.
        val_fraction: the validation fraction of the training config.
    """

    def __init__(self, dataset_dir: str, part: str, val_fraction: float):
        if part not in ("train", "val"):
            raise ConfigError(f"part must be 'train' or 'val', got {part!r}")
        self.dataset_dir = str(dataset_dir)
        self.part = part
        self.val_fraction = val_fraction

    @cached_property
    def items(self) -> list[dict[str, str]]:
        train, val = list_dataset(self.dataset_dir).split(self.val_fraction)
        return train if self.part == "train" else val

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.items[index]


class InferenceCases(Dataset):
    """Images to segment, each `{"image": path, "spleen": [[i, j, k], ...], "background": [...]}`.

    Clicks are keys named after the labels, in voxel indices of the image file's array (spec §5); a
    missing key means no click of that label, an item with no clicks is segmented automatically.

    Args:
        dataset_dir: the dataset folder. Without `data`: every image of `dataset_dir/imagesTs`, no
            clicks. Relative image paths in `data` are taken relative to it.
        data: None, a list of items, or the path of a JSON file holding that list.
    """

    def __init__(self, dataset_dir: str, data: str | os.PathLike | Sequence[dict[str, Any]] | None = None):
        self.dataset_dir = str(dataset_dir)
        self.data = data

    @cached_property
    def items(self) -> list[dict[str, Any]]:
        if self.data is None:
            ds = list_dataset(self.dataset_dir)
            if not ds.test:
                raise DataError(
                    f"{self.dataset_dir}: no images in imagesTs/ to segment; add some or pass --datalist FILE.json"
                )
            return [self._item({"image": path}, n, "imagesTs") for n, path in enumerate(ds.test)]
        entries, source = self.data, "datalist"
        if isinstance(entries, (str, os.PathLike)):
            source = str(entries)
            entries = _read_datalist(Path(entries))
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ConfigError(
                f'{source}: expected a non-empty list of {{"image": ..., "spleen": [[i, j, k]], "background": []}} items'
            )
        return [self._item(entry, n, source) for n, entry in enumerate(entries)]

    def _item(self, entry: Any, n: int, source: str) -> dict[str, Any]:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ConfigError(f'{source}[{n}]: each item must be an object with an "image" path, got {entry!r}')
        unknown = sorted(set(entry) - {"image", *CLICK_CHANNELS})
        if unknown:
            raise ConfigError(
                f"{source}[{n}]: unknown key(s) {unknown}; clicks are keys named after labels {list(CLICK_CHANNELS)}"
            )
        image = Path(entry["image"])
        if not image.is_absolute():
            image = Path(self.dataset_dir) / image
        return {"image": str(image), **{name: entry.get(name, []) for name in CLICK_CHANNELS}}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _read_datalist(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"datalist {str(path)!r} does not exist: pass a JSON file with a list of image/click items")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"datalist {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


# ----------------------------------------------------------------------------- weights


class _ExportBestModel(DelegatingRuntime):
    """Wraps a Runtime: the best model is also written as a plain state_dict (`models/model.pt`).

    Everything else is delegated, so `trainer.train.train` sees the runtime it was given. Rank 0 only.
    If validation never produced a best model (e.g. a NaN Dice) and there is no model file yet, the
    last one is exported at the end; an existing file (say, the best of a resumed run) is kept.
    """

    def __init__(self, runtime: Runtime, model_path: str | os.PathLike):
        super().__init__(runtime)
        self._model_path = Path(model_path)
        self._exported = False
        self._last: Checkpoint | None = None

    def on_epoch_end(self, *, metrics: dict[str, Any], checkpoint: Checkpoint, is_best: bool) -> None:
        self._runtime.on_epoch_end(metrics=metrics, checkpoint=checkpoint, is_best=is_best)
        if not self._runtime.is_main:
            return
        self._last = checkpoint
        if is_best:
            save_state_dict(checkpoint.model, self._model_path)
            self._exported = True
            log.info(
                "epoch %d: best validation Dice %.4f, model written to %s",
                checkpoint.epoch + 1,
                metrics["val_dice"],
                self._model_path,
            )

    def finish(self) -> None:
        self._runtime.finish()
        if not self._runtime.is_main or self._exported or self._last is None:
            return
        if self._model_path.exists():
            log.warning("no validation Dice improved in this run; %s is kept as it was", self._model_path)
        else:
            save_state_dict(self._last.model, self._model_path)
            log.warning("no validation Dice improved in this run; wrote the last model to %s", self._model_path)


# ----------------------------------------------------------------------------- workflows


class BundleTrainer:
    """The bundle's `train#trainer`: runs the one training loop and keeps the best model as `model_path`.

    Args:
        config: the training settings (`train_config`).
        dataset_dir: a Decathlon dataset.
        runtime: a callable returning the runtime (`LocalRuntime` or `TorchDistributedRuntime` with
            its output directory), called in `run()` so that parsing the config starts nothing.
        model_path: where the best model is written as a plain DynUNet state_dict.
        max_epochs: the number of epochs (MONAI's `max_epochs` property); None keeps the config's.
    """

    def __init__(
        self,
        *,
        config: TrainConfig,
        dataset_dir: str,
        runtime: Callable[[], LocalRuntime],
        model_path: str,
        max_epochs: int | None = None,
    ):
        self.config = config if max_epochs is None else config.replace(epochs=max_epochs)
        self.max_epochs = self.config.num_epochs
        self.dataset_dir = str(dataset_dir)
        self.runtime = runtime
        self.model_path = str(model_path)

    def run(self) -> dict[str, Any]:
        from .train import train

        list_dataset(self.dataset_dir)  # a missing or malformed dataset fails before any process group
        local = self.runtime()
        runtime = _ExportBestModel(local, self.model_path)
        if runtime.is_main:
            prof = self.config.profile_spec
            log.info(
                "training profile %s (%s) for %d epochs on %s with %d process(es); output %s, best model %s",
                prof.name,
                prof.description,
                self.config.num_epochs,
                self.dataset_dir,
                runtime.world_size,
                local.output_dir,
                self.model_path,
            )
        return train(self.config, self.dataset_dir, runtime)


class BundleEvaluation:
    """The evaluate overlay's `evaluator`: Dice versus clicks of `checkpoint` on the validation split.

    Writes `per_case.csv`, `summary.json` (and plots) into `output_dir` through
    `trainer.evaluate.evaluate_checkpoint`; the training curves are plotted when `output_dir` holds
    the training's `metrics.jsonl`.

    Args:
        checkpoint: `models/model.pt` (or one of our checkpoints).
        dataset_dir: the dataset the model was trained on.
        output_dir: report directory.
        profile: the network profile of the weights.
        val_fraction: the training's validation fraction (the same split is evaluated).
        device: torch device.
        max_clicks: corrective clicks after the automatic pass; None: EvaluateConfig's default.
    """

    def __init__(
        self,
        *,
        checkpoint: str,
        dataset_dir: str,
        output_dir: str,
        profile: str | None,
        val_fraction: float,
        device: torch.device | None = None,
        max_clicks: int | None = None,
    ):
        self.checkpoint = str(checkpoint)
        self.dataset_dir = str(dataset_dir)
        self.output_dir = str(output_dir)
        self.profile = resolve_profile(profile)
        self.val_fraction = val_fraction
        self.device = device
        self.max_clicks = max_clicks

    def run(self) -> dict[str, Any]:
        from .evaluate import evaluate_checkpoint

        check_fits(read_checkpoint(self.checkpoint)[1], self.profile, self.checkpoint)
        metrics_log = Path(self.output_dir) / "metrics.jsonl"
        optional: dict[str, Any] = {"max_clicks": self.max_clicks} if self.max_clicks is not None else {}
        summary = evaluate_checkpoint(
            EvaluateConfig(
                checkpoint=self.checkpoint,
                data_dir=self.dataset_dir,
                output_dir=self.output_dir,
                split="val",
                profile=self.profile.name,
                device=None if self.device is None else str(self.device),
                metrics_log=metrics_log if metrics_log.is_file() else None,
                val_fraction=self.val_fraction,
                **optional,
            )
        )
        log.info("evaluation of %s written to %s", self.checkpoint, self.output_dir)
        return summary


def load_predictor(
    *, network: torch.nn.Module, checkpoint: str, profile: str | None, device: torch.device | None = None
):
    """Load `checkpoint` (a plain DynUNet state_dict such as the model zoo's `model.pt`, or one of
    our checkpoints) into `network` (the config's `network_def`) and wrap it in the one Predictor."""
    from .predictor import Predictor

    # A plain state_dict carries no settings: the Predictor's guidance sigma is then the profile's.
    loaded = load_model(checkpoint, profile=resolve_profile(profile).name, network=network, check_fit=True)
    return Predictor.from_loaded(loaded, device=device)


class BundleInference:
    """The inference config's `evaluator`: segments every item of `dataset` into
    `output_dir/<name>/<name>_<output_postfix>.nii.gz`, in the image's original shape and affine.

    Args:
        predictor: a callable returning the Predictor (weights are loaded in `run()`).
        dataset: `InferenceCases`.
        output_dir: where the masks go.
        output_postfix: file name postfix (`trans`, as the model-zoo bundle).
        output_dtype: numpy dtype name of the written masks (`float32`, as the model-zoo bundle).
    """

    def __init__(
        self,
        *,
        predictor: Callable[[], Any],
        dataset: InferenceCases,
        output_dir: str,
        output_postfix: str,
        output_dtype: str,
    ):
        try:
            self.output_dtype = np.dtype(output_dtype)
        except TypeError:
            raise ConfigError(
                f"output_dtype {output_dtype!r} is not a numpy dtype name (e.g. float32, uint8)"
            ) from None
        self.predictor = predictor
        self.dataset = dataset
        self.output_dir = str(output_dir)
        self.output_postfix = str(output_postfix)

    def _check(self, items: list[dict[str, Any]]) -> None:
        """Every image readable and every click inside it, before the model is loaded."""
        from .clicks import validate_clicks

        for item in items:
            path = Path(item["image"])
            if not path.is_file():
                raise DataError(f"image {str(path)!r} does not exist")
            try:
                shape = cast(nib.Nifti1Image, nib.load(str(path))).shape
            except Exception as exc:  # nibabel raises many types for corrupt files
                raise DataError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
            try:
                validate_clicks({name: item[name] for name in CLICK_CHANNELS}, tuple(shape[:3]))
            except ValueError as exc:  # ClickError: say which image the clicks belong to
                raise type(exc)(f"{path}: {exc}") from None

    def run(self) -> list[str]:
        from .data import load_volume, write_mask

        items = [self.dataset[i] for i in range(len(self.dataset))]
        self._check(items)
        predictor = self.predictor()
        written = []
        for item in items:
            name = case_name(item["image"])
            out = Path(self.output_dir) / name / f"{name}_{self.output_postfix}.nii.gz"
            image, affine = load_volume(item["image"])
            clicks = {label: item[label] for label in CLICK_CHANNELS}
            pred = predictor.predict(image, affine, clicks)
            write_mask(out, pred.mask, pred.affine, dtype=self.output_dtype)
            n_clicks = sum(len(v) for v in clicks.values())
            log.info("%s: %d click(s), %d spleen voxels -> %s", name, n_clicks, int(pred.mask.sum()), out)
            written.append(str(out))
        return written
