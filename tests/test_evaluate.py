"""Evaluation: Dice versus simulated clicks, the report files and the `evaluate` command (issue 3)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import EvaluateConfig
from trainer.data import DataError, list_dataset
from trainer.evaluate import evaluate, evaluate_checkpoint, next_click, select_cases
from trainer.predictor import Prediction, load_volume

MAX_CLICKS = 2


# ----------------------------------------------------------------------------- fixtures and fakes


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's tiny convolutions on one thread, then restore the setting.

    Measured on the shared 2-core CI box: a tiny-profile forward takes ~0.12 s on 1 thread but ~1.6 s
    on 2 threads when another process holds a core (OpenMP threads wait on each other).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """6 labelled + 1 test phantom (with labelsTs/) on a small fixed grid."""
    from trainer.synth import write_dataset

    root = tmp_path_factory.mktemp("eval_ds")
    write_dataset(root, 6, seed=21, shape=(64, 64, 32))
    return root


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    """A tiny model trained for 2 epochs: the run directory (checkpoints/, metrics.jsonl).

    Validation only after epoch 2 (cheaper; epoch 1's val_dice is null, which the plot must handle).
    """
    from trainer.config import TrainConfig
    from trainer.runtime import LocalRuntime
    from trainer.train import train

    run = tmp_path_factory.mktemp("eval_run")
    train(TrainConfig(profile="tiny", epochs=2, val_every=2, cache_workers=1), str(phantoms), LocalRuntime(run))
    return run


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class FakePerfectPredictor:
    """A fake predictor (test double) that returns the ground-truth mask, ignoring clicks."""

    def __init__(self, cases):
        self.labels = {}
        for pair in cases:
            image, _ = load_volume(pair["image"])
            self.labels[_key(image)] = (load_volume(pair["label"])[0] > 0.5).astype(np.uint8)
        self.calls = 0

    def preprocess(self, image, affine):
        return (_key(image), affine)

    def predict_prepared(self, prepared, clicks=None):
        self.calls += 1
        key, affine = prepared
        return Prediction(mask=self.labels[key].copy(), affine=affine)


class FakeHoleUntilClickedPredictor(FakePerfectPredictor):
    """A fake that misses one half of the spleen until a spleen click lands in that half."""

    def predict_prepared(self, prepared, clicks=None):
        self.calls += 1
        key, affine = prepared
        label = self.labels[key]
        rows = np.flatnonzero(label.any(axis=(1, 2)))
        cut = int(rows[len(rows) // 2])  # spleen voxels with i >= cut form the "hole"
        if any(p[0] >= cut for p in (clicks or {}).get("spleen", [])):
            return Prediction(mask=label.copy(), affine=affine)
        mask = label.copy()
        mask[cut:] = 0
        return Prediction(mask=mask, affine=affine)


# ----------------------------------------------------------------------------- click simulation


def test_next_click_targets_the_larger_error_region():
    label = np.zeros((20, 20, 20), bool)
    label[5:15, 5:15, 5:15] = True
    rng = np.random.default_rng(0)
    assert next_click(label, label, rng) is None

    missed = label.copy()
    missed[5:15, 5:15, 10:15] = False  # 500 voxels missed, none extra
    name, point = next_click(missed, label, rng)
    assert name == "spleen" and label[point] and not missed[point]
    assert all(isinstance(v, int) for v in point)

    extra = label.copy()
    extra[0:20, 0:20, 15:20] = True  # 2000 extra voxels, none missed
    name, point = next_click(extra, label, rng)
    assert name == "background" and extra[point] and not label[point]


def test_perfect_fake_predictor_scores_dice_one_at_every_click_count(phantoms):
    cases = list_dataset(phantoms).labelled[:2]
    fake = FakePerfectPredictor(cases)
    results = evaluate(fake, cases, max_clicks=3, seed=0)
    assert len(results) == 2
    for r in results:
        assert r.spleen_dice == [1.0] * 4
        assert r.dice_with_background == [1.0] * 4
        assert r.clicks == [None] * 4  # no error: no click is ever placed
        assert r.hd95_mm[0] == 0.0 and r.hd95_mm[-1] == 0.0
    assert fake.calls == 2  # one automatic forward per case, none for clicks


def test_a_corrective_click_lands_in_the_missed_region_and_fixes_it(phantoms):
    cases = list_dataset(phantoms).labelled[:1]
    fake = FakeHoleUntilClickedPredictor(cases)
    first = evaluate(fake, cases, max_clicks=3, seed=7)[0]
    again = evaluate(FakeHoleUntilClickedPredictor(cases), cases, max_clicks=3, seed=7)[0]
    assert first.clicks == again.clicks  # seeded per case: reproducible
    assert first.spleen_dice[0] < 0.9
    assert first.clicks[1][0] == "spleen"
    assert first.spleen_dice[1:] == [1.0, 1.0, 1.0]
    assert first.clicks[2:] == [None, None]


# ----------------------------------------------------------------------------- case selection


def test_test_split_needs_labels_ts(phantoms, tmp_path):
    cases = select_cases(phantoms, "test")
    assert cases and all(Path(c["label"]).parent.name == "labelsTs" for c in cases)
    copy = tmp_path / "no_labels"
    shutil.copytree(phantoms, copy, ignore=shutil.ignore_patterns("labelsTs"))
    with pytest.raises(DataError, match="labelsTs"):
        select_cases(copy, "test")
    with pytest.raises(ValueError, match="split"):
        select_cases(phantoms, "train")


# ----------------------------------------------------------------------------- report and CLI


def test_evaluate_checkpoint_writes_the_report(phantoms, trained, tmp_path):
    out = tmp_path / "report"
    summary = evaluate_checkpoint(
        EvaluateConfig(
            checkpoint=trained / "checkpoints" / "best.pt", data_dir=phantoms, output_dir=out, max_clicks=MAX_CLICKS
        )
    )

    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert saved["split"] == "val" and saved["max_clicks"] == MAX_CLICKS and saved["cases"] == 2
    for key in ("dice_by_clicks", "dice_by_clicks_std", "dice_with_background_by_clicks"):
        assert len(saved[key]) == MAX_CLICKS + 1
        assert all(0.0 <= v <= 1.0 for v in saved[key])
    assert 0.0 <= saved["dice_auto"] <= 1.0 and saved["dice_auto"] == saved["dice_by_clicks"][0]
    for key in ("hd95_mm_auto", "hd95_mm_final"):
        assert saved[key] is None or saved[key] >= 0.0

    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (MAX_CLICKS + 1)
    assert {"case", "clicks", "spleen_dice", "dice_with_background", "hd95_mm"} <= set(rows[0])
    assert all(0.0 <= float(r["spleen_dice"]) <= 1.0 for r in rows)
    assert [int(r["clicks"]) for r in rows[: MAX_CLICKS + 1]] == list(range(MAX_CLICKS + 1))

    for name in ("dice_vs_clicks.png", "training_curves.png"):  # metrics.jsonl found next to checkpoints/
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 100_000


def test_cli_evaluate_exits_0(phantoms, trained, tmp_path):
    out = tmp_path / "cli_report"
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoints" / "last.pt"),
        "--data",
        str(phantoms),
        "--output",
        str(out),
        "--max-clicks",
        "1",
        "--split",
        "test",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spleen Dice" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and len(summary["dice_by_clicks"]) == 2
    assert all(math.isfinite(v) for v in summary["dice_by_clicks"])


def test_cli_bad_checkpoint_exits_2_naming_the_path(phantoms, tmp_path, capsys):
    from trainer.cli import main

    missing = tmp_path / "nowhere" / "model.pt"
    code = main(["evaluate", "--checkpoint", str(missing), "--data", str(phantoms), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("error:")
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_evaluate_dicom_series_images_score_like_their_nifti(phantoms, tmp_path):
    """`--dicom`: each image read from its DICOM series (k possibly reversed), the NIfTI label brought
    onto it: the automatic Dice equals the NIfTI path's; a missing series is a DataError naming it."""
    pytest.importorskip("pydicom")
    import shutil

    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import get_profile
    from trainer.data import DataError
    from trainer.dicom import write_dicom_dataset
    from trainer.network import build_network

    data = tmp_path / "ds"
    shutil.copytree(phantoms, data)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", epoch=0), ckpt)
    with pytest.raises(DataError, match="dicom/imagesTr"):
        evaluate_checkpoint(
            EvaluateConfig(checkpoint=ckpt, data_dir=data, output_dir=tmp_path / "none", max_clicks=0, dicom=True)
        )
    write_dicom_dataset(data)
    nifti = evaluate_checkpoint(
        EvaluateConfig(checkpoint=ckpt, data_dir=data, output_dir=tmp_path / "nifti", max_clicks=1)
    )
    dicom = evaluate_checkpoint(
        EvaluateConfig(checkpoint=ckpt, data_dir=data, output_dir=tmp_path / "dicom", max_clicks=1, dicom=True)
    )
    assert dicom["cases"] == nifti["cases"] == 2
    assert dicom["dice_auto"] == pytest.approx(nifti["dice_auto"], abs=1e-4)
    # The label lands on the same voxels of the series' array (some phantoms read back with k reversed).
    from trainer.evaluate import _load_case, with_dicom_images

    for pair in select_cases(data, "all"):
        image, _, label = _load_case(pair)
        image2, _, label2 = _load_case(with_dicom_images([pair])[0])
        assert label2.sum() == label.sum() > 0
        np.testing.assert_array_equal(np.sort(image2[label2]), np.sort(image[label]))


def test_the_val_split_is_the_one_the_checkpoint_was_trained_with(phantoms, tmp_path):
    """`train --val-fraction 0.5` then `evaluate --split val` scores the same 3 of 6 cases, not 0.2's 2."""
    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import TrainConfig, get_profile
    from trainer.network import build_network

    torch.manual_seed(0)
    cfg = TrainConfig(profile="tiny", val_fraction=0.5)
    path = tmp_path / "c.pt"
    save_checkpoint(
        Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", config=cfg.to_dict()), path
    )
    summary = evaluate_checkpoint(
        EvaluateConfig(checkpoint=f"file://{path}", data_dir=phantoms, output_dir=tmp_path / "r", max_clicks=0)
    )
    assert summary["case_names"] == [
        Path(c["image"]).name.removesuffix(".nii.gz") for c in select_cases(phantoms, "val", 0.5)
    ]
    assert summary["cases"] == 3
    assert (
        evaluate_checkpoint(
            EvaluateConfig(
                checkpoint=path, data_dir=phantoms, output_dir=tmp_path / "r2", max_clicks=0, val_fraction=0.2
            )
        )["cases"]
        == 2
    )
