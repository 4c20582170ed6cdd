"""vit.deploy.runners: every backend gives eager's answers on a small trained model; missing pieces are clear messages.

Thresholds: fp32 backends give eager's top-1 on every held-out digit (logits within 1e-4); int8 (eager torch.ao,
onnxruntime) agrees with fp32 on at least 97 % of them.
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vit
from vit.commands import predict as predict_cli
from vit.deploy import runners as inference
from vit.deploy.predict import load_model, predict
from vit.deploy.runners import BackendError, VerificationError, create_runner, top1_agreement

INT8_AGREEMENT = 0.97


def _digits(size: int = 16):
    from vit.data.datasets import load_digits_arrays
    images, labels = load_digits_arrays(3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).sub(0.5).div(0.5)
    return x, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT fitted on scikit-learn's digits (16 px) for a few seconds, so its logits have real margins:
    (model, held-out images, their labels)."""
    torch.manual_seed(0)
    x, y = _digits()
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    model = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(train_x), (64,), generator=generator)
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(test_x).argmax(-1) == test_y).float().mean() > 0.7  # it learned something (chance: 0.1)
    return model, test_x, test_y


@pytest.fixture
def eager_logits(trained):
    model, x, _ = trained
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_fp32_backends_give_eager_top1(trained, eager_logits, backend, tmp_path):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model, x, _ = trained
    runner = create_runner(model, backend, cache_dir=tmp_path)
    assert runner.name == f"{backend} fp32"
    logits = runner(x)
    assert top1_agreement(logits, eager_logits) == 1.0
    assert (logits - eager_logits).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_int8_backends_agree_with_fp32(trained, eager_logits, backend, tmp_path):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model, x, _ = trained
    runner = create_runner(model, backend, "int8", probe=x[:8], cache_dir=tmp_path)
    assert runner.name == f"{backend} int8" and runner.agreement >= inference.INT8_MIN_AGREEMENT
    logits = runner(x)
    assert top1_agreement(logits, eager_logits) >= INT8_AGREEMENT
    assert 0 < (logits - eager_logits).abs().max() < 1.0  # quantised (not fp32 in disguise), yet close


