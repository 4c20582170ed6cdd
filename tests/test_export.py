"""`python -m vit.export`: ONNX with a dynamic batch (parity with onnxruntime) and torch.export."""
import pytest
import torch

import vit
from vit import export


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
