"""Frozen-feature tasks: pooling, kNN, linear probe, feature files, the cache, vit.commands.embed / vit.commands.probe / vit.commands.search."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

import vit
from vit.features import Features, extract_features, knn_classify, linear_probe, nearest, pool_tokens, probe_backbone
from vit.features.backbone import load_backbone
from vit.tasks.backbone import Backbone

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def small_backbone(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = vit.VisionTransformer(**{**SMALL, "num_classes": 0, **overrides})
    return vit.save_pretrained(model, path, mean=[0.5] * 3, std=[0.5] * 3)


def write_digits_split(root: Path, train_per_class: int = 40) -> tuple[Path, tuple]:
    """The digits of the training recipe's split as an image folder: ``train/`` from its training part (the first
    ``train_per_class`` of each digit), ``val/`` = its whole test part (359 images no model here trained on)."""
    from vit.data import ImageDataModule
    data = ImageDataModule("digits", img_size=16)
    data.setup("fit")
    for split, subset in (("train", data.train_set), ("val", data.test_set)):
        counts: dict[int, int] = {}
        for i in subset.indices:
            label = int(subset.labels[i])
            if split == "train" and counts.get(label, 0) >= train_per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(subset.images[i]).save(folder / f"{i}.png")
    return root, (data.mean, data.std)


# ---- pure pieces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [dict(), dict(global_pool="avg"), dict(global_pool="map", class_token=False),
                                  dict(reg_tokens=2)])
def test_pools_are_the_model_s_own_where_they_coincide(arch):
    torch.manual_seed(0)
    model = vit.VisionTransformer(**{**SMALL, "num_classes": 0, **arch}).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 16, 16))
        own = model.forward_head(tokens, pre_logits=True)
        pool = {"token": "cls", "avg": "avg", "map": "map"}[model.global_pool]
        assert torch.allclose(pool_tokens(model, tokens, pool), own, atol=1e-6)
        patches = pool_tokens(model, tokens, "tokens")
        assert patches.shape == (2, 16, 32)  # 4x4 patches; class and register tokens left out
        assert torch.equal(patches, tokens[:, model.num_prefix_tokens:])
        if model.cls_token is None:  # cls without a class token: the model's own pooling
            assert torch.allclose(pool_tokens(model, tokens, "cls"), own)
        else:
            assert torch.equal(pool_tokens(model, tokens, "cls"), model.fc_norm(tokens[:, 0]))


def test_knn_is_the_dino_vote():
    g = torch.Generator().manual_seed(0)
    train, labels, queries = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g), \
        torch.randn(30, 8, generator=g)
    got = knn_classify(train, labels, queries, k=7, temperature=0.07, num_classes=4, batch_size=8)
    a = train / train.norm(dim=1, keepdim=True)
    for q, prediction in zip(queries, got.tolist()):
        sims = a @ (q / q.norm())
        votes = np.zeros(4)
        for j in sims.argsort(descending=True)[:7].tolist():
            votes[labels[j]] += np.exp(sims[j].item() / 0.07)
        assert prediction == votes.argmax()
    assert knn_classify(train, labels, train, k=1).tolist() == labels.tolist()  # each is its own nearest


def test_linear_probe_tunes_on_the_training_split_and_generalises():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(150) % 3
    x = centres[y] + torch.randn(150, 16, generator=g)
    probe = linear_probe(x[:100], y[:100])
    assert set(probe.sweep) == {0.01, 0.1, 1.0, 10.0, 100.0} and probe.C in probe.sweep
    assert (probe.predict(x[100:]) == y[100:]).float().mean() > 0.95
    tiny = linear_probe(x[:3], y[:3])  # one image per class: nothing to hold out, so C=1 without a sweep
    assert tiny.sweep == {} and tiny.C == 1.0


def test_feature_file_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file
    paths = ["a/ü 1.png", "b/2.png", "c/3.png"]
    Features(torch.randn(3, 5), paths, torch.tensor([0, 1, 1]), ["x", "y"], {"pool": "avg"},
             [("bad.png", "empty file")]).save(tmp_path / "f.safetensors")
    tensors = load_file(tmp_path / "f.safetensors")
    assert tensors["features"].shape == (3, 5) and tensors["labels"].tolist() == [0, 1, 1]
    assert bytes(tensors["paths"].numpy()).decode().split("\0") == paths
    back = Features.load(tmp_path / "f.safetensors")
    assert back.paths == paths and back.class_names == ["x", "y"] and back.skipped == [("bad.png", "empty file")]
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Features.load(tmp_path / "junk.safetensors")


# ---- the headline: a trained backbone separates digits, a random one of the same shape much less ---------------
@pytest.mark.slow  # ~10-25 s: trains a tiny ViT on digits for 8 epochs, then probes it against random weights
def test_probe_ranks_a_trained_backbone_above_a_random_one_on_digits(tmp_path, capsys):
    import lightning as L

    from vit.commands.probe import main
    from vit.data import ImageDataModule
    from vit.tasks.classification import ImageClassifier

    L.seed_everything(0)
    # average pooling, no class token: learns digits fastest (0.86 val accuracy after 8 epochs), and `--pool cls`
    # (the default) then falls back to the model's own pooling
    data = ImageDataModule("digits", img_size=16, batch_size=32, augment="none")
    module = ImageClassifier(Backbone(global_pool="avg", class_token=False, **{**SMALL, "depth": 2, "embed_dim": 48}),
                             num_classes=10, lr=3e-3, warmup_epochs=0.5, label_smoothing=0.0)
    L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=data)
    trained = vit.save_pretrained(module.model, tmp_path / "trained", mean=list(data.mean), std=list(data.std))
    root, _ = write_digits_split(tmp_path / "digits", train_per_class=40)

    out = tmp_path / "report"
    code = main(["--data.root", str(root), "--backbone", str(trained), "--backbone", f"random:{trained}",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| backbone | kNN top-1 | linear top-1 | img/s | dim |" in printed
    with open(out / "probe.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["backbone"] for r in rows] == [str(trained), f"random:{trained}"]  # the order given
    ours, random = ({k: float(v) for k, v in r.items() if k != "backbone"} for r in rows)
    assert ours["dim"] == random["dim"] == 48 and ours["img_per_s"] > 0
    assert ours["knn_top1"] > 0.7 and ours["linear_top1"] > 0.7  # chance is 0.1
    assert ours["knn_top1"] > random["knn_top1"] + 0.05 and ours["linear_top1"] > random["linear_top1"] + 0.05
    assert (out / "probe.png").stat().st_size > 1000


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    import vit.features.compare as compare
    root = write_image_folder(tmp_path / "images", per_class=6, size=16)
    backbone = str(small_backbone(tmp_path / "bb"))
    train = [(str(p), int(p.parent.name == "dog")) for p in sorted((root / "train").rglob("*.png"))]
    val = [(str(p), int(p.parent.name == "dog")) for p in sorted((root / "val").rglob("*.png"))]
    calls = []

    def counting(backbone, images, **kwargs):
        calls.append(len(images))
        return extract_features(backbone, images, **kwargs)

    monkeypatch.setattr(compare, "extract_features", counting)
    options = dict(cache_dir=tmp_path / "cache", accelerator="cpu", k=3)
    first = probe_backbone(backbone, train, val, ["cat", "dog"], **options)
    assert calls == [12, 12] and not first.cached
    second = probe_backbone(backbone, train, val, ["cat", "dog"], **options)
    assert calls == [12, 12] and second.cached  # nothing extracted, nothing loaded
    assert (second.knn_top1, second.linear_top1, second.dim) == (first.knn_top1, first.linear_top1, first.dim)

    changed = Path(val[0][0])
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = probe_backbone(backbone, train, val, ["cat", "dog"], **options)
    assert calls == [12, 12, 12] and not third.cached  # the val split again; train still from the cache
    assert probe_backbone(backbone, train, val, ["cat", "dog"], img_size=24, **options).cached is False  # new size


# ---- vit.commands.embed ---------------------------------------------------------------------------------------------
def test_embed_writes_paths_labels_and_skips_unreadable_images(tmp_path, monkeypatch, capsys):
    from vit.commands.embed import main
    root = write_image_folder(tmp_path / "images", per_class=3, size=20, splits=("",))
    (root / "cat" / "empty.png").write_bytes(b"")  # found by the header scan
    import vit.features.extract as extract
    real = extract.load_image

    def failing(path, in_chans=3):  # a file whose header is sound but whose pixels fail to decode
        if Path(path).name == "1.png" and Path(path).parent.name == "dog":
            raise vit.data.BadImageError(path, "broken data stream")
        return real(path, in_chans)

    monkeypatch.setattr(extract, "load_image", failing)
    out = tmp_path / "out" / "feats.safetensors"
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        code = main([str(root), "--checkpoint", str(small_backbone(tmp_path / "bb")), "--out", str(out),
                     "--pool", "avg", "--img-size", "24", "--batch-size", "2", "--no-progress", "--accelerator", "cpu",
                     "--backend", "eager", "--precision", "fp32"])
    assert code == 0
    printed = capsys.readouterr()
    assert "wrote 5 embeddings of shape (32,) (avg, 2 classes)" in printed.out
    assert [line for line in printed.err.splitlines() if line.startswith("runner:")] == ["runner: eager fp32 (as asked)"]
    feats = Features.load(out)
    names = [f"{Path(p).parent.name}/{Path(p).name}" for p in feats.paths]
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png"]
    assert feats.labels.tolist() == [0, 0, 0, 1, 1] and feats.class_names == ["cat", "dog"]
    assert sorted(Path(p).name for p, _ in feats.skipped) == ["1.png", "empty.png"]  # recorded in the file too
    assert feats.meta["img_size"] == [24, 24] and feats.meta["pool"] == "avg" and feats.meta["mean"] == [0.5] * 3
    assert feats.meta["runner"] == "eager fp32"
    skipped = (out.parent / "feats.skipped.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 2)[-2] + "/" + line.split("\t")[0].rsplit("/", 1)[-1]
                  for line in skipped) == ["cat/empty.png", "dog/1.png"]

    # each image's embedding is the one the model gives it alone
    model = vit.features.backbone.at_image_size(load_backbone(str(tmp_path / "bb")), 24)
    from vit.deploy.predict import preprocess
    with torch.no_grad():
        alone = pool_tokens(model, model.forward_features(preprocess(model, feats.paths[:1])), "avg")
    assert torch.allclose(feats.features[:1], alone, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["missing_dir", "--checkpoint", "BB", "--out", "f.safetensors"], "missing_dir: no such image"),
    (["IMAGES", "--checkpoint", "no_such.ckpt", "--out", "f.safetensors"], "no_such.ckpt"),
    (["IMAGES", "--checkpoint", "BB", "--out", "f.safetensors", "--pool", "map"], "--pool map: the backbone has no"),
    (["IMAGES", "--checkpoint", "BB", "--out", "f.safetensors", "--batch-size", "0"], "--batch-size"),
])
def test_embed_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    from vit.commands.embed import main
    root = write_image_folder(tmp_path / "images", per_class=1, size=16, splits=("",))
    bb = small_backbone(tmp_path / "bb")
    argv = [{"IMAGES": str(root), "BB": str(bb)}.get(a, a) for a in argv]
    argv = [str(tmp_path / a) if a in ("missing_dir", "no_such.ckpt") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow  # two fresh interpreters (torch + Lightning imports) under gloo: ~20 s
def test_embed_with_two_ddp_processes_yields_every_image_exactly_once(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=5, size=16, splits=("",))
    bb = small_backbone(tmp_path / "bb")
    out = tmp_path / "feats.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vit", "embed", str(root), "--checkpoint", str(bb), "--out", str(out),
                           "--accelerator", "cpu", "--devices", "2", "--batch-size", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 15 embeddings") == 1  # printed once, by rank 0
    # two processes: Lightning runs the model eagerly, and says so once
    assert [line for line in proc.stderr.splitlines() if line.startswith("runner:")] == [
        "runner: eager fp32 (auto: accelerator cpu, devices 2, run by Lightning)"]
    merged = Features.load(out)
    every = sorted(str(p) for p in root.rglob("*.png"))
    assert merged.meta["images_per_rank"] == [8, 7]  # each rank embedded its share...
    assert merged.paths == every  # ...and the merge holds each image exactly once, in input order
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []  # the ranks' parts merged and removed
    alone = extract_features(str(bb), str(root), accelerator="cpu", backend="eager", precision="fp32")
    assert alone.paths == merged.paths and torch.allclose(alone.features, merged.features, atol=1e-5)
    assert merged.labels.tolist() == alone.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5


# ---- vit.commands.search --------------------------------------------------------------------------------------------
def test_search_finds_the_query_itself_first(tmp_path, capsys):
    from vit.commands.search import main
    root = write_image_folder(tmp_path / "images", per_class=4, size=16, splits=("",))
    bb = small_backbone(tmp_path / "bb", seed=1)
    index = tmp_path / "feats.safetensors"
    extract_features(str(bb), str(root), out=index, accelerator="cpu")
    query = str(root / "dog" / "2.png")
    assert main([query, "--index", str(index), "--k", "3", "--out", str(tmp_path / "n.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rank, score, path = lines[0].split("\t")
    assert (rank, path) == ("1", query) and float(score) > 0.9999
    assert len(lines) == 4 and (tmp_path / "n.png").stat().st_size > 1000
    _, rows = nearest(Features.load(index).features, torch.eye(32)[:1], k=100)
    assert rows.shape == (1, 8)  # k capped at the index size

    extract_features(str(bb), str(root), pool="tokens", out=tmp_path / "tokens.safetensors", accelerator="cpu")
    assert main([query, "--index", str(tmp_path / "tokens.safetensors")]) == 2
    assert "per-token features" in capsys.readouterr().err


# ---- every feature command on create_runner ------------------------------------------------------------------------
RUNNER_LINE = r"runner: (eager|compile|onnxruntime|openvino) (fp32|bf16|int8) \((as asked|auto: .*)\)"


def _runner_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("runner:")]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def test_embed_prints_its_runner_once_and_onnxruntime_matches_eager(tmp_path, capsys):
    import re

    from vit.commands.embed import main
    pytest.importorskip("onnxruntime")
    root = write_image_folder(tmp_path / "images", per_class=4, size=16, splits=("",))
    bb = str(small_backbone(tmp_path / "bb"))
    feats = {}
    for name, flags in (("eager", ["--backend", "eager", "--precision", "fp32"]), ("ort", ["--backend", "onnxruntime"]),
                        ("auto", [])):
        out = tmp_path / f"{name}.safetensors"
        assert main([str(root), "--checkpoint", bb, "--out", str(out), "--no-progress", "--accelerator", "cpu",
                     *flags]) == 0
        lines = _runner_lines(capsys.readouterr().err)
        assert len(lines) == 1 and re.fullmatch(RUNNER_LINE, lines[0]), lines
        feats[name] = Features.load(out)
        assert feats[name].meta["runner"] == " ".join(lines[0].split()[1:3])
    assert _runner_lines(f"runner: {feats['eager'].meta['runner']}") == ["runner: eager fp32"]
    assert feats["ort"].meta["runner"] == "onnxruntime fp32"
    assert _cosine(feats["ort"].features, feats["eager"].features) > 0.999
    assert _cosine(feats["auto"].features, feats["eager"].features) > 0.99


def test_auto_never_picks_bf16_where_it_is_not_native(tmp_path, monkeypatch, capsys):
    from vit.commands.embed import main
    from vit.deploy import runners
    monkeypatch.setattr(runners, "native_bf16", lambda device: (False, "mocked CPU"))
    root = write_image_folder(tmp_path / "images", per_class=2, size=16, splits=("",))
    out = tmp_path / "f.safetensors"
    assert main([str(root), "--checkpoint", str(small_backbone(tmp_path / "bb")), "--out", str(out), "--no-progress",
                 "--accelerator", "cpu"]) == 0
    lines = _runner_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "bf16" not in lines[0] and "bf16" not in Features.load(out).meta["runner"]
    assert main([str(root), "--checkpoint", str(small_backbone(tmp_path / "bb")), "--out", str(out), "--no-progress",
                 "--accelerator", "cpu", "--precision", "bf16"]) == 2
    assert "precision bf16: not native here (mocked CPU)" in capsys.readouterr().err


def test_several_devices_run_eager_in_lightning_and_refuse_other_backends():
    from vit.features.running import embedding_runner, one_cpu_process
    model = vit.VisionTransformer(**{**SMALL, "num_classes": 0})
    assert one_cpu_process({"accelerator": "cpu", "devices": 1}) and not one_cpu_process({"accelerator": "cpu",
                                                                                           "devices": 2})
    notes = []
    assert embedding_runner(model, "cls", None, log=notes.append,
                            trainer_options={"accelerator": "cpu", "devices": 2}) is None
    assert notes == ["runner: eager fp32 (auto: accelerator cpu, devices 2, run by Lightning)"]
    with pytest.raises(ValueError, match="--backend onnxruntime: runs in one process on the CPU only"):
        embedding_runner(model, "cls", None, backend="onnxruntime", trainer_options={"accelerator": "cpu",
                                                                                     "devices": 2})


def test_probe_prints_one_runner_line_per_backbone_and_onnxruntime_matches_eager(tmp_path, monkeypatch, capsys):
    import re

    import vit.features.compare as compare
    from vit.commands.probe import main
    pytest.importorskip("onnxruntime")
    root = write_image_folder(tmp_path / "images", per_class=6, size=16)
    bb = str(small_backbone(tmp_path / "bb"))
    extracted = []

    def recording(*args, **kwargs):
        extracted.append(extract_features(*args, **kwargs))
        return extracted[-1]

    monkeypatch.setattr(compare, "extract_features", recording)
    for flags in (["--backend", "eager", "--precision", "fp32"], ["--backend", "onnxruntime"]):
        assert main(["--data.root", str(root), "--backbone", bb, "--out", str(tmp_path / "report"), "--k", "3",
                     "--no-cache", "--no-progress", "--accelerator", "cpu", *flags]) == 0
        lines = _runner_lines(capsys.readouterr().err)
        assert len(lines) == 1 and re.fullmatch(RUNNER_LINE, lines[0]) and flags[1] in lines[0], lines
    assert [f.meta["runner"] for f in extracted] == ["eager fp32"] * 2 + ["onnxruntime fp32"] * 2  # train, val
    for eager, ort in zip(extracted[:2], extracted[2:]):
        assert eager.paths == ort.paths and _cosine(ort.features, eager.features) > 0.999
    # from the cache: no runner built, the result says which runner made the features
    options = dict(cache_dir=tmp_path / "cache", accelerator="cpu", k=3, backend="eager", precision="fp32")
    train = [(str(p), int(p.parent.name == "dog")) for p in sorted((root / "train").rglob("*.png"))]
    val = [(str(p), int(p.parent.name == "dog")) for p in sorted((root / "val").rglob("*.png"))]
    probe_backbone(bb, train, val, ["cat", "dog"], **options)
    capsys.readouterr()
    again = probe_backbone(bb, train, val, ["cat", "dog"], **options)
    assert again.cached and again.runner == "eager fp32" and _runner_lines(capsys.readouterr().err) == []


def test_search_prints_its_runner_once_and_onnxruntime_matches_eager(tmp_path, capsys):
    import re

    from vit.commands.search import main
    from vit.features.search import embed_query
    pytest.importorskip("onnxruntime")
    root = write_image_folder(tmp_path / "images", per_class=4, size=16, splits=("",))
    bb = small_backbone(tmp_path / "bb", seed=1)
    index = tmp_path / "feats.safetensors"
    extract_features(str(bb), str(root), out=index, accelerator="cpu", backend="eager", precision="fp32")
    capsys.readouterr()
    query = str(root / "cat" / "1.png")
    meta = Features.load(index).meta
    eager = embed_query(meta, query, backend="eager", precision="fp32", log=lambda line: None)
    notes = []
    ort = embed_query(meta, query, backend="onnxruntime", probe_paths=Features.load(index).paths, log=notes.append)
    assert len(notes) == 1 and re.fullmatch(RUNNER_LINE, notes[0]) and notes[0].startswith("runner: onnxruntime fp32")
    assert _cosine(ort, eager) > 0.999
    for flags in (["--backend", "eager", "--precision", "fp32"], ["--backend", "onnxruntime"], []):
        assert main([query, "--index", str(index), "--k", "2", "--out", str(tmp_path / "n.png"), *flags]) == 0
        printed = capsys.readouterr()
        lines = _runner_lines(printed.err)
        assert len(lines) == 1 and re.fullmatch(RUNNER_LINE, lines[0]), lines
        assert printed.out.splitlines()[0].split("\t")[2] == query
