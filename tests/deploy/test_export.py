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
    assert "--precision int8 quantises the ONNX model or the OpenVINO IR" in capsys.readouterr().err


def _opset(path) -> int:
    import onnx
    return next(entry.version for entry in onnx.load(str(path)).opset_import if entry.domain in ("", "ai.onnx"))


def test_onnx_export_picks_the_newest_opset_onnxruntime_loads_unless_opset_is_given(saved, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from vit.deploy.onnx_backend import exporter_max_opset
    _, directory = saved
    assert export.main([str(directory), "--onnx", str(tmp_path / "new.onnx")]) == 0
    newest = _opset(tmp_path / "new.onnx")
    assert f"(opset {newest}; " in capsys.readouterr().out
    assert 18 < newest <= exporter_max_opset()  # newer than the old fixed 18 with this torch and onnxruntime
    ort.InferenceSession(str(tmp_path / "new.onnx"), providers=["CPUExecutionProvider"])  # it loads
    assert export.main([str(directory), "--onnx", str(tmp_path / "old.onnx"), "--opset", "18"]) == 0
    assert _opset(tmp_path / "old.onnx") == 18 and "(opset 18; " in capsys.readouterr().out


def test_onnx_newest_opset_steps_down_past_one_the_runtime_rejects(saved, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from vit.deploy import onnx_backend
    model, _ = saved
    real = onnx_backend.onnx_session
    newest = onnx_backend.exporter_max_opset()

    def runtime_without_newest(path, *args, **kwargs):
        if _opset(path) == newest:
            raise RuntimeError(f"opset {newest} is not supported")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnx_backend, "onnx_session", runtime_without_newest)
    path, opset = onnx_backend.export_onnx_newest(model, tmp_path / "m.onnx")
    assert opset == newest - 1 == _opset(path)


def test_openvino_export_writes_the_ir_fp32_and_int8_calibrated_on_a_folder(large_logits, tmp_path, capsys):
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("nncf", reason="the openvino extra is not installed")
    from PIL import Image
    model, directory = large_logits
    images = tmp_path / "calibration"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    assert export.main([str(directory), "--openvino", str(tmp_path / "ir")]) == 0
    assert "OpenVINO fp32 max |diff| vs PyTorch" in capsys.readouterr().out
    compiled = ov.Core().compile_model(str(tmp_path / "ir" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(5, 3, 16, 16, generator=generator)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(compiled(x.numpy())[0]), model(x), atol=1e-4)
    assert export.main([str(directory), "--openvino", str(tmp_path / "ir8"), "--precision", "int8",
                        "--calibration", str(images), "--min-agreement", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "int8, calibrated on 8 images; top-1 agreement with fp32 PyTorch" in out
    types = {op.get_type_name() for op in ov.Core().read_model(str(tmp_path / "ir8" / "model.xml")).get_ops()}
    assert "FakeQuantize" in types or "FakeConvert" in types  # quantised, not the fp32 IR again