def test_onnxruntime_int8_quantises_the_block_matmuls_only(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, _, _ = trained
    runner = create_runner(model, "onnxruntime", "int8", cache_dir=tmp_path)
    ops = [node.op_type for node in onnx.load(str(runner.path)).graph.node]
    # qkv, proj, fc1, fc2 in each of the 2 blocks; the patch embedding (Conv) and the head (not counted) stay fp32
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 4 * 2
    assert "Conv" in ops and "ConvInteger" not in ops


@pytest.mark.slow
def test_compile_backend_gives_eager_top1_and_pads_smaller_batches(trained, eager_logits):
    model, x, _ = trained
    try:
        runner = create_runner(model, "compile", probe=x[:8])
    except BackendError as error:  # no C++ compiler on this machine: the message says so
        assert "C++ compiler" in str(error)
        pytest.skip(str(error))
    logits = torch.cat([runner(x[i:i + 64]) for i in range(0, len(x), 64)])  # the last batch is padded up
    assert top1_agreement(logits, eager_logits) == 1.0
    assert (logits - eager_logits).abs().max() < 1e-4


def test_compile_int8_and_missing_compiler_are_clear_errors(trained, monkeypatch):
    model, _, _ = trained
    with pytest.raises(BackendError, match="compile int8: not supported"):
        create_runner(model, "compile", "int8")
    monkeypatch.setattr(inference.shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="no C\\+\\+ compiler"):
        create_runner(model, "compile")


def test_missing_onnxruntime_is_a_clear_message_and_auto_falls_back(trained, eager_logits, monkeypatch, tmp_path):
    model, x, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(BackendError, match="onnxruntime: not installed"):
        create_runner(model, "onnxruntime")
    notes = []
    runner = create_runner(model, "auto", log=notes.append)
    assert runner.name == "eager fp32" and len(notes) == 1 and "not installed" in notes[0]
    assert torch.equal(runner(x), eager_logits)
    assert create_runner(model, "auto", "int8", log=notes.append).name == "eager int8"


def test_a_backend_with_wrong_answers_is_refused(trained, monkeypatch):
    model, x, _ = trained
    broken = lambda model, quantize, **_: inference.Runner("onnxruntime", quantize, model,  # noqa: E731
                                                           lambda images: -model(images))
    monkeypatch.setitem(inference._BUILDERS, "onnxruntime", broken)
    with pytest.raises(VerificationError, match="top-1 agrees with eager fp32 on only 0 of 8"):
        create_runner(model, "onnxruntime", probe=x[:8])
    notes = []
    assert create_runner(model, "auto", probe=x[:8], log=notes.append).name == "eager fp32"
    assert "using eager instead" in notes[0]


def test_onnx_export_is_cached_by_weights(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    model, x, _ = trained
    first = create_runner(model, "onnxruntime", cache_dir=tmp_path)
    monkeypatch.setattr(inference, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    second = create_runner(model, "onnxruntime", cache_dir=tmp_path)
    assert second.path == first.path and torch.equal(second(x), first(x))
    other = vit.VisionTransformer(model.config)  # other weights: another file
    assert inference.weights_key(other) != inference.weights_key(model)


def test_bad_arguments_are_value_errors(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match="backend"):
        create_runner(model, "tensorrt")
    with pytest.raises(ValueError, match="quantize"):
        create_runner(model, "eager", "int4")


# ---- vit.deploy.predict -------------------------------------------------------------------------------------------
@pytest.fixture
def digit_files(trained, tmp_path):
    """The held-out digits as 16 px PNGs and a save_pretrained directory of the model (mean/std 0.5)."""
    model, x, _ = trained
    paths = []
    for i, image in enumerate(x[:40]):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1).__mul__(255).round()
                        .astype(np.uint8)).save(path)
        paths.append(str(path))
    directory = vit.save_pretrained(model, tmp_path / "digits", class_names=[str(i) for i in range(10)],
                                    mean=(0.5,) * 3, std=(0.5,) * 3)
    return paths, directory


def test_predict_backends_and_workers_give_the_same_answers(digit_files, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    paths, directory = digit_files
    model = load_model(str(directory))
    eager = predict(model, paths, topk=1, batch_size=16, backend="eager", workers=0)
    for backend, workers in (("onnxruntime", 1), ("auto", 2)):
        got = predict(model, paths, topk=1, batch_size=16, backend=backend, workers=workers)
        assert [top[0][0] for top in got] == [top[0][0] for top in eager]
        assert [top[0][1] for top in got] == pytest.approx([top[0][1] for top in eager], abs=1e-5)
    int8 = predict(model, paths, topk=1, batch_size=16, backend="onnxruntime", quantize="int8")
    assert np.mean([a[0][0] == b[0][0] for a, b in zip(int8, eager)]) >= INT8_AGREEMENT


def test_predict_cli_onnxruntime_int8_end_to_end(digit_files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    paths, directory = digit_files
    argv = ["--backend", "onnxruntime", "--quantize", "int8", *paths[:20], "--checkpoint", str(directory),
            "--topk", "2", "--batch-size", "8", "--workers", "1"]
    assert predict_cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 20 and all(line.startswith(f"{path}: ") for line, path in zip(lines, paths))
    assert list((tmp_path / "cache" / "onnx").glob("*.int8.onnx"))


def test_predict_cli_errors_are_one_line(digit_files, tmp_path, monkeypatch, capsys):
    paths, directory = digit_files
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    # a bad file decoded in a worker process: one line naming it, exit 2
    assert predict_cli.main([*paths[:10], str(bad), "--checkpoint", str(directory), "--backend", "eager",
                             "--batch-size", "4", "--workers", "1"]) == 2
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert predict_cli.main([paths[0], "--checkpoint", str(directory), "--backend", "onnxruntime"]) == 2
    assert predict_cli.main([paths[0], "--checkpoint", str(directory), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "bad.png" in err[0] and "onnxruntime: not installed" in err[1] and "--batch-size" in err[2]
