"""Contrastive image-text training: the losses against a hand computation, DDP (2 CPU processes) against one
process on the same global batch, the data module's bad rows, and a checkpoint that vit.load_image_text reads."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit.data.image_text import ImageTextDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.contrastive import clip_loss, contrastive_loss, siglip_loss
from vit.tasks.image_text import ImageTextModule, TextTower

REPO = Path(__file__).resolve().parents[2]


def tiny_module(loss: str = "clip", **kwargs) -> ImageTextModule:
    return ImageTextModule(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                           TextTower(context_length=12, embed_dim=32, depth=1, num_heads=2), joint_dim=16,
                           loss=loss, **kwargs)


def _hand_clip(images, texts, scale):
    n = len(images)
    sim = [[scale * sum(a * b for a, b in zip(images[i], texts[j])) for j in range(n)] for i in range(n)]
    per_image = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)]
    per_text = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)]
    return (sum(per_image) / n + sum(per_text) / n) / 2


def _hand_siglip(images, texts, scale, bias):
    n, total = len(images), 0.0
    for i in range(n):
        for j in range(n):
            z = scale * sum(a * b for a, b in zip(images[i], texts[j])) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-label * z))  # -log sigmoid(label * z)
    return total / n


def test_clip_and_siglip_losses_equal_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(2.5, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    rows_i, rows_t = images.tolist(), texts.tolist()
    assert clip_loss(images, texts, scale).item() == pytest.approx(_hand_clip(rows_i, rows_t, 2.5), abs=1e-12)
    assert siglip_loss(images, texts, scale, bias).item() == pytest.approx(_hand_siglip(rows_i, rows_t, 2.5, -1.5),
                                                                          abs=1e-12)
    # outside DDP the dispatcher is the same computation
    assert contrastive_loss(images, texts, scale, bias, "siglip").item() == siglip_loss(images, texts, scale, bias).item()
    with pytest.raises(ValueError, match="siglip needs a model with a logit_bias"):
        contrastive_loss(images, texts, scale, None, "siglip")
    with pytest.raises(ValueError, match="expected one of clip, siglip"):
        contrastive_loss(images, texts, scale, None, "infonce")


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, sys.argv[2])
    from tests.tasks.test_contrastive import global_batch, tiny_module

    class Step(torch.nn.Module):  # what Lightning's DDP wrapper does: forward runs the module's loss
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, images, token_ids):
            return self.module._loss((images, token_ids))[0]

    def run(rank, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        result = {}
        for kind in ("clip", "siglip"):
            torch.manual_seed(0)
            module = tiny_module(kind)
            images, token_ids = global_batch(module)
            half = len(images) // 2
            step = DistributedDataParallel(Step(module))
            loss = step(images[rank * half:(rank + 1) * half], token_ids[rank * half:(rank + 1) * half])
            loss.backward()  # DDP averages the gradients over the 2 processes
            losses = [torch.zeros(()) for _ in range(2)]
            dist.all_gather(losses, loss.detach())
            result[kind] = {"losses": [float(x) for x in losses],
                            "grads": {n: p.grad.flatten().tolist() for n, p in module.named_parameters()}}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=2)
""")


