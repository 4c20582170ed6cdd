"""How a frozen backbone runs for feature extraction: in one CPU process, a runner of ``vit.deploy.runners``
(``create_runner`` on an ``Embedder``, checked by cosine similarity on the first images); on GPUs or several
devices, eagerly in Lightning."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..data.folder import list_images
from ..data.images import load_image
from ..deploy.runners import BACKENDS, PROBE_SIZE, Runner, create_runner
from ..models.vision import VisionTransformer
from .backbone import Embedder


def one_cpu_process(trainer_options: dict[str, Any]) -> bool:
    """Whether Lightning would run these ``Trainer`` options as one process on the CPU (accelerator ``cpu``, or
    ``auto`` with no GPU; one device): then a runner of ``vit.deploy.runners`` can take the model's place."""
    accelerator = str(trainer_options.get("accelerator", "auto")).lower()
    devices = trainer_options.get("devices", 1)
    one = devices in (1, "1", "auto") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if accelerator == "auto":
        mps = getattr(torch.backends, "mps", None)
        accelerator = "gpu" if torch.cuda.is_available() or (mps is not None and mps.is_available()) else "cpu"
    return accelerator == "cpu" and one and trainer_options.get("num_nodes", 1) in (1, "1")


def first_images(dataset: Dataset, limit: int = PROBE_SIZE) -> torch.Tensor | None:
    """The first ``limit`` images of an ``ImageFiles`` that decode, stacked (the runner's probe batch), or None."""
    images = []
    for i in range(len(dataset)):
        image, _, error = dataset[i]
        if not error:
            images.append(image)
        if len(images) == limit:
            break
    return torch.stack(images) if images else None


def calibration_batch(calibration: torch.Tensor | str | os.PathLike | None, transform, in_chans: int,
                      limit: int = 64) -> torch.Tensor | None:
    """int8 calibration images: a tensor as it is, or up to ``limit`` images of a folder (recursive, sorted, spread
    over it) or ``.txt`` list, preprocessed by ``transform`` as the images to embed are."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    paths = list_images(str(calibration))
    paths = paths[::max(1, len(paths) // limit)][:limit]
    return torch.stack([transform(image=load_image(path, in_chans))["image"] for path in paths])


def embedding_runner(model: VisionTransformer, pool: str, probe: torch.Tensor | None, *, backend: str = "auto",
                     precision: str = "auto", calibration: torch.Tensor | None = None,
                     log: Callable[[str], None] | None = None, trainer_options: dict[str, Any] | None = None
                     ) -> Runner | None:
    """The runner ``extract_features`` embeds with: ``create_runner(Embedder(model, pool), backend, precision,
    probe=probe, compare="cosine")`` when the ``Trainer`` options (default: one device, accelerator auto) make
    one CPU process; else None, as Lightning runs the model eagerly on GPUs or several devices (backend "auto" or
    "eager"; any other is a ``ValueError``), and the line ``runner: eager <precision> (...)`` says so. Either way
    the choice is logged once, through ``log`` (default: stderr)."""
    options = {"accelerator": "auto", "devices": 1, **(trainer_options or {})}
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"--backend: expected auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    if one_cpu_process(options):
        return create_runner(Embedder(model, pool), backend, precision, probe=probe, calibration=calibration,
                             compare="cosine", log=log)
    where = f"accelerator {options['accelerator']}, devices {options['devices']}"
    if backend not in ("auto", "eager"):
        raise ValueError(f"--backend {backend}: runs in one process on the CPU only; with {where} Lightning runs "
                         f"the model itself (use --backend auto or eager, or --accelerator cpu --devices 1)")
    if precision not in ("auto", "fp32"):
        raise ValueError(f"--precision {precision}: with {where} Lightning runs the model in fp32 (use --precision "
                         f"auto or fp32, or --accelerator cpu --devices 1)")
    from lightning.pytorch.utilities import rank_zero_only
    if rank_zero_only.rank == 0:
        (log or (lambda message: print(message, file=sys.stderr)))(
            f"runner: eager fp32 ({'auto' if backend == 'auto' else 'as asked'}: {where}, run by Lightning)")
    return None
