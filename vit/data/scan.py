"""Fast checks of image files before training: headers only (no full decode), cached per folder.

The cache is a small JSON file per scanned folder under ``$VIT_CACHE_DIR`` (default ``~/.cache/vit/scan``),
keyed on each file's relative path, modification time and size, so a second scan of an unchanged folder
opens no image at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from PIL import Image

from .datasets import bad_image_reason

CACHE_VERSION = 1


def check_image(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image, or ``None`` if its header is sound. Reads the header (and, for
    PNG, checks the chunk CRCs; for JPEG, that the end-of-image marker is there) without decoding pixels.

    Example:
        >>> check_image(__file__)
        'not an image Pillow can read'
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt = img.format
                img.verify()  # PNG: walks the chunks and their CRCs; most formats: a no-op
        if fmt == "JPEG" and not _has_jpeg_end(path):
            return "truncated JPEG (no end-of-image marker)"
    except Exception as err:  # any Pillow failure is a reason to report, not to crash the scan
        return bad_image_reason(err)
    return None


def _has_jpeg_end(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 1024))
        return b"\xff\xd9" in f.read()


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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "folder": str(folder.resolve()), "files": entries}, f,
                      ensure_ascii=False)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache location only costs a rescan next time
