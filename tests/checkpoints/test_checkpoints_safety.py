"""Hostile and broken checkpoints: refused with a CheckpointError naming the file, never half-loaded."""
from __future__ import annotations

import logging
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import randomize_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vit
from vit import CheckpointError
from vit.tasks.backbone import Backbone

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _state_dict():
    torch.manual_seed(0)
    return vit.VisionTransformer(**SMALL).state_dict()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "payload_ran"
    checkpoint = {"state_dict": _state_dict(), "extra": Payload(marker)}
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused") as info:
        vit.load_pretrained(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # control: the payload is real — a plain unpickle would have run it
    control = tmp_path / "control_ran"
    torch.save({"x": Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real checkpoint, written by Lightning's Trainer after one training step of a tiny ImageClassifier."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vit.tasks.classification import ImageClassifier
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    module = ImageClassifier(Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=4)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))), batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=data)
    trainer.save_checkpoint(root / "real.ckpt")
    return root / "real.ckpt"


# torch.load(weights_only=True) stops at the payload's global (open pickles as io.open) before calling it
REFUSED_BY_TORCH = r"(?s)Weights only load failed.*Unsupported global: GLOBAL io\.open"


def _poisoned(lightning_ckpt, tmp_path):
    """The real checkpoint with a payload among its hyper-parameters; (path, marker the payload would create)."""
    marker = tmp_path / "payload_ran"
    checkpoint = torch.load(lightning_ckpt, weights_only=True)
    assert {"state_dict", "hyper_parameters", "optimizer_states", "pytorch-lightning_version"} <= set(checkpoint)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_lightning_checkpoint_with_a_payload_is_refused_by_load_pretrained(lightning_ckpt, tmp_path):
    assert vit.load_pretrained(lightning_ckpt).num_classes == 4  # control: the clean checkpoint loads
    path, marker = _poisoned(lightning_ckpt, tmp_path)
    with pytest.raises(CheckpointError, match=r"refused to load.*\(io\.open\)") as info:
        vit.load_pretrained(path)
    assert str(path) in str(info.value) and not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is real
    assert marker.exists()


def test_lightning_checkpoint_with_a_payload_is_refused_by_train_py(lightning_ckpt, tmp_path, monkeypatch, capsys):
    from vit.training.cli import DEFAULT_CONFIG, main
    path, marker = _poisoned(lightning_ckpt, tmp_path)
    monkeypatch.chdir(tmp_path)  # runs/ goes here
    args = ["fit", "--config", str(DEFAULT_CONFIG), "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
            "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--model.backbone.embed_dim", "32", "--model.backbone.depth", "1", "--model.backbone.num_heads", "2",
            "--data.img_size", "16", "--ckpt_path", str(path)]
    # Two locks, each enough: LightningCLI reads the checkpoint's hyper-parameters with weights_only=True before
    # building anything, and our CLI hands Trainer.fit weights_only=True.
    with pytest.raises(SystemExit) as stop:
        main(args)  # `python train.py fit ... --ckpt_path evil.ckpt`, in-process
    assert stop.value.code != 0 and not marker.exists()
    err = capsys.readouterr().err  # one clear line, not a traceback
    assert "error: refused to load the checkpoint: it holds pickled Python objects" in err
    assert "Unsupported global: GLOBAL io.open" in err and "Traceback" not in err


def test_lightning_checkpoint_with_a_payload_is_refused_by_load_from_checkpoint(lightning_ckpt, tmp_path,
                                                                                monkeypatch):
    from vit.tasks.classification import ImageClassifier
    assert ImageClassifier.load_from_checkpoint(lightning_ckpt).model.num_classes == 4  # control
    path, marker = _poisoned(lightning_ckpt, tmp_path)
    # refused by our default, not only by torch's (which this switches off)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match=REFUSED_BY_TORCH):
        ImageClassifier.load_from_checkpoint(path)
    assert not marker.exists()


def test_npz_with_an_object_array_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    arrays = vit.export_state_dict(vit.load_pretrained(_state_dict(), model={"num_heads": 2}), "npz")
    np.savez(tmp_path / "evil.npz", **arrays, extra=np.array([Payload(marker)], dtype=object))
    with pytest.raises(CheckpointError, match=r"refused to load: array 'extra' holds pickled Python objects") as info:
        vit.load_pretrained(tmp_path / "evil.npz")
    assert str(tmp_path / "evil.npz") in str(info.value) and not marker.exists()
    np.load(tmp_path / "evil.npz", allow_pickle=True)["extra"]  # control: the payload is real
    assert marker.exists()


def _valid_files(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, tmp_path / "w.safetensors")
    arrays = vit.export_state_dict(vit.load_pretrained(sd, model={"num_heads": 2}), "npz")
    np.savez(tmp_path / "w.npz", **arrays)
    return [tmp_path / "w.pth", tmp_path / "w.safetensors", tmp_path / "w.npz"]


