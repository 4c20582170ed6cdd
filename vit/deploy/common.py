"""What every inference backend shares: the ``Runner`` it returns, its errors, and the weight-keyed cache its
exported files live in."""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package or compiler, precision not native) or whose answers differ
    from eager fp32."""


class VerificationError(BackendError):
    """A backend that runs, but whose top-1 answers on the probe batch differ from eager fp32's."""


@dataclass
class Runner:
    """A model ready for inference: ``runner(images)`` -> logits (fp32), or embeddings for an embedder. ``model`` is
    the eager fp32 model it was built from (class names, ``img_size``, mean/std); ``agreement``/``max_diff``: the
    share of probe images that agree with eager fp32 (top-1, or cosine for ``compare="cosine"``) and the max
    |output difference| (None where not checked); ``cosine``: the lowest cosine similarity on the probe
    (``compare="cosine"`` only); ``path``: the file it runs (ONNX or OpenVINO IR), if any."""
    backend: str
    precision: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    agreement: float | None = None
    max_diff: float | None = None
    path: Path | None = None
    reason: str = ""  # how it was chosen: "as asked", or auto's order and where it came from
    cosine: float | None = None

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def quantize(self) -> str | None:
        """The old name of an int8 runner's precision: "int8", else None."""
        return "int8" if self.precision == "int8" else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(images).float()


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose arg-max equals the reference's.

    Example:
        >>> top1_agreement(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[2., 0.], [2., 0.]]))
        0.5
    """
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def default_cache_dir(kind: str = "onnx") -> Path:
    """Where exported models are kept: ``$VIT_CACHE_DIR/<kind>``, else ``~/.cache/vit/<kind>`` (kind ``onnx`` or
    ``openvino``), each file named by ``weights_key``."""
    return Path(os.environ.get("VIT_CACHE_DIR") or Path.home() / ".cache" / "vit") / kind


def cache_folder(cache_dir: str | os.PathLike | None, kind: str) -> Path:
    """``cache_dir/<kind>`` when given (the same layout as ``default_cache_dir``), else ``default_cache_dir(kind)``."""
    return Path(cache_dir).expanduser() / kind if cache_dir is not None else default_cache_dir(kind)


def weights_key(model: nn.Module, *extra: str) -> str:
    """A short hash of the model's architecture and weights (and ``extra``), naming its cached exports."""
    digest = hashlib.sha256(repr(getattr(model, "config", type(model).__name__)).encode())
    for part in (*extra, torch.__version__):
        digest.update(part.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:20]


def atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary folder beside ``path``, then the result renamed to ``path`` (with a
    sibling of the same stem, e.g. OpenVINO's ``.bin`` next to its ``.xml``), so a killed export never leaves a
    half file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        write(Path(tmp) / path.name)
        for written in sorted(Path(tmp).iterdir(), key=lambda p: p == Path(tmp) / path.name):
            os.replace(written, path.parent / written.name)  # the named file last: its presence means complete


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def noise(model: nn.Module, batch: int) -> torch.Tensor:
    """Seeded standard-normal images of the model's input shape, on its device."""
    height, width = getattr(model, "img_size", (224, 224))
    return torch.randn(batch, getattr(model, "in_chans", 3), height, width,
                       generator=torch.Generator().manual_seed(0)).to(device_of(model))


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
