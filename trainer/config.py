"""Typed configuration: named model profiles and the training job settings.

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
#: How inference resizes the network's answer back to the scan (Profile.upsample).
UPSAMPLE_MODES: tuple[str, ...] = ("area", "probability", "logit")
#: Share of the sorted labelled cases (the last ones) that validate: training's split, and the `val`
#: split `evaluate` scores when the checkpoint does not say which fraction it was trained with.
DEFAULT_VAL_FRACTION: float = 0.2


@dataclass(frozen=True, kw_only=True, slots=True)
class Profile:
    """A named network size. Chosen explicitly by the user, never silently.

    Attributes:
        name: profile name used on the command line.
        spatial_size: the network's input grid (the whole volume is resized to it).
        filters: DynUNet filters per level; None means MONAI's default (the bundle's network).
        epochs: default number of epochs for this profile.
        learning_rate: default Adam learning rate for this profile (the peak, with a schedule).
        lr_schedule: default learning-rate schedule (`constant` or `cosine`, see trainer.schedule).
        label_resize: default label resizing to the network grid (`nearest` or `area`, see
            trainer.transforms.preprocess_transforms).
        guidance_sigma: default Gaussian sigma of the click maps, in voxels of this profile's grid.
            Scaled with the grid (3 at 128^3, as the bundle) so a click covers the same anatomy.
        click_radius: default click locality radius of inference, in voxels of this profile's grid;
            0 = off (see trainer.predictor).
        edge_cut_prob: default probability of the edge-cut augmentation (the spleen cut by the top
            or bottom of the scan; see trainer.transforms.RandEdgeCutd).
        upsample: how inference resizes the grid's answer back to the scan before thresholding:
            `area` (the model zoo, spec §5: its `Invertd` inverts `Resized(mode="area")` in the same
            mode, adaptive average pooling of the softmax), `probability` (trilinear on the softmax)
            or `logit` (trilinear on the logit; see trainer.predictor).
        description: one line for `--help` and the model card.
        cuda_fp16_inference: inference autocasts to fp16 on CUDA by default (the model zoo's
            evaluator does; its masks are what the `bundle` profile reproduces).
        zoo_click_arithmetic: map clicks to the RAS array as the model zoo does (the float product
            inv(A_ras) @ A_orig, truncated: a click can land one voxel lower, e.g. 79.99999 -> 79),
            instead of rounding to the exact index.
        second_click_voxels: training's corrective clicks: an error region larger than this many
            grid voxels gets a second click, as MONAI's DeepEdit does above 50 voxels at 128^3; 0:
            one click per error region (the small grids, where most regions are that small).
        window_prob: default share of training samples that are click-centred refinement windows
            instead of whole-scan resizes (`trainer.refine`); checkpoints trained with windows > 0
            refine clicks at inference. 0 for `bundle`: the model zoo's behaviour.
        window_mm: a refinement window's extent at its finest, on every axis: the grid over it gives
            the window spacing (cpu: 128 mm over 64x64x32 = 2x2x4 mm).
    """

    name: str
    spatial_size: tuple[int, int, int]
    filters: tuple[int, ...] | None
    epochs: int
    learning_rate: float
    lr_schedule: str
    label_resize: str
    guidance_sigma: float
    click_radius: float
    edge_cut_prob: float
    upsample: str
    description: str
    cuda_fp16_inference: bool = False
    zoo_click_arithmetic: bool = False
    second_click_voxels: int = 0
    window_prob: float = 0.0
    window_mm: float = 128.0

    def __post_init__(self) -> None:
        # DynUNet strides (1,2,2,2,2,(2,2,1)) downsample x and y by 32 and z by 16.
        if self.spatial_size[0] % 32 or self.spatial_size[1] % 32 or self.spatial_size[2] % 16:
            raise ConfigError(f"profile {self.name}: spatial_size {self.spatial_size} must be multiples of (32, 32, 16)")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"profile {self.name}: upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {self.upsample!r}")


PROFILES: dict[str, Profile] = {
    "bundle": Profile(
        name="bundle",
        spatial_size=(128, 128, 128),
        filters=None,
        epochs=500,
        learning_rate=1e-4,
        lr_schedule="constant",
        label_resize="nearest",  # the bundle's choice (spec §2)
        guidance_sigma=3.0,
        click_radius=0.0,  # the model zoo's behaviour (spec §5): the network's answer as it is
        edge_cut_prob=0.0,  # the model zoo's augmentation (spec §3)
        # The model zoo's inference (spec §5): `Invertd` resizes the softmax back in `Resized`'s own
        # mode, area. Trilinear probabilities agreed with it only at Dice 0.96 on a smooth blob.
        upsample="area",
        description="the model-zoo bundle's network: DynUNet 32..320 filters at 128^3 (GPU)",
        cuda_fp16_inference=True,  # the model zoo's evaluator: "amp": true
        zoo_click_arithmetic=True,  # its OrientationGuidance + AddGuidanceFromPoints arithmetic
        second_click_voxels=50,  # MONAI's AddRandomGuidanceDeepEditd
    ),
    "cpu": Profile(
        name="cpu",
        # Half the slices of a cube: CT volumes span less in z than in-plane, so 64x64x32 is closer
        # to isotropic; twice the steps in a time budget, and area labels at 64x64x32 still map
        # back with Dice 0.976 (0.981 at 64^3) on held-out phantoms.
        spatial_size=(64, 64, 32),
        filters=(16, 32, 48, 64, 96, 96),
        # More epochs than a 10-minute budget holds (16 of 128 phantoms on 2 cores in bf16): the
        # budget ends the job, and the cosine schedule anneals over the budget.
        epochs=60,
        # A short CPU budget needs a larger step than the bundle's 1e-4 (measured: see docs/).
        learning_rate=2e-3,
        # Constant, then annealed to 1 % over the last 20 % of the job (or of its time budget). A
        # cosine over the whole 10-minute budget was worse: the model is far from converged, and
        # an early decay slowed it (training loss 0.40 vs 0.22 after 18 epochs at 64^3).
        lr_schedule="cosine",
        # Nearest-resized labels lie up to half a voxel off the image: a perfect fit of them scores
        # 0.90 Dice on the original grid of held-out phantoms, soft area-resized ones 0.976.
        label_resize="area",
        # sigma 3 at 64^3 made blobs twice the bundle's relative size and background clicks erased
        # true spleen: held-out Dice 0.818 -> 0.786 after 5 clicks; with 1.5: 0.851 -> 0.862.
        guidance_sigma=1.5,
        # Chosen on the validation split (16 phantoms, model trained 9.5 min on 64): radius 2 was the
        # only one whose Dice never fell from one click to the next (0.925 automatic -> 0.929 after
        # 5 -> 0.933 after 10; off: 0.925 -> 0.927 -> 0.932 with three dips; 3 and 4: four and two).
        click_radius=2.0,
        # Spleens cut by the top or bottom of the scan were most whole-organ misses (7 of one model's
        # 10 on 400 fresh phantoms) though only 15 % of phantoms; with 0.25, misses fell to 1-2 and
        # automatic Dice rose from 0.890-0.897 to 0.902 in two runs (docs/evaluation.md, rows N-R).
        edge_cut_prob=0.25,
        # Interpolating the logit (smooth where the probability saturates) follows the boundary more
        # closely: validation split, same model, Dice 0.9165 -> 0.9227; 400 fresh phantoms 0.902 ->
        # 0.908 (docs/evaluation.md, row S).
        upsample="logit",
        # Half the samples are refinement windows: see docs/evaluation.md (click-centred refinement).
        window_prob=0.5,
        description="demo profile for a laptop CPU: DynUNet 16..96 filters at 64x64x32",
    ),
    "tiny": Profile(
        name="tiny",
        spatial_size=(32, 32, 32),
        filters=(8, 16, 16, 32, 32, 32),
        epochs=2,
        learning_rate=3e-3,
        lr_schedule="cosine",
        label_resize="area",
        guidance_sigma=0.75,
        click_radius=1.0,
        edge_cut_prob=0.0,
        upsample="logit",
        description="test profile: DynUNet 8..32 filters at 32^3 (seconds per epoch)",
    ),
}


def check_click_radius(value: Any) -> float:
    """A click locality radius (trainer.predictor): a finite number >= 0 in grid voxels, 0 = off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"click_radius must be a number >= 0 (grid voxels; 0 turns click locality off), got {value!r}")
    return float(value)


def get_profile(name: str) -> Profile:
    """Return the named profile or raise a ConfigError listing the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown profile {name!r}: choose one of {', '.join(sorted(PROFILES))}"
        ) from None


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
        for name in ("click_prob_train", "click_prob_val", "flip_prob", "rot90_prob", "shift_prob", "edge_cut_prob", "window_prob"):
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
