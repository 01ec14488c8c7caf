"""The repository root is a MONAI bundle whose configs drive the `trainer` package (issue 5, spec §6).

Each model-zoo command runs as a subprocess from the repository root, as a user types it, with
`bundle_root` (hence `models/` and `eval/`) redirected to a temporary folder so the repository stays
clean. Data: four small phantoms; profile `tiny`; one epoch.

`python -m monai.bundle verify_metadata` downloads the meta schema, which CI cannot do: the metadata
test checks the schema's required fields offline instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN = "configs/train.json"
EVALUATE = "['configs/train.json','configs/evaluate.json']"
MULTI_GPU = "['configs/train.json','configs/multi_gpu_train.json']"
INFERENCE = "configs/inference.json"

# MONAI's DynUNet with the model-zoo bundle's arguments (spec §1), written out here rather than taken
# from trainer.network, so the test checks compatibility with MONAI itself.
ZOO_DYNUNET_ARGS = dict(
    spatial_dims=3,
    in_channels=3,
    out_channels=2,
    kernel_size=[3, 3, 3, 3, 3, 3],
    strides=[1, 2, 2, 2, 2, [2, 2, 1]],
    upsample_kernel_size=[2, 2, 2, 2, [2, 2, 1]],
    norm_name="instance",
    deep_supervision=False,
    res_block=True,
)


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail with its output's tail when it fails."""
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def bundle(config_file: str, bundle_root: Path, dataset_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            config_file,
            "--bundle_root",
            str(bundle_root),
            "--dataset_dir",
            str(dataset_dir),
            *overrides,
        ]
    )


def messages(exc: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps errors raised while parsing)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 labelled phantoms (3 train, 1 validate) and 1 test image."""
    from trainer.synth import write_dataset

    root = tmp_path_factory.mktemp("bundle_ds")
    write_dataset(root, 4, seed=21, shape=(64, 64, 32))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A bundle root after `python -m monai.bundle run --config_file configs/train.json` (tiny, 1 epoch)."""
    root = tmp_path_factory.mktemp("bundle_root")
    bundle(TRAIN, root, dataset, "--profile", "tiny", "--epochs", "1")
    return root


