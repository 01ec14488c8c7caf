#!/usr/bin/env python
"""Pipeline benchmarks against MONAI's own DeepEdit path, as ratios measured in one run.

- guidance encoding at 128^3: ours (local Gaussian windows) vs MONAI's `AddGuidanceSignalDeepEditd`
  (full-volume separable convolution), same clicks, values compared;
- dataset cache memory: our network-resolution cache vs the bundle's full-resolution cache of the
  same 512x512xZ cases (bytes held by MONAI's CacheDataset items);
- data + click pipeline per training iteration, network time excluded: the bundle's train chain
  (full-resolution cache, random transforms at full resolution, `Resized` to 128^3, initial seeds,
  guidance signal, and with p=0.4 an `Interaction`-style click round: discrepancy, random guidance,
  guidance signal) vs ours (`build_datasets` cache at 128^3, augmentation, `simulate_clicks`,
  `network_input`);
- inference overhead = end to end minus the network forward, int16 .nii.gz on disk -> mask on disk,
  with clicks: the bundle's inference chain (`LoadImaged` ... `Invertd`, `SaveImaged`) vs ours
  (`Predictor.predict_file`).

Both timed paths of the last two benchmarks run the same `FakeNetwork` (a FAKE network that returns a
fixed prediction almost instantly and times itself); its seconds are subtracted on both sides.

Writes benchmarks/results.json (merged with keys other benchmarks own) and benchmarks/pipeline.md.
Usage: .venv/bin/python scripts/bench_pipeline.py [--repeats 7] [--cases 3] [--iterations 30]
       .venv/bin/python scripts/bench_pipeline.py --quick      # smoke run: small volumes, writes nothing
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The bundle's label dict (spec §6) and click probability during training (spec §3).
LABEL_NAMES = {"spleen": 1, "background": 0}
CLICK_PROB_TRAIN = 0.4
SEED = 123


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# --------------------------------------------------------------------------- the fake network


class FakeNetwork(torch.nn.Module):
    """FAKE stand-in for the DynUNet, shared by both timed paths: returns a fixed two-channel
    "prediction" (logits) almost instantly and accumulates the seconds spent in its own forward, which
    the benchmarks subtract (network time excluded).

    - training (`label` set before each iteration): the spleen label shifted by `shift` voxels along
      axis 0, so every click round sees both a missed region (FN) and an over-segmented one (FP);
    - inference (`label` None): a threshold of the CT channel.
    """

    def __init__(self, shift: int = 4):
        super().__init__()
        self.shift = shift
        self.label: torch.Tensor | None = None  # (B, 1, X, Y, Z)
        self.seconds = 0.0
        self.calls = 0
        self._dummy = torch.nn.Parameter(torch.zeros(1))  # .to(device) / .parameters() behave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.label is not None:
            fg = torch.roll(torch.as_tensor(self.label).float(), shifts=self.shift, dims=2).to(x.device)
        else:
            fg = (torch.as_tensor(x[:, :1]) > 0.6).float()
        logits = torch.cat([1.0 - fg, fg], dim=1) * 4.0 - 2.0
        if isinstance(x, MetaTensor):  # as a real network's output would: the input's metadata
            logits = MetaTensor(torch.as_tensor(logits), meta=x.meta, applied_operations=x.applied_operations)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return logits

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


# --------------------------------------------------------------------------- guidance encoding


def bench_guidance(repeats: int) -> dict:
    from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd

    from trainer.clicks import guidance_channels

    shape = (128, 128, 128)
    rng = np.random.default_rng(0)
    clicks = {
        "spleen": [tuple(int(v) for v in rng.integers(0, 128, 3)) for _ in range(3)],
        "background": [tuple(int(v) for v in rng.integers(0, 128, 3)) for _ in range(2)],
    }
    image = np.zeros((1, *shape), np.float32)
    monai_t = AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", sigma=3)

    def reference():
        return monai_t({"image": image, "guidance": {k: [list(p) for p in v] for k, v in clicks.items()}})["image"]

    def ours():
        return guidance_channels(clicks, shape, 3.0)

    t_ref, _ = _median_time(reference, repeats)
    t_ours, _ = _median_time(ours, repeats)
    max_abs = float(np.abs(np.asarray(reference())[1:] - ours()).max())
    return {
        "reference_s": t_ref,
        "ours_s": t_ours,
        "speedup": t_ref / t_ours,
        "max_abs_diff": max_abs,
        "clicks": sum(len(v) for v in clicks.values()),
    }


# --------------------------------------------------------------------------- cache memory


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _labelled_items(data_dir: Path, n: int) -> list[dict[str, str]]:
    images = sorted((data_dir / "imagesTr").glob("*.nii.gz"))
    return [{"image": str(p), "label": str(data_dir / "labelsTr" / p.name)} for p in images][:n]


def bench_cache_memory(n_cases: int, data_dir: Path) -> dict:
    from monai import transforms as mt
    from monai.data import CacheDataset

    from trainer.config import TrainConfig
    from trainer.transforms import cache_transforms

    items = _labelled_items(data_dir, n_cases)
    # The bundle's deterministic part (spec §2): everything before its first random transform is cached
    # at full resolution; the resize to 128^3 runs every iteration after the random flips/rotations.
    bundle_chain = mt.Compose(
        [
            mt.LoadImaged(keys=["image", "label"], image_only=True),
            mt.EnsureChannelFirstd(keys=["image", "label"]),
            mt.Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    ref = CacheDataset(items, transform=bundle_chain, cache_rate=1.0, num_workers=1, progress=False)
    ours = CacheDataset(
        items, transform=cache_transforms(TrainConfig(profile="bundle")), cache_rate=1.0, num_workers=1, progress=False
    )
    ref_bytes = sum(_nbytes(x) for x in ref._cache)
    our_bytes = sum(_nbytes(x) for x in ours._cache)
    shapes = [list(np.asarray(x["image"]).shape[1:]) for x in ref._cache]
    return {
        "cases": len(items),
        "shapes": shapes,
        "reference_bytes": ref_bytes,
        "ours_bytes": our_bytes,
        "ratio": ref_bytes / our_bytes,
        "reference_mb_per_case": ref_bytes / len(items) / 2**20,
        "ours_mb_per_case": our_bytes / len(items) / 2**20,
    }


# --------------------------------------------------------------------------- training pipeline


def _ensure_skimage_measure() -> str:
    """MONAI's initial-seed transforms call `skimage.measure.label`; scikit-image is an optional MONAI
    dependency this project does not install. Without it, give MONAI the equivalent from scipy
    (full connectivity, as skimage's default `connectivity=ndim`; also compiled code)."""
    from monai.apps.deepedit import transforms as dt

    try:
        import skimage.measure  # noqa: F401

        return "skimage.measure.label"
    except ImportError:
        from types import SimpleNamespace

        from scipy import ndimage

        def label(image, background=0):
            fg = np.asarray(image) != background
            return ndimage.label(fg, structure=ndimage.generate_binary_structure(fg.ndim, fg.ndim))[0]

        dt.measure = SimpleNamespace(label=label)
        return "scipy.ndimage.label (scikit-image not installed)"


def _bundle_train_dataset(items: list[dict[str, str]], spatial_size):
    """The bundle's `train#dataset` (configs/train.json of spleen_deepedit_annotation), nibabel reader.

    CacheDataset caches the deterministic prefix (load, label normalisation, channel first, RAS,
    window) at full resolution and runs the rest every iteration.
    """
    from monai import transforms as mt
    from monai.apps.deepedit import transforms as dt
    from monai.data import CacheDataset

    # MONAI 1.6 renamed NormalizeLabelsInDatasetd (the bundle's name, now a deprecated alias).
    normalize = getattr(dt, "RemapLabelsToSequentiald", None) or dt.NormalizeLabelsInDatasetd
    keys = ["image", "label"]
    chain = mt.Compose(
        [
            mt.LoadImaged(keys=keys),
            normalize(keys="label", label_names=LABEL_NAMES),
            mt.EnsureChannelFirstd(keys=keys),
            mt.Orientationd(keys=keys, axcodes="RAS"),
            mt.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            # random_transforms, at full resolution
            mt.RandFlipd(keys=keys, spatial_axis=[0], prob=0.1),
            mt.RandFlipd(keys=keys, spatial_axis=[1], prob=0.1),
            mt.RandFlipd(keys=keys, spatial_axis=[2], prob=0.1),
            mt.RandRotate90d(keys=keys, prob=0.1, max_k=3),
            mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            # deepedit_transforms
            mt.Resized(keys=keys, spatial_size=tuple(spatial_size), mode=["area", "nearest"]),
            dt.FindAllValidSlicesMissingLabelsd(keys="label", sids="sids"),
            dt.AddInitialSeedPointMissingLabelsd(keys="label", guidance="guidance", sids="sids"),
            dt.AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", number_intensity_ch=1),
            mt.ToTensord(keys=keys),
        ]
    )
    ds = CacheDataset(items, transform=chain, cache_rate=1.0, num_workers=2, progress=False)
    ds.transform.set_random_state(seed=SEED)
    return ds


def _bundle_click_transforms():
    """The bundle's `train#click_transforms`."""
    from monai import transforms as mt
    from monai.apps.deepedit import transforms as dt

    return mt.Compose(
        [
            mt.Activationsd(keys="pred", softmax=True),
            mt.AsDiscreted(keys="pred", argmax=True),
            mt.ToNumpyd(keys=["image", "label", "pred"]),
            dt.FindDiscrepancyRegionsDeepEditd(keys="label", pred="pred", discrepancy="discrepancy"),
            dt.AddRandomGuidanceDeepEditd(
                keys="NA", guidance="guidance", discrepancy="discrepancy", probability="probability"
            ),
            dt.AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", number_intensity_ch=1),
            mt.ToTensord(keys=["image", "label"]),
        ]
    )


def _bundle_interaction(batch: dict, net: FakeNetwork, click_transforms, click_prob: float) -> tuple[dict, bool]:
    """`monai.apps.deepedit.interaction.Interaction.__call__` (train=True, max_interactions=1) without
    ignite: the part before `engine._iteration` (the training forward/backward, not timed)."""
    from monai.data import decollate_batch, list_data_collate

    clicked = bool(np.random.choice([True, False], p=[click_prob, 1 - click_prob]))
    if clicked:
        inputs = batch["image"]  # default_prepare_batch: (image, label) to the device (CPU here)
        net.eval()
        with torch.no_grad():
            predictions = net(inputs)
        batch.update({"pred": predictions})
        items = decollate_batch(batch, detach=True)
        for i in range(len(items)):
            items[i]["probability"] = 1.0  # (1 - 1/max_interactions * j) with j = 0
            items[i] = click_transforms(items[i])
        batch = list_data_collate(items)
    else:
        items = decollate_batch(batch, detach=True)
        for i in range(1, len(items[0]["image"])):
            items[0]["image"][i] *= 0
        batch = list_data_collate(items)
    return batch, clicked


def _timed(fn, net: FakeNetwork) -> tuple[float, object]:
    """Seconds of one call of `fn`, minus the seconds spent in the fake network's forward."""
    net.reset()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0 - net.seconds, out


def _interleaved(fns: dict, nets: dict, runs: int, warmup: int) -> dict[str, list[tuple[float, object]]]:
    """Time the paths in `fns` alternately (ABAB..., order swapped every run), so that the load of a
    shared machine, which drifts over minutes, weighs on both paths alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list] = {name: [] for name in names}
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(_timed(fns[name], nets[name]))
    return out


def _iteration_stats(samples: list[tuple[float, object]]) -> dict:
    """Per-iteration statistics; each sample is (seconds, was it a click iteration)."""
    times = [t for t, _ in samples]
    t_click = [t for t, c in samples if c]
    t_auto = [t for t, c in samples if not c]
    mean_click = statistics.fmean(t_click) if t_click else float("nan")
    mean_auto = statistics.fmean(t_auto) if t_auto else float("nan")
    med_click = statistics.median(t_click) if t_click else float("nan")
    med_auto = statistics.median(t_auto) if t_auto else float("nan")
    # The per-iteration cost at the nominal click probability: insensitive to how many click
    # iterations each path happened to draw in a short run.
    p = CLICK_PROB_TRAIN
    both = bool(t_click and t_auto)
    return {
        "iterations": len(times),
        "click_iterations": len(t_click),
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "mean_click_s": mean_click,
        "mean_auto_s": mean_auto,
        "median_click_s": med_click,
        "median_auto_s": med_auto,
        "expected_s": p * mean_click + (1 - p) * mean_auto if both else statistics.fmean(times),
        "expected_from_medians_s": p * med_click + (1 - p) * med_auto if both else statistics.median(times),
        "times_s": [round(t, 4) for t in times],
    }


def bench_train_pipeline(data_dir: Path, n_cases: int, iterations: int, warmup: int) -> dict:
    """Seconds per training iteration of data + click pipeline, network time excluded."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from trainer.config import TrainConfig
    from trainer.engine import network_input, simulate_clicks
    from trainer.train import build_datasets
    from trainer.transforms import label_mask

    cfg = TrainConfig(profile="bundle", seed=SEED)
    assert abs(cfg.click_prob_train - CLICK_PROB_TRAIN) < 1e-12, "both paths must use the same click probability"
    spatial = tuple(cfg.spatial_size)

    # ---- ours: the network-resolution cache of build_datasets (its train split = the first n_cases)
    t0 = time.perf_counter()
    train_ds, _ = build_datasets(cfg, str(data_dir), progress=False)
    ours_cache_s = time.perf_counter() - t0
    assert len(train_ds) == n_cases, f"expected {n_cases} training cases, got {len(train_ds)}"
    net = FakeNetwork()
    gen = torch.Generator().manual_seed(SEED)
    loader = DataLoader(train_ds, batch_size=1, shuffle=True, num_workers=0, generator=gen)
    state = {"it": iter(loader), "step": 0}

    def ours_iteration() -> bool:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            batch = next(state["it"])
        # train_step up to the training forward
        image = batch["image"].to(torch.float32)
        label_np = label_mask(batch["label"][:, 0]).numpy()
        body_np = batch["body"][:, 0].numpy().astype(bool)
        seeds = np.random.SeedSequence([cfg.seed, 0, 0, state["step"]]).spawn(image.shape[0])
        state["step"] += 1
        rngs = [np.random.default_rng(s) for s in seeds]
        net.label = batch["label"]
        clicks = simulate_clicks(net, image, label_np, body_np, rngs, cfg, cfg.click_prob_train)
        x = network_input(image, clicks, cfg.sigma)
        assert x.shape[1] == 3
        return any(any(v) for v in clicks[0].values())

    # ---- reference: the bundle's train chain + Interaction
    connected_components = _ensure_skimage_measure()
    set_determinism(seed=SEED)
    items = _labelled_items(data_dir, n_cases)
    t0 = time.perf_counter()
    ref_ds = _bundle_train_dataset(items, spatial)
    ref_cache_s = time.perf_counter() - t0
    click_t = _bundle_click_transforms()
    ref_net = FakeNetwork()
    ref_loader = DataLoader(
        ref_ds, batch_size=1, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(SEED)
    )
    rstate = {"it": iter(ref_loader)}

    def ref_iteration() -> bool:
        try:
            batch = next(rstate["it"])
        except StopIteration:
            rstate["it"] = iter(ref_loader)
            batch = next(rstate["it"])
        ref_net.label = batch["label"]
        batch, clicked = _bundle_interaction(batch, ref_net, click_t, CLICK_PROB_TRAIN)
        assert batch["image"].shape[1] == 3
        return clicked

    logging.getLogger("monai.apps.deepedit.transforms").setLevel(logging.WARNING)
    samples = _interleaved(
        {"reference": ref_iteration, "ours": ours_iteration}, {"reference": ref_net, "ours": net}, iterations, warmup
    )
    ref, ours = _iteration_stats(samples["reference"]), _iteration_stats(samples["ours"])
    ref["cache_s"], ours["cache_s"] = ref_cache_s, ours_cache_s
    set_determinism(seed=None)
    return {
        "cases": n_cases,
        "click_prob": CLICK_PROB_TRAIN,
        "reference": ref,
        "ours": ours,
        "reference_connected_components": connected_components,
        "speedup": ref["expected_s"] / ours["expected_s"],
        "speedup_from_medians": ref["expected_from_medians_s"] / ours["expected_from_medians_s"],
        "speedup_raw_mean": ref["mean_s"] / ours["mean_s"],
    }


# --------------------------------------------------------------------------- inference overhead


def _test_clicks(label_path: Path, n_spleen: int = 3, n_background: int = 2) -> dict:
    """Clicks in the original file's voxel indices: inside the spleen and outside it (seeded)."""
    import nibabel as nib

    label = np.asarray(nib.load(str(label_path)).dataobj) > 0
    rng = np.random.default_rng(SEED)
    fg, bg = np.argwhere(label), np.argwhere(~label)
    pick = lambda pts, n: [[int(v) for v in pts[i]] for i in rng.choice(len(pts), n, replace=False)]  # noqa: E731
    return {"spleen": pick(fg, n_spleen), "background": pick(bg, n_background)}


def _bundle_inference(spatial_size, output_dir: Path):
    """The bundle's inference chain (configs/inference.json of spleen_deepedit_annotation v0.5.x):
    pre-processing, guidance from points in original voxel indices, resize, guidance signal; after the
    forward: softmax, Invertd, argmax, SaveImaged (float32 `<name>/<name>_trans.nii.gz`)."""
    from monai import transforms as mt
    from monai.apps.deepedit import transforms as dt

    pre = mt.Compose(
        [
            mt.LoadImaged(keys="image"),
            mt.EnsureChannelFirstd(keys="image"),
            mt.Orientationd(keys="image", axcodes="RAS"),
            mt.ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            dt.AddGuidanceFromPointsDeepEditd(ref_image="image", guidance="guidance", label_names=LABEL_NAMES),
            mt.Resized(keys="image", spatial_size=tuple(spatial_size), mode="area"),
            dt.ResizeGuidanceMultipleLabelDeepEditd(guidance="guidance", ref_image="image"),
            dt.AddGuidanceSignalDeepEditd(keys="image", guidance="guidance", number_intensity_ch=1),
            mt.EnsureTyped(keys="image"),
        ]
    )
    post = mt.Compose(
        [
            mt.EnsureTyped(keys="pred"),
            mt.Activationsd(keys="pred", softmax=True),
            mt.Invertd(
                keys="pred",
                transform=pre,
                orig_keys="image",
                meta_key_postfix="meta_dict",
                nearest_interp=False,
                to_tensor=True,
            ),
            mt.AsDiscreted(keys="pred", argmax=True),
            mt.SaveImaged(
                keys="pred",
                meta_keys="pred_meta_dict",
                output_dir=str(output_dir),
                output_postfix="trans",
                output_dtype=np.float32,
                separate_folder=True,
                print_log=False,
            ),
        ]
    )
    return pre, post


def bench_inference(image_path: Path, clicks: dict, runs: int, out_dir: Path) -> dict:
    from monai.data import decollate_batch, list_data_collate

    from trainer.config import get_profile
    from trainer.predictor import Predictor

    profile = get_profile("bundle")
    spatial = tuple(profile.spatial_size)
    net = FakeNetwork().eval()

    # ---- reference: Dataset item -> collate -> forward -> decollate -> postprocessing
    pre, post = _bundle_inference(spatial, out_dir / "bundle")

    def reference() -> float:
        item = pre({"image": str(image_path), **clicks})
        batch = list_data_collate([item])
        with torch.no_grad():
            batch["pred"] = net(batch["image"])
        for d in decollate_batch(batch):
            post(d)
        return net.seconds

    # ---- ours
    predictor = Predictor(net, profile, device=torch.device("cpu"), amp=False)
    mask_path = out_dir / "ours" / "mask.nii.gz"
    stages: list[dict] = []

    def ours() -> float:
        pred = predictor.predict_file(image_path, mask_path, clicks)
        stages.append(pred.timings)
        return net.seconds

    samples = _interleaved({"reference": reference, "ours": ours}, {"reference": net, "ours": net}, runs, warmup=1)

    def summary(name: str) -> dict:
        overhead = [t for t, _ in samples[name]]
        return {
            "runs": runs,
            "overhead_s": statistics.median(overhead),
            "overhead_all_s": [round(t, 4) for t in overhead],
            "network_s": statistics.median(n for _, n in samples[name]),
            "end_to_end_s": statistics.median(t + n for t, n in samples[name]),
        }

    ref, ours_r = summary("reference"), summary("ours")
    stage_medians = {k: statistics.median(s[k] for s in stages[1:]) for k in stages[-1]}  # [0]: warm-up
    ours_r["stages_s"] = stage_medians
    ref_files = sorted((out_dir / "bundle").rglob("*.nii.gz"))
    return {
        "image": image_path.name,
        "clicks": clicks,
        "reference": ref,
        "ours": ours_r,
        "ratio": ref["overhead_s"] / ours_r["overhead_s"],
        "reference_output": [str(p.relative_to(out_dir)) for p in ref_files],
    }


# --------------------------------------------------------------------------- output


def write_results(results: dict) -> None:
    out_dir = ROOT / "benchmarks"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def _miss(ratio: float, goal: float) -> str:
    return "met" if ratio >= goal else f"missed by {goal / ratio:.1f}×"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per timing (medians); >= 5 for the table")
    parser.add_argument("--cases", type=int, default=3, help="512x512xZ phantoms for cache and pipeline benchmarks")
    parser.add_argument("--iterations", type=int, default=30, help="timed training iterations per path")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="reuse phantoms written by trainer.synth.write_dataset (needs cases+1 labelled, 1 test)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 repeats, 4 iterations, 1 case of 256x256x48; prints, writes nothing",
    )
    args = parser.parse_args()
    shape = (512, 512, 100)
    if args.quick:
        args.repeats, args.cases, args.iterations, shape = 2, 1, 4, (256, 256, 48)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    load_start = os.getloadavg()

    g = bench_guidance(args.repeats)
    print(
        f"guidance 128^3: MONAI {g['reference_s'] * 1e3:.1f} ms, ours {g['ours_s'] * 1e3:.2f} ms -> {g['speedup']:.0f}x (max |diff| {g['max_abs_diff']:.1e})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            from trainer.synth import write_dataset

            data_dir = Path(tmp) / "data"
            t0 = time.perf_counter()
            # cases + 1 labelled: build_datasets keeps the last one for validation.
            write_dataset(data_dir, args.cases + 1, seed=0, test_cases=1, shape=shape)
            print(
                f"phantoms: {args.cases + 1} labelled + 1 test of {shape} in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        c = bench_cache_memory(args.cases, data_dir)
        print(
            f"cache: bundle {c['reference_mb_per_case']:.0f} MB/case, ours {c['ours_mb_per_case']:.1f} MB/case -> {c['ratio']:.1f}x smaller",
            flush=True,
        )

        p = bench_train_pipeline(data_dir, args.cases, args.iterations, warmup=2)
        pr, po = p["reference"], p["ours"]
        print(
            f"train pipeline/iteration (network excluded): bundle {pr['expected_s']:.3f} s "
            f"(click {pr['mean_click_s']:.3f}, auto {pr['mean_auto_s']:.3f}, {pr['click_iterations']}/{pr['iterations']} clicked), "
            f"ours {po['expected_s'] * 1e3:.1f} ms (click {po['mean_click_s'] * 1e3:.1f}, auto {po['mean_auto_s'] * 1e3:.1f}, "
            f"{po['click_iterations']}/{po['iterations']} clicked) -> {p['speedup']:.1f}x",
            flush=True,
        )

        test_image = sorted((data_dir / "imagesTs").glob("*.nii.gz"))[0]
        clicks = _test_clicks(data_dir / "labelsTs" / test_image.name)
        i = bench_inference(test_image, clicks, args.repeats, Path(tmp) / "out")
        ir, io = i["reference"], i["ours"]
        print(
            f"inference overhead: bundle {ir['overhead_s']:.2f} s (e2e {ir['end_to_end_s']:.2f}), "
            f"ours {io['overhead_s']:.2f} s (e2e {io['end_to_end_s']:.2f}; stages "
            + ", ".join(f"{k} {v:.2f}" for k, v in io["stages_s"].items())
            + f") -> {i['ratio']:.1f}x",
            flush=True,
        )
    load_end = os.getloadavg()

    if args.quick:
        print("--quick: smoke run, benchmarks/ left untouched")
        return 0

    import monai

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    load = f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end (1-min load average)"
    results = {
        "guidance_speedup": round(g["speedup"], 1),
        "cache_memory_ratio": round(c["ratio"], 1),
        "pipeline_speedup": round(p["speedup"], 1),
        "inference_overhead_ratio": round(i["ratio"], 1),
        "details_guidance": g,
        "details_cache": c,
        "details_pipeline": p,
        "details_inference": i,
        "machine": machine,
        "load_average": load,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__},
    }
    write_results(results)
    cmd = f".venv/bin/python scripts/bench_pipeline.py --repeats {args.repeats} --cases {args.cases} --iterations {args.iterations}"
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in io["stages_s"].items())
    md = [
        "# Pipeline benchmarks (ours vs MONAI's DeepEdit path)",
        "",
        f"Machine: {machine}; torch {torch.__version__}, MONAI {monai.__version__}, numpy {np.__version__}.",
        f"Load average during the run: {load} — the machine was shared with other work, so absolute times are noisy; "
        "each ratio compares two paths timed alternately (run by run, order swapped every run) in the same process on the same input.",
        f"Command: `{cmd}`",
        "",
        "| benchmark | reference (MONAI / bundle) | ours | ratio | goal |",
        "|---|---|---|---|---|",
        f"| guidance encoding at 128³, {g['clicks']} clicks (max abs diff {g['max_abs_diff']:.1e}); medians of {args.repeats} | "
        f"{g['reference_s'] * 1e3:.1f} ms | {g['ours_s'] * 1e3:.2f} ms | {g['speedup']:.0f}× faster | ≥ 100× ({_miss(g['speedup'], 100)}) |",
        f"| dataset cache memory, {c['cases']} cases of {'×'.join(map(str, c['shapes'][0]))} | {c['reference_mb_per_case']:.0f} MB/case | "
        f"{c['ours_mb_per_case']:.1f} MB/case | {c['ratio']:.1f}× smaller | ≥ 10× ({_miss(c['ratio'], 10)}) |",
        f"| data + click pipeline per training iteration, network excluded, {p['cases']} cached cases, p(click) = {p['click_prob']}; "
        f"{pr['iterations']} seeded iterations per path ({pr['click_iterations']} / {po['click_iterations']} click iterations) | "
        f"{pr['expected_s']:.3f} s (click it. {pr['mean_click_s']:.3f} s, auto it. {pr['mean_auto_s']:.3f} s) | "
        f"{po['expected_s'] * 1e3:.1f} ms (click it. {po['mean_click_s'] * 1e3:.1f} ms, auto it. {po['mean_auto_s'] * 1e3:.1f} ms) | "
        f"{p['speedup']:.1f}× faster (from medians: {p['speedup_from_medians']:.1f}×) | ≥ 10× ({_miss(p['speedup'], 10)}) |",
        f"| inference overhead (end to end − network), {i['image']} int16 .nii.gz → mask .nii.gz, "
        f"{sum(len(v) for v in clicks.values())} clicks, 128³; medians of {args.repeats} | "
        f"{ir['overhead_s']:.2f} s (e2e {ir['end_to_end_s']:.2f} s) | {io['overhead_s']:.2f} s (e2e {io['end_to_end_s']:.2f} s) | "
        f"{i['ratio']:.1f}× smaller | ≥ 5× ({_miss(i['ratio'], 5)}) |",
        "",
        "How the last two are measured:",
        "",
        "- Both timed paths run the same `FakeNetwork` (a **fake** network returning a fixed prediction in "
        "milliseconds: the label shifted by 4 voxels in training, a CT threshold in inference); the seconds spent "
        "in its forward are subtracted, so only data, click and I/O work is compared.",
        "- Training reference: the bundle's `train#dataset` (CacheDataset of load → label normalisation "
        "(`RemapLabelsToSequentiald`, MONAI 1.6's name for `NormalizeLabelsInDatasetd`) → channel first → RAS → window at "
        "full resolution), then per iteration the random flips/rot90/intensity shift at full resolution, `Resized` to 128³, "
        "`FindAllValidSlicesMissingLabelsd`, `AddInitialSeedPointMissingLabelsd`, `AddGuidanceSignalDeepEditd`, and "
        "`Interaction`'s logic without ignite: with p = 0.4 a no-grad forward, decollate, the bundle's `click_transforms` "
        "(softmax, argmax, `FindDiscrepancyRegionsDeepEditd`, `AddRandomGuidanceDeepEditd`, `AddGuidanceSignalDeepEditd`), "
        "collate; otherwise the guidance channels are zeroed. Ours: `build_datasets` (cache at 128³, bundle profile), "
        "augmentation, `simulate_clicks` and `network_input` as in `train_step`. Both through a batch-1 DataLoader. "
        "The per-iteration figure is 0.4 × mean(click iterations) + 0.6 × mean(automatic iterations) of each path, "
        "so it does not depend on how many click iterations each seeded run happened to draw.",
        "- Inference reference: `LoadImaged` → `EnsureChannelFirstd` → `Orientationd` (RAS) → `ScaleIntensityRanged` → "
        "`AddGuidanceFromPointsDeepEditd` → `Resized` (area) → `ResizeGuidanceMultipleLabelDeepEditd` → "
        "`AddGuidanceSignalDeepEditd`, forward, softmax, `Invertd`, argmax, `SaveImaged` (float32 `_trans.nii.gz`). "
        "Ours: `Predictor.predict_file` (writes uint8). Our stage medians: " + stages + ".",
        "- The bundle reads with ITKReader; itk is not installed here, so both paths read with nibabel. Its seed "
        f"transforms need `skimage.measure.label`; here: {p['reference_connected_components']}.",
        "- Where the bundle's inference time goes (profiled separately): `AsDiscreted(argmax=True)` over the 2 channels at "
        "full resolution dominates — PyTorch's CPU `argmax` over a 2-long channel dimension is ~1000× slower than "
        "comparing the two channels — then the full-volume Gaussian guidance convolution, `Invertd`, and `SaveImaged` "
        "writing float32.",
        "",
    ]
    if p["speedup"] < 10 or po["mean_click_s"] > 3 * po["mean_auto_s"]:
        head = (
            f"Pipeline goal missed by {10 / p['speedup']:.1f}×." if p["speedup"] < 10 else "Pipeline: our slowest step."
        )
        md += [
            f"**{head}** Our click iterations cost "
            f"{po['mean_click_s'] * 1e3:.0f} ms against {po['mean_auto_s'] * 1e3:.0f} ms for automatic ones; the "
            "difference is dominated by `trainer/engine.py: predict_mask`, whose `logits.argmax(dim=1)` on a "
            "(1, 2, 128, 128, 128) tensor takes ~0.2–0.5 s on 2 CPU threads, while `logits[:, 1] > logits[:, 0]` "
            "gives the same mask (ties → background, as argmax) in < 1 ms. The automatic iteration's own cost is mostly MONAI's "
            "`CacheDataset` deep copy of each cached item and the batch collation.",
            "",
        ]
    if i["ratio"] < 5:
        md += [
            f"**Inference goal missed by {5 / i['ratio']:.1f}×.** Our stage medians: {stages}. Causes, all in "
            "`trainer/` (predictor, data, transforms): the .nii.gz is decompressed twice (`data.check_volume` reads the "
            "whole array to check it, then `predictor.load_volume` reads it again as float32); the windowing runs at full "
            "resolution through MONAI's `ScaleIntensityRanged` (several passes over 26 M voxels) after a float32 copy; "
            "`Orientationd` copies the full volume; `Resized(area)` is a generic `adaptive_avg_pool3d` over the full "
            "volume. Decompressing once, windowing in place on the int16→float32 conversion, resizing separably "
            "(exact 4×4 in-plane means, then the z axis) and reorienting at 128³ (flips and axis permutations commute "
            "with area pooling) removes most of it.",
            "",
        ]
    (ROOT / "benchmarks" / "pipeline.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
