"""Training CLI: LightningCLI over the recipe's task (classification: ImageClassifier + ImageDataModule; detection:
ObjectDetector + DetectionDataModule), with the default recipe built in."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Literal, get_type_hints

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..utils.hardware import native_bf16
from .recipes import MOVED_TO_BACKBONE, TASKS, check_moved_keys, task_of  # noqa: F401  (re-exported)
from .resume import (AtomicCheckpointIO, LastCheckpoint, ResumeState, SaveOnSignal, TrainingInterrupted,
                     find_last_checkpoint)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
DEFAULT_ROOT = "runs"  # trainer.default_root_dir unless given: logs, checkpoints, config.yaml, --ckpt_path last
RUN_NAME = "vit"  # runs are <root>/vit/version_N


class VitCLI(LightningCLI):
    """LightningCLI over the recipe's task (``task:``; classification by default) with the data -> model links that
    must agree (classes, image size, channels)."""

    phase = "parse"  # "configure" while building classes, "run" once a Trainer method runs (for main's errors)

    def __init__(self, *args, task: str = "classification", **kwargs):
        self.task_name, self.task = task, TASKS[task]
        super().__init__(*self.task.classes(), *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--task", choices=list(TASKS), default=self.task_name,
                            help="the image task of the recipe: its model and data classes and their links")
        for source, target, when in self.task.links:
            parser.link_arguments(source, target, apply_on=when)

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
                data.hparams[key] = list(values)  # recorded in the .ckpt, so vit predict normalises the same way
                config["data"][key] = list(values)  # and in the run's config.yaml

    def before_instantiate_classes(self) -> None:
        VitCLI.phase = "configure"
        config = self._subcommand_config(self.config)
        if config.get("weights_only", False) is None:
            config["weights_only"] = True  # our checkpoints hold tensors and plain values only
        if config.get("ckpt_path") == "last":
            # A new run writes to a new version_N, so Lightning's own "last" would find nothing there: search the
            # run root this command was given instead.
            root = run_root(config["trainer"].get("default_root_dir"))
            last = find_last_checkpoint(root)
            if last is None:
                raise ValueError(f"--ckpt_path last: no last.ckpt found under {root} (trainer.default_root_dir); "
                                 "start without --ckpt_path, pass the run's --trainer.default_root_dir, or pass "
                                 "the checkpoint's path")
            config["ckpt_path"] = str(last)
        check_devices(config["trainer"].get("accelerator"), config["trainer"].get("devices"))

    def _run_subcommand(self, subcommand: str) -> None:
        VitCLI.phase = "run"
        return super()._run_subcommand(subcommand)

    def parse_arguments(self, parser, args) -> None:
        check_moved_keys(args)
        # Lightning warns when `args` and sys.argv are both given; main() builds `args` from sys.argv itself (the
        # default run puts `fit --config digits.yaml` in front), so that caution does not apply here.
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def instantiate_trainer(self, **kwargs):
        config = self._subcommand_config(self.config_init)["trainer"]
        # `--trainer.enable_progress_bar false` should just work, not clash with the default rich bar.
        if config.get("enable_progress_bar") is False:
            self.trainer_defaults["callbacks"] = [c for c in self.trainer_defaults.get("callbacks", [])
                                                  if not isinstance(c, RichProgressBar)]
            callbacks = kwargs.get("callbacks")
            if callbacks:
                kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        # Loggers and the checkpoint plugin are objects, built here rather than given as trainer defaults: the
        # loggers need the parsed run root, and objects in the parser's defaults cannot be written to config.yaml.
        if config.get("logger") in (None, True):  # not configured: TensorBoard + CSV under the run root
            kwargs.setdefault("logger", default_loggers(run_root(config.get("default_root_dir"))))
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])  # a kill never leaves half a last.ckpt
        return super().instantiate_trainer(**kwargs)


def trainer_defaults(task: str = "classification") -> dict:
    """What every recipe gets unless it overrides it: the run root ``runs/`` (``trainer.default_root_dir``), and
    callbacks: best + last checkpoints on the task's validation metric (accuracy, mAP), LR monitor, rich progress
    bar, exact resume, save on SIGTERM/SIGINT. ``VitCLI.instantiate_trainer`` adds the loggers
    (``default_loggers``) and ``AtomicCheckpointIO``.
    """
    return {
        "default_root_dir": DEFAULT_ROOT,
        "callbacks": [
            LastCheckpoint(monitor=TASKS[task].monitor, mode="max", save_last=True, auto_insert_metric_name=False,
                           filename=TASKS[task].checkpoint_name),
            LearningRateMonitor(logging_interval="step"),
            RichProgressBar(),
            ResumeState(),
            SaveOnSignal(),
        ],
    }


def run_root(default_root_dir: str | os.PathLike | None) -> str:
    """The folder a run writes everything under: ``trainer.default_root_dir`` as Lightning reads it (unset is
    the current directory; the CLI's default is ``runs``)."""
    return os.fspath(default_root_dir) if default_root_dir is not None else os.getcwd()


def default_loggers(root: str | os.PathLike, name: str = RUN_NAME) -> list:
    """CSV + TensorBoard logs in one ``<root>/<name>/version_N`` (the next free N, chosen once for both).

    The CSV logger comes first: Lightning creates the loggers' folders in list order, and CSV's warns ("exists
    and is not empty") when TensorBoard's event file is already there. The first logger's folder is also where
    config.yaml and the checkpoints go; both loggers have the same one.

    Example:
        >>> [type(logger).__name__ for logger in default_loggers("runs")]
        ['CSVLogger', 'TensorBoardLogger']
    """
    version = _next_version(Path(root) / name)
    return [CSVLogger(root, name=name, version=version), TensorBoardLogger(root, name=name, version=version)]


# The precisions lightning.Trainer accepts, read from its signature (so a new Lightning's list comes along).
_TRAINER_PRECISION = get_type_hints(Trainer.__init__)["precision"]


class VitTrainer(Trainer):
    """``lightning.Trainer`` that also takes ``precision: auto``: bf16-mixed where the hardware runs bf16 natively,
    else 32-true (``resolve_precision``), decided when the Trainer is built and printed once.

    Args:
        precision: as ``lightning.Trainer`` ("32-true", "bf16-mixed", "16-mixed", "64-true", ...), or "auto":
            bf16-mixed on a CUDA GPU or CPU that runs bf16 natively, else 32-true (emulated bf16 on a CPU is many
            times slower than fp32). config.yaml keeps "auto", so a rerun on other hardware decides again.

    Example:
        >>> trainer = VitTrainer(precision="auto", accelerator="cpu", logger=False)
        trainer.precision auto -> ... (CPU ...)
        >>> trainer.precision in ("bf16-mixed", "32-true")
        True
    """

    def __init__(self, *, precision: _TRAINER_PRECISION | Literal["auto"] | None = None, **kwargs):
        if precision == "auto":
            precision, why = _auto_precision(kwargs.get("accelerator", "auto"))
            if rank_zero_only.rank == 0:
                print(f"trainer.precision auto -> {precision} ({why})", flush=True)
        super().__init__(precision=precision, **kwargs)


def resolve_precision(accelerator: str = "auto") -> str:
    """What ``precision: auto`` means on this machine: ``"bf16-mixed"`` on a CUDA GPU with native bf16 (Ampere and
    later) or a CPU with native bf16 (AVX512-BF16 or AMX on x86, BF16 on Arm), else ``"32-true"``: where bf16 is
    emulated it is many times slower than fp32.

    Example:
        >>> resolve_precision("cpu") in ("bf16-mixed", "32-true")
        True
    """
    return _auto_precision(accelerator)[0]


def _auto_precision(accelerator) -> tuple[str, str]:
    name = accelerator.lower() if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if (name == "auto" or "gpu" in name or "cuda" in name) and torch.cuda.is_available():
        native, why = native_bf16("cuda")
        return ("bf16-mixed" if native else "32-true"), why
    if name == "auto" and torch.backends.mps.is_available():
        return "32-true", "Apple MPS"
    if name == "auto" or "cpu" in name:
        native, why = native_bf16("cpu")
        return ("bf16-mixed" if native else "32-true"), why
    return "32-true", f"accelerator {accelerator}"


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
    _ignore_library_notices()
    task = task_of(args)
    return VitCLI(task=task, args=args, run=run, trainer_class=VitTrainer, trainer_defaults=trainer_defaults(task),
                  save_config_kwargs={"overwrite": True}, seed_everything_default=42)


def _ignore_library_notices() -> None:
    """Silence the warnings that are addressed to a library's own authors, not to whoever trains, and nothing else.

    Lightning 2.6's CombinedLoader (behind every Trainer loop) builds torch's ``LeafSpec``, which recent torch
    (2.14 here) deprecates; nothing in this project or a recipe can change that, so for our users the
    FutureWarning is a false alarm. Filtered by message and by the Lightning module that triggers it, so any
    other warning still shows (idempotent: ``warnings`` keeps one copy of a filter)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Lightning 2.6 advertises a cloud logger on every Trainer it builds; that line tells a user nothing about
    # their run. Only that message is dropped: every other line of Lightning's log still shows.
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropAdvertisement())


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg).lower()


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

    from ..checkpoints import CheckpointError
    from ..data.images import BadImageError
    from ..tasks.classification import ClassMismatchError, NonFiniteLossError
    known = (BadImageError, NonFiniteLossError, ClassMismatchError, CheckpointError, TrainingInterrupted)
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met a pickled object
        refused = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), text.strip())
        return (f"refused to load the checkpoint: it holds pickled Python objects, which loading would run "
                f"({refused}). Load only checkpoints you trust; ours hold tensors and plain values only")
    if "Caught BadImageError in DataLoader worker" in text:  # re-raised by torch with the worker's traceback
        return [line for line in text.splitlines() if "bad image" in line][-1].split("BadImageError: ")[-1]
    if "Caught BadSampleError in DataLoader worker" in text:  # a segmentation sample, as above
        return [line for line in text.splitlines() if "bad sample" in line][-1].split("BadSampleError: ")[-1]
    if isinstance(err, known) or (VitCLI.phase != "run" and isinstance(err, (ValueError, TypeError,
                                                                           FileNotFoundError,
                                                                           MisconfigurationException))):
        return text
    return None


def run_default(extra: list[str]) -> VitCLI:
    """Fit ``configs/digits.yaml`` plus any ``--key value`` overrides, or the recipe given with ``--config`` (on
    its own, exactly as ``fit --config`` reads it), then test: the best checkpoint on val, or with
    ``model.schedule: budget`` the final weights (EMA ones if on), whose schedule ended with the time."""
    start = time.perf_counter()
    # Without a recipe, the digits one; a recipe given stands on its own. (Layered under another recipe, the digits
    # recipe's settings for 8x8 digits leaked into it: no flips, its EMA, its model where the recipe set none.)
    gives_recipe = any(arg in ("--config", "-c") or arg.startswith("--config=") for arg in extra)
    base = [] if gives_recipe or task_of(extra) != "classification" else ["--config", str(DEFAULT_CONFIG)]
    if base and not DEFAULT_CONFIG.is_file():
        raise SystemExit(f"default recipe not found: {DEFAULT_CONFIG}; run from a clone of the repository "
                         f"or pass a recipe: python train.py --config <recipe>.yaml")
    app = cli(["fit", *base, *extra])
    if app.model.hparams.get("schedule") == "budget":
        weights = None  # the model as training left it
    else:
        # The best checkpoint by path: "best" makes Lightning warn about "multiple ModelCheckpoint callbacks", as
        # it counts SaveOnSignal, a Checkpoint that only saves on a signal.
        weights = getattr(app.trainer.checkpoint_callback, "best_model_path", "") or "best"
    results = app.trainer.test(app.model, datamodule=app.datamodule, ckpt_path=weights)
    wall = time.perf_counter() - start
    metrics = results[0] if results else {}
    if app.task_name == "detection":
        score = (f"test mAP@50: {metrics.get('test/map_50', float('nan')):.4f}, "
                 f"mAP: {metrics.get('test/map', float('nan')):.4f}")
    elif app.task_name == "segmentation":
        score = (f"test mIoU: {metrics.get('test/miou', float('nan')):.4f}, "
                 f"pixel accuracy: {metrics.get('test/pixel_acc', float('nan')):.4f}")
    else:
        score = f"test accuracy: {metrics.get('test/acc', float('nan')):.4f}"
    if app.trainer.is_global_zero:
        print(f"{app.datamodule.dataset} {score} on {len(app.datamodule.test_set)} held-out images | wall time: "
              f"{wall:.1f} s", flush=True)
    return app
