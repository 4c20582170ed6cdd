"""``data.cache``: a small dataset's images decoded once into one uint8 buffer, so every epoch augments from memory
instead of decoding JPEGs again. DataLoader workers share the buffer (forked processes see the parent's pages
without copying them: one contiguous array, no per-image Python objects whose reference counts would touch it).
Several processes on one node (DDP) share one copy too: the node's first process decodes into a file in shared
memory, the others map that file (see ``NodeShare``).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..utils.files import atomic_path
from .images import BadImageError, load_image

# The share of the memory available now that a cache may take: the rest is for the model, loader and OS.
MEMORY_SHARE = 0.5


@dataclass
class NodeShare:
    """How the processes of one node share decoded images: the ``leader`` decodes into a file in shared memory
    whose name starts with ``name`` (the same in the node's processes, unique on the node), every process waits at
    ``barrier`` (all of them, on every node, call it as often) and then maps the file read-only."""
    name: str
    leader: bool
    barrier: Callable[[], None]

    @classmethod
    def for_trainer(cls, trainer) -> NodeShare | None:
        """Lightning's processes share per node; None for one process (a private buffer is simpler there)."""
        if trainer is None or trainer.world_size < 2:
            return None
        token = trainer.strategy.broadcast(secrets.token_hex(6))  # rank 0's: unique to this run
        return cls(f"vit-cache-{token}-node{trainer.node_rank}", trainer.local_rank == 0, trainer.strategy.barrier)


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
               threads: int | None = None, available: int | None = None,
               share: NodeShare | None = None) -> "DecodedImages":
        """Decode ``paths`` (with ``load_image``'s conversions) into one buffer, sized from the headers first, so a
        dataset that would not fit is refused before anything is decoded. A file that fails to decode raises
        ``BadImageError``, or, with ``on_bad``, is reported to it and left empty. With ``share``, the node's
        processes get one copy: only the leader decodes (and reports bad files), the others map its buffer."""
        if share is None:
            offsets = _plan(paths, in_chans, available)
            cache = cls(np.empty(int(offsets[-1]), dtype=np.uint8), offsets, np.zeros((len(paths), 3), np.int64))
            cache._fill(paths, in_chans, on_bad, threads)
            return cache
        digest = hashlib.sha1("\n".join([str(in_chans), *paths]).encode("utf-8", "surrogateescape")).hexdigest()
        name = f"{share.name}-{digest[:12]}.u8"
        error = None
        if share.leader:
            try:
                _write_shared(name, paths, in_chans, on_bad, threads, available)
            except Exception as err:  # noqa: BLE001 — raised below: the others must not wait at the barrier for ever
                error = err
        share.barrier()
        if error is not None:
            raise error
        path = next((folder / name for folder in _shared_folders() if (folder / name).is_file()), None)
        if path is None:
            raise RuntimeError(f"data.cache: the node's first process did not write the decoded images ({name}) "
                               f"to {' or '.join(map(str, _shared_folders()))}; see its error")
        cache = cls._map(path, len(paths))
        share.barrier()
        if share.leader:  # every process maps it now: the name can go, the pages stay until the last one unmaps
            path.unlink(missing_ok=True)
        return cache

    def _fill(self, paths: Sequence[str], in_chans: int, on_bad, threads: int | None) -> None:
        buffer, offsets, shapes = self.buffer, self.offsets, self.shapes

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

    @classmethod
    def _map(cls, path: Path, n: int, mode: str = "r") -> DecodedImages:
        """The file's layout: offsets (n + 1) and shapes (n x 3) as int64, then the pixels."""
        data = np.memmap(path, dtype=np.uint8, mode=mode)
        header = data[:8 * _header_words(n)].view(np.int64)
        return cls(data[8 * _header_words(n):], header[:n + 1], header[n + 1:].reshape(n, 3))


def _header_words(n: int) -> int:
    return (n + 1) + 3 * n


def _plan(paths: Sequence[str], in_chans: int, available: int | None, copy: str = "") -> np.ndarray:
    """Each image's start in the buffer (and the end), from the headers; refused when it would not fit."""
    sizes = [_pixels(p) * in_chans for p in paths]
    need = sum(sizes)
    available = _available_memory() if available is None else available
    if available is not None and need > MEMORY_SHARE * available:
        raise ValueError(f"data.cache: decoding {len(paths)} images needs {need / 2**30:.2f} GiB{copy}, more than "
                         f"{MEMORY_SHARE:.0%} of the {available / 2**30:.2f} GiB of memory available; set "
                         f"data.cache: false (images are then decoded every epoch)")
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    return offsets


def _write_shared(name: str, paths: Sequence[str], in_chans: int, on_bad, threads: int | None,
                  available: int | None) -> None:
    offsets = _plan(paths, in_chans, available, copy=" (one copy for all processes on this node)")
    size = 8 * _header_words(len(paths)) + int(offsets[-1])
    folders = _shared_folders()
    free = {folder: shutil.disk_usage(folder).free for folder in folders}
    folder = next((f for f in folders if free[f] >= size), None)
    if folder is None:
        raise ValueError(f"data.cache: the decoded images need {size / 2**30:.2f} GiB of shared memory, more than "
                         + " or ".join(f"the {free[f] / 2**30:.2f} GiB free in {f}" for f in folders)
                         + "; set data.cache: false (images are then decoded every epoch)")
    path = folder / name
    atexit.register(path.unlink, missing_ok=True)  # a run that stops before every process mapped it leaves nothing
    with atomic_path(path, durable=False) as part:  # the others never see a half-written file
        with open(part, "r+b") as f:
            f.truncate(size)
            if hasattr(os, "posix_fallocate"):  # reserve it now: a full tmpfs would kill a later write with SIGBUS
                os.posix_fallocate(f.fileno(), 0, size)
        cache = DecodedImages._map(part, len(paths), mode="r+")
        cache.offsets[:] = offsets
        cache._fill(paths, in_chans, on_bad, threads)


def _shared_folders() -> list[Path]:
    """Where the node's copy may go: /dev/shm (memory), else the temp folder (where there is no /dev/shm, or it
    is too small, as a container's 64 MiB default: its page cache still holds one copy for the node)."""
    return [Path(p) for p in dict.fromkeys(("/dev/shm", tempfile.gettempdir())) if os.path.isdir(p)]


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
