"""Named network sizes (profiles): the network grid, filters and each profile's own defaults.

`trainer.config` re-exports everything here; `TrainConfig` and the inference settings fall back to a
profile's field where they leave a setting None.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

#: How inference resizes the network's answer back to the scan (Profile.upsample).
UPSAMPLE_MODES: tuple[str, ...] = ("area", "probability", "logit")


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
        refine_radius_mm: click locality of refinement windows, in mm: a window changes the mask only
            near its clicks (Gaussian of this width, plus the flipped pieces that hold a click); 0: off.
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
    refine_radius_mm: float = 0.0

    def __post_init__(self) -> None:
        # DynUNet strides (1,2,2,2,2,(2,2,1)) downsample x and y by 32 and z by 16.
        if self.spatial_size[0] % 32 or self.spatial_size[1] % 32 or self.spatial_size[2] % 16:
            raise ConfigError(
                f"profile {self.name}: spatial_size {self.spatial_size} must be multiples of (32, 32, 16)"
            )
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(
                f"profile {self.name}: upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {self.upsample!r}"
            )


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


def get_profile(name: str) -> Profile:
    """Return the named profile or raise a ConfigError listing the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}: choose one of {', '.join(sorted(PROFILES))}") from None
