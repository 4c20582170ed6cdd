"""Feature extraction through ``Trainer.predict``: images -> frozen backbone -> pooled embeddings.

One ``LightningModule`` (``FeatureExtractor``) and one ``BasePredictionWriter`` (``FeatureWriter``), so Lightning
does devices, DDP and the progress bar. Under DDP each rank writes its own part file next to the output and rank 0
merges the parts into the output (in input order, each image once) and removes them.

In one process on the CPU the backbone runs through a runner of ``vit.deploy.runners`` (``create_runner`` on an
``Embedder``, backend and precision "auto" by default, checked against eager fp32 by cosine similarity on the first
images); on GPUs or several devices Lightning runs it eagerly, as it places and splits the work itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..data.folder import check_images, find_classes, list_images, scan_image_folder
from ..data.images import IMAGE_EXTENSIONS, BadImageError, check_image, load_image
from ..deploy.runners import Runner
from ..models.vision import VisionTransformer
from .backbone import at_image_size, check_pool, fingerprint, load_backbone, pool_tokens, preprocessing
from .features import Features, merge
from .running import calibration_batch, embedding_runner, first_images

ON_BAD_IMAGE = ("skip", "error")
Samples = list[tuple[str, int]]


# ---- inputs ------------------------------------------------------------------------------------------------
def collect_images(images: str | os.PathLike | Sequence, on_bad_image: str = "skip"
                   ) -> tuple[Samples, list[str] | None, list[tuple[str, str]]]:
    """(samples as (path, label), class names or None, skipped (path, reason)) for a folder, an image file, a
    ``.txt`` list of paths, or a list of these or of ``(path, label)`` pairs. A folder whose images all sit in
    sub-folders is read as ``folder/<class>/...`` (labels 0.. in sorted class order); anything else is unlabelled
    (label -1). Headers are checked as in training (cached per folder); with ``on_bad_image="skip"`` bad files are
    left out and listed, with ``"error"`` the first one raises ``BadImageError``.

    Example:
        >>> collect_images([("a.png", 0), ("b.png", 1)])
        ([('a.png', 0), ('b.png', 1)], None, [])
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"--on-bad-image: expected 'skip' or 'error', got {on_bad_image!r}")
    skipped: list[tuple[str, str]] = []
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = list(images)
    if images and all(isinstance(item, (tuple, list)) and len(item) == 2 for item in images):
        return [(str(p), int(y)) for p, y in images], None, skipped  # already checked by whoever labelled them
    if len(images) == 1 and _is_class_folder(Path(images[0]).expanduser()):
        folder = Path(images[0]).expanduser()
        class_names = find_classes(folder)
        return scan_image_folder(folder, class_names, on_bad_image, skipped), class_names, skipped
    samples: Samples = []
    for item in images:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{item}: no such image, folder or list file")
        if path.is_dir():
            try:
                files = list_images(path)
            except ValueError:
                raise ValueError(f"{item}: no image files in this folder ({', '.join(IMAGE_EXTENSIONS)})") from None
            problems = check_images(path, [Path(f) for f in files])
        else:
            files = list_images(path)
            problems = {f: reason for f in files if (reason := check_image(f)) is not None}
        for file in files:
            reason = problems.get(file)
            if reason is None:
                samples.append((file, -1))
            elif on_bad_image == "skip":
                skipped.append((file, reason))
            else:
                raise BadImageError(file, reason + "; pass --on-bad-image skip to leave such files out")
    return samples, None, skipped


def _is_class_folder(folder: Path) -> bool:
    if not folder.is_dir() or not find_classes(folder):
        return False
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return not loose


