"""A background click inside a false-positive blob removes most of it (issue 3), on our recipe's model.

The cpu profile is trained by the demo's recipe for a fixed 8 epochs (3 minutes here, 4 on CI) and
used through the `Predictor`, as `infer` and the server use it, on held-out phantoms at their
original resolution. A step count, not a time budget: a slower machine trains the same model (a
240 s budget gave CI's slower cores a model that took one of the test's blobs for spleen, too few).
A false-positive blob is made the way a real one arises: a ball with the spleen's own CT values
near the spleen (an accessory-spleen-like nodule, labelled background). Where the automatic mask
takes it for spleen, one background click at its centre must remove most of it and leave the
spleen alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from trainer.predictor import Predictor, load_volume

pytestmark = pytest.mark.slow

EPOCHS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(predictor, held-out cases): the cpu profile trained for EPOCHS on 24 phantoms, without
    refinement windows: these tests are about the whole-scan network and click locality (refinement's
    own behaviour is tests/test_refine.py's)."""
    from trainer.config import TrainConfig
    from trainer.runtime import LocalRuntime
    from trainer.synth import write_dataset
    from trainer.train import train

    data = tmp_path_factory.mktemp("blob_ds")
    write_dataset(data, 30, seed=0, test_cases=12)
    out = tmp_path_factory.mktemp("blob_run")
    train(TrainConfig(profile="cpu", epochs=EPOCHS, window_prob=0.0), str(data), LocalRuntime(out))
    predictor = Predictor.from_checkpoint(out / "checkpoints" / "last.pt", device=torch.device("cpu"))
    cases = []
    for path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image, affine = load_volume(path)
        label = load_volume(data / "labelsTs" / path.name)[0] > 0.5
        cases.append((path.name, image, affine, label))
    return predictor, cases


# Blob candidates per case (`trainer.synth.blobs`), tried in order until 2 of them are taken for spleen.
# Few are (the better the model, the fewer), so the test looks through up to 12 candidates on each of
# 12 phantoms rather than betting on two fixed blobs. Measured on this machine: 11 blobs taken, on 6 of
# the 12 phantoms; one click left 21 % of their voxels.


def test_a_background_click_inside_a_false_positive_blob_removes_most_of_it(trained):
    from trainer.evaluate import blob_clicks

    predictor, cases = trained
    clicks = blob_clicks(predictor, cases, taken_per_case=2)
    print("\n".join(f"{c.case}: {c.before} -> {c.after} voxels" for c in clicks))
    assert len(clicks) >= 4, f"only {len(clicks)} blob(s) were taken for spleen; nothing to test"
    for c in clicks:
        assert c.after < c.before, c
        # The click removes the blob, not the spleen.
        assert c.spleen_after >= c.spleen_before - 0.02, c
    assert sum(c.after for c in clicks) <= 0.5 * sum(c.before for c in clicks), clicks


def test_a_background_click_does_not_add_spleen(trained):
    """The background channel is not a "spleen is near" cue (MONAI Label #1406, where background
    clicks added spleen): the network alone (click locality off, as the bundle profile runs), given
    one background click just outside the spleen or 60-150 mm from it, adds no spleen-sized blob.
    What it adds is the jitter of a changed input along the boundary: measured 3.4 % of a spleen per
    click on average (24 clicks, 12 held-out phantoms, the 8-epoch model). With click locality (the `cpu` profile) a
    background click can only remove spleen."""
    predictor, cases = trained
    raw = Predictor(predictor.model, predictor.profile, device=torch.device("cpu"), click_radius=0)
    added, spleens = [], []
    for i, (_name, image, affine, label) in enumerate(cases):
        rng = np.random.default_rng(100 + i)
        auto = raw.predict(image, affine).mask.astype(bool)
        spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        distance = ndimage.distance_transform_edt(~label, sampling=spacing)
        body = image > -300
        for lo, hi in ((5.0, 15.0), (60.0, 150.0)):  # just outside the spleen; liver/stomach/body-wall distances
            candidates = np.argwhere((distance > lo) & (distance < hi) & body)
            if not len(candidates):
                continue
            click = [int(v) for v in candidates[rng.integers(len(candidates))]]
            clicked = raw.predict(image, affine, {"background": [click]}).mask.astype(bool)
            added.append(int((clicked & ~auto).sum()))
        spleens.append(int(label.sum()))
    share = float(np.mean(added)) / float(np.mean(spleens))
    print(f"spleen voxels added by {len(added)} background clicks: {added}; {share:.1%} of a mean spleen per click")
    assert len(added) >= 8
    assert share <= 0.10, (added, spleens)
    # Never a spleen-sized blob. Half the median spleen, not the smallest: the phantoms now include
    # 25-50 ml spleens (docs/phantoms.md), smaller than what the jitter of a large boundary adds
    # (measured: at most 1 606 voxels, against spleens of 1 973-35 615 voxels, median 8 324).
    assert max(added) <= 0.5 * float(np.median(spleens)), (added, spleens)
