"""What the training CLI reads from a recipe before LightningCLI parses it: which task it is (its top-level
``task:`` key picks the LightningModule, DataModule and links) and whether it still uses the flat architecture keys
that moved under ``model.backbone``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from ..tasks.backbone import OVERRIDE_FIELDS


@dataclass(frozen=True)
class Task:
    """An image task as the training CLI knows it: its LightningModule and DataModule (by import path, so a task is
    only imported when a recipe asks for it), the data -> model values that must agree, the metric the
    checkpoints follow and the one the default run reports."""

    module: str
    data: str
    links: tuple[tuple[str, str, str], ...]  # (data key, model key, "parse" or "instantiate")
    monitor: str
    checkpoint_name: str

    def classes(self) -> tuple[type, type]:
        import importlib
        return tuple(getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2])
                     for path in (self.module, self.data))


# The recipe's top-level `task:` key picks one (classification when absent).
TASKS = {
    "classification": Task("vit.tasks.classification.ImageClassifier", "vit.data.ImageDataModule",
                           (("data.num_classes", "model.num_classes", "instantiate"),
                            ("data.class_names", "model.class_names", "instantiate"),
                            ("data.img_size", "model.backbone.img_size", "parse"),
                            ("data.in_chans", "model.backbone.in_chans", "parse")),
                           "val/acc", "epoch{epoch:03d}-acc{val/acc:.4f}"),
    "detection": Task("vit.tasks.detection.ObjectDetector", "vit.data.detection.DetectionDataModule",
                      (("data.num_classes", "model.num_classes", "instantiate"),
                       ("data.class_names", "model.class_names", "instantiate"),
                       ("data.img_size", "model.image_size", "parse")),
                      "val/map", "epoch{epoch:03d}-map{val/map:.4f}"),
    "segmentation": Task("vit.tasks.segmentation.Segmenter", "vit.data.segmentation.SegmentationDataModule",
                         (("data.num_classes", "model.num_classes", "instantiate"),
                          ("data.class_names", "model.class_names", "instantiate"),
                          ("data.img_size", "model.image_size", "parse"),
                          ("data.ignore_index", "model.ignore_index", "parse")),
                         "val/miou", "epoch{epoch:03d}-miou{val/miou:.4f}"),
    "image_text": Task("vit.tasks.image_text.ImageTextModule", "vit.data.image_text.ImageTextDataModule",
                       (("data.img_size", "model.backbone.img_size", "parse"),
                        ("data.in_chans", "model.backbone.in_chans", "parse")),
                       "val/acc", "epoch{epoch:03d}-acc{val/acc:.4f}"),
}


def config_files(args: list[str]) -> list[tuple[int, Any]]:
    """The ``--config`` files of a command line, parsed: (position of the flag, the YAML's content); a file that is
    missing or not valid YAML is left to jsonargparse, which reports it.

    Example:
        >>> config_files(["fit", "--model.lr", "0.1"])
        []
    """
    found = []
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path and Path(path).is_file():
            try:
                found.append((i, yaml.safe_load(Path(path).read_text(encoding="utf-8"))))
            except yaml.YAMLError:
                pass
    return found


def task_of(args) -> str:
    """The task a command line asks for: ``--task NAME``, else the last ``task:`` of its ``--config`` files, else
    classification.

    Example:
        >>> task_of(["fit", "--task", "detection"]), task_of(["fit", "--model.lr", "0.1"])
        ('detection', 'classification')
    """
    found = "classification"
    if isinstance(args, (Mapping, Namespace)):
        config = args.as_dict() if isinstance(args, Namespace) else args
        return str(config.get("task") or found)
    args = list(args or [])
    configs = dict(config_files(args))
    for i, arg in enumerate(args):
        config = configs.get(i)
        if isinstance(config, Mapping) and config.get("task"):
            found = str(config["task"])
        if arg == "--task" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--task="):
            found = arg.split("=", 1)[1]
    if found not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {found!r}")
    return found


# Keys that moved from model.* to model.backbone.* when every task came to share one backbone description.
MOVED_TO_BACKBONE = ("arch", "pretrained", "freeze", "layer_decay", "grad_checkpointing", *OVERRIDE_FIELDS)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def check_moved_keys(args) -> None:
    """A clear error for the flat architecture keys of earlier recipes (``model.embed_dim``), naming the new
    ones (``model.backbone.embed_dim``), whether they come from the command line or a ``--config`` file.

    Example:
        >>> check_moved_keys(["fit", "--model.embed_dim", "64", "--model.lr", "0.01"])
        Traceback (most recent call last):
        ...
        ValueError: model.embed_dim moved to model.backbone.embed_dim (on the command line) ...; see configs/digits.yaml)
    """
    found: list[tuple[str, str]] = []  # (key, where)

    def scan(config, where: str) -> None:
        if not isinstance(config, Mapping):
            return
        model = config.get("model")
        if isinstance(model, Mapping):
            found.extend((key, where) for key in model if key in MOVED_TO_BACKBONE)
        for sub in SUBCOMMANDS:
            scan(config.get(sub), where)

    if isinstance(args, (Mapping, Namespace)):
        scan(args.as_dict() if isinstance(args, Namespace) else args, "in the configuration")
    else:
        args = list(args or [])
        configs = dict(config_files(args))
        for i, arg in enumerate(args):
            key = arg[len("--model."):].split("=")[0] if arg.startswith("--model.") else None
            if key in MOVED_TO_BACKBONE:
                found.append((key, "on the command line"))
            if i in configs:
                scan(configs[i], f"in {args[i + 1] if arg in ('--config', '-c') else arg.split('=', 1)[1]}")
    if found:
        moved = "; ".join(f"model.{key} moved to model.backbone.{key} ({where})" for key, where in found)
        raise ValueError(f"{moved} (every task takes the same backbone description: architecture, pretrained "
                         f"weights, freezing, layer decay; see configs/digits.yaml)")