class ImageFiles(Dataset):
    """Image files decoded and transformed on access; ``(image, index, "")``, or for a file that fails to decode
    ``(zeros, index, reason)`` (with ``on_bad_image="skip"``), so the writer can leave exactly that one out."""

    def __init__(self, paths: Sequence[str], transform, in_chans: int, img_size: Sequence[int],
                 on_bad_image: str = "skip"):
        self.paths, self.transform, self.on_bad_image = list(paths), transform, on_bad_image
        self.blank = torch.zeros(in_chans, *img_size)
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = self.transform(image=load_image(self.paths[i], self.in_chans))["image"]
        except BadImageError as error:
            if self.on_bad_image != "skip":
                raise
            return self.blank, i, error.reason or str(error)
        return image, i, ""


# ---- Lightning ---------------------------------------------------------------------------------------------
class FeatureExtractor(L.LightningModule):
    """A frozen backbone whose ``predict_step`` returns (embeddings, dataset index, decode errors) per batch; with a
    ``runner`` (see ``embedding_runner``) the embeddings come from it, else from the model run eagerly."""

    def __init__(self, model: VisionTransformer, pool: str = "cls", runner: Runner | None = None):
        super().__init__()
        check_pool(model, pool)
        self.model = model.eval().requires_grad_(False)
        self.pool = pool
        self.runner = runner

    def predict_step(self, batch, batch_idx: int = 0):
        images, index, errors = batch
        if self.runner is not None:
            return self.runner(images).float(), index, list(errors)  # bf16 runners: stored as fp32 like eager
        return pool_tokens(self.model, self.model.forward_features(images), self.pool).float(), index, list(errors)


