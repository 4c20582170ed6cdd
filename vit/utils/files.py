"""Writing files so that a kill at any moment leaves either the old or the new complete file, never half of one."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; when the block ends without an error it is renamed over
    ``path`` (``os.replace`` is atomic), else removed. ``durable`` also flushes the file and the rename to disk
    (checkpoints); caches that can be rebuilt skip it.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with atomic_path(f"{tmp}/notes.txt") as part:
        ...         _ = part.write_text("complete")
        ...     sorted(p.name for p in Path(tmp).iterdir()), Path(f"{tmp}/notes.txt").read_text()
        (['notes.txt'], 'complete')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    part = Path(name)
    try:
        yield part
        if durable:
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable (POSIX); harmless to skip where directories cannot be opened
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
