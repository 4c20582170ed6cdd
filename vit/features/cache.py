"""A cache of extracted features, one ``.safetensors`` file per (backbone, image files, preprocessing, pool).

The key is a hash of the backbone source (with the (path, mtime, size) of its local files), each image's
(path, mtime, size, label), the image size, mean/std and pool. A changed, added or removed image or a rewritten
checkpoint gives a new key, so stale features are never read; old entries stay until the folder is cleared.
Location: ``cache_dir``, else ``$VIT_CACHE_DIR/features``, else ``~/.cache/vit/features``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .backbone import source_identity
from .features import Features

VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vit") / "features"


def cache_key(source: str, samples: Sequence[tuple[str, int]], **settings: Any) -> str:
    """A hex digest of everything the features depend on (see the module docstring).

    Example:
        >>> cache_key("vit_tiny_patch16_224", [], img_size=None) == cache_key("vit_tiny_patch16_224", [], img_size=None)
        True
    """
    files = []
    for path, label in samples:
        try:
            st = os.stat(path)
            files.append([str(Path(path).resolve()), st.st_mtime_ns, st.st_size, int(label)])
        except OSError:
            files.append([str(Path(path).resolve()), None, None, int(label)])  # extraction will skip it
    blob = json.dumps({"version": VERSION, "backbone": source_identity(source), "settings": settings, "files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def cached_features(source: str, samples: Sequence[tuple[str, int]], extract: Callable[[], Features],
                    cache_dir: str | os.PathLike | None = None, **settings: Any) -> tuple[Features, bool]:
    """(features, whether they came from the cache): read the entry for this key, or call ``extract()`` and
    store its result. A damaged entry is recomputed; a cache folder that cannot be written is only a slower run."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = folder / f"{cache_key(source, samples, **settings)}.safetensors"
    if entry.is_file():
        try:
            return Features.load(entry), True
        except (OSError, ValueError):
            pass
    features = extract()
    try:
        features.save(entry)
    except OSError:
        pass
    return features, False