class FeatureWriter(BasePredictionWriter):
    """Collects ``FeatureExtractor`` batches into ``Features`` (``self.result``), written to ``out`` if given.

    Under DDP (``trainer.world_size > 1``) each rank writes ``<out stem>.partR-of-W.safetensors``; after a barrier
    rank 0 merges them into ``out`` (input order, each image once), removes them, and its ``result`` is the whole
    set; the other ranks' ``result`` is their own share.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None, meta: dict[str, Any] | None = None,
                 out: str | os.PathLike | None = None, skipped: Sequence[tuple[str, str]] = ()):
        super().__init__(write_interval="batch")
        self.scan_skipped = [tuple(item) for item in skipped]  # left out before extraction (header scan)
        self.paths, self.labels = list(paths), (list(labels) if labels is not None else None)
        self.class_names = list(class_names) if class_names is not None else None
        self.meta, self.out = dict(meta or {}), (Path(out) if out is not None else None)
        self.result: Features | None = None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.errors: list[tuple[int, str]] = []
        self.start = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        features, index, errors = prediction
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        self.parts.append((features[ok.to(features.device)].cpu(), index[ok.to(index.device)].cpu()))
        self.errors += [(int(i), e) for i, e in zip(index.tolist(), errors) if e]

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self.start
        features, index = merge(self.parts)
        if trainer.world_size == 1:
            self.result = self._features(features, index, self.errors, seconds)
            if self.out is not None:
                self.result.save(self.out)
            return
        if self.out is None:
            raise ValueError("extracting with several processes needs an output file (out=...): each rank writes "
                             "its part next to it")
        from safetensors.torch import save_file

        from ..utils.files import atomic_path
        part = self._part_path(trainer.global_rank, trainer.world_size)
        with atomic_path(part, durable=False) as tmp:
            save_file({"features": features.contiguous(), "index": index.contiguous()}, str(tmp),
                      metadata={"errors": json.dumps(self.errors), "seconds": json.dumps(seconds)})
        self.result = self._features(features, index, self.errors, seconds)
        trainer.strategy.barrier("vit.features.FeatureWriter")
        if trainer.is_global_zero:
            self.result = self._merge_parts(trainer.world_size)

    def _part_path(self, rank: int, world: int) -> Path:
        return self.out.with_name(f"{self.out.stem}.part{rank}-of-{world}{self.out.suffix}")

    def _merge_parts(self, world: int) -> Features:
        from safetensors import safe_open
        pieces, errors, seconds, shares = [], [], 0.0, []
        parts = [self._part_path(r, world) for r in range(world)]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:  # multi-node without a shared folder: leave each node's parts as they are
            warnings.warn(f"cannot merge the ranks' feature files: {', '.join(missing)} not found from rank 0 "
                          f"(no shared folder?); the parts stay where each rank wrote them", stacklevel=2)
            return self.result
        for path in parts:
            with safe_open(str(path), framework="pt") as f:
                pieces.append((f.get_tensor("features"), f.get_tensor("index")))
                errors += [tuple(e) for e in json.loads(f.metadata()["errors"])]
                seconds = max(seconds, json.loads(f.metadata()["seconds"]))
                shares.append(len(pieces[-1][1]) + len(json.loads(f.metadata()["errors"])))
        features, index = merge(pieces)
        result = self._features(features, index, errors, seconds)
        result.meta["images_per_rank"] = shares  # how Lightning's sampler split the work
        result.save(self.out)
        for path in parts:
            path.unlink(missing_ok=True)
        return result

    def _features(self, features, index, errors, seconds) -> Features:
        rows = index.tolist()
        labels = torch.tensor([self.labels[i] for i in rows], dtype=torch.long) if self.labels is not None else None
        done = len(rows) + len({i for i, _ in errors})
        meta = {**self.meta, "img_per_s": round(done / seconds, 2) if seconds > 0 else None}
        skipped = sorted({(self.paths[i], reason) for i, reason in errors} | set(self.scan_skipped))
        return Features(features, [self.paths[i] for i in rows], labels, self.class_names, meta, skipped)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up lines (GPU available, ...), its 'few workers' hint and a deprecation inside Lightning,
    silenced for a tool's output."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # Lightning's own, about torch
            yield
    finally:
        logger.setLevel(level)


# ---- the runner -------------------------------------------------------------------------------------------
def samples_runner(model: VisionTransformer, samples: Sequence[tuple[str, int]], *, pool: str = "cls",
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop_pct: float | None = None, backend: str = "auto", precision: str = "auto",
                   calibration: torch.Tensor | str | os.PathLike | None = None,
                   log: Callable[[str], None] | None = None, **trainer_options: Any) -> Runner | None:
    """``embedding_runner`` probed on the first images of ``samples`` ((path, label) pairs), preprocessed as
    ``extract_features`` would with the same options: build it once and pass it as ``runner=`` to several calls
    (``probe_backbone`` does, for the training and evaluation splits)."""
    _, transform = _preparation(model, mean, std, crop_pct)
    dataset = ImageFiles([str(path) for path, _ in samples], transform, model.in_chans, model.img_size)
    return embedding_runner(model, pool, first_images(dataset), backend=backend, precision=precision,
                            calibration=calibration_batch(calibration, transform, model.in_chans), log=log,
                            trainer_options=trainer_options)


def _preparation(model: VisionTransformer, mean, std, crop_pct) -> tuple[dict[str, Any], Any]:
    from ..data.transforms import eval_transform
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"--crop-pct: expected a value in (0, 1], got {crop_pct}")
    prep = preprocessing(model, mean, std, crop_pct)
    return prep, eval_transform(model.img_size, prep["mean"], prep["std"], crop_pct=prep["crop_pct"])


# ---- the one call ------------------------------------------------------------------------------------------
def extract_features(backbone: VisionTransformer | str, images, *, pool: str = "cls",
                     img_size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, crop_pct: float | None = None,
                     batch_size: int = 64, num_workers: int = 0,
                     on_bad_image: str = "skip", out: str | os.PathLike | None = None,
                     class_names: Sequence[str] | None = None, progress: bool = False,
                     backend: str = "auto", precision: str = "auto",
                     calibration: torch.Tensor | str | os.PathLike | None = None,
                     log: Callable[[str], None] | None = None, runner: Runner | None = None,
                     **trainer_options: Any) -> Features:
    """Embeddings of ``images`` by a frozen ``backbone`` (a model, or any source ``load_backbone`` reads), through
    ``Trainer.predict``.

    ``images``: a folder (``folder/<class>/...`` gives labels), an image, a ``.txt`` list, or a list of these or of
    ``(path, label)`` pairs. Images are resized, cropped and normalised the backbone's way (its ``img_size``, mean,
    std, ``crop_pct``) unless ``img_size``/``mean``/``std``/``crop_pct`` say otherwise (a new ``img_size``
    resamples the position embeddings). ``pool``: ``cls``, ``avg``, ``map`` (B, D), ``tokens`` (B, N, D) or ``proj``
    (a CLIP / SigLIP image tower's output: the joint image-text space ``vit search --text`` queries); see
    ``pool_tokens``. ``meta["fingerprint"]`` identifies the weights, so queries from another model are refused.
    Unreadable images are skipped and listed in ``result.skipped`` (``on_bad_image="error"``: raise). ``out`` also
    writes the result (see ``vit.features.features``); ``trainer_options`` go to ``lightning.Trainer``
    (``accelerator``, ``devices``, ``strategy``; several devices need ``out``).

    ``backend`` / ``precision`` ("auto" by default) choose how the backbone runs in one CPU process
    (``embedding_runner``: ``vit.deploy.runners.create_runner`` checked by cosine similarity on the first 16 images,
    int8 calibrated on ``calibration``, a tensor or a folder / ``.txt`` list of images, else on them); the choice is
    logged in one line through ``log`` (default stderr) and kept in ``meta["runner"]``. ``runner``: one built
    before for this backbone and pool (e.g. for another split), used as it is.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for name in ("cat", "dog"):
        ...         Path(tmp, name).mkdir()
        ...         Image.new("RGB", (40, 30), name == "dog" and "white" or "black").save(f"{tmp}/{name}/1.png")
        ...     feats = extract_features(model, tmp, accelerator="cpu")
        >>> tuple(feats.features.shape), feats.labels.tolist(), feats.class_names
        ((2, 32), [0, 1], ['cat', 'dog'])
    """
    model = load_backbone(backbone, img_size, image_text=pool == "proj") \
        if not isinstance(backbone, VisionTransformer) else at_image_size(backbone, img_size)
    check_pool(model, pool)
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"--batch-size must be positive and --num-workers >= 0, got {batch_size}, {num_workers}")
    samples, found_names, skipped = collect_images(images, on_bad_image)
    if not samples:
        raise ValueError(f"{images}: no readable images" + (f" ({len(skipped)} skipped)" if skipped else ""))
    class_names = list(class_names) if class_names is not None else found_names
    labels = [label for _, label in samples]
    labelled = class_names is not None or all(label >= 0 for label in labels)
    prep, transform = _preparation(model, mean, std, crop_pct)
    paths = [path for path, _ in samples]
    dataset = ImageFiles(paths, transform, model.in_chans, model.img_size, on_bad_image)
    options = {"accelerator": "auto", "devices": 1, **trainer_options}
    if runner is None:
        runner = embedding_runner(model, pool, first_images(dataset), backend=backend, precision=precision,
                                  calibration=calibration_batch(calibration, transform, model.in_chans), log=log,
                                  trainer_options=options)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available())
    if isinstance(backbone, VisionTransformer):
        source = (getattr(model, "pretrained_cfg", None) or {}).get("source")
    else:  # a local path is recorded absolute, so vit search finds the backbone from anywhere
        source = str(Path(backbone).expanduser().resolve()) if Path(backbone).expanduser().exists() else str(backbone)
    meta = {"source": source, "pool": pool, **prep, "fingerprint": fingerprint(model),
            "runner": runner.name if runner is not None else "eager fp32"}
    writer = FeatureWriter(paths, labels if labelled else None, class_names, meta, out, skipped)
    with quiet_lightning():
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=progress, callbacks=[writer], **options)
        trainer.predict(FeatureExtractor(model, pool, runner), dataloaders=loader, return_predictions=False)
    result = writer.result
    if result.skipped and trainer.is_global_zero:
        first = result.skipped[0]
        warnings.warn(f"skipped {len(result.skipped)} unreadable image file(s) (first: {first[0]}: {first[1]})",
                      stacklevel=2)
    return result
