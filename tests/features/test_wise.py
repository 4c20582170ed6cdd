"""Zero-shot-initialised fine-tuning and WiSE-FT: epoch 0 scores the zero-shot accuracy; alpha 0 and 1 give back the
two endpoints' logits exactly; vit wise writes the ensemble and the sweep."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import vit
from vit.data import ImageDataModule
from vit.data.image_text import DIGIT_WORDS, ImageTextDataModule
from vit.features.wise import wise_ft, zeroshot_head_model
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ImageClassifier
from vit.tasks.image_text import ImageTextModule, TextTower

TEMPLATES = ["a photo of the digit {}.", "the number {}."]


@pytest.fixture(scope="module")
def image_text_ckpt(tmp_path_factory):
    """A tiny image-text model trained for a few steps on captioned digits (better than chance, not perfect)."""
    L.seed_everything(0)
    module = ImageTextModule(Backbone(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
                             TextTower(context_length=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
                             joint_dim=64, lr=1e-3, weight_decay=0.05)
    trainer = L.Trainer(max_epochs=4, limit_val_batches=1, accelerator="cpu", logger=False,  # ~12 s on 2 shared cores
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ImageTextDataModule("digits", img_size=16, batch_size=64, templates=TEMPLATES))
    path = tmp_path_factory.mktemp("clip") / "digits_clip.ckpt"
    trainer.save_checkpoint(path)
    return path


def _val_images(data: ImageDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(data.val_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_zeroshot_head_scores_the_zeroshot_accuracy_before_any_step(image_text_ckpt):
    classifier = ImageClassifier(Backbone(pretrained=str(image_text_ckpt), img_size=16), num_classes=10,
                                 class_names=[str(i) for i in range(10)], class_prompts=DIGIT_WORDS,
                                 templates=TEMPLATES, head_init="zeroshot")
    clip = vit.load_image_text(image_text_ckpt).eval()
    data = ImageDataModule("digits", img_size=16, batch_size=64, mean=clip.pretrained_cfg["mean"],
                           std=clip.pretrained_cfg["std"])
    data.setup("fit")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    validated = trainer.validate(classifier, datamodule=data, verbose=False)[0]["val/acc"]

    images, labels = _val_images(data)
    weights = vit.zeroshot_classifier(clip, DIGIT_WORDS, TEMPLATES)
    with torch.no_grad():
        zeroshot = (clip.encode_image(images, normalize=True) @ weights).argmax(dim=1)
        folded = classifier.model.eval()(images)
    expected = float((zeroshot == labels).float().mean())
    assert 0.12 < expected < 1.0  # above chance (0.1), so equal accuracies say something
    assert validated == pytest.approx(expected, abs=1e-6)
    assert torch.equal(folded.argmax(dim=1), zeroshot)  # the same prediction for every image
    # the folded logits are the zero-shot logits times each image's projected-feature length
    with torch.no_grad():
        logits = clip.logit_scale.exp() * clip.encode_image(images, normalize=True) @ weights
        lengths = clip.encode_image(images).norm(dim=1, keepdim=True)
    assert torch.allclose(folded, logits * lengths, atol=1e-4, rtol=1e-4)


def test_zeroshot_head_init_needs_an_image_text_source_and_one_prompt_per_class(image_text_ckpt):
    with pytest.raises(ValueError, match="needs model.backbone.pretrained"):
        ImageClassifier(Backbone(img_size=16), num_classes=10, head_init="zeroshot", class_prompts=DIGIT_WORDS)
    with pytest.raises(ValueError, match="one prompt per class.*gives 3 for 10 classes"):
        ImageClassifier(Backbone(pretrained=str(image_text_ckpt)), num_classes=10, head_init="zeroshot",
                        class_prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"the recipe asks for img_size 32 \(it has 16; data.img_size sets it\), "
                                         r"depth 4 \(it has 2\); remove these model.backbone keys"):
        ImageClassifier(Backbone(pretrained=str(image_text_ckpt), img_size=32, depth=4), num_classes=10,
                        head_init="zeroshot", class_prompts=DIGIT_WORDS)


def test_wise_alpha_0_and_1_reproduce_the_endpoints_logits_exactly(image_text_ckpt, tmp_path):
    zeroshot = zeroshot_head_model(vit.load_image_text(image_text_ckpt), DIGIT_WORDS, TEMPLATES).eval()
    finetuned = zeroshot_head_model(vit.load_image_text(image_text_ckpt), DIGIT_WORDS, TEMPLATES).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in finetuned.parameters():  # a "fine-tune": every weight moved
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    images = torch.randn(4, 3, 16, 16, generator=generator)
    with torch.no_grad():
        assert torch.equal(wise_ft(zeroshot, finetuned, 0.0)(images), zeroshot(images))
        assert torch.equal(wise_ft(zeroshot, finetuned, 1.0)(images), finetuned(images))
        half = wise_ft(zeroshot, finetuned, 0.5)
        assert torch.allclose(half.head.weight, (zeroshot.head.weight + finetuned.head.weight) / 2, atol=1e-7)
    other = vit.VisionTransformer(finetuned.config.replace(num_classes=3))
    with pytest.raises(ValueError, match="(?s)one architecture.*head.weight: zero-shot \\[10, 64\\] vs fine-tuned \\[3, 64\\]"):
        wise_ft(zeroshot, other, 0.5)
    with pytest.raises(ValueError, match="--alpha: expected a value in \\[0, 1\\]"):
        wise_ft(zeroshot, finetuned, 1.5)


def test_vit_wise_writes_the_ensemble_and_the_sweep(image_text_ckpt, tmp_path, capsys):
    from tests.tasks.test_contrastive import write_digit_folder
    from vit.commands.wise import main as wise
    L.seed_everything(0)
    classifier = ImageClassifier(Backbone(pretrained=str(image_text_ckpt), img_size=16), num_classes=10,
                                 class_names=DIGIT_WORDS, templates=TEMPLATES, head_init="zeroshot", lr=1e-3,
                                 warmup_epochs=0)
    clip_cfg = vit.load_image_text(image_text_ckpt).pretrained_cfg
    data = ImageDataModule("digits", img_size=16, batch_size=32, mean=clip_cfg["mean"], std=clip_cfg["std"])
    data.class_names = DIGIT_WORDS  # the words are the class names (and so the prompts)
    trainer = L.Trainer(max_steps=5, limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(classifier, datamodule=data)
    ckpt = tmp_path / "finetuned.ckpt"
    trainer.save_checkpoint(ckpt)
    assert ImageClassifier.load_from_checkpoint(ckpt).hparams.head_init == "random"  # the head is in the weights

    val = write_digit_folder(tmp_path / "val", "val")
    out = tmp_path / "wise"
    assert wise(["--zeroshot", str(image_text_ckpt), "--finetuned", str(ckpt), "--alpha", "1.0", "--out", str(out),
                 "--sweep", "--images", str(val)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sweep = {float(line.split()[1][:-1]): float(line.split()[-1]) for line in lines if line.startswith("alpha ")}
    assert sorted(sweep) == [round(0.1 * i, 1) for i in range(11)]
    assert (out / "wise_sweep.csv").is_file() and (out / "wise_sweep.png").stat().st_size > 0
    # alpha 1 is the fine-tuned classifier itself: the folder it wrote predicts as the checkpoint does
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit.load_pretrained(out).eval()(images), vit.load_pretrained(ckpt).eval()(images))
    assert wise(["--zeroshot", str(image_text_ckpt), "--finetuned", str(ckpt), "--sweep"]) == 2
    assert "--sweep needs --images" in capsys.readouterr().err