@pytest.fixture
def restore_logging():
    """ConfigWorkflow applies configs/logging.conf to the root logger: undo it after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ----------------------------------------------------------------------------- metadata and configs


def test_metadata_has_the_model_zoo_fields_offline():
    from trainer.config import CLICK_CHANNELS, LABELS, PROFILES

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in (
        "schema",
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "optional_packages_version",
        "name",
        "task",
        "description",
        "authors",
        "copyright",
        "data_source",
        "data_type",
        "image_classes",
        "label_classes",
        "pred_classes",
        "eval_metrics",
        "intended_use",
        "references",
        "network_data_format",
    ):
        assert meta.get(key) not in (None, "", [], {}), key
    assert meta["schema"].startswith("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/")
    assert meta["version"] in meta["changelog"]
    # Versions of this environment: torch is pinned exactly; MONAI to 1.6.x.
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    import monai

    assert meta["monai_version"].split(".")[:2] == monai.__version__.split(".")[:2]
    assert all(isinstance(v, str) and v[0].isdigit() for v in meta["optional_packages_version"].values())
    # Spleen-only metrics, not yet measured: null until the lead fills them, never invented.
    assert all(k.startswith("spleen_") and (v is None or 0 <= v <= 1) for k, v in meta["eval_metrics"].items())
    assert "spleen-only" in meta["eval_metrics_note"]

    image = meta["network_data_format"]["inputs"]["image"]
    assert image == {
        **image,
        "type": "image",
        "format": "hounsfield",
        "modality": "CT",
        "num_channels": 3,
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
    }
    assert image["spatial_shape"] == list(PROFILES["bundle"].spatial_size)
    # The click channels in the order the network reads them (spec §7.1): ch1 spleen, ch2 background.
    assert [image["channel_def"][str(i + 1)] for i in range(len(CLICK_CHANNELS))] == [
        f"{c} clicks" for c in CLICK_CHANNELS
    ]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["format"] == "segmentation" and pred["num_channels"] == 2
    assert pred["channel_def"] == {str(v): k for k, v in LABELS.items()}
    assert meta["label_names"] == LABELS


def test_every_training_setting_has_its_home_in_python_and_is_overridable():
    from monai.bundle import ConfigParser

    from trainer.config import PROFILES, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    raw = json.loads((CONFIGS / "train.json").read_text())
    # Every setting is a top-level key (so `--name value` works) holding null: the value is Python's.
    assert fields <= set(raw)
    assert {k: raw[k] for k in fields | {"spatial_size"}} == dict.fromkeys(fields | {"spatial_size"})
    assert {k: v for k, v in raw["train_config"].items() if not k.startswith("_")} == {
        k: f"@{k}" for k in fields | {"spatial_size"}
    }

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser.get_parsed_content("train_config").to_dict() == TrainConfig(profile="bundle").to_dict()
    assert parser.get_parsed_content("train#trainer#max_epochs") == PROFILES["bundle"].epochs

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {"profile": "tiny", "epochs": 3, "learning_rate": 0.01, "click_prob_train": 0.5, "spatial_size": [32, 32, 32]}
    )
    cfg = parser.get_parsed_content("train_config")
    assert (cfg.profile, cfg.num_epochs, cfg.lr, cfg.click_prob_train) == ("tiny", 3, 0.01, 0.5)
    assert cfg.seed == TrainConfig().seed
    assert parser.get_parsed_content("train#trainer").max_epochs == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ({"spatial_size": [96, 96, 96]}, "chosen with --profile"),
        ({"click_prob_train": 1.5}, "click_prob_train must be a probability"),
        ({"profile": "huge"}, "unknown profile 'huge'"),
    ],
)
def test_invalid_settings_fail_with_a_message(override, message):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(override)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train_config")
    assert message in messages(info.value)


@pytest.mark.parametrize(
    "config_file, workflow_type, evaluator",
    [
        ([TRAIN], "train", None),
        ([TRAIN, "configs/evaluate.json"], "infer", "BundleEvaluation"),
        ([INFERENCE], "infer", "BundleInference"),
        ([TRAIN, "configs/multi_gpu_train.json"], "train", None),
    ],
)
def test_config_workflow_properties(config_file, workflow_type, evaluator, monkeypatch, restore_logging):
    """As model-zoo CI: ConfigWorkflow loads the configs and check_properties() finds nothing missing."""
    from monai.bundle import ConfigWorkflow

    from trainer import bundle

    monkeypatch.chdir(REPO)
    workflow = ConfigWorkflow(config_file=config_file, workflow_type=workflow_type)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.device, torch.device)
    if workflow_type == "train":
        assert isinstance(workflow.trainer, bundle.BundleTrainer)
        assert isinstance(workflow.train_dataset, bundle.SplitCases) and workflow.train_dataset.part == "train"
        assert workflow.max_epochs == workflow.trainer.config.num_epochs
        factory = workflow.trainer.runtime  # a factory: parsing the config started no process group
        expected = "TorchDistributedRuntime" if "multi_gpu" in config_file[-1] else "LocalRuntime"
        assert factory.func.__name__ == expected
    else:
        assert type(workflow.evaluator).__name__ == evaluator
        assert type(workflow.network_def).__name__ == "DynUNet"
        assert type(workflow.inferer).__name__ == "SimpleInferer"


# ----------------------------------------------------------------------------- the four commands


def test_train_command_keeps_the_best_model_as_a_plain_state_dict(trained):
    from monai.networks.nets import DynUNet

    from trainer.checkpoint import load_checkpoint
    from trainer.config import PROFILES

    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    net = DynUNet(**ZOO_DYNUNET_ARGS, filters=list(PROFILES["tiny"].filters))
    net.load_state_dict(state)  # strict: exactly MONAI's module names
    # Our full checkpoints and the metrics log stay under output_dir (bundle_root/eval).
    out = trained / "eval"
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best.profile == "tiny"
    assert all(torch.equal(best.model[k], state[k]) for k in state)
    assert (out / "checkpoints" / "last.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]


def test_evaluate_command_writes_dice_versus_clicks(trained, dataset):
    bundle(EVALUATE, trained, dataset, "--profile", "tiny", "--max_clicks", "1")
    summary = json.loads((trained / "eval" / "summary.json").read_text())
    assert summary["checkpoint"] == str(trained / "models" / "model.pt")
    assert (summary["split"], summary["profile"], summary["cases"]) == ("val", "tiny", 1)
    assert len(summary["dice_by_clicks"]) == 2 and summary["dice_by_clicks"][0] == summary["dice_auto"]
    assert 0.0 <= summary["dice_auto"] <= 1.0
    with (trained / "eval" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["spleen_004", "spleen_004"]


def _assert_mask_in_original_geometry(mask_path: Path, image_path: Path, dtype=np.float32) -> np.ndarray:
    mask, image = nib.load(str(mask_path)), nib.load(str(image_path))
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert mask.get_data_dtype() == dtype
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    return data


def test_inference_command_takes_clicks_named_after_labels(trained, dataset, tmp_path):
    datalist = tmp_path / "clicks.json"
    datalist.write_text(
        json.dumps(
            [
                {"image": "imagesTs/spleen_005.nii.gz", "spleen": [[32, 32, 16]], "background": [[2, 2, 2]]},
                {"image": str(dataset / "imagesTr" / "spleen_001.nii.gz")},
            ]
        )
    )
    bundle(INFERENCE, trained, dataset, "--profile", "tiny", "--datalist", str(datalist))
    for name, folder in (("spleen_005", "imagesTs"), ("spleen_001", "imagesTr")):
        mask = trained / "eval" / name / f"{name}_trans.nii.gz"
        _assert_mask_in_original_geometry(mask, dataset / folder / f"{name}.nii.gz")


def test_a_model_zoo_state_dict_runs_through_inference_unchanged(dataset, tmp_path):
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(DynUNet(**ZOO_DYNUNET_ARGS).state_dict(), tmp_path / "models" / "model.pt")
    bundle(INFERENCE, tmp_path, dataset)  # default profile: the bundle's network at 128^3
    images = sorted((dataset / "imagesTs").glob("*.nii.gz"))
    assert images
    for image in images:
        name = image.name[: -len(".nii.gz")]
        _assert_mask_in_original_geometry(tmp_path / "eval" / name / f"{name}_trans.nii.gz", image)


def test_weights_of_another_profile_are_refused_with_the_profile_to_pass(trained):
    from trainer import bundle as tb
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="pass --profile tiny"):
        tb.load_predictor(network=tb.network(None), checkpoint=str(trained / "models" / "model.pt"), profile=None)


class _FakeRuntime:
    def __init__(self, rank: int):
        self.rank, self.is_main, self.calls = rank, rank == 0, []

    def on_epoch_end(self, **kwargs):
        self.calls.append(kwargs["is_best"])

    def finish(self):
        self.calls.append("finish")


def test_best_model_export_is_rank_0_only_and_keeps_an_existing_model(tmp_path):
    from trainer.bundle import _ExportBestModel
    from trainer.checkpoint import Checkpoint

    def epoch(runtime, value: float, is_best: bool):
        ckpt = Checkpoint(model={"input_block.conv1.conv.weight": torch.full((1,), value)}, epoch=0)
        runtime.on_epoch_end(metrics={"val_dice": value}, checkpoint=ckpt, is_best=is_best)

    path = tmp_path / "models" / "model.pt"
    rank1 = _FakeRuntime(rank=1)
    other = _ExportBestModel(rank1, path)
    epoch(other, 0.5, True)
    other.finish()
    assert rank1.calls == [True, "finish"] and not path.exists()

    main = _ExportBestModel(_FakeRuntime(rank=0), path)
    epoch(main, 0.5, False)
    main.finish()  # no best at all (NaN validation Dice): the last model is exported
    assert torch.load(path, weights_only=True)["input_block.conv1.conv.weight"].item() == 0.5

    resumed = _ExportBestModel(_FakeRuntime(rank=0), path)
    epoch(resumed, 0.25, False)
    resumed.finish()  # a resumed run that did not improve keeps the earlier best
    assert torch.load(path, weights_only=True)["input_block.conv1.conv.weight"].item() == 0.5
    epoch(resumed, 0.75, True)
    assert torch.load(path, weights_only=True)["input_block.conv1.conv.weight"].item() == 0.75


@pytest.mark.parametrize(
    "data, message",
    [
        ([{"image": "a.nii.gz", "liver": [[1, 2, 3]]}], "unknown key(s) ['liver']"),
        ([{"spleen": [[1, 2, 3]]}], '"image" path'),
        ([], "non-empty list"),
        ("missing.json", "does not exist"),
    ],
)
def test_bad_datalists_fail_with_a_message(data, message, tmp_path):
    from trainer.bundle import InferenceCases
    from trainer.config import ConfigError

    if isinstance(data, str):
        data = str(tmp_path / data)
    with pytest.raises(ConfigError) as info:
        len(InferenceCases(str(tmp_path), data))
    assert message in str(info.value)


@pytest.mark.slow
def test_torchrun_two_processes_train_with_files_and_logs_on_rank_0_only(dataset, tmp_path):
    """Each rank gets its own bundle_root, so any file rank 1 wrote would show up in its folder."""
    logs = tmp_path / "logs"
    per_rank_root = f"$'{tmp_path}/rank' + __import__('os').environ['RANK']"
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--log-dir",
            str(logs),
            "--redirects",
            "3",
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            MULTI_GPU,
            "--bundle_root",
            per_rank_root,
            "--dataset_dir",
            str(dataset),
            "--profile",
            "tiny",
            "--epochs",
            "1",
        ]
    )
    rank_logs = {}
    for rank in (0, 1):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        rank_logs[rank] = (folder / "stdout.log").read_text() + (folder / "stderr.log").read_text()
    # Both ranks ran the bundle workflow; the loop reduced over 2 processes (it would hang without rank 1).
    assert all("input summary of monai.bundle.scripts.run" in text for text in rank_logs.values())
    assert "with 2 process(es)" in rank_logs[0] and "epoch 1/1" in rank_logs[0]
    # Only rank 0 logged training and wrote files.
    assert "trainer.bundle" not in rank_logs[1] and "epoch 1/1" not in rank_logs[1]
    assert not (tmp_path / "rank1").exists()
    root = tmp_path / "rank0"
    assert (root / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (root / "eval" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len((root / "eval" / "metrics.jsonl").read_text().splitlines()) == 1
