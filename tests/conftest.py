"""Tiny fixtures shared by the tests: small models and small image folders, all offline."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# VIT_TEST_THREADS=1 keeps tests usable while other jobs share the cores (OpenMP spin-waits oversubscribe badly)
torch.set_num_threads(int(os.environ.get("VIT_TEST_THREADS", min(2, os.cpu_count() or 1))))

@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Scan caches and ONNX exports of the tests go to a temporary folder, not the user's ~/.cache/vit."""
    if "VIT_CACHE_DIR" not in os.environ:
        os.environ["VIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("vit_cache"))
    yield


# CLI flags for a seconds-long fit/test of a tiny model on 16 px images (data sources' end-to-end tests)
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
         "--model.backbone.arch", "null", "--model.backbone.embed_dim", "32", "--model.backbone.depth", "1",
         "--model.backbone.num_heads", "2", "--model.backbone.patch_size", "8",
         "--data.img_size", "16", "--data.batch_size", "4", "--data.num_workers", "0"]

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


@pytest.fixture
def tiny_model():
    import vit
    torch.manual_seed(0)
    return vit.VisionTransformer(**TINY).eval()


def write_image_folder(root, classes=("cat", "dog"), per_class=8, size=24, splits=("train", "val"), seed=0):
    """Write a small folder of PNGs whose class is visible (a bright square in a class-specific corner)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                h = size // 2
                y, x = (c // 2) % 2 * h, c % 2 * h
                img[y:y + h, x:x + h, c % 3] = 230
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


# ---- import parity: every reference parameter random, outputs compared at every stage --------------------------
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Overwrite every parameter of ``module`` in place with seeded N(0, std) values; returns ``module``.

    Libraries start some parameters at constants (torchvision: head and class token 0; timm: class token
    at std 1e-6; all: LayerNorm 1/0, biases 0), so outputs of freshly built models cannot show that such a
    parameter was mapped wrongly. With std 0.5 a tiny ViT's logits have a spread of a few units: finite,
    not saturated, and every parameter moves them.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
    return module


def reference_outputs(reference: torch.nn.Module, x: torch.Tensor):
    """(tokens after the final norm (B, N, D), pre-logits features (B, D), logits or None) of a timm,
    torchvision or Hugging Face model, each computed by that library's own code."""
    import timm.models.vision_transformer as timm_vit
    import torchvision.models.vision_transformer as tv_vit
    reference.eval()
    with torch.no_grad():
        if isinstance(reference, timm_vit.VisionTransformer):
            tokens = reference.forward_features(x)
            return tokens, reference.forward_head(tokens, pre_logits=True), reference.forward_head(tokens)
        if isinstance(reference, tv_vit.VisionTransformer):
            seen = []  # the encoder's output (final LayerNorm included) from torchvision's own forward
            hook = reference.encoder.register_forward_hook(lambda module, args, out: seen.append(out))
            try:
                logits = reference(x)
            finally:
                hook.remove()
            return seen[0], seen[0][:, 0], logits  # torchvision classifies the class token
        # Hugging Face: the base model's last_hidden_state is after the final LayerNorm; heads read token 0 (and 1)
        tokens = reference.base_model(pixel_values=x).last_hidden_state
        logits = getattr(reference(pixel_values=x), "logits", None)
        if hasattr(reference, "distillation_classifier"):  # DeiT with teacher: both tokens, as timm's contract
            return tokens, (tokens[:, 0] + tokens[:, 1]) / 2, logits
        return tokens, tokens[:, 0], logits


def assert_matches_reference(ours: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor,
                             tol: float = 1e-4, pre_logits: bool = True) -> None:
    """Our tokens, pre-logits features and logits equal the reference library's (max abs difference <= tol)."""
    tokens, pooled, logits = reference_outputs(reference, x)
    ours.eval()
    with torch.no_grad():
        our_tokens = ours.forward_features(x)
        pairs = {"tokens": (our_tokens, tokens)}
        if pre_logits:
            pairs["pre_logits"] = (ours.forward_head(our_tokens, pre_logits=True), pooled)
        if logits is not None:
            pairs["logits"] = (ours(x), logits)
    for what, (a, b) in pairs.items():
        assert a.shape == b.shape, f"{what}: ours {tuple(a.shape)} vs reference {tuple(b.shape)}"
        assert b.std() > 1e-2, f"{what}: the reference's values are (nearly) constant; randomise its weights"
        difference = (a - b).abs().max().item()
        assert difference <= tol, f"{what}: max abs difference {difference:.3g} > {tol}"


def logged_losses(app) -> list[float]:
    """The training losses a CLI run logged, in order (run with --trainer.log_every_n_steps 1 for every step)."""
    import csv
    from pathlib import Path
    metrics = next(Path(app.trainer.log_dir).rglob("metrics.csv"))
    with open(metrics, newline="") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def assert_loss_fell(losses: list[float], window: int = 3, factor: float = 0.9) -> None:
    """The mean of the last ``window`` losses is below ``factor`` x the mean of the first ``window``."""
    assert len(losses) >= 2 * window, losses
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < factor * first, f"the loss did not fall: {first:.3f} -> {last:.3f} ({losses})"


REPO = Path(__file__).resolve().parent.parent  # the repository root (tests/ live one level down)

# a callback file the resume tests put beside a run: it SIGKILLs the process after a given step
KILL_AT = """
import os, signal
from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    \"\"\"SIGKILLs its own process once `step` optimizer steps are done, like a node lost without warning: no
    handler runs, nothing is saved; only what is already on disk survives.\"\"\"

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""

# flags that add mid-epoch save points to a run: last.ckpt every 4 optimizer steps (what a SIGKILL test resumes from)
SAVE_EVERY_4_STEPS = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=4",
                      "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0"]


def train_process(cwd, *args):
    """``python train.py ARGS`` started in ``cwd`` (one thread; callback files written to ``cwd`` importable),
    stdout and stderr together; the caller waits with ``communicate``."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)])}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_script(script, out, *args):
    """``python SCRIPT OUT ARGS`` in ``out`` (created), one thread per process, to completion (the DDP tests)."""
    import subprocess
    import sys
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), str(out), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=out)
