"""The picture in README's "Segment images": held-out shapes scenes, `vit predict`'s overlays of a segmentation
checkpoint, and the true masks drawn the same way (one scene per row: image | predicted | true).

    python train.py --config configs/segmentation/shapes.yaml --trainer.default_root_dir runs/shapes_seg
    python docs/segmentation_overlay.py runs/shapes_seg/vit/version_0/checkpoints/last.ckpt docs/segmentation_overlay.png
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vit.data.shapes import SHAPES_SEGMENTATION_CLASSES, make_shape_masks
from vit.deploy.segment import overlay


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a segmentation checkpoint trained on the shapes scenes")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--scenes", type=int, default=4, help="rows (scenes with at least two shape classes)")
    args = parser.parse_args(argv)
    # seed 1234 is none of the recipe's own scenes; rows need two or more shape classes to show anything
    scenes = [s for s in make_shape_masks(16, size=96, seed=1234, max_objects=5) if len(np.unique(s[1])) >= 3]
    scenes = scenes[:args.scenes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        for i, (image, _) in enumerate(scenes):
            Image.fromarray(image).save(images / f"scene{i}.png")
        subprocess.run([sys.executable, "-m", "vit", "predict", str(images), "--checkpoint", args.checkpoint,
                        "--out", f"{tmp}/pred"], check=True)
        for i, (image, mask) in enumerate(scenes):
            predicted = np.asarray(Image.open(f"{tmp}/pred/scene{i}_overlay.png").convert("RGB"))
            gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
            rows.append(np.concatenate([image, gap, predicted, gap,
                                        overlay(image, mask, len(SHAPES_SEGMENTATION_CLASSES))], axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
