"""Training CLI: LightningCLI over ImageClassifier + ImageDataModule, with the default recipe built in."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .data import ImageDataModule
from .module import ImageClassifier

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


class VitCLI(LightningCLI):
    """LightningCLI with the data -> model links that must agree (classes, image size, channels)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.in_chans", "model.in_chans")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self._use_pretrained_normalisation()

    def _use_pretrained_normalisation(self) -> None:
        """Normalise as the pretrained weights expect (their mean/std) unless data.mean/std are set. Done after
        the model is built, so the weights are read once and the model never imports data code."""
        config = self.config[self.subcommand] if self.subcommand else self.config
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

    def instantiate_trainer(self, **kwargs):
        # `--trainer.enable_progress_bar false` should just work, not clash with the default rich bar.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
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
            ModelCheckpoint(monitor="val/acc", mode="max", save_last=True, auto_insert_metric_name=False,
                            filename="epoch{epoch:03d}-acc{val/acc:.4f}"),
            LearningRateMonitor(logging_interval="step"),
            RichProgressBar(),
        ],
        "logger": [TensorBoardLogger("runs", name=run_name, version=version),
                   CSVLogger("runs", name=run_name, version=version)],
    }


def _next_version(folder: Path) -> int:
    """The next free ``version_N`` under ``folder``, chosen once so TensorBoard and CSV share a run directory."""
    taken = [int(p.name.split("_")[1]) for p in folder.glob("version_*") if p.name.split("_")[1].isdigit()]
    return max(taken, default=-1) + 1


def cli(args: list[str] | None = None, run: bool = True) -> VitCLI:
    return VitCLI(ImageClassifier, ImageDataModule, args=args, run=run, trainer_defaults=trainer_defaults(),
                  save_config_kwargs={"overwrite": True}, seed_everything_default=42)


def main(args: list[str] | None = None) -> VitCLI | None:
    """``python train.py [fit|validate|test|predict] ...``; with no arguments: the default digits recipe,
    fit then test on the held-out split, ending with one line of test accuracy and wall time."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] not in ("-h", "--help") and not args[0].startswith("--"):
        return cli(args)
    return run_default(args)


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
