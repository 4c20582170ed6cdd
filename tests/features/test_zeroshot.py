"""Zero-shot classification: ``zeroshot_classifier`` equals open_clip's ``build_zero_shot_classifier`` for the same
model, names and templates; ``vit zeroshot`` on a labelled folder reports the accuracy a hand computation (open_clip's
own model, its own classifier, the same preprocessing) gives. Search by text: ``vit embed --pool proj`` writes image
features in the joint space, ``vit search --text`` ranks them as open_clip's own text features do, and a query model
other than the index's is refused."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import randomize_, write_image_folder
from safetensors.torch import save_file

import vit
from vit.commands import main
from vit.data.images import load_image
from vit.data.transforms import eval_transform
from vit.features.templates import OPENAI_IMAGENET, SIMPLE
from vit.features.zeroshot import classify_images, read_class_names, read_templates, zeroshot_classifier

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_classifier import build_zero_shot_classifier

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)  # open_clip's own vocabulary
VISION = dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
CLASSES = ["cat", "dog", "bird"]


def _clip_dir(root, seed=0):
    """A random open_clip CLIP (std 0.1 keeps the 49408-token embedding's features spread out) as an open_clip
    repository directory, and the reference itself."""
    reference = randomize_(CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**VISION), text_cfg=CLIPTextCfg(**TEXT)),
                           seed=seed, std=0.1).eval()
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT},
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    save_file(reference.state_dict(), root / "open_clip_model.safetensors")
    return root, reference


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _clip_dir(tmp_path_factory.mktemp("clip") / "model")


@pytest.mark.parametrize("templates", [SIMPLE, OPENAI_IMAGENET[:7], [lambda c: f"itap of a {c}.", lambda c: f"a {c} photo"]],
                         ids=["simple", "openai-7", "callables"])
def test_zeroshot_classifier_equals_open_clips(clip_dir, templates):
    root, reference = clip_dir
    model = vit.load_image_text(root)
    names = ["cat", "dog", "bird", "red car", "東京", "a very long class name " * 4] * 2  # 12: two class batches
    ours = vit.zeroshot_classifier(model, names, list(templates))
    theirs = build_zero_shot_classifier(reference, SimpleTokenizer(context_length=16), names, list(templates))
    assert ours.shape == theirs.shape == (16, len(names))
    assert theirs.std() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-5


def _hand_accuracy(reference, folder, class_names):
    """open_clip's model and classifier, our documented preprocessing (resize, centre crop, mean/std 0.5), argmax."""
    weights = build_zero_shot_classifier(reference, SimpleTokenizer(context_length=16), class_names, list(SIMPLE))
    transform = eval_transform(32, [0.5] * 3, [0.5] * 3)
    correct = total = 0
    predictions = {}
    for label, name in enumerate(class_names):
        for path in sorted((folder / name).glob("*.png")):
            image = transform(image=load_image(path, 3))["image"][None]
            with torch.no_grad():
                predicted = int((reference.encode_image(image, normalize=True) @ weights).argmax())
            predictions[str(path)] = class_names[predicted]
            correct += predicted == label
            total += 1
    return correct / total, predictions


def test_vit_zeroshot_on_a_labelled_folder(clip_dir, tmp_path, capsys):
    root, reference = clip_dir
    folder = write_image_folder(tmp_path / "images", classes=CLASSES, per_class=4, size=40, splits=("",))
    # fp32 (on whichever backend auto finds fastest here): compared with open_clip's own answers, so no bf16 near ties
    code = main(["zeroshot", str(folder), "--checkpoint", str(root), "--templates", "simple", "--topk", "2",
                 "--out", str(tmp_path / "out"), "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    expected, predictions = _hand_accuracy(reference, folder, CLASSES)
    assert f"accuracy {expected:.4f} ({round(expected * 12)}/12 images)" in out
    with open(tmp_path / "out" / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["file", "label_1", "prob_1", "label_2", "prob_2"]
    assert {row["file"]: row["label_1"] for row in rows} == predictions
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 0
    with open(tmp_path / "out" / "per_class.csv", encoding="utf-8") as f:
        support = {row["class"]: int(row["support"]) for row in csv.DictReader(f)}
    assert support == {name: 4 for name in CLASSES}


def test_classes_given_relabel_the_folders_and_unlabelled_images_have_no_accuracy(clip_dir, tmp_path, capsys):
    root, _ = clip_dir
    folder = write_image_folder(tmp_path / "images", classes=["dog", "cat"], per_class=2, size=40, splits=("",))
    model = vit.load_image_text(root)
    names = ["cat", "dog", "bird"]
    result = classify_images(model, folder, zeroshot_classifier(model, names, "simple"), names)
    assert result.folder_classes == ["cat", "dog"]
    assert [names[i] for i in result.labels.tolist()] == ["cat"] * 2 + ["dog"] * 2
    assert torch.allclose(result.probabilities.sum(1), torch.ones(4), atol=1e-5)  # CLIP: softmax over classes
    code = main(["zeroshot", str(folder / "cat"), "--checkpoint", str(root), "--classes", "cat,dog",
                 "--templates", "simple", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "accuracy" not in out and out.count(": cat ") + out.count(": dog ") == 2


@pytest.mark.parametrize("argv,message", [
    (["--classes", "cat"], "expected at least two class names"),
    (["--classes", "cat,cat,dog"], "class names repeated: cat"),
    (["--classes", "cat,dog", "--templates", "nope.txt"], "expected openai, simple or a text file"),
    ([], "give the class names with --classes"),
    (["--classes", "cat,dog", "--topk", "0"], "--topk: expected a positive integer"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(clip_dir, tmp_path, capsys, argv, message):
    root, _ = clip_dir
    image = write_image_folder(tmp_path / "images", classes=["x"], per_class=1, splits=("",)) / "x" / "0.png"
    assert main(["zeroshot", str(image), "--checkpoint", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_templates_and_class_files(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# mine\na sketch of a {}.\n\nthe {} in the wild\n")
    assert read_templates(path) == ["a sketch of a {}.", "the {} in the wild"]
    path.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one '{}'"):
        read_templates(path)
    names = tmp_path / "names.txt"
    names.write_text("cat\n dog \n\n")
    assert read_class_names(classes_file=names) == ["cat", "dog"]
    assert len(OPENAI_IMAGENET) == 80 and all(t.count("{}") == 1 for t in OPENAI_IMAGENET)


def test_a_model_without_tokenizer_says_how_to_get_one(clip_dir):
    root, _ = clip_dir
    model = vit.load_image_text(root)
    model.tokenizer = None
    with pytest.raises(RuntimeError, match="has no tokenizer"):
        zeroshot_classifier(model, ["cat", "dog"], "simple")


# ---- search by text ------------------------------------------------------------------------------------------------
def test_search_by_text_in_the_joint_space(clip_dir, tmp_path, capsys):
    from vit.commands.search import main as search
    from vit.features import Features, extract_features
    root, reference = clip_dir
    folder = write_image_folder(tmp_path / "images", classes=CLASSES, per_class=3, size=40, splits=("",))
    index = tmp_path / "feats.safetensors"
    assert main(["embed", str(folder), "--checkpoint", str(root), "--pool", "proj", "--out", str(index),
                 "--no-progress", "--precision", "fp32"]) == 0  # compared with open_clip's to 1e-4 below
    capsys.readouterr()
    feats = Features.load(index)
    transform = eval_transform(32, [0.5] * 3, [0.5] * 3)
    images = torch.stack([transform(image=load_image(p, 3))["image"] for p in feats.paths])
    with torch.no_grad():  # the joint space: open_clip's own image embedding
        assert (feats.features - reference.encode_image(images)).abs().max() <= 1e-4
        query = reference.encode_text(SimpleTokenizer(context_length=16)(["a photo of a red car"]))
    expected = torch.nn.functional.cosine_similarity(query, feats.features).topk(4).indices.tolist()
    assert search(["--text", "a photo of a red car", "--index", str(index), "--k", "4",
                   "--out", str(tmp_path / "grid.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines[:4]] == [feats.paths[i] for i in expected]
    assert (tmp_path / "grid.png").stat().st_size > 1000
    # image queries still work on the same index, with the query image itself first
    assert search([feats.paths[5], "--index", str(index), "--k", "1", "--out", str(tmp_path / "g2.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(feats.paths[5])

    # another model's query is refused, naming both; a cls index cannot take text
    other, _ = _clip_dir(tmp_path / "other", seed=1)
    for argv in (["--text", "a cat"], [feats.paths[0]]):
        assert search([*argv, "--index", str(index), "--checkpoint", str(other)]) == 2
        err = capsys.readouterr().err
        assert f"made by {root}" in err and str(other) in err and "not comparable" in err
    extract_features(str(root), str(folder), out=tmp_path / "cls.safetensors",
                     accelerator="cpu")
    assert search(["--text", "a cat", "--index", str(tmp_path / "cls.safetensors")]) == 2
    assert "--pool cls image features, outside the joint image-text space" in capsys.readouterr().err
    assert search(["--index", str(index)]) == 2
    assert "give a query image or --text" in capsys.readouterr().err


def test_pool_proj_needs_a_text_tower(tmp_path):
    from vit.features import extract_features
    folder = write_image_folder(tmp_path / "images", classes=["a"], per_class=1, size=32, splits=("",))
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="--pool proj: the joint image-text space needs a CLIP / SigLIP checkpoint"):
        extract_features(model, str(folder), pool="proj", accelerator="cpu")
    vit.save_pretrained(model, tmp_path / "vit")
    with pytest.raises(vit.CheckpointError, match="no text tower found"):
        extract_features(str(tmp_path / "vit"), str(folder), pool="proj", accelerator="cpu")


# ---- the image tower on create_runner ------------------------------------------------------------------------------
def test_zeroshot_prints_its_runner_once_and_onnxruntime_matches_eager(clip_dir, tmp_path, capsys):
    import re
    pytest.importorskip("onnxruntime")
    root, _ = clip_dir
    folder = write_image_folder(tmp_path / "images", classes=CLASSES, per_class=2, size=40, splits=("",))
    model = vit.load_image_text(root)
    weights = zeroshot_classifier(model, CLASSES, "simple")
    eager = classify_images(model, folder, weights, CLASSES, backend="eager", precision="fp32", log=lambda line: None)
    notes = []
    ort = classify_images(model, folder, weights, CLASSES, backend="onnxruntime", precision="fp32", log=notes.append)
    assert notes == ["runner: onnxruntime fp32 (as asked)"] and ort.files == eager.files
    assert (ort.probabilities - eager.probabilities).abs().max() < 1e-4
    with torch.no_grad():  # the runner's image tower is the model's own encode_image
        from vit.features.backbone import Embedder
        images = torch.stack([eval_transform(32, [0.5] * 3, [0.5] * 3)(image=load_image(p, 3))["image"]
                              for p in eager.files])
        assert torch.allclose(Embedder(model.visual, "proj")(images), model.encode_image(images), atol=1e-6)
    for flags in (["--backend", "eager", "--precision", "fp32"], ["--backend", "onnxruntime"], []):
        assert main(["zeroshot", str(folder), "--checkpoint", str(root), "--templates", "simple",
                     "--out", str(tmp_path / "out"), *flags]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("runner:")]
        assert len(lines) == 1 and re.fullmatch(r"runner: \w+ (fp32|bf16|int8) \((as asked|auto: .*)\)", lines[0])
        assert flags[1:2] in ([], [lines[0].split()[1]])
