"""Zero-shot classification with a frozen image-text model: class names -> prompts -> text embeddings -> one
classifier column per class; images are scored by cosine similarity to the columns.

    zeroshot_classifier(model, class_names, templates) -> (D, C)   (open_clip's build_zero_shot_classifier)
    zeroshot_probabilities(model, images, classifier)   -> (B, C)   (softmax for CLIP, sigmoid for SigLIP)
    classify_images(model, images, classifier)          -> ZeroShotResult (files, labels, probabilities)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.transforms import eval_transform
from ..models.image_text import ImageTextModel
from .templates import TEMPLATES

Template = str | Callable[[str], str]


def read_templates(spec: str | os.PathLike | Sequence[Template]) -> list[Template]:
    """``"openai"`` (80 templates), ``"simple"`` (one), a text file with one template per line (``#`` comments and
    blank lines skipped), or a list of strings with one ``{}`` / callables. Each string must hold ``{}`` once.

    Example:
        >>> len(read_templates("openai")), read_templates("simple")
        (80, ['a photo of a {}.'])
    """
    if isinstance(spec, (str, os.PathLike)):
        if str(spec) in TEMPLATES:
            return list(TEMPLATES[str(spec)])
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--templates: expected {', '.join(TEMPLATES)} or a text file of templates, got {spec!r} "
                             f"(no such file)")
        templates: list[Template] = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                                     if line.strip() and not line.strip().startswith("#")]
        where = str(path)
    else:
        templates, where = list(spec), "templates"
    if not templates:
        raise ValueError(f"{where}: no templates")
    for template in templates:
        if isinstance(template, str) and template.count("{}") != 1:
            raise ValueError(f"{where}: each template needs exactly one '{{}}' for the class name, got {template!r}")
        if not isinstance(template, str) and not callable(template):
            raise ValueError(f"{where}: a template is a string with '{{}}' or a callable, got {template!r}")
    return templates


def read_class_names(classes: str | None = None, classes_file: str | os.PathLike | None = None) -> list[str]:
    """Class names from ``"cat,dog,bird"`` or a file with one name per line.

    Example:
        >>> read_class_names("cat, dog ,bird")
        ['cat', 'dog', 'bird']
    """
    if (classes is None) == (classes_file is None):
        raise ValueError("give the class names with --classes 'a,b,c' or --classes-file FILE (one of them)")
    if classes is not None:
        names = [n.strip() for n in classes.split(",") if n.strip()]
        where = "--classes"
    else:
        path = Path(classes_file)
        if not path.is_file():
            raise ValueError(f"--classes-file: {path}: no such file")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        where = str(path)
    if len(names) < 2:
        raise ValueError(f"{where}: expected at least two class names, got {names}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: class names repeated: {', '.join(duplicates)}")
    return names


@torch.no_grad()
def zeroshot_classifier(model: ImageTextModel, class_names: Sequence[str],
                        templates: str | Sequence[Template] = "openai", batch_size: int = 10) -> torch.Tensor:
    """(D, C) zero-shot weights: for each class, every template filled with its name, embedded and normalised, the
    mean over templates normalised again (open_clip's ``build_zero_shot_classifier``). ``templates``: strings with
    one ``{}``, callables, or ``"openai"`` / ``"simple"``; ``batch_size`` classes are embedded at a time.

    Example:
        >>> weights = zeroshot_classifier(model, ["cat", "dog"], "simple")  # doctest: +SKIP
        >>> weights.shape  # doctest: +SKIP
        torch.Size([512, 2])
    """
    templates = read_templates(templates)
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names: expected at least one class name")
    device = next(model.parameters()).device
    columns = []
    for start in range(0, len(class_names), batch_size):
        batch = class_names[start:start + batch_size]
        texts = [t.format(name) if isinstance(t, str) else t(name) for name in batch for t in templates]
        features = model.encode_text(model.tokenize(texts).to(device), normalize=True)
        features = features.reshape(len(batch), len(templates), -1).mean(dim=1)  # (classes, templates, D) -> (classes, D)
        columns.append(F.normalize(features, dim=-1).T)
    return torch.cat(columns, dim=1)


@torch.no_grad()
def zeroshot_probabilities(model: ImageTextModel, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities: the scaled cosine similarities through a softmax over classes (CLIP), or a
    sigmoid per class (SigLIP, with its ``logit_bias``)."""
    return probabilities_of(model, model.encode_image(images), classifier)


@torch.no_grad()
def probabilities_of(model: ImageTextModel, features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """``zeroshot_probabilities`` from image features (B, D) already in the joint space (``encode_image``'s, or
    a runner's of ``Embedder(model.visual, "proj")``)."""
    features = F.normalize(features.float(), dim=-1)
    logits = model.logit_scale.exp().float() * features @ classifier.to(features.device, torch.float32)
    if model.logit_bias is not None:
        return torch.sigmoid(logits + model.logit_bias.float())
    return logits.softmax(dim=-1)


@dataclass
class ZeroShotResult:
    """What ``classify_images`` found: ``files``; ``labels`` (index into the class names, -1 unlabelled);
    ``probabilities`` (N, C); ``skipped`` (path, reason) for files that could not be read; ``folder_classes``: the
    class sub-folders, when the images were a labelled folder."""
    files: list[str]
    labels: torch.Tensor
    probabilities: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folder_classes: list[str] | None = None

    @property
    def predictions(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def accuracy(self) -> float:
        """Fraction of labelled images whose most probable class is their own."""
        return float((self.predictions == self.labels).float().mean())

    def confusion_matrix(self, num_classes: int) -> torch.Tensor:
        """(C, C) counts, rows the true class, columns the predicted one."""
        return torch.bincount(self.labels * num_classes + self.predictions,
                              minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classify_images(model: ImageTextModel, images: str | os.PathLike | Sequence, classifier: torch.Tensor,
                    class_names: Sequence[str] | None = None, batch_size: int = 32,
                    on_bad_image: str = "skip", *, backend: str = "auto", precision: str = "auto",
                    calibration: torch.Tensor | str | os.PathLike | None = None,
                    log: Callable[[str], None] | None = None) -> ZeroShotResult:
    """Score image files (a folder, files, a ``.txt`` list) against the classifier's classes, with the model's own
    preprocessing (``pretrained_cfg``: size, mean/std, crop). A folder of class sub-folders is labelled by folder
    name, matched to ``class_names`` (all of them must be among the names).

    The image tower runs through ``create_runner(Embedder(model.visual, "proj"), backend, precision,
    compare="cosine")`` (see ``vit.deploy.runners``; "auto" by default), checked on the first 16 images, int8
    calibrated on ``calibration`` (a tensor, or a folder / ``.txt`` list of images) else on them; its choice is
    logged as one line through ``log`` (default stderr)."""
    from ..deploy.runners import create_runner
    from .backbone import Embedder
    from .extract import ImageFiles, collect_images
    from .running import calibration_batch, first_images

    samples, folder_classes, skipped = collect_images(images, on_bad_image)
    labels = [label for _, label in samples]
    if folder_classes is not None and class_names is not None:
        unknown = [name for name in folder_classes if name not in class_names]
        if unknown:
            raise ValueError(f"{images}: class folders {unknown} are not among the class names {list(class_names)}")
        labels = [list(class_names).index(folder_classes[label]) for label in labels]
    if not samples:
        raise ValueError(f"{images}: no readable images")
    cfg = getattr(model.visual, "pretrained_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or (0.5, 0.5, 0.5), cfg.get("std") or (0.5, 0.5, 0.5)
    transform = eval_transform(model.visual.img_size, mean, std, crop_pct=cfg.get("crop_pct") or 1.0)
    dataset = ImageFiles([path for path, _ in samples], transform, model.visual.in_chans, model.visual.img_size,
                         on_bad_image)
    device = next(model.parameters()).device
    model.eval()
    probe = first_images(dataset)
    runner = create_runner(Embedder(model.visual, "proj", image_tower=True), backend, precision,
                           probe=probe.to(device) if probe is not None else None,
                           calibration=calibration_batch(calibration, transform, model.visual.in_chans),
                           compare="cosine", log=log)
    kept, probabilities = [], []
    for batch, index, reasons in DataLoader(dataset, batch_size=batch_size):
        probs = probabilities_of(model, runner(batch.to(device)), classifier).cpu()
        for row, (i, reason) in enumerate(zip(index.tolist(), reasons)):
            if reason:
                skipped.append((samples[i][0], reason))
            else:
                kept.append(i)
                probabilities.append(probs[row])
    return ZeroShotResult([samples[i][0] for i in kept], torch.tensor([labels[i] for i in kept], dtype=torch.long),
                          torch.stack(probabilities) if probabilities else torch.zeros(0, classifier.shape[1]),
                          skipped, folder_classes)
