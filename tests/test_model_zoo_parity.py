"""Parity with the model zoo: its own `configs/inference.json`, run by `monai.bundle` from the shared
copy of the bundle (read at run time, never copied), against our `bundle` profile, on the same
`models/model.pt`.

The weights are a fixed-seed DynUNet whose output layer is scaled up, so the mask is a structured
pattern that is neither empty nor full. Volumes: RAS, LPS and LAS, anisotropic, odd sizes, larger and
smaller than the grid, with and without clicks, and one with permuted axes (no clicks: there the
model zoo scales clicks by the file's axis order, an upstream defect we do not copy). Our mask must
equal the model zoo's voxel for voxel except where the two softmax channels after the resize are
within float noise of each other, and carry the same geometry.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import get_profile
from trainer.network import build_network
from trainer.predictor import Predictor

ZOO = Path(
    os.environ.get(
        "SPLEEN_DEEPEDIT_MODEL_ZOO",
        Path(__file__).resolve().parents[2] / "shared" / "model-zoo" / "spleen_deepedit_annotation",
    )
)
#: Where our side runs (scripts/gpu_check.py --parity sets cuda: the model zoo then runs on the GPU
#: too, with fp16 autocast, and so does our bundle profile).
DEVICE = torch.device(os.environ.get("SPLEEN_DEEPEDIT_PARITY_DEVICE", "cpu"))
#: Softmax channels closer than this after the resize are a tie up to float rounding. The two
#: preprocessing chains agree to ~2e-7 (ITK's reader and MONAI's own resize against ours), which the
#: 31 M-parameter network turns into up to ~1e-5 in the softmax on CPU; fp16 logits on CUDA round at ~1e-3.
NOISE = 1e-4 if DEVICE.type == "cpu" else 2e-3

# name, axis codes, shape, spacing, clicks (original voxel indices)
CASES = [
    ("ras", "RAS", (97, 83, 41), (0.8, 0.7, 2.5), None),
    (
        "lps",
        "LPS",
        (97, 83, 41),
        (0.8, 0.7, 2.5),
        {"spleen": [[48, 40, 20], [60, 30, 25]], "background": [[10, 12, 5]]},
    ),
    ("las", "LAS", (61, 135, 150), (1.2, 0.6, 0.9), {"spleen": [[30, 70, 80]], "background": []}),
    ("las_bg", "LAS", (61, 135, 150), (1.2, 0.6, 0.9), {"spleen": [], "background": [[40, 100, 20]]}),
    ("permuted", "SAR", (41, 83, 97), (2.5, 0.7, 0.8), None),
]
#: At 128^3 every case costs two or three forwards of the 31 M-parameter network (~12 s each on two
#: cores): these three keep each geometry the small grid checks in full (flipped axes with spleen and
#: background clicks, a background click alone on a volume larger than the grid, permuted axes).
CASES_128 = ("lps", "las_bg", "permuted")


def _affine(codes: str, spacing, shape) -> np.ndarray:
    """An affine of the given orientation (axis codes of the array axes), spacing and origin."""
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = np.zeros((4, 4))
    for axis, (world, flip) in enumerate(ornt):
        affine[int(world), axis] = flip * spacing[axis]
    affine[:3, 3] = [-40.0, 25.0, -120.0]
    affine[3, 3] = 1
    return affine


def _volume(shape, seed) -> np.ndarray:
    """A CT-like volume in HU: an ellipsoid of soft tissue in fat, with texture and noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = np.where(x**2 / 0.6 + (y - 0.1) ** 2 / 0.4 + z**2 / 0.7 < 1, 55.0, -120.0)
    return (body + 40 * np.sin(7 * x + 3 * z) + rng.normal(0, 12, shape)).astype(np.int16)


def _weights(profile, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_network(profile).state_dict()
    # A random network's logits differ by ~0.1: scaled, the mask is a pattern, not a coin toss per voxel.
    return {k: v * 30 if k.startswith("output_block") else v for k, v in state.items()}


def _run_model_zoo(root: Path, data: Path, overrides: list[str], cases: list) -> Path:
    items = []
    for name, _, _, _, clicks in cases:
        items.append({"image": str(data / f"{name}.nii.gz"), **(clicks or {})})
    out = root / "eval"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(ZOO / "configs" / "inference.json"),
        "--bundle_root",
        str(root),
        "--output_dir",
        str(out),
        "--dataset#data",
        "$" + repr(items),
        *overrides,
    ]
    # The bundle imports its own `scripts.transforms` from the bundle root.
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _gap(predictor: Predictor, image, affine, clicks) -> np.ndarray:
    """|spleen - background| of the resized softmax, per voxel in the original order: how far from a tie."""
    prepared = predictor.preprocess(image, affine)
    checked = {k: [tuple(p) for p in v] for k, v in (clicks or {"spleen": [], "background": []}).items()}
    soft = predictor.network([prepared], [predictor.map_clicks(checked, prepared)])
    up = F.interpolate(soft, size=prepared.ras_shape, mode="area")[0]
    gap = (up[1] - up[0]).abs().cpu().numpy()
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), prepared.to_ras)
    return nib.orientations.apply_orientation(gap, back)


