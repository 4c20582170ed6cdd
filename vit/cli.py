"""Training CLI: LightningCLI over ImageClassifier + ImageDataModule, with the default recipe built in."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .data import ImageDataModule
from .module import ImageClassifier
from .resume import AtomicCheckpointIO, LastCheckpoint, ResumeState, SaveOnSignal, TrainingInterrupted, find_last_checkpoint

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


class VitCLI(LightningCLI):
    """LightningCLI with the data -> model links that must agree (classes, image size, channels)."""

    phase = "parse"  # "configure" while building classes, "run" once a Trainer method runs (for main's errors)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.in_chans", "model.in_chans")

    def _subcommand_config(self, config):
        """The running subcommand's part of a parsed config (the whole config when there is no subcommand)."""
        return config[self.subcommand] if self.subcommand else config

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self._use_pretrained_normalisation()

    def _use_pretrained_normalisation(self) -> None:
        """Normalise as the pretrained weights expect (their mean/std) unless data.mean/std are set. Done after
        the model is built, so the weights are read once and the model never imports data code."""
        config = self._subcommand_config(self.config)
        cfg = getattr(getattr(self.model, "model", None), "pretrained_cfg", None) or {}
        data = self.datamodule
        if data is None or cfg.get("mean") is None or cfg.get("std") is None:
            return
        for key in ("mean", "std"):
            if config["data"].get(key) is None and len(cfg[key]) in (1, data.in_chans):
                values = tuple(float(v) for v in cfg[key]) * (data.in_chans // len(cfg[key]))
                setattr(data, key, values)
                data.hparams[key] = list(values)  # recorded in the .ckpt, so vit.predict normalises the same way
                config["data"][key] = list(values)  # and in the run's config.yaml

    def before_instantiate_classes(self) -> None:
        VitCLI.phase = "configure"
        config = self._subcommand_config(self.config)
        if config.get("weights_only", False) is None:
            config["weights_only"] = True  # our checkpoints hold tensors and plain values only
        if config.get("ckpt_path") == "last":
            # A new run writes to a new version_N, so Lightning's own "last" would find nothing there.
            last = find_last_checkpoint("runs")
            if last is None:
                raise ValueError("--ckpt_path last: no runs/**/last.ckpt found (start without --ckpt_path, or "
                                 "pass the checkpoint's path)")
            config["ckpt_path"] = str(last)
        check_devices(config["trainer"].get("accelerator"), config["trainer"].get("devices"))

    def _run_subcommand(self, subcommand: str) -> None:
        VitCLI.phase = "run"
        return super()._run_subcommand(subcommand)

    def instantiate_trainer(self, **kwargs):
        # `--trainer.enable_progress_bar false` should just work, not clash with the default rich bar.
        config = self._subcommand_config(self.config_init)
        if config["trainer"].get("enable_progress_bar") is False:
            self.trainer_defaults["callbacks"] = [c for c in self.trainer_defaults.get("callbacks", [])
                                                  if not isinstance(c, RichProgressBar)]
            callbacks = kwargs.get("callbacks")
            if callbacks:
                kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        return super().instantiate_trainer(**kwargs)


def trainer_defaults(run_name: str = "vit") -> dict:
    """Callbacks and loggers every recipe gets unless it overrides them: best + last checkpoints on
    val accuracy, LR monitor, rich progress bar, TensorBoard + CSV logs under ``runs/<run_name>/version_N``."""
    version = _next_version(Path("runs") / run_name)
    return {
        "callbacks": [
            LastCheckpoint(monitor="val/acc", mode="max", save_last=True, auto_insert_metric_name=False,
                            filename="epoch{epoch:03d}-acc{val/acc:.4f}"),
            LearningRateMonitor(logging_interval="step"),
            RichProgressBar(),
            ResumeState(),
            SaveOnSignal(),
        ],
        "logger": [TensorBoardLogger("runs", name=run_name, version=version),
                   CSVLogger("runs", name=run_name, version=version)],
        "plugins": [AtomicCheckpointIO()],  # last.ckpt is replaced atomically: a kill never leaves half a file
    }


def check_devices(accelerator, devices) -> None:
    """Fail before any training if ``trainer.devices`` asks for more devices than this machine has."""
    if devices is None or devices == "auto" or devices == -1 or devices == "-1":
        return
    if isinstance(devices, (list, tuple)):
        wanted = len(devices)
    elif isinstance(devices, str) and "," in devices:
        wanted = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            wanted = int(devices)
        except (TypeError, ValueError):
            return  # Lightning reports formats it does not know
    import torch
    accelerator = accelerator or "auto"
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        available, kind = gpus, "CUDA GPU(s)"
    elif accelerator == "cpu" or (accelerator == "auto" and gpus == 0):
        available, kind = os.cpu_count() or 1, "CPU core(s)"
    else:
        return
    if wanted > available:
        raise ValueError(f"trainer.devices: asked for {wanted} devices but this machine has {available} {kind} "
                         f"(trainer.accelerator {accelerator}); use --trainer.devices {max(available, 1)} or 'auto'")


def _next_version(folder: Path) -> int:
    """The next free ``version_N`` under ``folder``, chosen once so TensorBoard and CSV share a run directory."""
    taken = [int(p.name.split("_")[1]) for p in folder.glob("version_*") if p.name.split("_")[1].isdigit()]
    return max(taken, default=-1) + 1


def cli(args: list[str] | None = None, run: bool = True) -> VitCLI:
    return VitCLI(ImageClassifier, ImageDataModule, args=args, run=run, trainer_defaults=trainer_defaults(),
                  save_config_kwargs={"overwrite": True}, seed_everything_default=42)


def main(args: list[str] | None = None) -> VitCLI | None:
    """``python train.py [fit|validate|test|predict] ...``; with no arguments: the default digits recipe,
    fit then test on the held-out split, ending with one line of test accuracy and wall time.

    Mistakes in the configuration and known failures (bad image, non-finite loss, checkpoint of other classes,
    a stop by signal) end with a one-paragraph message on stderr, not a traceback."""
    args = list(sys.argv[1:] if args is None else args)
    VitCLI.phase = "parse"
    try:
        if args and args[0] not in ("-h", "--help") and not args[0].startswith("--"):
            return cli(args)
        return run_default(args)
    except Exception as err:
        message = _clean_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        code = 128 + err.signum if isinstance(err, TrainingInterrupted) else 2 if VitCLI.phase != "run" else 1
        raise SystemExit(code) from None


def _clean_error(err: Exception) -> str | None:
    """The message to show for an expected failure, or None for a bug (which keeps its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .checkpoints import CheckpointError
    from .data.images import BadImageError
    from .module import ClassMismatchError, NonFiniteLossError
    known = (BadImageError, NonFiniteLossError, ClassMismatchError, CheckpointError, TrainingInterrupted)
    text = str(err)
    if "Caught BadImageError in DataLoader worker" in text:  # re-raised by torch with the worker's traceback
        return [line for line in text.splitlines() if "bad image" in line][-1].split("BadImageError: ")[-1]
    if isinstance(err, known) or (VitCLI.phase != "run" and isinstance(err, (ValueError, TypeError,
                                                                           FileNotFoundError,
                                                                           MisconfigurationException))):
        return text
    return None


def run_default(extra: list[str]) -> VitCLI:
    """Fit ``configs/digits.yaml`` (plus any ``--key value`` overrides), then test the best checkpoint."""
    if not DEFAULT_CONFIG.is_file():
        raise SystemExit(f"default recipe not found: {DEFAULT_CONFIG}; run from a clone of the repository "
                         f"or pass a recipe: python train.py fit --config <recipe>.yaml")
    start = time.perf_counter()
    app = cli(["fit", "--config", str(DEFAULT_CONFIG), *extra])
    results = app.trainer.test(app.model, datamodule=app.datamodule, ckpt_path="best")
    wall = time.perf_counter() - start
    acc = results[0]["test/acc"] if results else float("nan")
    if app.trainer.is_global_zero:
        print(f"digits test accuracy: {acc:.4f} on {len(app.datamodule.test_set)} held-out images | "
              f"wall time: {wall:.1f} s", flush=True)
    return app
