"""``data.cache``: a small dataset's images decoded once into one uint8 buffer, so every epoch augments from memory
instead of decoding JPEGs again. DataLoader workers share the buffer (forked processes see the parent's pages
without copying them: one contiguous array, no per-image Python objects whose reference counts would touch it).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .images import BadImageError, load_image

# The share of the memory available now that a cache may take: the rest is for the model, loader and OS.
MEMORY_SHARE = 0.5


class DecodedImages:
    """Decoded HWC uint8 images in one buffer; ``images[i]`` is a view, ``None`` for a file that failed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("RGB", (5, 3), (255, 0, 0)).save(f"{tmp}/a.png")
        ...     cache = DecodedImages.decode([f"{tmp}/a.png"], in_chans=3)
        >>> cache[0].shape, int(cache[0][0, 0, 0]), cache.nbytes
        ((3, 5, 3), 255, 45)
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray):
        self.buffer, self.offsets, self.shapes = buffer, offsets, shapes

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray | None:
        if self.shapes[i, 0] == 0:
            return None
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].reshape(tuple(self.shapes[i]))

    @classmethod
    def decode(cls, paths: Sequence[str], in_chans: int = 3, on_bad: Callable[[BadImageError], None] | None = None,
               threads: int | None = None, available: int | None = None) -> "DecodedImages":
        """Decode ``paths`` (with ``load_image``'s conversions) into one buffer, sized from the headers first, so a
        dataset that would not fit is refused before anything is decoded. A file that fails to decode raises
        ``BadImageError``, or, with ``on_bad``, is reported to it and left empty."""
        sizes = [_pixels(p) for p in paths]
        need = sum(sizes) * in_chans
        available = _available_memory() if available is None else available
        if available is not None and need > MEMORY_SHARE * available:
            raise ValueError(f"data.cache: decoding {len(paths)} images needs {need / 2**30:.2f} GiB, more than "
                             f"{MEMORY_SHARE:.0%} of the {available / 2**30:.2f} GiB of memory available; set "
                             f"data.cache: false (images are then decoded every epoch)")
        offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([s * in_chans for s in sizes])
        buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
        shapes = np.zeros((len(paths), 3), dtype=np.int64)

        def fill(i: int) -> None:
            try:
                image = load_image(paths[i], in_chans)
            except BadImageError as error:
                if on_bad is None:
                    raise
                on_bad(error)
                return
            if image.size != offsets[i + 1] - offsets[i]:  # the header lied about the size: treat as bad
                error = BadImageError(paths[i], f"decoded to {image.shape}, not the header's size")
                if on_bad is None:
                    raise error
                on_bad(error)
                return
            buffer[offsets[i]:offsets[i + 1]] = image.reshape(-1)
            shapes[i] = image.shape

        # Pillow releases the GIL while decoding: threads use every core without copying results between processes
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(len(paths))))
        return cls(buffer, offsets, shapes)


def _pixels(path: str | Path) -> int:
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
        return width * height
    except Exception:  # noqa: BLE001 — a bad file takes no room; decoding reports it
        return 0


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
