"""The command line: --help everywhere, one-line errors naming the bad value, exit status 2."""

import json
import subprocess
import sys

import pytest

from trainer.cli import main

COMMANDS = ["synth", "check-data", "train", "infer", "evaluate", "serve", "k8s"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: spleen-deepedit" in capsys.readouterr().out


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_synth_rejects_zero_cases(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["synth", "--out", str(tmp_path), "--cases", "0"])
    assert info.value.code == 2
    assert "'0' must be at least 1" in capsys.readouterr().err


def test_train_bad_inputs(capsys, tmp_path, tiny_dataset):
    assert "does not exist" in _error(
        capsys, ["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]
    )
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rat: 0.1\n")
    err = _error(
        capsys, ["train", "--data", str(tiny_dataset), "--output", str(tmp_path / "o"), "--config", str(bad_yaml)]
    )
    assert "learning_rat" in err and "learning_rate" in err
    bad_yaml.write_text("click_prob_train: 1.5\n")
    assert "1.5" in _error(
        capsys, ["train", "--data", str(tiny_dataset), "--output", str(tmp_path / "o"), "--config", str(bad_yaml)]
    )
    assert "nope.yaml" in _error(
        capsys,
        [
            "train",
            "--data",
            str(tiny_dataset),
            "--output",
            str(tmp_path / "o"),
            "--config",
            str(tmp_path / "nope.yaml"),
        ],
    )
    assert "learning_rate" in _error(
        capsys, ["train", "--data", str(tiny_dataset), "--output", str(tmp_path / "o"), "--learning-rate", "-1"]
    )
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing half-written


def test_train_rejects_unknown_profile(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path), "--output", str(tmp_path), "--profile", "huge"])
    assert info.value.code == 2
    assert "huge" in capsys.readouterr().err


def test_check_data_reports_the_bad_file(capsys, tmp_path):
    (tmp_path / "imagesTr").mkdir()
    assert "labelsTr" in _error(capsys, ["check-data", "--data", str(tmp_path)])


def test_infer_bad_inputs(capsys, tmp_path, tiny_dataset):
    from trainer.checkpoint import Checkpoint, save_checkpoint
    from trainer.config import get_profile
    from trainer.network import build_network

    ckpt = tmp_path / "m.pt"
    save_checkpoint(Checkpoint(model=build_network(get_profile("tiny")).state_dict(), profile="tiny", epoch=0), ckpt)
    image = str(tiny_dataset / "imagesTs" / "spleen_011.nii.gz")
    out = tmp_path / "mask.nii.gz"
    base = ["infer", "--checkpoint", str(ckpt), "--image", image, "--output", str(out)]
    assert "outside the volume" in _error(capsys, base + ["--clicks", '{"spleen": [[9999, 1, 1]]}'])
    assert "3 integer" in _error(capsys, base + ["--clicks", '{"spleen": [[1, 1]]}'])
    assert "integers" in _error(capsys, base + ["--clicks", '{"spleen": [[1.5, 1, 1]]}'])
    assert "unknown click label" in _error(capsys, base + ["--clicks", '{"liver": [[1, 1, 1]]}'])
    assert "not valid JSON" in _error(capsys, base + ["--clicks", '{"spleen": [[1, 1, 1]'])
    assert "nofile.json" in _error(capsys, base + ["--clicks", str(tmp_path / "nofile.json")])
    assert "missing.pt" in _error(
        capsys, ["infer", "--checkpoint", str(tmp_path / "missing.pt"), "--image", image, "--output", str(out)]
    )
    assert "missing.nii.gz" in _error(
        capsys, ["infer", "--checkpoint", str(ckpt), "--image", str(tmp_path / "missing.nii.gz"), "--output", str(out)]
    )
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:2000])
    assert "corrupt.pt" in _error(
        capsys, ["infer", "--checkpoint", str(corrupt), "--image", image, "--output", str(out)]
    )
    assert not out.exists()
    # And a good call through the real console entry point.
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"spleen": [[30, 40, 10]], "background": []}))
    proc = run(*base, "--clicks", str(clicks))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_unusable_device_is_a_one_line_error(capsys, tmp_path):
    import torch

    assert "not a torch device" in _error(
        capsys, ["infer", "--checkpoint", "x", "--image", "y", "--output", "z", "--device", "gpu0"]
    )
    if not torch.cuda.is_available():
        assert "no CUDA device" in _error(
            capsys, ["train", "--data", str(tmp_path), "--output", str(tmp_path), "--device", "cuda"]
        )


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc"])
def test_click_radius_flag_rejects_bad_values_naming_them(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["infer", "--checkpoint", "x.pt", "--image", "x.nii.gz", "--output", "y.nii.gz", "--click-radius", value])
    assert info.value.code == 2
    assert f"'{value}' is not a number >= 0" in capsys.readouterr().err


def test_evaluate_flags_become_a_typed_config_with_its_defaults():
    from trainer.cli import build_parser, evaluate_config
    from trainer.config import EvaluateConfig

    args = build_parser().parse_args(["evaluate", "--checkpoint", "c.pt", "--data", "d", "--output", "o"])
    assert evaluate_config(args) == EvaluateConfig(checkpoint="c.pt", data_dir="d", output_dir="o")
    args = build_parser().parse_args(
        [
            "evaluate",
            "--checkpoint",
            "c.pt",
            "--data",
            "d",
            "--output",
            "o",
            "--split",
            "test",
            "--max-clicks",
            "3",
            "--click-radius",
            "0",
            "--dicom",
        ]
    )
    cfg = evaluate_config(args)
    assert (cfg.split, cfg.max_clicks, cfg.click_radius, cfg.dicom) == ("test", 3, 0.0, True)


def test_evaluate_bad_settings_are_one_line_errors_before_any_work(capsys, tmp_path):
    base = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "missing.pt"),
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "r"),
    ]
    assert "max_clicks must be an integer >= 0, got -1" in _error(capsys, base + ["--max-clicks", "-1"])
    assert "missing.pt" in _error(capsys, base)
    assert not (tmp_path / "r").exists()
