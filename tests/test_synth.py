"""Synthetic phantoms: layout, determinism, anatomy facts, contrast phases, geometries."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from trainer.synth import GEOMETRIES, ORIENTATIONS, generate_case, write_dataset
from trainer.synth.geometry import sample_geometry


def _ras(case):
    """(image, label bool, spacing) of a case in RAS order."""
    img = nib.as_closest_canonical(nib.Nifti1Image(case.image, case.affine))
    lab = nib.as_closest_canonical(nib.Nifti1Image(case.label, case.affine))
    return np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj).astype(bool), img.header.get_zooms()


def test_dataset_layout_and_types(tmp_path):
    meta = write_dataset(tmp_path, 4, seed=1, test_cases=2)
    assert (tmp_path / "dataset.json").is_file()
    on_disk = json.loads((tmp_path / "dataset.json").read_text())
    assert on_disk["numTraining"] == 4 and on_disk["numTest"] == 2
    assert on_disk["labels"] == {"0": "background", "1": "spleen"}
    assert on_disk["synthetic"]["geometry"] == "compact"
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
        img, lab, zooms = _ras(case)
        assert case.spleen_ml == pytest.approx(lab.sum() * float(np.prod(zooms)) / 1000.0)
        if lab.any():
            spleen_hu.append(float(np.median(img[lab])))
            # Spleen on the patient's left (RAS: x < body centre), mostly posterior.
            com = np.argwhere(lab).mean(axis=0)
            assert com[0] < lab.shape[0] / 2
            assert com[1] < lab.shape[1] * 0.6
            partial += bool(lab[:, :, 0].any() or lab[:, :, -1].any())
            # Label only where spleen: no air or fat under it, but for the blurred edge (next to lung
            # or gas, partial volume brings up to ~5 % of edge voxels below -150 HU).
            core = ndimage.binary_erosion(lab)
            if core.sum() >= 100:
                assert np.mean(img[core] < -150) < 0.002
    assert orientations == set(ORIENTATIONS)
    present = [v for v in volumes if v > 0]
    assert min(present) < 100 and max(present) > 400
    assert all(20 < hu < 200 for hu in spleen_hu), spleen_hu  # non-contrast small spleens in ascites: ~28
    assert partial >= 1  # some spleens are cut by the field of view


def test_label_is_one_spleen_never_a_neighbour():
    """The label is one connected organ: touching stomach, kidney, colon or pancreas never join it."""
    for i in range(12):
        case = generate_case(np.random.default_rng([43, i]), shape=(96, 96, 48))
        _, lab, _ = _ras(case)
        if lab.sum() > 50:
            _, n = ndimage.label(lab)
            assert n == 1, f"case {i}: {n} label pieces"


def test_clinical_geometry_ranges():
    """In-plane 0.6-1.0 mm over a 300-500 mm field, 1.25-5 mm slices over 300-500 mm, spleen high."""
    for i in range(200):
        rng = np.random.default_rng([44, i])
        half_z = rng.uniform(30, 110)
        geo = sample_geometry(rng, "clinical", None, rng.uniform(135, 180), half_z)
        sx, sy, sz = geo.spacing
        nx, ny, nz = geo.shape
        assert 0.6 - 1e-9 <= sx == sy <= 1.0 + 1e-9 and 384 <= nx == ny <= 512
        assert 300 - 1e-6 <= sx * nx <= 500 + 1e-6
        assert 1.25 <= sz <= 5.0 and 300 - sz <= sz * nz <= 500 + sz
        top, bottom = geo.origin[2] + sz * nz, geo.origin[2]
        assert top - half_z >= 40  # lung bases above the spleen's top
        assert -bottom - half_z >= 120 - sz  # the scan goes on well below the spleen: it sits high


def test_spleen_volumes_reach_small_and_splenomegaly():
    """Over seeds: small spleens (< 60 ml) and splenomegaly (>= 1500 ml), whole in a clinical scan."""
    volumes = []
    for i in range(60):
        case = generate_case(np.random.default_rng([45, i]), shape=(48, 48, 64), geometry="clinical")
        _, lab, _ = _ras(case)
        assert not lab[:, :, -1].any() and not lab[:, :, 0].any()
        volumes.append(case.spleen_ml)
    assert min(volumes) < 60
    assert max(volumes) >= 1500


def _cases_by_phase(n: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for i in range(n):
        case = generate_case(np.random.default_rng([46, i]), shape=(96, 96, 48))
        out.setdefault(case.phase, []).append(case)
    return out


def test_contrast_phases():
    """Non-contrast spleens are 40-60 HU and darker than the liver; arterial ones are heterogeneous."""
    phases = _cases_by_phase(40)
    assert set(phases) == {"portal-venous", "non-contrast", "arterial"}
    spread = {}
    for phase, cases in phases.items():
        stds = []
        for case in cases:
            img, lab, _ = _ras(case)
            core = ndimage.binary_erosion(lab, iterations=3)
            if core.sum() < 100 or {"lesion", "streaks"} & set(case.features):
                continue
            if phase == "non-contrast":
                # 40-60 HU drawn; the median of a few hundred voxels of correlated noise moves by ~5.
                assert 33 <= np.median(img[core]) <= 67 and np.median(img[core]) < case.liver_hu
            # Texture at the scale of a centimetre, noise smoothed away (within 2 voxels, inside the
            # core eroded by 3, so no neighbour leaks in): the zebra, or nothing.
            smooth = ndimage.gaussian_filter(img.astype(np.float32), 1.0, truncate=2.0)
            stds.append(float(np.std(smooth[core])))
        spread[phase] = float(np.median(stds))
    assert spread["arterial"] > 1.5 * spread["portal-venous"], spread


def test_lung_air_above_the_spleen():
    """In a clinical scan, lung air lies inside the body within a few cm above the spleen's top."""
    for i in range(4):
        case = generate_case(np.random.default_rng([47, i]), shape=(96, 96, 96), geometry="clinical")
        img, lab, zooms = _ras(case)
        top = int(np.where(lab.any(axis=(0, 1)))[0].max())
        above = img[:, :, top + 1 : top + 1 + int(60 / zooms[2])]
        inside = ndimage.binary_fill_holes(img > -500, structure=np.ones((3, 3, 1)))[
            :, :, top + 1 : top + 1 + above.shape[2]
        ]
        assert ((above < -600) & inside).sum() * float(np.prod(zooms)) > 20_000, f"case {i}: no lung above the spleen"