def _parity(tmp_path, profile, overrides, names=None) -> list[tuple[str, float, int]]:
    if not (ZOO / "configs" / "inference.json").is_file():
        pytest.skip(f"the model zoo's bundle is not at {ZOO} (set SPLEEN_DEEPEDIT_MODEL_ZOO)")
    pytest.importorskip("itk", reason="the model zoo's inference.json reads images with ITKReader")
    pytest.importorskip("einops", reason="the model zoo's scripts/transforms.py imports einops")
    root, data = tmp_path / "bundle", tmp_path / "data"
    (root / "models").mkdir(parents=True)
    data.mkdir()
    for folder in ("configs", "scripts"):
        (root / folder).symlink_to(ZOO / folder, target_is_directory=True)
    weights = _weights(profile)
    torch.save(weights, root / "models" / "model.pt")
    # A case keeps its seed (its position in CASES), so its volume is the same whatever the subset.
    seeded = [(seed, case) for seed, case in enumerate(CASES) if names is None or case[0] in names]
    cases = [case for _, case in seeded]
    for seed, (name, codes, shape, spacing, _) in seeded:
        affine = _affine(codes, spacing, shape)
        img = nib.Nifti1Image(_volume(shape, seed), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, data / f"{name}.nii.gz")

    out = _run_model_zoo(root, data, overrides, cases)
    network = build_network(profile)
    network.load_state_dict(weights)
    predictor = Predictor(network, profile, device=DEVICE)
    results = []
    for name, _, shape, _, clicks in cases:
        theirs_img = nib.load(out / name / f"{name}_trans.nii.gz")
        theirs = np.asarray(theirs_img.dataobj).reshape(shape)
        source = nib.load(data / f"{name}.nii.gz")
        image = np.asarray(source.dataobj)
        ours = predictor.predict_file(data / f"{name}.nii.gz", tmp_path / "ours" / f"{name}.nii.gz", clicks)
        mask = np.asarray(nib.load(tmp_path / "ours" / f"{name}.nii.gz").dataobj)
        assert mask.shape == theirs.shape == shape, name
        np.testing.assert_allclose(theirs_img.affine, source.affine, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(nib.load(tmp_path / "ours" / f"{name}.nii.gz").affine, source.affine, atol=1e-6)
        differ = mask.astype(bool) != (theirs > 0.5)
        # How far from a tie the differing voxels are (one more forward, only when some differ).
        worst = float(_gap(predictor, image, source.affine, clicks)[differ].max()) if differ.any() else 0.0
        assert worst < NOISE, (name, int(differ.sum()), worst)
        fg = theirs > 0.5
        dice = 2 * (fg & mask.astype(bool)).sum() / max(fg.sum() + mask.sum(), 1)
        assert 0.02 < fg.mean() < 0.98, (name, fg.mean())  # neither empty nor full
        assert dice >= 0.999, (name, dice)
        results.append((name, round(float(dice), 6), int(differ.sum()), worst))
        assert ours.mask.shape == shape
    return results


@pytest.mark.slow
def test_small_grid_masks_equal_the_model_zoo_inference(tmp_path):
    """The model zoo's pipeline with its grid and filters overridden on the command line (as bundle
    users do): every transform, the inversion and the argmax as in the 128^3 bundle, in seconds."""
    profile = dataclasses.replace(get_profile("bundle"), spatial_size=(64, 64, 32), filters=(8, 16, 16, 32, 32, 32))
    results = _parity(
        tmp_path, profile, ["--spatial_size", "[64,64,32]", "--network_def#filters", "[8,16,16,32,32,32]"]
    )
    print(results)


@pytest.mark.slow
def test_bundle_profile_masks_equal_the_model_zoo_inference_at_128(tmp_path):
    """The real thing: the model zoo's inference.json unchanged, its 31 M-parameter network at 128^3."""
    results = _parity(tmp_path, get_profile("bundle"), [], names=CASES_128)
    print(results)