def global_batch(module: ImageTextModule) -> tuple[torch.Tensor, torch.Tensor]:
    """8 images and 8 different captions, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=generator)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    return images, module.model.tokenize([f"a photo of the digit {w}." for w in words])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_parts_over_processes_average_to_the_global_batch_loss(kind):
    """The per-process normalisation, without processes: rows 0-3 and 4-7 scored against all 8 columns."""
    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(8, 6, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(8, 6, generator=generator), dim=-1)
    scale, bias = torch.tensor(3.0), torch.tensor(-2.0)
    if kind == "clip":
        parts = [clip_loss(images[k:k + 4], texts[k:k + 4], scale, images, texts, k) for k in (0, 4)]
        whole = clip_loss(images, texts, scale)
    else:
        parts = [siglip_loss(images[k:k + 4], texts[k:k + 4], scale, bias, texts, k) for k in (0, 4)]
        whole = siglip_loss(images, texts, scale, bias)
    assert torch.allclose((parts[0] + parts[1]) / 2, whole, atol=1e-6)


@pytest.mark.slow  # two processes start torch: about 20 s on 2 shared CPU cores
def test_two_process_ddp_step_equals_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "ddp.json"
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    port = str(29500 + os.getpid() % 1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(out), str(REPO), port], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for kind in ("clip", "siglip"):
        torch.manual_seed(0)
        module = tiny_module(kind)
        images, token_ids = global_batch(module)
        loss = module._loss((images, token_ids))[0]
        loss.backward()
        ddp = result[kind]
        assert ddp["losses"][0] != pytest.approx(ddp["losses"][1])  # the processes saw different halves...
        assert sum(ddp["losses"]) / 2 == pytest.approx(loss.item(), abs=1e-5)  # ...that average to the whole
        for name, param in module.named_parameters():
            assert torch.allclose(torch.tensor(ddp["grads"][name]), param.grad.flatten(), atol=1e-6, rtol=1e-4), \
                f"{kind}: gradient of {name} differs from the single-process one"
        # the gradient reached the text tower and the temperature through the other process's slice too
        assert module.model.logit_scale.grad.abs() > 0 and module.model.text.token_embedding.weight.grad.abs().sum() > 0


def _write_png(path: Path, seed: int) -> None:
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def test_captions_table_bad_rows_are_skipped_and_reported_or_named_in_an_error(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", i)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "captions.csv").write_text("file,caption\n0.png,a red square\n1.png,\nmissing.png,a cat\n"
                                           "2.png,a blue square\nbroken.png,a dog\n3.png,a green square\n"
                                           "0.png,another caption of the first image\n", encoding="utf-8")
    data = ImageTextDataModule("captions", root=str(tmp_path), img_size=16, batch_size=2, val_fraction=0.25)
    with pytest.warns(UserWarning, match=r"skipped 3 row\(s\) of .*captions.csv \(first: row 3, 1.png: empty caption"):
        data.setup("fit")
    assert [(row, file) for row, file, _ in data.skipped_rows] == [(3, "1.png"), (4, "missing.png"), (6, "broken.png")]
    assert data.skipped_rows[1][2] == "no such file"
    assert len(data.train_set) + len(data.val_set) == 4  # 3 usable images, one with two captions
    captions = {caption for _, caption in (data.train_set[i] for i in range(len(data.train_set)))}
    assert captions <= {"a red square", "a blue square", "a green square", "another caption of the first image"}

    strict = ImageTextDataModule("captions", root=str(tmp_path), img_size=16, on_bad_row="error")
    with pytest.raises(ValueError, match=r"captions.csv, row 3 \(1.png\): empty caption"):
        strict.setup("fit")
    (tmp_path / "captions.csv").write_text("path,text\n0.png,a red square\n", encoding="utf-8")
    with pytest.raises(ValueError, match="the header needs the columns file and caption"):
        ImageTextDataModule("captions", root=str(tmp_path), img_size=16).setup("fit")
    with pytest.raises(ValueError, match="data.templates: each template needs exactly one"):
        ImageTextDataModule("digits", templates=["no slot"])


def test_class_folders_become_captions_through_templates(image_folder):
    data = ImageTextDataModule("imagefolder", root=str(image_folder), img_size=16, batch_size=4,
                               templates=["a photo of a {}.", "a picture of the {}."],
                               class_names=["kitten", "puppy"])
    data.setup("fit")
    images, captions = next(iter(data.val_dataloader()))
    assert images.shape[1:] == (3, 16, 16)
    assert set(captions) <= {"a photo of a kitten.", "a photo of a puppy."}  # evaluation: the first template
    drawn = {data.train_set[(i, seed)][1] for i in range(len(data.train_set)) for seed in range(10)}
    assert drawn == {f"{t} {c}." for t in ("a photo of a", "a picture of the") for c in ("kitten", "puppy")}
    with pytest.raises(ValueError, match="data.class_names: 3 names for 2 classes"):
        ImageTextDataModule("imagefolder", root=str(image_folder), class_names=["a", "b", "c"])


def test_module_trains_saves_and_loads_back_through_load_image_text(tmp_path):
    import vit
    L.seed_everything(0)
    module = tiny_module("siglip", lr=2e-3)
    assert module.model.logit_bias.item() == -10.0 and module.model.logit_scale.item() == pytest.approx(math.log(10))
    data = ImageTextDataModule("digits", img_size=16, batch_size=16)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = module.model.text.token_embedding.weight.detach().clone()
    trainer.fit(module, datamodule=data)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert not torch.equal(before, module.model.text.token_embedding.weight)
    trainer.save_checkpoint(tmp_path / "it.ckpt")

    loaded = vit.load_image_text(tmp_path / "it.ckpt").eval()
    module.eval()
    images, tokens = torch.randn(2, 3, 16, 16), module.model.tokenize(["a photo of the digit two.", "a one"])
    with torch.no_grad():
        assert torch.equal(loaded.logits(images, tokens)[0], module.model.logits(images, tokens)[0])
    assert loaded.pretrained_cfg["mean"] == pytest.approx(list(data.mean))  # the data's normalisation
    again = ImageTextModule.load_from_checkpoint(tmp_path / "it.ckpt")
    assert again.hparams.pretrained_model is None and again.hparams.architecture["tokenizer"] == "openclip"

    # fine-tuning starts from the whole trained model (its own tokenizer and temperature) ...
    tuned = ImageTextModule(Backbone(img_size=16), pretrained_model=str(tmp_path / "it.ckpt"), loss="siglip")
    assert torch.equal(tuned.model.logit_bias, module.model.logit_bias)
    assert torch.equal(tuned.model.text.pos_embed, module.model.text.pos_embed)
    assert tuned.model.tokenizer("a one").tolist() == module.model.tokenizer("a one").tolist()
    # ... at its own image size
    with pytest.raises(ValueError, match="takes img_size 16, but the recipe asks for 32"):
        ImageTextModule(Backbone(img_size=32), pretrained_model=str(tmp_path / "it.ckpt"))


def test_module_checks_its_arguments():
    with pytest.raises(ValueError, match="model.loss: expected one of clip, siglip"):
        tiny_module("triplet")
    with pytest.raises(TypeError, match="unknown text tower field"):
        TextTower.from_value({"widht": 3})
    frozen = ImageTextModule(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                      freeze="backbone"),
                             TextTower(context_length=12, embed_dim=32, depth=1, num_heads=2, freeze=True),
                             joint_dim=16)
    trainable = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert trainable == {"visual.head.weight", "visual.head.bias", "logit_scale"}  # a projection and temperature


OTHER_TEMPLATES = "a drawing of the digit {}.\nthe handwritten number {}.\na {}.\nan image showing a {}.\n"


def write_digit_folder(root: Path, split: str = "test") -> Path:
    """The digits recipe's held-out split as root/<word>/<index>.png (the folder names are the class names)."""
    from PIL import Image

    from vit.data import ImageDataModule
    from vit.data.image_text import DIGIT_WORDS
    data = ImageDataModule("digits")
    data.setup("fit")
    part = getattr(data, f"{split}_set")
    for i in part.indices:
        folder = root / DIGIT_WORDS[part.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(part.images[i]).save(folder / f"{i}.png")
    return root


@pytest.mark.slow  # 8 epochs of the digits recipe: about 2 minutes on 2 shared CPU cores
def test_digits_chain_train_then_zeroshot_with_other_templates_far_above_chance(tmp_path, monkeypatch, capsys):
    """docs/image_text_training.md's chain: train.py fit on captioned digits, then vit zeroshot on the held-out test
    digits with templates never seen in training. The full recipe (20 epochs) measured 0.7744; 8 epochs ~0.5."""
    from vit.commands.zeroshot import main as zeroshot
    from vit.training.cli import main as train
    monkeypatch.chdir(tmp_path)
    train(["fit", "--config", str(REPO / "configs" / "image_text" / "digits.yaml"), "--trainer.max_epochs", "8",
           "--trainer.enable_progress_bar", "false"])
    last = next(tmp_path.rglob("last.ckpt"))
    images = write_digit_folder(tmp_path / "digits_test")
    (tmp_path / "other.txt").write_text(OTHER_TEMPLATES, encoding="utf-8")
    capsys.readouterr()
    assert zeroshot([str(images), "--checkpoint", str(last), "--templates", "other.txt", "--out", "zs"]) == 0
    accuracy = float(capsys.readouterr().out.split("accuracy ")[1].split()[0])
    print(f"zero-shot accuracy with unseen templates after 8 epochs: {accuracy:.4f}")
    assert accuracy > 0.35, accuracy  # chance: 0.10


LIGHTNING_DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L, torch
    sys.path.insert(0, sys.argv[2])
    from tests.tasks.test_contrastive import tiny_module
    from vit.data.image_text import ImageTextDataModule

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            module.losses = getattr(module, "losses", []) + [float(outputs["loss"])]

        def on_fit_end(self, trainer, module):
            rank = trainer.global_rank
            weights = torch.cat([p.detach().flatten() for p in module.parameters()])
            torch.save(weights, os.path.join(sys.argv[1], f"weights{rank}.pt"))
            with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
                json.dump({"world": trainer.world_size, "step": trainer.global_step, "losses": module.losses,
                           "val_acc": float(trainer.callback_metrics["val/acc"])}, f)

    if __name__ == "__main__":
        L.seed_everything(0)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=3,
                            limit_val_batches=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Record()])
        trainer.fit(tiny_module("siglip", lr=1e-3), datamodule=ImageTextDataModule("digits", img_size=16,
                                                                                 batch_size=8))
""")


@pytest.mark.slow  # a 2-process Lightning fit on CPU: about 20 s on 2 shared cores
def test_lightning_ddp_fit_trains_one_model_and_scores_the_whole_validation_split(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(LIGHTNING_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(REPO)], env=env, capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each process scored its own rows...
    weights = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(weights[0], weights[1])  # ...and the averaged gradients kept one model
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]  # both scored the gathered split
