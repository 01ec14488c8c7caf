"""Checkpoints: round trip, checksum, corruption, bundle state_dict."""

import pytest
import torch

from trainer.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint, save_state_dict
from trainer.config import get_profile
from trainer.network import build_network
from trainer.predictor import Predictor


def _ckpt():
    torch.manual_seed(0)
    model = build_network(get_profile("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 32, 32, 32)).mean().backward()
    opt.step()
    return Checkpoint(
        model=model.state_dict(),
        profile="tiny",
        epoch=3,
        optimizer=opt.state_dict(),
        scaler={"scale": 1.0},
        config={"profile": "tiny"},
        metrics={"val_dice": 0.5},
    )


def test_round_trip(tmp_path):
    ckpt = _ckpt()
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    back = load_checkpoint(path)
    assert back.epoch == 3 and back.profile == "tiny" and back.metrics == {"val_dice": 0.5}
    for k, v in ckpt.model.items():
        torch.testing.assert_close(back.model[k], v)
    assert back.optimizer["state"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_corrupted_tensor_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_ckpt(), path)
    data = bytearray(path.read_bytes())
    # Flip bytes in the middle of the file (tensor storage), leaving the zip structure intact.
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(path)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_ckpt(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or corrupted"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "x.pt")


def test_bundle_state_dict_loads_into_the_predictor(tmp_path):
    """A plain state_dict of MONAI's DynUNet with the bundle's arguments (the model-zoo model.pt)."""
    from monai.networks.nets import DynUNet

    net = DynUNet(
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
    assert sum(p.numel() for p in net.parameters()) == 31_001_282
    save_state_dict(net.state_dict(), tmp_path / "model.pt")
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt.plain_state_dict
    predictor = Predictor.from_checkpoint(tmp_path / "model.pt", device=torch.device("cpu"))
    assert predictor.profile.name == "bundle"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(predictor.model.state_dict()[k], v)


# ----------------------------------------------------------------------------- one URI rule, one loader


def test_fetch_turns_plain_paths_and_file_uris_into_local_files(tmp_path):
    from trainer.storage import StorageError, fetch

    path = tmp_path / "c.pt"
    assert fetch(path) == str(path)
    assert fetch(f"file://{path}") == str(path)
    for uri in ("http://example.invalid/c.pt", "gs://bucket/c.pt"):
        with pytest.raises(StorageError, match=r"only local paths, file:// and s3:// URIs"):
            fetch(uri)


def test_every_checkpoint_reader_takes_file_uris(tmp_path):
    """Predictor (infer, evaluate), the server's loader and train's init-from share one rule."""
    from trainer.config import TrainConfig
    from trainer.network import load_model, read_checkpoint
    from trainer.serve.core import load_predictor
    from trainer.train import _restore

    path = tmp_path / "c.pt"
    save_checkpoint(_ckpt(), path)
    uri = f"file://{path}"
    predictor = Predictor.from_checkpoint(uri, device=torch.device("cpu"))
    assert predictor.profile.name == "tiny" and predictor.version == "c.pt@epoch4"
    served = load_predictor(uri, None, "cpu")
    assert served.version.startswith("c.pt@epoch4+") and len(served.version) == len("c.pt@epoch4+") + 10
    assert load_model(path, digest=True).version == served.version
    model = build_network(get_profile("tiny"))
    _restore(model, None, None, read_checkpoint(uri)[1], TrainConfig(profile="tiny"), repr(uri))
    for k, v in load_checkpoint(path).model.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_the_loader_names_the_profile_that_fits(tmp_path):
    from trainer.config import ConfigError
    from trainer.network import load_model

    path = tmp_path / "c.pt"
    save_checkpoint(_ckpt(), path)
    with pytest.raises(ConfigError, match="holds weights of profile 'tiny'.*pass --profile tiny"):
        load_model(path, profile="cpu", check_fit=True)
    with pytest.raises(CheckpointError, match="does not fit profile 'cpu'"):
        load_model(path, profile="cpu")
