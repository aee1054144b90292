"""Resumable data order: a seeded permutation per epoch (or a stream) and a position counted in micro-batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError


class BatchStream:
    """Endless micro-batches over epochs; `batches(start)` continues exactly at micro-batch number `start`.

    Epoch e uses permutation randperm(n) seeded by (seed, e); incomplete last batches are dropped so
    every step sees the same number of examples. Under several processes each takes its slice of a
    global batch. Nothing here touches the global RNGs (the DataLoader gets its own generator).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, collate_fn: Callable | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate_fn = collate_fn or getattr(dataset, "collate", None)
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.global_batch = batch_size * world_size
        # The stream is what training sees: the recipe's train transform (data.augment) is switched on here,
        # never for the same records read by evaluation.
        if hasattr(dataset, "train_mode"):
            dataset.train_mode(True)
        self.streamed = hasattr(dataset, "configure")
        if self.streamed:  # a webdataset stream: its epoch depends on ranks, workers and batch
            from ..data.streaming import Layout

            dataset.configure(Layout(batch_size, rank, world_size, num_workers))
        n = len(dataset)
        self.per_epoch = n // self.global_batch
        if self.per_epoch < 1:
            raise DataError(f"only {n} training examples, fewer than one batch of {self.global_batch}",
                            "lower train.batch_size or add data")

    def order(self, epoch: int) -> list[int]:
        """The example order of one epoch."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=gen).tolist()

    def batches(self, start: int = 0) -> Iterator[Any]:
        """Collated micro-batches from position `start` on, forever."""
        if self.streamed:
            yield from self._streamed(start)
            return
        pos = start
        while True:
            epoch, first = divmod(pos, self.per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            perm = self.order(epoch)
            lo = self.rank * self.batch_size
            plan = [perm[b * self.global_batch + lo: b * self.global_batch + lo + self.batch_size]
                    for b in range(first, self.per_epoch)]
            loader = DataLoader(self.dataset, batch_sampler=plan, collate_fn=self.collate_fn,
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(epoch))
            for batch in loader:
                yield batch
                pos += 1

    def _streamed(self, start: int) -> Iterator[Any]:
        """One endless loader over the stream; each worker resumes at the samples it had emitted by `start`."""
        from ..data.streaming import Layout

        self.dataset.configure(Layout(self.batch_size, self.rank, self.world_size, self.num_workers), start)
        # Its own generator: a loader without one seeds its workers from the global RNG, which would shift the
        # dropout stream of a resumed run against the uninterrupted one.
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))
        yield from loader
