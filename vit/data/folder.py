"""Image folders: walking ``root/<class>/...`` trees and file lists, header checks cached per folder, and the
dataset that decodes the files on access.

The header-check cache is a small JSON file per scanned folder under ``$VIT_CACHE_DIR`` (default
``~/.cache/vit/scan``), keyed on each file's relative path, modification time and size, so a second scan of an
unchanged folder opens no image at all.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..utils.files import atomic_path
from .cache import DecodedImages, NodeShare
from .images import IMAGE_EXTENSIONS, BadImageError, SkipLog, check_image, first_decodable, load_image
from .sampling import seed_transform, split_index

CACHE_VERSION = 1


def find_classes(folder: Path) -> list[str]:
    """Class names: the visible sub-folders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(folder: Path, class_names: Sequence[str], on_bad_image: str | None = None,
                      skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
    """(path, label) for every image file under ``folder/<class>/`` (hidden files/folders and non-images skipped).

    With ``on_bad_image`` set, each file's header is checked (cached per folder):
    ``"error"`` raises ``BadImageError`` for the first bad file, ``"skip"`` leaves it out and appends
    ``(path, reason)`` to ``skipped``; a class folder missing from ``class_names`` is skipped the same way.
    """
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for name in find_classes(folder):
        files = []
        for path in sorted((folder / name).rglob("*")):
            rel = path.relative_to(folder / name)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
        if name not in index:
            if on_bad_image != "skip" or skipped is None:
                raise ValueError(f"{folder}: class folder {name!r} is not among the training classes "
                                 f"{list(class_names)}")
            reason = f"class {name!r} is not among the training classes"
            skipped.extend((str(p), reason) for p in files)
            continue
        if on_bad_image is not None:
            problems = check_images(folder, files)
            for path in files:
                reason = problems.get(str(path))
                if reason is None:
                    samples.append((str(path), index[name]))
                elif on_bad_image == "skip" and skipped is not None:
                    skipped.append((str(path), reason))
                else:
                    raise BadImageError(path, reason + "; set data.on_bad_image: skip to leave such files out")
        else:
            samples.extend((str(p), index[name]) for p in files)
    return samples


def list_images(source: str | Sequence[str]) -> list[str]:
    """Image files from a folder (recursive, sorted; hidden entries skipped), one image file, a ``.txt`` file with
    one path per line (relative to the list's folder), or a list of any of these.

    Example:
        >>> list_images([])
        []
    """
    if not isinstance(source, (str, os.PathLike)):
        return [f for item in source for f in list_images(item)]
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise ValueError(f"data.predict_path: no image files under {path}")
        return [str(p) for p in files]
    if path.suffix.lower() == ".txt" and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [str(path.parent / line) for line in lines if line and not line.startswith("#")]
    if not path.is_file():
        raise FileNotFoundError(f"data.predict_path: {path} does not exist")
    return [str(path)]


class FileDataset(Dataset):
    """Image files with integer labels, decoded on access.

    A file that fails to decode (the folder scan checks headers, not every pixel) raises ``BadImageError``
    with ``on_bad_image="error"``; with ``"skip"`` the next file takes its place (with its own label, so a
    label is never wrong), and the path and reason are appended to ``skip_log`` if given.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None, in_chans: int = 3,
                 on_bad_image: str = "error", skip_log: str | Path | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans
        self.on_bad_image = on_bad_image
        self.skip_log = skip_log
        self.skips = SkipLog(skip_log)
        self.decoded: DecodedImages | None = None  # data.cache: every image decoded once, see cache_decoded()

    def cache_decoded(self, threads: int | None = None, share: NodeShare | None = None) -> "FileDataset":
        """Decode every file now, once, into memory (``data.cache``); files that fail follow ``on_bad_image``.
        With ``share``, the processes of a node share one copy (see ``NodeShare``)."""
        on_bad = self.skips.record if self.on_bad_image == "skip" else None
        self.decoded = DecodedImages.decode([path for path, _ in self.samples], self.in_chans, on_bad, threads,
                                            share=share)
        return self

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, j: int) -> np.ndarray | None:
        if self.decoded is not None:
            image = self.decoded[j]  # None: failed when cached (and reported then): the next file takes its place
            return None if image is None else image.copy()  # transforms must never write into the shared cache
        return load_image(self.samples[j][0], self.in_chans)

    def __getitem__(self, i):
        i, sample_seed = split_index(i)
        j, image = first_decodable(i, len(self.samples), self._decode, self.on_bad_image, self.skips,
                                   lambda k: self.samples[k][0])
        label = self.samples[j][1]
        if self.transform is not None:
            if sample_seed is not None:
                seed_transform(self.transform, sample_seed)
            image = self.transform(image=image)["image"]
        return image, label

def check_images(folder: Path, files: Iterable[Path]) -> dict[str, str]:
    """``{path: reason}`` for the bad files among ``files`` (all under ``folder``), using and updating the
    folder's cache."""
    folder = Path(folder)
    cache_file = _cache_file(folder)
    cached = _read_cache(cache_file)
    entries, problems, changed = {}, {}, False
    for path in files:
        rel = str(Path(path).relative_to(folder))
        st = os.stat(path)
        key = [st.st_mtime_ns, st.st_size]
        hit = cached.get(rel)
        if hit is not None and hit[:2] == key:
            reason = hit[2]
        else:
            reason, changed = check_image(path), True
        entries[rel] = [*key, reason]
        if reason is not None:
            problems[str(path)] = reason
    if changed:  # merged: the folder is scanned one class sub-folder at a time
        _write_cache(cache_file, folder, {**cached, **entries})
    return problems


def _cache_file(folder: Path) -> Path:
    root = Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vit") / "scan"
    digest = hashlib.sha1(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return root / f"{digest}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["files"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # absent or damaged cache: scan again


def _write_cache(path: Path, folder: Path, entries: dict) -> None:
    try:
        with atomic_path(path, durable=False) as part, open(part, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "folder": str(folder.resolve()), "files": entries}, f,
                      ensure_ascii=False)
    except OSError:
        pass  # a read-only cache location only costs a rescan next time
