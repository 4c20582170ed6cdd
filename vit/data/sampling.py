"""Resumable, reproducible training order: the shuffle and every image's augmentation are pure functions of
(seed, epoch, position), so a run resumed from a checkpoint (even mid-epoch) sees the same data as one that
never stopped, with any number of loader workers."""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffles ``range(n)`` anew each epoch from ``(seed, epoch)`` and yields this rank's ``(index, sample_seed)``
    pairs; datasets seed the image's augmentation with ``sample_seed``. Lightning calls ``set_epoch``;
    ``start_at(epoch, position)`` skips the first ``position`` items of this rank's share, what a resumed run has
    already trained on (once).

    Under several processes (``num_replicas`` > 1) rank ``r`` takes positions ``r, r + num_replicas, ...`` of the
    epoch's order, wrapped around to equal lengths: the split Lightning's ``DistributedSamplerWrapper`` made of
    this sampler's order before it split by itself. Splitting here, before the skip, is what lets a mid-epoch
    resume skip each rank's own batches; being a ``DistributedSampler``, Lightning leaves it unwrapped.

    Example:
        >>> s = EpochSampler(4, seed=0); s.set_epoch(1); sorted(i for i, _ in s)
        [0, 1, 2, 3]
        >>> halves = [[i for i, _ in EpochSampler(5, seed=0, num_replicas=2, rank=r)] for r in (0, 1)]
        >>> [len(h) for h in halves], sorted(set(halves[0] + halves[1]))
        ([3, 3], [0, 1, 2, 3, 4])
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        # explicit num_replicas/rank (not torch.distributed's defaults): one process sees everything
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self._skip = 0

    def start_at(self, epoch: int, position: int) -> None:
        self.epoch, self._skip = epoch, position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]))
        order = torch.randperm(self.n, generator=generator).tolist()
        seeds = np.random.default_rng(int(state[1])).integers(0, 2**31, self.n).tolist()
        # this rank's positions in the epoch (padded by wrapping around, as DistributedSampler does)
        positions = range(self.rank, self.total_size, self.num_replicas)
        for k in positions[skip:]:
            yield order[k % self.n], seeds[k % self.n]


def seed_transform(transform, seed: int) -> None:
    """Point every op of an albumentations pipeline at one generator seeded with ``seed`` (albumentations 2
    otherwise draws from OS entropy, which makes runs unrepeatable). ~30 µs, cheap enough per image."""
    rng, py = np.random.default_rng(seed), random.Random(seed)
    stack = [transform]
    while stack:
        op = stack.pop()
        if hasattr(op, "random_generator"):
            op.random_generator, op.py_random = rng, py
        stack.extend(getattr(op, "transforms", ()))


def split_index(item) -> tuple[int, int | None]:
    """A sampler item: a plain index, or ``(index, sample_seed)`` from ``EpochSampler``."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def process_share(datamodule) -> dict:
    """``num_replicas`` and ``rank`` of this process, as Lightning would give its own DistributedSampler (one
    process, rank 0, when the datamodule has no trainer yet)."""
    trainer = getattr(datamodule, "trainer", None)
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not kwargs:  # no trainer, or one process
        return {"num_replicas": 1, "rank": 0}
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}


def training_position(datamodule) -> dict:
    """Where fitting stands in the data, for a datamodule's ``state_dict`` (saved in every checkpoint):
    ``{"epoch", "batches_done"}``, or ``{}`` outside fitting. Saved at the end of an epoch, the next one starts
    afresh."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None or not trainer.training:
        return {}
    done, epoch = trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.current_epoch
    if done >= trainer.num_training_batches:
        epoch, done = epoch + 1, 0
    return {"epoch": int(epoch), "batches_done": int(done)}


class ResumableLoaders:
    """Loaders for a data module with ``train_set``, ``val_set``, ``test_set``, ``seed``, ``batch_size`` and
    ``num_workers`` (mixed in before ``LightningDataModule``; the subclass gives ``collate()``): the training
    order and augmentation are functions of (seed, epoch, position), each process takes its own equal share, and
    the position in the data is saved in every checkpoint so that a resumed run continues where it stopped."""

    _resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a resumed checkpoint

    def collate(self):
        raise NotImplementedError

    def _loader(self, dataset, shuffle: bool):
        import torch
        from torch.utils.data import DataLoader
        sampler = EpochSampler(len(dataset), self.seed, **process_share(self)) if shuffle else None
        if sampler is not None and self._resume_at is not None:  # a resumed run skips what it has trained on
            sampler.start_at(self._resume_at[0], self._resume_at[1] * self.batch_size)
            self._resume_at = None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collate(), persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))

    def state_dict(self) -> dict:
        return training_position(self)

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches_done"]))

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)
