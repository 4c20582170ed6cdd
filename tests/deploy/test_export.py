"""`vit export`: ONNX with a dynamic batch (parity with onnxruntime) and torch.export."""
import pytest
import torch
from conftest import randomize_

import vit
from vit.commands import export


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return model.eval(), vit.save_pretrained(model, tmp_path / "m", class_names=["a", "b", "c"])


def test_onnx_export_matches_pytorch_for_other_batch_sizes(saved, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model, directory = saved
    assert export.main([str(directory), "--onnx", str(tmp_path / "m.onnx"), "--pt2", str(tmp_path / "m.pt2")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-5)


def test_export_errors_exit_2(tmp_path, capsys):
    assert export.main([str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert export.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


@pytest.fixture
def large_logits(tmp_path):
    """The tiny model with every parameter random (N(0, 0.5)): logits spread over several units (a fresh model's
    are ~0.1, so any output near zero would pass as "close to fp32"), as a trained model's do."""
    model = randomize_(vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=3)).eval()
    return model, vit.save_pretrained(model, tmp_path / "m", class_names=["a", "b", "c"])


def test_onnx_int8_export_is_checked_against_fp32(large_logits, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, directory = large_logits
    path = tmp_path / "m.int8.onnx"
    assert export.main([str(directory), "--onnx", str(path), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement with fp32 PyTorch" in out and "max |logit diff|" in out
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}  # int8 MatMuls written, not the fp32 model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (got,) = session.run(["logits"], {"images": x.numpy()})
    got = torch.from_numpy(got)
    with torch.no_grad():
        want = model(x)
    assert want.abs().max() > 2 and want.std() > 1  # logits of a few units: the bound below means something
    assert 0 < (got - want).abs().max() < 0.3  # quantised (not fp32 in disguise), yet close (~0.08 here)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.int8.onnx"]  # the fp32 file was temporary


def test_onnx_int8_agreement_below_the_threshold_fails(saved, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _, directory = saved
    assert export.main([str(directory), "--onnx", str(tmp_path / "m.onnx"), "--quantize", "int8",
                        "--min-agreement", "1.01"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "int8 top-1 agrees with fp32 PyTorch" in err[0]
    assert export.main([str(directory), "--pt2", str(tmp_path / "m.pt2"), "--quantize", "int8"]) == 2
    assert "--quantize int8 quantises the ONNX model" in capsys.readouterr().err
