"""Surviving interruptions: atomic checkpoint files, a checkpoint on SIGTERM/SIGINT, exact resume.

The CLI installs all three by default. With a plain ``lightning.Trainer``::

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastCheckpoint(save_last=True),
                        ResumeState(), SaveOnSignal()])
    trainer.fit(module, datamodule=dm, ckpt_path="path/to/last.ckpt", weights_only=True)

What a resume restores: model, optimizer, LR scheduler and loop counters (Lightning), callback states such as
``EMAWeightAveraging`` (Lightning, through the callback's ``state_dict``), the position in the training data
(``ImageDataModule.state_dict``) and the torch / numpy / Python RNG states (``ResumeState``).
"""
from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..utils.files import atomic_path


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every epoch. Lightning 2.6 refreshes ``last.ckpt`` only
    when a top-k file is written, so a run whose metric stopped improving would resume from an old epoch."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):  # no validation loop: this is the epoch's save point
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, flushes it to disk, then renames it over
    the target (``os.replace`` is atomic), so a kill at any moment leaves either the old or the new complete file.

    Example:
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote file systems: Lightning's own transactional write
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as part, open(part, "wb") as f:
            torch.save(checkpoint, f)


# ---- RNG state -------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values, loadable with
    ``torch.load(weights_only=True)`` (numpy's own state holds an ndarray, which is not)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
             "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(Callback):
    """Saves the RNG states with every checkpoint and restores them when training resumes (so dropout, stochastic
    depth and mixup draw what an uninterrupted run would), then prints what the resume restored."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self._rng: dict[str, Any] | None = None
        self._restored: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._restored = describe_checkpoint(checkpoint)

    def on_train_start(self, trainer, pl_module) -> None:
        # Applied here, after the sanity check and data setup, so nothing between restore and the first
        # training step draws from these generators.
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
            self._restored.append("RNG states (torch, numpy, python)")
        if self._restored and self.verbose and trainer.is_global_zero:
            print(f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch}, global step "
                  f"{trainer.global_step}\n  restored: " + "; ".join(self._restored), flush=True)
        self._restored = []


def describe_checkpoint(checkpoint: dict[str, Any]) -> list[str]:
    """What a Lightning checkpoint carries, in words, for the resume message."""
    parts = ["model weights"]
    optimizers = checkpoint.get("optimizer_states") or []
    if optimizers:
        groups = sum(len(o.get("param_groups", [])) for o in optimizers)
        parts.append(f"{len(optimizers)} optimizer state(s) ({groups} parameter groups)")
    schedulers = checkpoint.get("lr_schedulers") or []
    if schedulers:
        last_lr = schedulers[0].get("_last_lr")
        parts.append(f"{len(schedulers)} LR scheduler(s)" + (f" (lr {last_lr[0]:.3g})" if last_lr else ""))
    callbacks = [key.split("{")[0] for key in (checkpoint.get("callbacks") or {})]
    if callbacks:
        parts.append("callback states: " + ", ".join(callbacks))
    if any("datamodule" in key.lower() or key.endswith("ImageDataModule") for key in checkpoint):
        parts.append("data position")
    if checkpoint.get("loops"):
        parts.append("loop counters")
    return parts


# ---- signals ---------------------------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """Raised after a signal-triggered checkpoint: training stopped on purpose; ``path`` resumes it."""

    def __init__(self, signum: int, path: str | None):
        name = signal.Signals(signum).name
        where = f"saved {path}; resume with --ckpt_path last (or --ckpt_path {path})" if path else "nothing saved"
        super().__init__(f"training stopped by {name}: {where}")
        self.signum, self.path = signum, path


class SaveOnSignal(Checkpoint):
    """On SIGTERM (cluster pre-emption, ``kill``) or SIGINT (Ctrl-C): finish the current training step, save a
    checkpoint (``last.ckpt`` next to ModelCheckpoint's files, else ``interrupted.ckpt`` in the root dir), then
    stop by raising ``TrainingInterrupted``. A second signal stops at once, as if this callback were absent.

    It is a ``Checkpoint`` callback so Lightning runs it after the others (an EMA update of the same step is in
    the file); list it after ``ModelCheckpoint`` so ``trainer.checkpoint_callback`` stays the latter."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.path: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: stop now
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank must save and stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self.path = str(self.checkpoint_path(trainer))
        trainer.save_checkpoint(self.path)
        signum = self.received if self.received is not None else signal.SIGTERM
        if trainer.is_global_zero:
            print(f"\n{signal.Signals(signum).name} received: saved {self.path} at epoch {trainer.current_epoch}, "
                  f"step {trainer.global_step}", flush=True)
        raise TrainingInterrupted(signum, self.path)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if callback is not None and callback.dirpath and callback.save_last:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(trainer.default_root_dir) / "interrupted.ckpt"

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


def find_last_checkpoint(runs: str | Path) -> Path | None:
    """The most recently written ``last.ckpt`` under ``runs``, a run root (``trainer.default_root_dir``, whose runs
    keep it in ``<name>/version_N/checkpoints/``); None when there is none or the folder does not exist."""
    candidates = [p for p in Path(runs).rglob("last.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
