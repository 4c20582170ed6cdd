"""Convert an image folder to litdata chunks for ``data.dataset: streaming``.

    vit shards SRC OUT [--chunk-bytes 64MB] [--workers N] [--seed 0] [--on-bad-image skip|error]

SRC is ``SRC/train/<class>/...`` with optional ``SRC/val/...`` and ``SRC/test/...`` (the class folders of train
name the classes). Each split becomes ``OUT/<split>/`` (litdata's ``index.json`` + ``chunk-*.bin``), holding every
file's original encoded bytes, its label and its path; ``OUT/vit_dataset.json`` records the class names and the
counts. The file list is shuffled (seeded) before writing, so chunks are random samples and a validation split
can be cut from the end of train. Unusable files are left out as ``data.on_bad_image: skip`` leaves them out of an
image folder: one warning, every path and reason in ``OUT/skipped_images.tsv``.

OUT must be a local folder (upload it afterwards to s3:// or gs:// with any tool). Each split is written to a
temporary folder and renamed into place when complete, so running the command again after an interruption
keeps the finished splits, redoes the interrupted one from its start, and never duplicates a sample.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from ..utils.files import atomic_path
from .folder import find_classes, scan_image_folder
from .streaming import FORMAT, META_FILE, SPLITS

SPLIT_FILE = "vit_split.json"  # inside a finished split: what it was written from


def _read_sample(item: tuple[str, int, str]) -> dict:
    """One file as stored: its original bytes, label and path (runs in litdata's worker processes)."""
    path, label, rel = item
    with open(path, "rb") as f:
        return {"image": f.read(), "label": int(label), "path": rel}


def convert(src: str | Path, out: str | Path, chunk_bytes: str | int = "64MB", workers: int | None = None,
            seed: int = 0, on_bad_image: str = "skip") -> dict:
    """Write ``src``'s splits to ``out`` as litdata chunks and return the metadata written to
    ``out/vit_dataset.json`` (class names; per split the count and per-class counts)."""
    from litdata import optimize
    src, out = Path(src).expanduser(), Path(out).expanduser()
    chunk_bytes = int(chunk_bytes) if str(chunk_bytes).isdigit() else chunk_bytes  # litdata reads "64MB" or bytes
    if "://" in str(out):
        raise ValueError(f"OUT: {out} must be a local folder (upload it afterwards)")
    folders = {split: src / split for split in SPLITS if (src / split).is_dir()}
    if "train" not in folders:
        raise ValueError(f"SRC: {src} has no train/ folder; expected SRC/train/<class>/... (and optional "
                         f"SRC/val/..., SRC/test/...)")
    classes = find_classes(folders["train"])
    if not classes:
        raise ValueError(f"SRC: {folders['train']} has no class folders")
    skipped: list[tuple[str, str]] = []
    samples = {split: scan_image_folder(folder, classes, on_bad_image, skipped) for split, folder in folders.items()}
    out.mkdir(parents=True, exist_ok=True)
    _report(src, out, skipped, classes, samples["train"])
    meta = {"format": FORMAT, "classes": classes, "splits": {}, "source": str(src.resolve()), "seed": seed}
    for split, items in samples.items():
        if not items:
            if split == "train":
                raise ValueError(f"SRC: no usable training images under {folders['train']}")
            continue
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
        inputs = [(path, label, str(Path(path).relative_to(folders[split]))) for path, label in
                  (items[i] for i in order)]
        fingerprint = hashlib.sha1("\n".join(f"{rel}\t{label}" for _, label, rel in inputs).encode(
            "utf-8", "surrogateescape")).hexdigest()
        done = out / split
        if _finished(done) == fingerprint:
            print(f"{split}: {len(inputs)} images already converted in {done}, kept")
        else:
            part = out / f".{split}.partial"
            shutil.rmtree(part, ignore_errors=True)  # what an interrupted run left: this split starts over
            print(f"{split}: converting {len(inputs)} images to {done}")
            optimize(_read_sample, inputs, output_dir=str(part), chunk_bytes=chunk_bytes, num_workers=workers,
                     reorder_files=False,  # keep the shuffled order (litdata would sort by file size)
                     # forked writers start in a moment; spawned ones import torch and vit again (~10 s each)
                     start_method="fork" if sys.platform == "linux" else None)
            (part / SPLIT_FILE).write_text(json.dumps({"fingerprint": fingerprint, "count": len(inputs)}))
            shutil.rmtree(done, ignore_errors=True)
            part.rename(done)
        counts = np.bincount([label for _, label, _ in inputs], minlength=len(classes))
        meta["splits"][split] = {"count": len(inputs), "per_class": counts.tolist()}
    with atomic_path(out / META_FILE) as tmp:  # written last: its presence means every split is complete
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.chmod(0o644)  # readable like the chunks (mkstemp makes it private)
    return meta


def _finished(split_dir: Path) -> str | None:
    """The fingerprint of a completely written split, else None."""
    try:
        return json.loads((split_dir / SPLIT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _report(src: Path, out: Path, skipped: list[tuple[str, str]], classes: list[str], train) -> None:
    """As the data module reports an image folder: one warning, the list in skipped_images.tsv."""
    log = out / "skipped_images.tsv"
    log.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8")
    if skipped:
        warnings.warn(f"convert: skipped {len(skipped)} unusable image file(s) under {src} (first: "
                      f"{skipped[0][0]}: {skipped[0][1]}); every path and reason in {log}", stacklevel=3)
    counts = np.bincount([label for _, label in train], minlength=len(classes))
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        warnings.warn(f"convert: class folder(s) {empty} have no usable training images", stacklevel=3)
