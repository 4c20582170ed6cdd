"""Decoding one image file, and the error every reader raises for a file it cannot use."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImageError(ValueError):
    """An image file that cannot be used (empty, not an image, truncated, corrupt, over Pillow's size guard)."""

    def __init__(self, path: str | Path, reason: str | None = None):
        # one argument: torch re-raising a worker's error with the full message
        super().__init__(f"bad image {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable, so it crosses from a loader worker with its message intact
        return BadImageError, (self.path, self.reason)


def load_image(path: str | Path, in_chans: int = 3) -> np.ndarray:
    """Decode an image file to HWC uint8 with ``in_chans`` channels (EXIF rotation applied; palette,
    grayscale, RGBA, CMYK and 16-bit images converted). Any file that cannot be decoded raises
    ``BadImageError`` naming the file and the reason.

    Example:
        >>> load_image("missing.png")
        Traceback (most recent call last):
        ...
        vit.data.images.BadImageError: bad image missing.png: file not found
    """
    try:
        return _decode(path, in_chans)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Exception as err:  # Pillow's plugins raise many types on garbage; callers need one
        raise BadImageError(path, bad_image_reason(err)) from None


def bad_image_reason(err: BaseException) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"too large for Pillow's decompression-bomb guard ({err}); if the file is trusted, raise "
                f"PIL.Image.MAX_IMAGE_PIXELS")
    text = str(err).strip() or type(err).__name__
    if "cannot identify image file" in text:
        return "not an image Pillow can read"
    return text


def _decode(path: str | Path, in_chans: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits instead of clipping.
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray(np.clip(arr / max(float(arr.max()), 1.0) * 255.0, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("L" if in_chans == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


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


def decode_image(data: bytes | str | None, in_chans: int, name: str) -> np.ndarray:
    """Encoded image bytes (or a file path) to HWC uint8 with ``in_chans`` channels, as ``load_image`` decodes files;
    failures raise ``BadImageError`` naming ``name`` (the sample, since bytes have no file name).

    Example:
        >>> decode_image(b"not an image", 3, "train[7]")
        Traceback (most recent call last):
        ...
        vit.data.images.BadImageError: bad image train[7]: not an image Pillow can read
    """
    if data is None:
        raise BadImageError(name, "no image data")
    if isinstance(data, (str, Path)):
        return load_image(data, in_chans)
    try:
        return load_image(io.BytesIO(data), in_chans)  # Pillow reads file objects as it reads files
    except BadImageError as err:
        raise BadImageError(name, err.reason) from None


class SkipLog:
    """Undecodable samples skipped while training: one warning, and each ``name<TAB>reason`` appended to ``path``
    (the run's ``skipped_images.tsv``), as image folders report them."""

    def __init__(self, path: str | Path | None = None):
        self.path = path
        self._warned = False

    def record(self, err: BadImageError) -> None:
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one short line: appends don't interleave
                f.write(f"{err.path}\t{err.reason}\n")
        if not self._warned:
            self._warned = True
            where = f"; listed in {self.path}" if self.path else ""
            warnings.warn(f"skipping images that fail to decode (first: {err.path}: {err.reason}){where}",
                          stacklevel=3)


def first_decodable(start: int, count: int, decode, on_bad_image: str, skips: SkipLog,
                    name_of) -> tuple[int, np.ndarray]:
    """(index, image) of the first of ``count`` samples from ``start`` (wrapping, at most 16 tries) that decodes:
    ``decode(j)`` gives sample j's HWC image, ``None`` for one already reported, or raises ``BadImageError``, which
    stops everything with ``on_bad_image="error"`` and is recorded in ``skips`` with ``"skip"`` (the next sample
    takes the place). ``name_of(start)`` names the sample when none of the tries decodes.

    Example:
        >>> first_decodable(0, 3, lambda j: None if j == 0 else np.zeros((2, 2, 3), np.uint8) + j, "skip", SkipLog(),
        ...                 str)[0]
        1
    """
    for attempt in range(min(count, 16)):
        j = (start + attempt) % count
        try:
            image = decode(j)
        except BadImageError as err:
            if on_bad_image != "skip":
                raise
            skips.record(err)
            continue
        if image is not None:
            return j, image
    raise BadImageError(name_of(start), "this and the following images could not be decoded")
