"""Segmentation heads on frozen features: ``linear`` vs ``linear_ms`` vs ``dpt`` on the shapes scenes, each head
trained alone on the same frozen ViT (``model.backbone.freeze: backbone``), then scored on the held-out scenes:
test mIoU, pixel accuracy and inference images/s (sliding windows, batch of the test loader).

    python benchmarks/segmentation_heads.py --backbone runs/vit/version_0/checkpoints/last.ckpt   # a Segmenter's ViT
    python benchmarks/segmentation_heads.py --backbone hf-hub:facebook/dinov2-small --img-size 224
    python benchmarks/segmentation_heads.py --tiny                                                # seconds: the test

``--backbone`` is a segmentation checkpoint (its ViT is taken, its head left) or anything ``vit.load_pretrained``
reads; without it the ViT is random (a floor, not a result). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from vit import save_pretrained
from vit.data.segmentation import SegmentationDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.heads import HEADS
from vit.tasks.segmentation import Segmenter


def parse_args(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=None, help="a Segmenter .ckpt or a vit.load_pretrained source")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads (default all)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of head training (default 5)")
    parser.add_argument("--images", type=int, default=512, help="shapes scenes generated (default 512)")
    parser.add_argument("--img-size", type=int, default=64, help="training crop side (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate (default 1e-3)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny ViT, 32 scenes, one epoch")
    return parser.parse_args(args)


def frozen_source(backbone: str | None, workdir: Path) -> str | None:
    """A source ``Backbone.pretrained`` reads: a Segmenter checkpoint's ViT saved with ``save_pretrained``, or
    ``backbone`` as given."""
    if backbone is None or not backbone.endswith(".ckpt"):
        return backbone
    segmenter = Segmenter.load_from_checkpoint(backbone, map_location="cpu")
    target = workdir / "backbone"
    save_pretrained(segmenter.model.vit, target)
    return str(target)


def images_per_second(module: Segmenter, loader) -> float:
    module.eval()
    count, start = 0, time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            module.predict_logits(images)
            count += len(images)
    return count / (time.perf_counter() - start)


def main(args=None) -> list[dict]:
    args = parse_args(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = frozen_source(args.backbone, Path(tmp))
        if args.tiny:
            backbone = Backbone(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, freeze="backbone")
            args.images, args.epochs, args.img_size = 32, 1, 32
        elif source is None:
            backbone = Backbone(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, freeze="backbone")
        else:
            backbone = Backbone(pretrained=source, freeze="backbone")
        for head in args.heads.split(","):
            L.seed_everything(0, verbose=False)
            data = SegmentationDataModule("shapes", img_size=args.img_size, num_images=args.images, batch_size=16)
            module = Segmenter(backbone, num_classes=data.num_classes, class_names=data.class_names, head=head,
                               head_channels=32, image_size=args.img_size, lr=args.lr)
            trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                default_root_dir=tmp)
            start = time.perf_counter()
            trainer.fit(module, datamodule=data)
            seconds = time.perf_counter() - start
            scores = trainer.test(module, datamodule=data, verbose=False)[0]
            rows.append({"head": head, "miou": scores["test/miou"], "pixel_acc": scores["test/pixel_acc"],
                         "ips": images_per_second(module, data.test_dataloader()), "fit_s": seconds,
                         "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)})
    print(f"frozen backbone: {args.backbone or 'random'}; {args.images} shapes scenes, {args.epochs} epochs\n")
    print("| head | test mIoU | pixel acc | img/s (inference) | fit s | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['head']} | {r['miou']:.4f} | {r['pixel_acc']:.4f} | {r['ips']:.1f} | {r['fit_s']:.0f} | "
              f"{r['trainable']:,} |")
    return rows


if __name__ == "__main__":
    main()
