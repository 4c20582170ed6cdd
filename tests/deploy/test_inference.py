"""vit.deploy.runners: every backend gives eager's answers on a small trained model; missing pieces are clear messages.

Thresholds: fp32 backends give eager's top-1 on every held-out digit (logits within 1e-4); int8 (eager torch.ao,
onnxruntime) agrees with fp32 on at least 97 % of them.
"""
import re
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
from vit.deploy import onnx_backend
from vit.deploy.order import save_order
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
    runner = create_runner(model, backend, "fp32", cache_dir=tmp_path)
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
        runner = create_runner(model, "compile", "fp32", probe=x[:8])
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
        create_runner(model, "compile", "fp32")


def test_missing_onnxruntime_is_a_clear_message_and_auto_falls_back(trained, eager_logits, monkeypatch, tmp_path):
    model, x, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(BackendError, match="onnxruntime: not installed"):
        create_runner(model, "onnxruntime")
    order = save_order([("onnxruntime", "fp32"), ("eager", "fp32")], path=tmp_path / "order.json")
    notes = []
    runner = create_runner(model, "auto", order_file=order, log=notes.append)
    assert runner.name == "eager fp32" and len(notes) == 2 and "not installed" in notes[0]
    assert notes[1] == f"runner: eager fp32 (auto: order measured here ({order}))"
    assert torch.equal(runner(x), eager_logits)
    # int8 asked for: auto tries int8 runners only (a model this small may keep under 99% top-1 in int8, and
    # then auto refuses them all, naming them)
    notes.clear()
    try:
        assert create_runner(model, "auto", "int8", order_file=order, log=notes.append).name in ("openvino int8",
                                                                                                 "eager int8")
    except BackendError as error:
        assert "int8" in str(error) and "fp32" not in str(error).replace("eager fp32", "")
    assert notes and all("int8" in note for note in notes), notes


def test_a_backend_with_wrong_answers_is_refused_by_auto_in_one_line(trained, monkeypatch, tmp_path):
    model, x, _ = trained
    broken = lambda model, precision, **_: inference.Runner("onnxruntime", precision, model,  # noqa: E731
                                                            lambda images: -model(images))
    monkeypatch.setitem(inference._BUILDERS, "onnxruntime", broken)
    with pytest.raises(VerificationError, match="top-1 agrees with eager fp32 on only 0 of 8"):
        create_runner(model, "onnxruntime", "fp32", probe=x[:8])
    order = save_order([("onnxruntime", "fp32"), ("eager", "fp32")], path=tmp_path / "order.json")
    notes = []
    runner = create_runner(model, "auto", probe=x[:16], order_file=order, log=notes.append)
    assert runner.name == "eager fp32" and len(notes) == 2 and notes[1].startswith("runner: eager fp32 (auto: ")
    assert re.fullmatch(r"note: onnxruntime fp32: top-1 agrees with eager fp32 on only 0 of 16 probe images, needs all "
                        r"\(max \|logit difference\| [0-9.]+\); trying eager fp32", notes[0])


