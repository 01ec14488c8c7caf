"""DICOM series in, DICOM SEG out (trainer/dicom/).

Oracles we did not write: nibabel (the NIfTI the series was made from), MONAI's `PydicomReader` (reads
the same files with its own sorting and affine code), highdicom (reads the SEG back) and dicom3tools'
`dciodvfy` (validates the CT slices and the SEG against the standard's IODs).
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from trainer import dicom  # noqa: E402
from trainer.dicom import DicomError, SegInfo, SeriesLimits, read_files, read_series, read_series_bytes, write_ct_series  # noqa: E402
from trainer.synth import generate_case  # noqa: E402

SHAPE = (40, 36, 14)


def _canonical(array, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, np.float64)))
    return np.asarray(img.dataobj), img.affine


def _case(orientation: str, seed: int = 0):
    return generate_case(np.random.default_rng(seed), shape=SHAPE, orientation=orientation)


def _series(tmp_path: Path, orientation: str = "LPS", seed: int = 0, **kw):
    case = _case(orientation, seed)
    out = tmp_path / f"series_{orientation}_{seed}"
    write_ct_series(out, case.image, case.affine, seed=seed, **kw)
    return case, out


def _decoder_available(uid: str) -> bool:
    from pydicom.pixels import get_decoder, get_encoder

    try:
        return get_decoder(uid).is_available and get_encoder(uid).is_available
    except NotImplementedError:
        return False


@pytest.mark.parametrize(
    "orientation,syntax",
    [
        ("RAS", None),
        ("LPS", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 Lossless
        ("LAS", "1.2.840.10008.1.2.5"),  # RLE Lossless; LAS: the slice normal points inferior, so k reverses
        ("LPS", "1.2.840.10008.1.2.4.80"),  # JPEG-LS Lossless
    ],
)
def test_series_geometry_matches_nifti_and_monai(tmp_path, orientation, syntax):
    if syntax is not None and not _decoder_available(syntax):
        pytest.skip(f"no encoder/decoder for {syntax} installed")
    case, folder = _series(tmp_path, orientation, transfer_syntax=syntax)
    nifti = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(case.image, case.affine), nifti)
    ref = nib.load(nifti)
    vol = read_series(folder)
    assert vol.image.dtype == np.float32 and vol.image.shape == SHAPE
    assert vol.meta.transfer_syntax == (syntax or "1.2.840.10008.1.2.1")

    # The same voxels at the same RAS positions as the NIfTI it came from (canonical order removes the
    # freedom of the slice order) ...
    ours, ours_aff = _canonical(vol.image, vol.affine)
    theirs, theirs_aff = _canonical(np.asanyarray(ref.dataobj), ref.affine)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours_aff, theirs_aff, atol=1e-4)

    # ... and as MONAI's reader of the same files.
    from monai.data import PydicomReader

    reader = PydicomReader()
    arr, meta = reader.get_data(reader.read(str(folder)))
    monai_arr, monai_aff = _canonical(arr, meta["affine"])
    np.testing.assert_array_equal(ours, monai_arr)
    np.testing.assert_allclose(ours_aff, monai_aff, atol=1e-4)

    # Sorted along the normal: row cosine x column cosine points along +k of the affine.
    lps = dicom.LPS_TO_RAS @ vol.affine
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    assert normal @ lps[:3, 2] > 0
    if orientation == "LAS":  # stored superior-to-inferior relative to that normal: k is reversed
        np.testing.assert_array_equal(vol.image, case.image[:, :, ::-1].astype(np.float32))
    else:
        np.testing.assert_array_equal(vol.image, case.image.astype(np.float32))
        np.testing.assert_allclose(vol.affine, case.affine, atol=1e-4)


def test_zip_and_file_list_read_like_the_folder(tmp_path):
    case, folder = _series(tmp_path, "RAS")
    ref = read_series(folder)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"study/series/{f.name}")
        zf.writestr("__MACOSX/._IM00000.dcm", b"junk")  # ignored, as are hidden files and DICOMDIR
    for vol in (
        read_series(archive),
        read_series_bytes(archive.read_bytes()),
        read_files([(f.name, f.read_bytes()) for f in folder.iterdir()]),
    ):
        np.testing.assert_array_equal(vol.image, ref.image)
        np.testing.assert_allclose(vol.affine, ref.affine)
        assert pickle.loads(pickle.dumps(vol.meta)).n_slices == SHAPE[2]  # no open stream kept: Ray can pass it on


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def _files(folder: Path) -> list[Path]:
    return sorted(
        folder.glob("IM*.dcm"),
        key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True, force=True).InstanceNumber),
    )


def _err(source, limits=None) -> DicomError:
    with pytest.raises(DicomError) as info:
        read_series(source, limits)
    return info.value


def test_bad_series_each_get_their_error(tmp_path):
    _, good = _series(tmp_path, "LPS")

    def variant(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(good, out)
        return out

    d = variant("several")
    _, other = _series(tmp_path, "LPS", seed=1)
    shutil.copy(next(other.iterdir()), d / "other.dcm")
    e = _err(d)
    assert e.code == "several_series" and "2 series" in str(e) and "one series" in str(e)

    d = variant("missing")
    _files(d)[5].unlink()
    e = _err(d)
    assert e.code == "missing_slices" and "1 slice(s) missing" in str(e)

    d = variant("duplicate")
    src = _files(d)[3]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(d / "dup.dcm", enforce_file_format=True)
    e = _err(d)
    assert e.code == "duplicate_slices" and "same position" in str(e)

    d = variant("uneven")
    for f in _files(d)[7:]:
        ds = pydicom.dcmread(f)
        z = [float(v) for v in ds.ImagePositionPatient]
        normal = np.cross(
            np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        )
        _rewrite(f, ImagePositionPatient=[f"{v:.6f}" for v in np.asarray(z) + 0.4 * float(ds.SliceThickness) * normal])
    e = _err(d)
    assert e.code == "uneven_spacing" and "tolerance" in str(e)

    d = variant("sheared")  # positions drift sideways: what a gantry tilt does to the stack
    for k, f in enumerate(_files(d)):
        ds = pydicom.dcmread(f)
        # About 6 degrees: each slice shifted a tenth of the slice gap along the column direction.
        shift = np.asarray(ds.ImageOrientationPatient[3:], float) * 0.1 * float(ds.SliceThickness) * k
        _rewrite(
            f,
            ImagePositionPatient=[f"{v:.6f}" for v in np.asarray([float(v) for v in ds.ImagePositionPatient]) + shift],
        )
    assert _err(d).code == "gantry_tilt"

    d = variant("rounded")  # positions written to 0.1 mm, as some scanners do: still one regular series
    for f in _files(d):
        _rewrite(f, ImagePositionPatient=[f"{float(v):.1f}" for v in pydicom.dcmread(f).ImagePositionPatient])
    assert read_series(d).image.shape == SHAPE

    d = variant("tilt_tag")
    _rewrite(_files(d)[0], GantryDetectorTilt="12")
    e = _err(d)
    assert e.code == "gantry_tilt" and "12" in str(e)

    d = variant("mr")
    _rewrite(_files(d)[2], Modality="MR")
    e = _err(d)
    assert e.code == "unsupported_modality" and "'MR'" in str(e)

    d = variant("multiframe")
    _rewrite(_files(d)[0], NumberOfFrames=3)
    assert _err(d).code == "multi_frame"

    d = variant("syntax")  # MPEG-2: encapsulated video, no decoder in pydicom
    ds = pydicom.dcmread(_files(d)[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(_files(d)[0], enforce_file_format=True)
    e = _err(d)
    assert e.code == "unsupported_transfer_syntax" and "MPEG2" in str(e) and "uncompressed" in str(e)

    d = variant("raw")  # no preamble, no file meta (a raw PACS export): still read
    for f in _files(d):
        ds = pydicom.dcmread(f)
        buf = pydicom.filebase.DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(buf, ds)
        f.write_bytes(buf.getvalue())
    assert pydicom.dcmread(_files(d)[0], force=True).file_meta.get("TransferSyntaxUID") is None
    np.testing.assert_array_equal(read_series(d).image, read_series(good).image)

    d = variant("text")
    (d / "notes.txt").write_text("not an image")
    e = _err(d)
    assert e.code == "not_dicom" and "notes.txt" in str(e)

    d = variant("truncated")  # header fine, pixel data cut short
    f = _files(d)[4]
    f.write_bytes(f.read_bytes()[:-500])
    e = _err(d)
    assert e.code in ("undecodable", "bad_dicom") and f.name in str(e)

    assert _err(good, SeriesLimits(max_files=5)).code == "too_many_files"
    assert _err(good, SeriesLimits(max_bytes=10_000)).code == "too_large"
    e = _err(good, SeriesLimits(max_voxels=1000))
    assert e.code == "volume_too_large" and e.status == 413
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _err(empty).code == "empty_upload"
    e = _err(_files(good)[0])  # one slice given where a series is expected
    assert e.code == "too_few_slices" and "whole series" in str(e)
    with pytest.raises(DicomError) as info:
        read_series_bytes(b"PK\x03\x04 not really a zip")
    assert info.value.code == "bad_zip"


def test_seg_reads_back_references_source_and_passes_dciodvfy(tmp_path):
    case, folder = _series(tmp_path, "LAS")
    private = {
        "PatientAge": "042Y",
        "PatientWeight": "70",
        "PatientComments": "private note",
        "OtherPatientNames": "Alias^Name",
        "StudyDescription": "ABDOMEN CT",
        "InstitutionName": "General Hospital",
        "OperatorsName": "Op^Erator",
        "StationName": "CT01",
        "PatientBirthDate": "19800101",
    }
    for f in folder.iterdir():
        _rewrite(f, **private)
    vol = read_series(folder)
    # The phantom's label, in the read-back grid: same canonical voxels (k reversed for LAS).
    mask = case.label[:, :, ::-1]
    out = tmp_path / "seg.dcm"
    dicom.write_seg(out, mask, vol.meta, SegInfo(model_version="last.pt@epoch3#abc123"))
    seg = hd.seg.segread(out)
    src = vol.meta.datasets
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.PatientID == src[0].PatientID
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src[0].SeriesInstanceUID
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "Spleen"
    prop = desc.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("78961009", "SCT")
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "spleen-deepedit" and algo.AlgorithmVersion == "last.pt@epoch3#abc123"
    referenced = {
        item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in src}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    # The mask read back frame by frame, in source-slice order.
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in src], segment_numbers=[1]
    )[..., 0]
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), mask)
    assert int(mask.sum()) > 0
    # Only what the standard has the SEG share with its source: Patient and General Study modules'
    # Type 1/2 attributes; nothing optional (age, weight, comments, study description, institution, ...).
    assert (
        seg.PatientName == src[0].PatientName
        and seg.PatientBirthDate == "19800101"
        and seg.StudyDate == src[0].StudyDate
    )
    leaked = [k for k, v in private.items() if k != "PatientBirthDate" and k in seg]
    assert not leaked, leaked
    values = {str(el.value) for el in seg.iterall() if el.VR in ("LO", "PN", "LT", "SH", "ST", "AS", "DS", "UT")}
    common = {v for k, v in private.items() if k != "PatientBirthDate"} & values
    assert not common, common

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: scripts/test.sh installs it")
    for path in (out, _files(folder)[0]):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy {path.name}:\n{report}"


def test_infer_cli_dicom_in_seg_out_matches_nifti_path(tmp_path, capsys):
    import torch

    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.cli import main
    from trainer.config import get_profile
    from trainer.network import build_network

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", epoch=0), ckpt)
    case, folder = _series(tmp_path, "LAS", seed=4)
    nifti = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(case.image, case.affine), nifti)
    base = ["infer", "--checkpoint", str(ckpt), "--device", "cpu"]
    assert main(base + ["--image", str(nifti), "--output", str(tmp_path / "a.nii.gz")]) == 0
    assert main(base + ["--image", str(folder), "--output", str(tmp_path / "b.nii.gz")]) == 0
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    ma, aa = _canonical(a.dataobj, a.affine)
    mb, ab = _canonical(b.dataobj, b.affine)
    np.testing.assert_allclose(aa, ab, atol=1e-4)
    np.testing.assert_array_equal(ma, mb)  # the same mask, voxel for voxel, from DICOM and from NIfTI
    assert 0 < int(ma.sum()) < ma.size, "a trivial mask would not test the geometry"
    assert main(base + ["--image", str(folder), "--output", str(tmp_path / "c.dcm")]) == 0
    seg = hd.seg.segread(tmp_path / "c.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    capsys.readouterr()

    # User errors: one line, exit 2.
    assert main(base + ["--image", str(nifti), "--output", str(tmp_path / "d.dcm")]) == 2
    assert "--format dcm" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "x.txt").write_text("hello")
    assert main(base + ["--image", str(bad), "--output", str(tmp_path / "e.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.txt is not a DICOM file" in err
    assert not (tmp_path / "e.nii.gz").exists()


def test_import_trainer_without_pydicom(tmp_path):
    """`import trainer` (and the CLI's parser) must not need the optional DICOM libraries."""
    code = (
        "import sys\n"
        "for m in ('pydicom', 'highdicom'): sys.modules[m] = None\n"
        "import trainer, trainer.cli, trainer.dicom\n"
        "trainer.cli.build_parser()\n"
        "try:\n"
        f"    trainer.dicom.read_series({str(tmp_path)!r})\n"
        "except trainer.dicom.DicomError as e:\n"
        "    print(e.code)\n"
    )
    (tmp_path / "a.dcm").write_bytes(b"x")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "dicom_unavailable"


def test_synth_writes_dicom_series_of_its_phantoms(tmp_path, capsys):
    """`synth --dicom rle`: every phantom also as a compressed DICOM series, read back to the same volume."""
    from trainer.cli import main

    if not _decoder_available("1.2.840.10008.1.2.5"):
        pytest.skip("no RLE encoder")
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path),
                "--cases",
                "2",
                "--test-cases",
                "1",
                "--shape",
                "40",
                "36",
                "12",
                "--dicom",
                "rle",
            ]
        )
        == 0
    )
    assert "3 DICOM series (rle)" in capsys.readouterr().out
    for nifti in sorted(tmp_path.glob("images*/*.nii.gz")):
        vol = read_series(tmp_path / "dicom" / nifti.parent.name / nifti.name[: -len(".nii.gz")])
        assert vol.meta.transfer_syntax == "1.2.840.10008.1.2.5"
        ref = nib.load(nifti)
        ours, ours_aff = _canonical(vol.image, vol.affine)
        theirs, theirs_aff = _canonical(np.asanyarray(ref.dataobj), ref.affine)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(ours_aff, theirs_aff, atol=1e-4)
