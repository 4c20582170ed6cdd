"""Results people look at: `train.py predict` CSV, `vit predict`, the test report, attention maps."""
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, write_image_folder

import vit
from vit.commands import predict as predict_cli
from vit.commands import visualize
from vit.data import ImageDataModule
from vit.deploy.predict import load_model, predict
from vit.features.attention import attention_map, attention_rollout
from vit.training.cli import main as train_main

TINY = ["--model.backbone.embed_dim", "32", "--model.backbone.depth", "2", "--model.backbone.num_heads", "2", "--model.backbone.patch_size", "4",
        "--data.img_size", "16", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "imagefolder.yaml"


CLASSES = ["cat", "dog", "fox"]  # three, so a model that always answers one class is right a third of the time


@pytest.fixture
def image_folder(tmp_path):
    """train/ and val/ with 8 images per class; each class a bright square of its own colour and corner."""
    return write_image_folder(tmp_path / "images", classes=CLASSES)


@pytest.fixture
def trained(tmp_path, image_folder, monkeypatch):
    """A tiny model fitted on the cat/dog/fox folder through the CLI until it separates the classes (10 epochs of
    3 steps; 8 already reach 100 % validation accuracy): (run directory, last.ckpt)."""
    monkeypatch.chdir(tmp_path)
    app = train_main(["fit", "--config", str(RECIPE), "--data.root", str(image_folder), "--trainer.max_epochs", "10",
                      *TINY, "--model.lr", "0.003", "--model.warmup_epochs", "0", "--data.augment", "none"])
    return Path(app.trainer.log_dir), next(Path(app.trainer.log_dir).rglob("last.ckpt"))


def test_train_predict_writes_a_csv_of_topk_labels(trained, image_folder, tmp_path):
    _, ckpt = trained
    files = sorted(str(p) for p in (image_folder / "val").rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files[:3]) + "\n")
    written = []
    for source, expected in ((str(image_folder / "val"), files), (str(listing), files[:3])):
        app = train_main(["predict", "--config", str(RECIPE), "--data.root", str(image_folder), *TINY,
                          "--data.predict_path", source, "--ckpt_path", str(ckpt)])
        out = Path(app.trainer.log_dir) / "predictions.csv"
        rows = list(csv.reader(out.open()))
        # top-5 by default, so every class is listed: a ranking of all three
        assert rows[0] == ["file", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
        assert [r[0] for r in rows[1:]] == expected
        # each row is the model's own ranking for that file, computed here without Lightning
        own = predict(load_model(str(ckpt)), expected, topk=3, precision="fp32")  # Lightning ran fp32
        for row, ranking in zip(rows[1:], own):
            labels, probs = row[1::2], [float(p) for p in row[2::2]]
            assert labels == [name for name, _ in ranking], row[0]
            assert probs == pytest.approx([p for _, p in ranking], abs=1e-5), row[0]
            assert sorted(labels) == CLASSES and probs == sorted(probs, reverse=True)
            assert sum(probs) == pytest.approx(1, abs=1e-5)
        written.append(rows[1:])
    rows = written[0]  # the whole val folder
    correct = sum(r[1] == Path(r[0]).parent.name for r in rows)
    assert len(rows) == 24 and correct >= 22  # a trained model separates the squares; one constant class gets 8
    assert {r[1] for r in rows} == set(CLASSES)


def test_predict_entry_point_reads_ckpt_and_save_pretrained_directory(trained, image_folder, tmp_path, capsys):
    _, ckpt = trained
    cat = str(next((image_folder / "val" / "cat").glob("*.png")))
    directory = vit.save_pretrained(vit.load_pretrained(ckpt), tmp_path / "exported")
    outputs = []
    for checkpoint in (ckpt, directory):
        assert predict_cli.main([cat, cat, "--checkpoint", str(checkpoint), "--topk", "1"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"{cat}: ") and lines[0].split(": ")[1].split()[0] == "cat"
        outputs.append(lines)
    assert outputs[0] == outputs[1]  # same model, same normalisation, same answer


def test_predict_entry_point_errors_are_one_line_and_exit_code_2(trained, tmp_path, capsys):
    _, ckpt = trained
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert predict_cli.main(["x.png", "--checkpoint", str(bad)]) == 2
    assert predict_cli.main([str(tmp_path / "missing.png"), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and "missing.png" in err[1]


def test_test_writes_confusion_matrix_png_and_per_class_csv(trained, image_folder, tmp_path):
    _, ckpt = trained
    app = train_main(["test", "--config", str(RECIPE), "--data.root", str(image_folder), *TINY,
                      "--ckpt_path", str(ckpt)])
    run = Path(app.trainer.log_dir)
    png = run / "confusion_matrix.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((run / "per_class.csv").open()))
    assert [r["class"] for r in rows] == CLASSES and sum(int(r["support"]) for r in rows) == 24
    # the same numbers as scikit-learn's on the model's own answers for the test (= val) images
    from sklearn.metrics import precision_recall_fscore_support
    files = sorted(str(p) for p in (image_folder / "val").rglob("*.png"))
    answers = [ranking[0][0] for ranking in predict(load_model(str(ckpt)), files, topk=1, precision="fp32")]
    truth = [Path(f).parent.name for f in files]
    expected = precision_recall_fscore_support(truth, answers, labels=CLASSES, zero_division=0)
    for i, row in enumerate(rows):
        got = [float(row[k]) for k in ("precision", "recall", "f1")] + [int(row["support"])]
        assert got == pytest.approx([float(expected[j][i]) for j in range(4)], abs=1e-4), row


def test_visualize_writes_an_attention_overlay_png(trained, image_folder, tmp_path, capsys):
    _, ckpt = trained
    image = str(next((image_folder / "val" / "dog").glob("*.png")))
    for method in ("rollout", "last"):
        out = tmp_path / f"attn_{method}.png"
        assert visualize.main([image, "--checkpoint", str(ckpt), "--out", str(out), "--method", method]) == 0
        assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert visualize.main([image, "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}], ids=["class token", "class token and 2 registers"])
def test_attention_rollout_is_a_distribution_over_patches(extra):
    # every parameter random, so that attention is far from uniform and differs between heads and blocks
    model = randomize_(vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=3, **extra)).eval()
    prefix = model.num_prefix_tokens  # class token (and registers) first, then the 4x4 patches
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = model.attention_maps(x)
    rollout = attention_rollout(maps, prefix)
    assert rollout.shape == (2, 16) and (rollout >= 0).all() and (rollout.sum(-1) <= 1 + 1e-5).all()
    # the maps are each block's own attention: block 1's over block 0's output
    with torch.no_grad():
        tokens = model._embed(x)
        for block, got in zip(model.blocks, maps):
            assert got.shape == (2, 2, prefix + 16, prefix + 16)
            torch.testing.assert_close(got, block.attn.attention_map(block.norm1(tokens)))
            tokens = block(tokens)
    # Abnar & Zuidema (2020) by hand: per block, heads averaged, identity added (the residual), rows renormalised;
    # the class token's row after block 1 is its attention over block 1's inputs, each of which is a row of
    # block 0's matrix over the image tokens: rollout[k] = sum_j A1[0, j] A0[j, k], then patches only
    eye = torch.eye(prefix + 16)
    a0, a1 = [(m.mean(dim=1) + eye) / (m.mean(dim=1) + eye).sum(dim=-1, keepdim=True) for m in maps]
    expected = torch.einsum("bj,bjk->bk", a1[:, 0], a0)[:, prefix:]
    torch.testing.assert_close(rollout, expected)
    # a wrong implementation would show: the heads differ, and so does the other order of the blocks
    assert (maps[0][:, 0] - maps[0][:, 1]).abs().max() > 0.1
    assert (torch.einsum("bj,bjk->bk", a0[:, 0], a1)[:, prefix:] - expected).abs().max() > 1e-2
    # "last": block 1's class-token row, heads averaged, without identity
    torch.testing.assert_close(attention_rollout(maps, prefix, "last"), maps[1].mean(dim=1)[:, 0, prefix:])
    # the heat map: the rollout on its 4x4 grid, upsampled bilinearly to the image, scaled to [0, 1] per image
    heat = attention_map(model, x, "rollout")
    up = F.interpolate(expected.reshape(2, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(heat, (up - low) / (high - low))
    heat = attention_map(model, torch.randn(1, 3, 16, 16), "last")
    assert heat.shape == (1, 16, 16) and heat.min() == 0 and heat.max() == pytest.approx(1)


def test_predict_path_without_a_value_is_a_clear_error(image_folder):
    dm = ImageDataModule("imagefolder", root=str(image_folder), img_size=16)
    with pytest.raises(ValueError, match="data.predict_path"):
        dm.setup("predict")
    dm = ImageDataModule("imagefolder", root=str(image_folder), img_size=16, predict_path=str(image_folder / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.setup("predict")


@pytest.mark.slow
def test_predict_compile_option_gives_the_eager_answers(trained, image_folder, capsys):
    _, ckpt = trained
    images = [str(p) for p in sorted((image_folder / "val").rglob("*.png"))[:2]]
    fp32 = ["--checkpoint", str(ckpt), "--topk", "2", "--precision", "fp32"]
    assert predict_cli.main([*images, *fp32, "--backend", "eager"]) == 0
    eager = capsys.readouterr().out
    assert predict_cli.main([*images, *fp32, "--compile"]) == 0
    assert capsys.readouterr().out == eager