def test_onnx_export_is_cached_by_weights(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    model, x, _ = trained
    first = create_runner(model, "onnxruntime", "fp32", cache_dir=tmp_path)
    monkeypatch.setattr(onnx_backend, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    second = create_runner(model, "onnxruntime", "fp32", cache_dir=tmp_path)
    assert second.path == first.path and torch.equal(second(x), first(x))
    other = vit.VisionTransformer(model.config)  # other weights: another file
    assert inference.weights_key(other) != inference.weights_key(model)


def test_bad_arguments_are_value_errors(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match="backend"):
        create_runner(model, "tensorrt")
    with pytest.raises(ValueError, match="precision: expected auto or one of fp32, bf16, int8, got 'int4'"):
        create_runner(model, "eager", "int4")


# ---- precision: fp32 | bf16 | int8 | auto ---------------------------------------------------------------------------
def _bf16(monkeypatch, native: bool):
    monkeypatch.setattr(inference, "native_bf16", lambda device: (native, "mocked CPU"))


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_takes_bf16_only_where_it_is_native(trained, monkeypatch, tmp_path, native):
    model, x, _ = trained
    _bf16(monkeypatch, native)
    runner = create_runner(model, "eager", "auto", probe=x[:16], order_file=tmp_path / "none.json")
    assert runner.name == ("eager bf16" if native else "eager fp32") and runner.reason.startswith("auto: default order")
    if native:
        assert runner.agreement >= inference.AUTO_MIN_AGREEMENT
        assert create_runner(model, "eager", "bf16", probe=x[:16]).name == "eager bf16"
    else:  # never emulated: asking for it is an error naming the precision and why
        with pytest.raises(BackendError, match="precision bf16: not native here \\(mocked CPU\\)"):
            create_runner(model, "eager", "bf16")
        with pytest.raises(BackendError, match="precision bf16: not native"):
            create_runner(model, "auto", "bf16")
        # a measured order that starts with bf16 (measured on other hardware, say) is skipped too
        order = save_order([("eager", "bf16"), ("eager", "fp32")], path=tmp_path / "order.json")
        assert create_runner(model, order_file=order, probe=x[:16]).name == "eager fp32"


def test_the_old_quantize_argument_still_works_or_names_precision(trained):
    model, _, _ = trained
    with pytest.warns(DeprecationWarning, match="precision"):
        assert create_runner(model, "eager", quantize="int8").name == "eager int8"
    with pytest.warns(DeprecationWarning):
        assert create_runner(model, "eager", quantize=None).name == "eager fp32"
    assert create_runner(model, "eager", None).name == "eager fp32"  # the old positional "no quantisation"
    with pytest.raises(ValueError, match="quantize: expected none or int8 \\(quantize is now precision"):
        create_runner(model, "eager", quantize="int4")
    with pytest.raises(ValueError, match="give precision only"):
        create_runner(model, "eager", "bf16", quantize="int8")


# every backend x precision this machine runs, against eager fp32 on the held-out digits: fp32 gives eager's top-1
# (logits within 1e-4); bf16 and int8 agree on >= 97 % and differ from fp32 (not fp32 in disguise) by less than
# their tolerance (logits here span about +-6; OpenVINO's int8 quantises activations statically, the others per batch)
PAIRS = {("eager", "bf16"): 0.5, ("onnxruntime", "fp32"): 1e-4, ("onnxruntime", "int8"): 1.0,
         ("openvino", "fp32"): 1e-4, ("openvino", "bf16"): 0.5, ("openvino", "int8"): 2.5}


@pytest.mark.parametrize("backend, precision", PAIRS, ids=[" ".join(pair) for pair in PAIRS])
def test_every_backend_and_precision_agrees_with_fp32(trained, eager_logits, tmp_path, backend, precision):
    pytest.importorskip(backend if backend != "eager" else "torch", reason=f"the {backend} extra is not installed")
    model, x, _ = trained
    if precision == "bf16" and not inference.native_bf16("cpu")[0]:
        with pytest.raises(BackendError, match="not native"):
            create_runner(model, backend, precision)
        return
    runner = create_runner(model, backend, precision, probe=x[:16], calibration=x[:32], cache_dir=tmp_path)
    assert runner.name == f"{backend} {precision}"
    logits = torch.cat([runner(x[i:i + 50]) for i in range(0, len(x), 50)])
    if precision == "fp32":
        assert top1_agreement(logits, eager_logits) == 1.0
        assert (logits - eager_logits).abs().max() < PAIRS[backend, precision]
    else:
        assert top1_agreement(logits, eager_logits) >= INT8_AGREEMENT
        assert 1e-5 < (logits - eager_logits).abs().max() < PAIRS[backend, precision]


def test_auto_follows_the_measured_order_else_the_default(trained, monkeypatch, tmp_path):
    model, x, _ = trained
    _bf16(monkeypatch, False)
    order = save_order([("onnxruntime", "int8"), ("eager", "fp32")], path=tmp_path / "order.json",
                       measured={"onnxruntime int8": 2.0})
    runner = create_runner(model, probe=x[:16], order_file=order, cache_dir=tmp_path)
    assert runner.name == "onnxruntime int8" and "order measured here" in runner.reason
    assert runner.agreement >= inference.AUTO_MIN_AGREEMENT
    # another machine's entry (another key) is kept beside ours, and does not apply here
    from vit.deploy import order as ordering
    monkeypatch.setattr(ordering, "machine", lambda device="cpu": {"cpu": "another"})
    assert ordering.measured_order(path=order) is None
    save_order([("eager", "int8")], path=order)
    monkeypatch.undo()
    assert ordering.measured_order(path=order) == [("onnxruntime", "int8"), ("eager", "fp32")]
    (tmp_path / "bad.json").write_text("{not json")
    assert ordering.measured_order(path=tmp_path / "bad.json") is None


def test_openvino_ir_is_converted_once_into_the_weight_keyed_cache(trained, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from vit.deploy import openvino_backend
    model, x, _ = trained
    first = create_runner(model, "openvino", "fp32", cache_dir=tmp_path)
    assert first.path.parent == tmp_path / "openvino" and first.path.with_suffix(".bin").is_file()
    monkeypatch.setattr(openvino_backend, "convert", lambda *a, **k: pytest.fail("converted again"))
    second = create_runner(model, "openvino", "fp32", cache_dir=tmp_path)
    assert second.path == first.path and torch.equal(second(x), first(x))
    int8 = create_runner(model, "openvino", "int8", probe=x[:16], calibration=x[:32], cache_dir=tmp_path)
    other = create_runner(model, "openvino", "int8", probe=x[:16], calibration=x[32:64], cache_dir=tmp_path)
    assert int8.path.name.startswith(first.path.stem + ".int8-") and other.path != int8.path  # keyed by calibration


def test_missing_openvino_is_a_clear_message(trained, monkeypatch):
    model, _, _ = trained
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match="openvino: not installed \\(pip install 'vit\\[openvino\\]'"):
        create_runner(model, "openvino", "fp32")


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
    eager = predict(model, paths, topk=1, batch_size=16, backend="eager", precision="fp32", workers=0)
    for backend, workers in (("onnxruntime", 1), ("auto", 2)):
        got = predict(model, paths, topk=1, batch_size=16, backend=backend, precision="fp32", workers=workers)
        assert [top[0][0] for top in got] == [top[0][0] for top in eager]
        assert [top[0][1] for top in got] == pytest.approx([top[0][1] for top in eager], abs=1e-5)
    int8 = predict(model, paths, topk=1, batch_size=16, backend="onnxruntime", precision="int8")
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


def test_predict_cli_prints_the_runner_it_chose_and_takes_overrides(digit_files, capsys):
    paths, directory = digit_files
    assert predict_cli.main([*paths[:4], "--checkpoint", str(directory)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"runner: \w+ (fp32|bf16|int8) \(auto: .*\)", err[0])
    assert predict_cli.main([*paths[:4], "--checkpoint", str(directory), "--backend", "eager", "--precision", "int8"]) == 0
    assert capsys.readouterr().err.strip() == "runner: eager int8 (as asked)"
    assert predict_cli.main([*paths[:4], "--checkpoint", str(directory), "--backend", "eager", "--quantize", "int8"]) == 0
    assert capsys.readouterr().err.strip() == "runner: eager int8 (as asked)"
    assert predict_cli.main([paths[0], "--checkpoint", str(directory), "--quantize", "int8", "--precision", "bf16"]) == 2
    assert "--quantize int8 and --precision bf16 disagree" in capsys.readouterr().err


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
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("runner: ")]
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "bad.png" in err[0] and "onnxruntime: not installed" in err[1] and "--batch-size" in err[2]


# ---- embeddings: compare="cosine" on an Embedder (backbone + pool) -------------------------------------------------
def test_cosine_verification_refuses_a_broken_embedder_in_one_line(trained, monkeypatch, tmp_path):
    from vit.features.backbone import Embedder
    model, x, _ = trained
    embedder = Embedder(model, "avg")
    noise = lambda model, precision, **_: inference.Runner("onnxruntime", precision, model,  # noqa: E731
                                                           lambda images: torch.randn(len(images), 32))
    monkeypatch.setitem(inference._BUILDERS, "onnxruntime", noise)
    with pytest.raises(VerificationError, match=r"onnxruntime fp32: cosine similarity >= 0.9999 with eager fp32 on "
                                                r"only 0 of 8 probe images, needs all \(lowest cosine"):
        create_runner(embedder, "onnxruntime", "fp32", probe=x[:8], compare="cosine")
    with pytest.raises(VerificationError, match="cosine similarity >= 0.99 with eager fp32 on only 0 of 8"):
        create_runner(embedder, "onnxruntime", "int8", probe=x[:8], compare="cosine")
    order = save_order([("onnxruntime", "fp32"), ("eager", "fp32")], path=tmp_path / "order.json")
    notes = []
    runner = create_runner(embedder, "auto", probe=x[:16], order_file=order, log=notes.append, compare="cosine")
    assert runner.name == "eager fp32" and len(notes) == 2 and notes[1].startswith("runner: eager fp32 (auto: ")
    assert re.fullmatch(r"note: onnxruntime fp32: cosine similarity >= 0.9999 with eager fp32 on only 0 of 16 probe "
                        r"images, needs all \(lowest cosine -?[0-9.]+, max \|output difference\| [0-9.]+\); trying "
                        r"eager fp32", notes[0]) and "top-1" not in notes[0]
    with pytest.raises(ValueError, match="compare: expected one of top1, cosine"):
        create_runner(embedder, "eager", "fp32", compare="l2")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("pool", ["cls", "avg", "tokens"])
def test_embedders_export_and_match_eager_by_cosine(trained, tmp_path, backend, pool):
    pytest.importorskip(backend, reason=f"the {backend} extra is not installed")
    from vit.features.backbone import Embedder
    model, x, _ = trained
    embedder = Embedder(model, pool)
    runner = create_runner(embedder, backend, "fp32", probe=x[:16], cache_dir=tmp_path, compare="cosine")
    assert runner.name == f"{backend} fp32" and runner.cosine >= inference.FP32_COSINE
    with torch.no_grad():
        want = embedder(x[:40])
    got = runner(x[:40])
    assert got.shape == want.shape == ((40, 32) if pool != "tokens" else (40, 16, 32))
    assert inference.cosine_similarities(got, want).min() > 0.9999 and (got - want).abs().max() < 1e-4


def test_an_embedder_never_shares_the_classifier_s_cached_export(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from vit.features.backbone import Embedder
    model, x, _ = trained
    keys = {inference.weights_key(model), *(inference.weights_key(Embedder(model, pool)) for pool in ("cls", "avg",
                                                                                                       "tokens"))}
    assert len(keys) == 4  # the classifier and each pool: four files
    assert "pool='avg'" in repr(Embedder(model, "avg").config) and repr(model.config) in repr(Embedder(model).config)
    classifier = create_runner(model, "onnxruntime", "fp32", cache_dir=tmp_path)
    embedder = create_runner(Embedder(model, "cls"), "onnxruntime", "fp32", cache_dir=tmp_path, compare="cosine")
    assert classifier.path != embedder.path and classifier(x[:2]).shape == (2, 10) and embedder(x[:2]).shape == (2, 32)
    # eager int8 quantises the wrapped blocks' linear layers too
    quantized = create_runner(Embedder(model, "avg"), "eager", "int8", probe=x[:16], compare="cosine")
    assert 0 < quantized.max_diff and quantized.cosine > 0.99
