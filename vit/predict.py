"""Classify images with a trained model and print the top-k class names.

    python -m vit.predict IMAGE [IMAGE ...] --checkpoint PATH [--topk 5] [--backend auto] [--quantize none]

PATH is anything ``vit.load_pretrained`` reads: our Lightning ``.ckpt``, a ``save_pretrained`` directory, timm /
Hugging Face weights, ... Images are normalised with the checkpoint's mean/std and resized as in evaluation,
decoded in loader worker processes and run in batches of ``--batch-size`` by the backend of ``vit.inference``
(``--backend auto``: the fastest available here whose answers match eager PyTorch on the first images).
For a whole folder with a CSV, use ``python train.py predict --config ... --ckpt_path ... --data.predict_path``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import DataLoader, Dataset

from .checkpoints import CheckpointError, load_pretrained
from .inference import AUTO_ORDER, BACKENDS, PROBE_SIZE, BackendError, Runner, VerificationError, create_runner
from .model import VisionTransformer


def load_model(checkpoint: str) -> VisionTransformer:
    """The model of ``checkpoint`` in eval mode (its ``pretrained_cfg`` carries class names and mean/std)."""
    return load_pretrained(checkpoint).eval()


def preprocess(model: VisionTransformer, paths: Sequence[str | Path]) -> torch.Tensor:
    """Images -> (B, C, H, W) the way the model was evaluated: resize + center crop to its size, its mean/std.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGB", (64, 48)).save(f"{tmp}/cat.png")
        ...     preprocess(model, [f"{tmp}/cat.png"]).shape
        torch.Size([1, 3, 32, 32])
    """
    _check_files(paths)
    files = ImageFiles(model, paths)
    images = [files.decode(i) for i in range(len(files))]  # BadImageError names the file
    return torch.stack(images)


class ImageFiles(Dataset):
    """Image files decoded and transformed for ``model`` as in evaluation; an item that cannot be decoded is
    returned as its error (so it crosses from a loader worker intact and is raised, one line, by ``predict``)."""

    def __init__(self, model: VisionTransformer, paths: Sequence[str | Path]):
        from .data import eval_transform
        from .data.transforms import match_channels

        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD  # bare state dict: ImageNet's
        mean, std = match_channels(mean, model.in_chans), match_channels(std, model.in_chans)
        self.transform = eval_transform(model.img_size, mean, std, crop_pct=cfg.get("crop_pct") or 1.0)
        self.paths, self.in_chans = list(paths), model.in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> torch.Tensor:
        from .data import load_image
        return self.transform(image=load_image(self.paths[index], self.in_chans))["image"]

    def __getitem__(self, index: int) -> torch.Tensor | Exception:
        try:
            return self.decode(index)
        except (ValueError, OSError) as error:
            return error


def _collate(items: list) -> torch.Tensor | Exception:
    errors = [item for item in items if isinstance(item, Exception)]
    return errors[0] if errors else torch.stack(items)


def image_loader(model: VisionTransformer, paths: Sequence[str | Path], batch_size: int = 32,
                 workers: int | None = None) -> DataLoader:
    """Batches (B, C, H, W) of ``paths`` in order, decoded by ``workers`` processes (default: none for a single
    batch, else one) while the model runs on the previous batch. torch gives each worker one thread; nothing
    else is set in the workers (OpenCV's thread pool, reconfigured in a forked child, can hang it)."""
    if workers is None:
        workers = 0 if len(paths) <= batch_size else 1
    return DataLoader(ImageFiles(model, paths), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      prefetch_factor=2 if workers else None)


def _check_files(paths: Sequence[str | Path]) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such image file")


def predict(model: VisionTransformer | Runner, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 32,
            backend: str = "auto", quantize: str | None = None, workers: int | None = None
            ) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image, most likely first.

    ``model`` is a model (then the runner for ``backend``/``quantize`` is built and checked on the first images;
    see ``vit.inference.create_runner``) or a runner built before, for many calls.

    Example:
        >>> predict(load_model("runs/vit/version_0/checkpoints/last.ckpt"), ["cat.jpg"], topk=2)  # doctest: +SKIP
        [[('cat', 0.93...), ('dog', 0.05...)]]
    """
    _check_files(paths)
    source = model.model if isinstance(model, Runner) else model
    runner = model if isinstance(model, Runner) else None
    results = []
    for images in image_loader(source, paths, batch_size, workers):
        if isinstance(images, Exception):
            raise images
        if runner is None:
            runner = create_runner(source, backend, quantize, probe=images[:PROBE_SIZE])
        results += top_classes(runner, images, topk)
    return results


@torch.no_grad()
def top_classes(model: VisionTransformer | Runner, images: torch.Tensor, topk: int = 5
                ) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for a preprocessed batch (B, C, H, W)."""
    source = model.model if isinstance(model, Runner) else model
    names = (getattr(source, "pretrained_cfg", None) or {}).get("class_names") or \
        [str(i) for i in range(source.num_classes)]
    probs = model(images).float().softmax(dim=-1)
    values, labels = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    return [[(names[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, labels)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vit.predict", description="Top-k classes for a few images.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True,
                        help="our .ckpt, a save_pretrained directory, or any source vit.load_pretrained reads")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                        help="how to run the model (default auto: the first of "
                             f"{', '.join(AUTO_ORDER[None])} that works here and matches eager on the first images)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: dynamic int8 linear layers (faster on CPU; may change answers near a tie)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: 0 for a single batch, else 1)")
    parser.add_argument("--compile", action="store_true", help="the same as --backend compile")
    return parser


def one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(args: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 for a bad checkpoint, image, argument or a backend that cannot
    run here, 1 for a backend whose answers differ from eager PyTorch's).

    Example:
        >>> main(["cat.jpg", "--checkpoint", "my_vit/", "--topk", "3"])  # doctest: +SKIP
        0
    """
    options = _parser().parse_args(args)
    for name in ("topk", "batch_size"):
        if getattr(options, name) < 1:
            print(f"error: --{name.replace('_', '-')}: expected a positive integer, got {getattr(options, name)}",
                  file=sys.stderr)
            return 2
    if options.workers is not None and options.workers < 0:
        print(f"error: --workers: expected 0 or more, got {options.workers}", file=sys.stderr)
        return 2
    backend = "compile" if options.compile else options.backend
    try:
        model = load_model(options.checkpoint)
        results = predict(model, options.images, options.topk, options.batch_size, backend=backend,
                          quantize=options.quantize, workers=options.workers)
    except VerificationError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except (CheckpointError, BackendError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    for path, top in zip(options.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
