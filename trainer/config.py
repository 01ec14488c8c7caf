"""Typed configuration: the training and evaluation job settings (the named model profiles live in
`trainer.profiles` and are re-exported here).

Every hyperparameter has exactly one home: the dataclass field defaults below. Profiles override a
few of them (spatial size, filters, epochs); YAML files and command-line flags override those.
Nothing else in the package restates a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError as ConfigError
from .profiles import PROFILES as PROFILES
from .profiles import UPSAMPLE_MODES as UPSAMPLE_MODES
from .profiles import Profile as Profile
from .profiles import get_profile as get_profile
from .schedule import SCHEDULES

#: Label names and values, as in the bundle's `label_names` (spec §1). The network's output channel
#: index equals the label value; the input click channels are ordered as LABEL_ORDER after the CT.
LABELS: dict[str, int] = {"background": 0, "spleen": 1}
#: Order of the click channels after the CT channel: ch1 = spleen, ch2 = background (spec §1, §7.1).
CLICK_CHANNELS: tuple[str, ...] = ("spleen", "background")
#: CT window used by the bundle (spec §2): HU in [A_MIN, A_MAX] maps linearly to [0, 1].
HU_MIN: float = -175.0
HU_MAX: float = 250.0
#: How labels are resized to the network grid (trainer.transforms.preprocess_transforms).
LABEL_RESIZE_MODES: tuple[str, ...] = ("nearest", "area")
#: Share of the sorted labelled cases (the last ones) that validate: training's split, and the `val`
#: split `evaluate` scores when the checkpoint does not say which fraction it was trained with.
DEFAULT_VAL_FRACTION: float = 0.2
#: Case sets `evaluate` scores (trainer.evaluate.select_cases): the training's validation part, the
#: labelled held-out images (imagesTs + labelsTs), or every labelled training case.
EVAL_SPLITS: tuple[str, ...] = ("val", "test", "all")


def check_click_radius(value: Any) -> float:
    """A click locality radius (trainer.predictor): a finite number >= 0 in grid voxels, 0 = off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"click_radius must be a number >= 0 (grid voxels; 0 turns click locality off), got {value!r}"
        )
    return float(value)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Settings of one training job. Validated on construction.

    Attributes:
        profile: name of the network profile (`tiny`, `cpu`, `bundle`).
        epochs: number of epochs; None takes the profile's default.
        learning_rate: Adam (peak) learning rate; None takes the profile's default (1e-4 for
            `bundle`, as the model zoo).
        lr_schedule: `constant` (the bundle: its StepLR never fires) or `cosine` (the peak, then
            annealed to 1 % of it over the last `lr_anneal_fraction` of the job or of
            `max_train_seconds`, whichever ends first); None takes the profile's default (`cosine`
            for `cpu` and `tiny`).
        lr_anneal_fraction: the final fraction of the job over which `cosine` anneals (1: a
            cosine over the whole job; measured worse on the cpu profile's short budget, see docs).
        label_resize: how training and validation labels reach the network grid: `nearest` (the
            bundle: PyTorch's nearest samples each bin's first voxel, so labels lie up to half a
            network voxel off the image) or `area` (the fraction of each network voxel that is
            spleen, a soft target for the loss; aligned with the image); None takes the profile's
            default (`area` for `cpu` and `tiny`).
        batch_size: volumes per optimisation step and worker.
        val_fraction: fraction of the sorted labelled cases, taken from the end, used for validation.
        val_every: validate every N epochs (and always after the last one).
        click_prob_train: probability that a training sample gets a click iteration (else automatic).
        click_prob_val: the same for validation (1.0: every validation case is scored with clicks).
        max_click_rounds: maximum simulated correction rounds per click iteration; each click
            iteration draws its number of rounds uniformly from 1..max_click_rounds.
        max_click_budget: the bundle's per-iteration click budget U{1..N}, used to keep or clear whole
            labels' click lists so the model also learns from clicks on one label only.
        guidance_sigma: Gaussian sigma (voxels at network resolution) of the click maps; None takes
            the profile's default (3 for `bundle`, as the model zoo).
        amp: mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPUs with native
            bf16 (steps with an inf/NaN gradient are skipped); False: fp32.
        seed: seed of every random generator the job owns.
        cache_workers: threads used to fill the network-resolution cache.
        loader_workers: DataLoader worker processes (0: in the main process).
        flip_prob: probability of a flip on each spatial axis (augmentation).
        rot90_prob: probability of an axial rot90 (k in 1..3).
        shift_prob: probability of an intensity shift.
        shift_offset: maximum absolute intensity shift (in the [0, 1] scale).
        edge_cut_prob: probability that a training sample becomes a scan that ends inside the spleen
            (trainer.transforms.RandEdgeCutd); None takes the profile's default (0 for `bundle`, as
            the model zoo; 0.25 for `cpu`).
        resume: continue from the `last` checkpoint in the output directory if there is one.
        init_from: a checkpoint (ours or a bundle `model.pt` state_dict) to start from when there is
            nothing to resume.
        max_train_seconds: wall-time budget of the training loop: the job stops at the first step past
            it, validates and writes its checkpoint (0: no limit).
        window_prob: share of training samples drawn as click-centred refinement windows
            (`trainer.refine.RandWindowd`); None takes the profile's default (0 for `bundle`).
        window_mm: refinement windows' extent at their finest (mm); None takes the profile's.
        deterministic: deterministic kernels (`torch.use_deterministic_algorithms`, no cuDNN
            autotuning; the bundle's `set_determinism`): GPU runs repeat to the last digit, slower.
            CPU fp32 runs are reproducible without it.
    """

    # Two defaults on purpose: `cpu` where the trainer runs on whatever machine it is given (the CLI,
    # the demo, a laptop), `bundle` (`trainer.bundle.BUNDLE_PROFILE`, the model zoo's network, GPU)
    # where the caller asked for the model zoo's recipe: the MONAI bundle and the train chart's GPU job.
    profile: str = "cpu"
    epochs: int | None = None
    learning_rate: float | None = None
    lr_schedule: str | None = None
    lr_anneal_fraction: float = 0.2
    label_resize: str | None = None
    batch_size: int = 1
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_every: int = 1
    click_prob_train: float = 0.4
    click_prob_val: float = 1.0
    max_click_rounds: int = 1
    max_click_budget: int = 10
    guidance_sigma: float | None = None
    amp: bool = True
    seed: int = 123
    cache_workers: int = 2
    loader_workers: int = 0
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    shift_prob: float = 0.5
    shift_offset: float = 0.1
    edge_cut_prob: float | None = None
    resume: bool = False
    init_from: str | None = None
    max_train_seconds: float = 0.0
    deterministic: bool = False
    window_prob: float | None = None
    window_mm: float | None = None

    def __post_init__(self) -> None:
        get_profile(self.profile)
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.learning_rate is not None and (not self.learning_rate > 0 or not math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 < self.lr_anneal_fraction <= 1.0:
            raise ConfigError(f"lr_anneal_fraction must be in (0, 1], got {self.lr_anneal_fraction}")
        if self.label_resize is not None and self.label_resize not in LABEL_RESIZE_MODES:
            raise ConfigError(f"label_resize must be one of {', '.join(LABEL_RESIZE_MODES)}, got {self.label_resize!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_every < 1:
            raise ConfigError(f"val_every must be at least 1, got {self.val_every}")
        for name in (
            "click_prob_train",
            "click_prob_val",
            "flip_prob",
            "rot90_prob",
            "shift_prob",
            "edge_cut_prob",
            "window_prob",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value}")
        if self.max_click_rounds < 1:
            raise ConfigError(f"max_click_rounds must be at least 1, got {self.max_click_rounds}")
        if self.max_click_budget < 1:
            raise ConfigError(f"max_click_budget must be at least 1, got {self.max_click_budget}")
        if self.guidance_sigma is not None and not self.guidance_sigma > 0:
            raise ConfigError(f"guidance_sigma must be positive, got {self.guidance_sigma}")
        if self.cache_workers < 1 or self.loader_workers < 0:
            raise ConfigError("cache_workers must be >= 1 and loader_workers >= 0")
        if self.window_mm is not None and not (self.window_mm > 0 and math.isfinite(self.window_mm)):
            raise ConfigError(f"window_mm must be a positive number of millimetres, got {self.window_mm}")
        if self.max_train_seconds < 0:
            raise ConfigError(f"max_train_seconds must be >= 0, got {self.max_train_seconds}")

    @property
    def profile_spec(self) -> Profile:
        return get_profile(self.profile)

    def _or_profile(self, name: str) -> Any:
        """The setting `name`, or the profile's field of the same name when it is None."""
        value = getattr(self, name)
        return value if value is not None else getattr(self.profile_spec, name)

    @property
    def num_epochs(self) -> int:
        return self._or_profile("epochs")

    @property
    def lr(self) -> float:
        return self._or_profile("learning_rate")

    @property
    def schedule(self) -> str:
        return self._or_profile("lr_schedule")

    @property
    def label_resize_mode(self) -> str:
        return self._or_profile("label_resize")

    @property
    def edge_cut_probability(self) -> float:
        return self._or_profile("edge_cut_prob")

    @property
    def window_probability(self) -> float:
        return self._or_profile("window_prob")

    @property
    def window_extent_mm(self) -> float:
        return self._or_profile("window_mm")

    @property
    def sigma(self) -> float:
        return self._or_profile("guidance_sigma")

    @property
    def spatial_size(self) -> tuple[int, int, int]:
        return self.profile_spec.spatial_size

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe dict (stored in checkpoints and metrics logs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict, rejecting unknown keys with a message that lists the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as exc:  # wrong type that dataclasses cannot coerce
            raise ConfigError(f"{source}: {exc}") from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with the given fields changed (None values are ignored)."""
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.from_dict(values)


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluateConfig:
    """One evaluation: Dice versus simulated clicks of a checkpoint on a dataset split.

    Attributes:
        checkpoint: our checkpoint or a bundle `model.pt`: a path, `file://` or `s3://` URI.
        data_dir: Decathlon dataset directory.
        output_dir: report directory (created): per_case.csv, summary.json, PNG plots.
        split: one of `EVAL_SPLITS`.
        max_clicks: corrective clicks after the automatic pass.
        profile: override the checkpoint's profile.
        device: torch device name (default: CUDA if available, else CPU).
        metrics_log: training `metrics.jsonl` to plot (default: `<checkpoint dir>/../metrics.jsonl`).
        seed: click-sampling seed.
        val_fraction: validation fraction of the `val` split; None: the one the checkpoint was
            trained with (its stored config), else `DEFAULT_VAL_FRACTION` (a plain state_dict).
        click_radius: click locality radius in grid voxels (None: the profile's; 0 = off).
        refine: click-centred refinement (None: when the checkpoint was trained with windows).
        dicom: read each image from its DICOM series (`trainer.evaluate.with_dicom_images`).
    """

    checkpoint: str | Path
    data_dir: str | Path
    output_dir: str | Path
    split: str = "val"
    max_clicks: int = 10
    profile: str | None = None
    device: str | None = None
    metrics_log: str | Path | None = None
    seed: int = 0
    val_fraction: float | None = None
    click_radius: float | None = None
    refine: bool | None = None
    dicom: bool = False

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise ConfigError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {self.split!r}")
        if isinstance(self.max_clicks, bool) or not isinstance(self.max_clicks, int) or self.max_clicks < 0:
            raise ConfigError(f"max_clicks must be an integer >= 0, got {self.max_clicks!r}")
        if self.profile is not None:
            get_profile(self.profile)
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.click_radius is not None:
            check_click_radius(self.click_radius)


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (e.g. for a command-line flag's default)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


def load_yaml_config(path: str | Path) -> TrainConfig:
    """Read a YAML file of TrainConfig settings (flat mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass an existing YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(values).__name__}")
    return TrainConfig.from_dict(values, source=str(path))