def test_same_case_in_every_orientation():
    ras = generate_case(np.random.default_rng(48), shape=(48, 48, 24), orientation="RAS", geometry="clinical")
    for code in ORIENTATIONS:
        case = generate_case(np.random.default_rng(48), shape=(48, 48, 24), orientation=code, geometry="clinical")
        img, lab, _ = _ras(case)
        np.testing.assert_array_equal(img, ras.image)
        np.testing.assert_array_equal(lab, ras.label.astype(bool))
        assert case.spleen_ml == pytest.approx(ras.spleen_ml)


def test_bad_geometry_and_shape_are_named(tmp_path):
    with pytest.raises(ValueError, match="'huge'.*compact.*clinical"):
        generate_case(np.random.default_rng(0), geometry="huge")
    with pytest.raises(ValueError, match="'huge'"):
        write_dataset(tmp_path, 1, geometry="huge")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match=r"shape \(0, 4, 4\)"):
        generate_case(np.random.default_rng(0), shape=(0, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        write_dataset(tmp_path, 1, shape=(4, 4))
    assert not list(tmp_path.iterdir())


def test_cli_geometry_choices_match():
    from trainer.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["synth"]
    choices = next(a for a in sub._actions if a.dest == "geometry").choices
    assert tuple(choices) == GEOMETRIES


@pytest.mark.slow
def test_clinical_case_full_size(tmp_path):
    """One scanner-sized case: spacing and extent as drawn, spleen whole, file written and read back."""
    meta = write_dataset(tmp_path, 1, seed=49, test_cases=0, geometry="clinical")
    img = nib.load(str(tmp_path / meta["training"][0]["image"]))
    lab = np.asanyarray(nib.load(str(tmp_path / meta["training"][0]["label"])).dataobj)
    zooms = img.header.get_zooms()
    assert 0.6 <= zooms[0] <= 1.0 and 300 <= zooms[0] * img.shape[0] <= 500
    assert 300 <= zooms[2] * img.shape[2] <= 505 and lab.any()


def test_noise_is_correlated():
    """Grainy (low-pass filtered) noise, not white: neighbouring voxels of a flat spleen correlate."""
    correlations = []
    for i in range(16):
        case = generate_case(np.random.default_rng([50, i]), shape=(96, 96, 48))
        img, lab, _ = _ras(case)
        core = ndimage.binary_erosion(lab, iterations=2)
        if case.phase == "portal-venous" and core.sum() > 200 and not {"lesion", "streaks"} & set(case.features):
            pairs = core[:-1] & core[1:]
            a, b = img[:-1][pairs].astype(float), img[1:][pairs].astype(float)
            correlations.append(float(np.corrcoef(a, b)[0, 1]))
    assert len(correlations) >= 3 and np.median(correlations) > 0.25, correlations


def test_the_couch_is_under_the_patient():
    """Below the patient's back, where the field of view reaches that far (as in real scans, not
    always): the couch, a thin shell and then foam."""
    seen = 0
    for i in range(8):
        case = generate_case(np.random.default_rng([51, i]), shape=(256, 256, 4), geometry="clinical")
        img, _, zooms = _ras(case)
        column = img[img.shape[0] // 2, :, 2]  # the midline, from the back (y = 0) to the front
        y0 = int(np.argmax(column > -300))  # the first thing above air: the couch's lower shell, or skin
        foam = column[y0 + 1 : y0 + 1 + int(60 / zooms[1])] < -500
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, foam.astype(int), 0])))[::2]
        seen += bool(len(runs) and runs.max() * zooms[1] >= 5)
    assert seen >= 3, f"a couch under only {seen} of 8 patients"


def test_false_positive_blobs_sit_beside_the_spleen_with_its_values():
    """The blobs `trainer.evaluate.blob_clicks` clicks away: spleen-valued balls at the requested gap,
    never over the spleen, the rest of the image untouched."""
    from trainer.synth.blobs import false_positive_blobs

    case = generate_case(np.random.default_rng([7, 1]), orientation="RAS")
    label = case.label > 0
    spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    distance = ndimage.distance_transform_edt(~label, sampling=spacing)
    spleen_hu = float(np.median(case.image[label]))
    blobs = list(false_positive_blobs(case.image, case.affine, label, np.random.default_rng(0), draws=1))
    assert len(blobs) >= 4
    for with_blob, blob, centre in blobs:
        assert blob.any() and not (blob & label).any()
        assert blob[tuple(centre)]
        assert 0.0 < distance[blob].min() <= 5.0 + 2.0 * float(spacing.max())  # at most 5 mm gap, a voxel's slack
        assert abs(float(np.median(with_blob[blob])) - spleen_hu) < 10.0
        np.testing.assert_array_equal(with_blob[~blob], case.image[~blob])