def test_truncated_files_raise_and_leave_the_model_untouched(tmp_path):
    for path in _valid_files(tmp_path):
        data = path.read_bytes()
        for cut in (len(data) // 2, len(data) - 1, 100):
            broken = tmp_path / f"cut_{cut}{path.suffix}"
            broken.write_bytes(data[:cut])
            model = vit.VisionTransformer(**SMALL)
            before = _snapshot(model)
            with pytest.raises(CheckpointError) as info:
                vit.load_pretrained(broken, model=model)
            assert str(broken) in str(info.value)
            assert _unchanged(model, before)


def test_random_bytes_empty_and_non_checkpoints(tmp_path):
    cases = {"random.pth": bytes(range(256)) * 4, "empty.safetensors": b"", "notes.bin": b"hello world\n",
             "fake.npz": b"PK\x03\x04" + b"\0" * 60}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            vit.load_pretrained(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        vit.load_pretrained(tmp_path / "missing.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "not weights")
    with pytest.raises(CheckpointError, match="neither"):
        vit.load_pretrained(tmp_path / "other.zip")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="expected one weights file"):
        vit.load_pretrained(tmp_path / "empty_dir")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"cls_token": torch.zeros(1), "patch_embed.proj.weight": "text"}, tmp_path / "text.pth")
    torch.save({"resnet.conv1.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        vit.load_pretrained(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        vit.load_pretrained(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="not a Vision Transformer checkpoint"):
        vit.load_pretrained(tmp_path / "resnet.pth")


def test_npz_with_missing_arrays_lists_the_missing_keys(tmp_path):
    arrays = vit.export_state_dict(vit.load_pretrained(_state_dict(), model={"num_heads": 2}), "npz")
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc1\.weight") as info:
        vit.load_pretrained(tmp_path / "partial.npz")
    assert info.value.missing == ["blocks.1.mlp.fc1.weight"]


def test_other_architecture_lists_missing_unexpected_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    other = vit.VisionTransformer(**{**SMALL, "depth": 3, "embed_dim": 64, "num_heads": 2})
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    model = vit.VisionTransformer(**SMALL)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        vit.load_pretrained(tmp_path / "other.safetensors", model=model)
    message = str(info.value)
    assert "other.safetensors" in message and "unexpected keys" in message
    assert "wrong shape: blocks.0.mlp.fc1.weight: checkpoint [256, 64] vs model [128, 32]" in message
    assert info.value.mismatched["cls_token"] == ((1, 1, 64), (1, 1, 32))
    assert "blocks.2.norm1.weight" in info.value.unexpected
    assert _unchanged(model, before)


def test_strict_false_allows_missing_keys_with_a_warning(caplog):
    # every tensor random, so that a loaded one cannot equal its initial value by chance (LayerNorm 1/0, biases 0)
    sd = randomize_(vit.VisionTransformer(**SMALL)).state_dict()
    del sd["blocks.1.norm2.weight"], sd["blocks.0.mlp.fc1.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing keys"):
        vit.load_pretrained(sd, model={"num_heads": 2})
    with caplog.at_level(logging.WARNING, logger="vit.checkpoints"):
        model = vit.load_pretrained(sd, model={"num_heads": 2}, strict=False)
    assert "strict=False" in caplog.text and model.blocks[1].norm2.weight.shape == (32,)
    assert "blocks.1.norm2.weight" in caplog.text and "extra.weight" in caplog.text
    loaded = model.state_dict()
    for key, value in sd.items():  # every tensor the file has for the model: the file's values
        if key != "extra.weight":
            assert torch.equal(loaded[key], value), key
    # the missing ones keep their initial values (the reference init: LayerNorm weight 1, Linear bias 0)
    assert torch.equal(model.blocks[1].norm2.weight, torch.ones(32))
    assert torch.equal(model.blocks[0].mlp.fc1.bias, torch.zeros(128))
    assert set(loaded) == set(sd) - {"extra.weight"} | {"blocks.1.norm2.weight", "blocks.0.mlp.fc1.bias"}


def test_hf_config_with_other_activation_is_refused(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    reference = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, image_size=32, patch_size=8,
                                                    hidden_act="gelu_new"))
    reference.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="gelu_new"):
        vit.load_pretrained(tmp_path / "hf")


SUFFIXES = st.sampled_from([".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz", ""])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on garbage that looks like pickle
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), suffix=SUFFIXES,
       magic=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]))
def test_property_garbage_is_always_a_checkpoint_error(tmp_path, data, suffix, magic):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(magic + data)
    with pytest.raises(CheckpointError):
        vit.load_pretrained(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cut=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10**9), max_size=4))
def test_property_damaged_files_load_completely_or_raise(tmp_path, which, cut, flips):
    source = _valid_files(tmp_path)[which]
    data = bytearray(source.read_bytes())
    for position in flips:  # flipped bytes may land in tensor data (a valid file) or in structure (an error)
        data[position % len(data)] ^= 0xFF
    data = bytes(data[:max(1, int(len(data) * cut))]) if cut > 0.5 else bytes(data)
    damaged = tmp_path / f"damaged{source.suffix}"
    damaged.write_bytes(data)
    model = vit.VisionTransformer(**SMALL)
    before = _snapshot(model)
    try:
        loaded = vit.load_pretrained(damaged, model=model)
    except CheckpointError:
        assert _unchanged(model, before)
    else:
        assert loaded is model
