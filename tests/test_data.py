"""Decathlon listing, split and integrity checks: every bad input gets an error naming the file."""

import json

import nibabel as nib
import numpy as np
import pytest

from trainer.data import DataError, check_dataset, list_dataset


def _write(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _pair(root, name, image=None, label=None, affine_label=None):
    image = np.zeros((8, 8, 4), np.int16) if image is None else image
    label = np.zeros((8, 8, 4), np.uint8) if label is None else label
    _write(root / "imagesTr" / name, image)
    _write(root / "labelsTr" / name, label, affine_label)


def test_split_matches_the_bundle_on_41_cases(tmp_path):
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir()
    for i in range(41):
        for d in ("imagesTr", "labelsTr"):
            (tmp_path / d / f"spleen_{i:02d}.nii.gz").touch()
    (tmp_path / "imagesTr" / "._spleen_00.nii.gz").touch()  # macOS resource file: ignored
    ds = list_dataset(tmp_path)
    train, val = ds.split(0.2)
    assert len(train) == 32 and len(val) == 9
    assert [p["image"] for p in val] == sorted(p["image"] for p in val)
    assert val[0]["image"].endswith("spleen_32.nii.gz")


@pytest.mark.parametrize("n,expected_val", [(2, 1), (5, 1), (6, 2), (10, 2)])
def test_split_sizes(tmp_path, n, expected_val):
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir()
        for i in range(n):
            (tmp_path / d / f"c{i}.nii").touch()
    assert len(list_dataset(tmp_path).split(0.2)[1]) == expected_val


def test_dataset_json_is_used(tiny_dataset):
    ds = list_dataset(tiny_dataset)
    assert len(ds.labelled) == 10 and len(ds.test) == 2
    check_dataset(tiny_dataset)


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_dataset(tmp_path / "nope")
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="labelsTr"):
        list_dataset(tmp_path)


def test_unmatched_names(tmp_path):
    _pair(tmp_path, "a.nii.gz")
    _write(tmp_path / "imagesTr" / "b.nii.gz", np.zeros((8, 8, 4), np.int16))
    with pytest.raises(DataError, match="b.nii.gz.*no label"):
        list_dataset(tmp_path)


def test_dataset_json_naming_missing_file(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]})
    )
    with pytest.raises(DataError, match="x.nii.gz"):
        list_dataset(tmp_path)


@pytest.mark.parametrize(
    "case,kwargs,message",
    [
        ("shape", dict(label=np.zeros((8, 8, 5), np.uint8)), "shape"),
        ("affine", dict(affine_label=np.diag([2.0, 1, 1, 1])), "affine"),
        ("values", dict(label=np.full((8, 8, 4), 2, np.uint8)), "label values"),
        ("nan", dict(image=np.full((8, 8, 4), np.nan, np.float32)), "NaN"),
        ("4d", dict(image=np.zeros((8, 8, 4, 2), np.int16)), "3D"),
        ("2d", dict(image=np.zeros((8, 8), np.int16), label=np.zeros((8, 8), np.uint8)), "3D"),
    ],
)
def test_check_rejects_bad_pairs_naming_the_file(tmp_path, case, kwargs, message):
    _pair(tmp_path, "good.nii.gz")
    _pair(tmp_path, f"bad_{case}.nii.gz", **kwargs)
    with pytest.raises(DataError, match=message) as info:
        check_dataset(tmp_path)
    assert f"bad_{case}.nii.gz" in str(info.value)


def test_unreadable_file(tmp_path):
    _pair(tmp_path, "a.nii.gz")
    (tmp_path / "imagesTr" / "a.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="a.nii.gz.*cannot be read"):
        check_dataset(tmp_path)


def test_training_loader_rejects_bad_label_naming_the_file(tmp_path):
    from trainer.config import TrainConfig
    from trainer.train import build_datasets

    _pair(tmp_path, "a.nii.gz")
    _pair(tmp_path, "b.nii.gz", label=np.full((8, 8, 4), 3, np.uint8))
    with pytest.raises(DataError, match="b.nii.gz"):
        build_datasets(TrainConfig(profile="tiny", cache_workers=1), str(tmp_path), progress=False)
