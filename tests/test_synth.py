"""Synthetic phantoms: layout, determinism, anatomy facts."""

import json

import nibabel as nib
import numpy as np

from trainer.synth import ORIENTATIONS, generate_case, write_dataset


def test_dataset_layout_and_types(tmp_path):
    meta = write_dataset(tmp_path, 4, seed=1, test_cases=2)
    assert (tmp_path / "dataset.json").is_file()
    on_disk = json.loads((tmp_path / "dataset.json").read_text())
    assert on_disk["numTraining"] == 4 and on_disk["numTest"] == 2
    assert on_disk["labels"] == {"0": "background", "1": "spleen"}
    for entry in meta["training"]:
        img = nib.load(str(tmp_path / entry["image"]))
        lab = nib.load(str(tmp_path / entry["label"]))
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert set(np.unique(np.asanyarray(lab.dataobj))) <= {0, 1}
    assert len(list((tmp_path / "imagesTs").glob("*.nii.gz"))) == 2


def test_same_seed_same_files(tmp_path):
    write_dataset(tmp_path / "a", 2, seed=5)
    write_dataset(tmp_path / "b", 2, seed=5)
    write_dataset(tmp_path / "c", 2, seed=6)
    a = nib.load(str(tmp_path / "a/imagesTr/spleen_001.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b/imagesTr/spleen_001.nii.gz")).get_fdata()
    c = nib.load(str(tmp_path / "c/imagesTr/spleen_001.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_anatomy_is_plausible_and_varied():
    volumes, orientations, spleen_hu, partial = [], set(), [], 0
    for i in range(24):
        case = generate_case(np.random.default_rng([42, i]))
        orientations.add(case.orientation)
        volumes.append(case.spleen_ml)
        ras = nib.as_closest_canonical(nib.Nifti1Image(case.label, case.affine))
        lab = np.asanyarray(ras.dataobj).astype(bool)
        img = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(case.image, case.affine)).dataobj)
        if lab.any():
            spleen_hu.append(float(np.median(img[lab])))
            # Spleen on the patient's left (RAS: x < body centre) and posterior (y < centre).
            com = np.argwhere(lab).mean(axis=0)
            assert com[0] < lab.shape[0] / 2
            assert com[1] < lab.shape[1] / 2 + 2
            partial += bool(lab[:, :, 0].any() or lab[:, :, -1].any())
    assert orientations == set(ORIENTATIONS)
    present = [v for v in volumes if v > 0]
    assert min(present) < 150 and max(present) > 250
    assert max(present) < 700
    assert all(60 < hu < 200 for hu in spleen_hu)
    assert partial >= 1  # some spleens are cut by the field of view
