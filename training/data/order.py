"""The order samples are read in: a pure function of (seed, step), sharded over processes."""

from __future__ import annotations

import numpy as np
import torch


class SamplePlan:
    """Which samples every process reads at every step: a pure function of (seed, step).

    The training set is read as an endless stream of epochs, each a seeded random permutation with
    seeded flips. Sample number ``((step * grad_accum + micro) * num_processes + rank) * batch + i``
    of that stream goes to process `rank`, so processes get disjoint shards, and resuming at a step
    needs no state: it skips straight to that batch.
    """

    def __init__(self, size: int, seed: int, batch_size: int, grad_accum: int = 1, num_processes: int = 1,
                 rank: int = 0, flip: bool = True):
        self.size, self.seed, self.flip = size, seed, flip
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.num_processes, self.rank = num_processes, rank
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation [N], flips [N] bool) of an epoch."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x0DA7A))
            order = torch.randperm(self.size, generator=generator)
            flips = torch.rand(self.size, generator=generator) < 0.5
            self._epoch, self._order = epoch, (order, flips & self.flip)
        return self._order

    def batch(self, step: int, micro: int = 0) -> list[tuple[int, bool]]:
        """The (index, flip) items of this process's micro-batch `micro` of optimiser step `step`."""
        first = ((step * self.grad_accum + micro) * self.num_processes + self.rank) * self.batch_size
        items = []
        for position in range(first, first + self.batch_size):
            order, flips = self.epoch_order(position // self.size)
            k = position % self.size
            items.append((int(order[k]), bool(flips[k])))
        return items

    def epoch_of(self, step: int) -> float:
        """Epochs completed at the start of `step` (for logs)."""
        return step * self.grad_accum * self.num_processes * self.batch_size / self.size


class PlanSampler(torch.utils.data.Sampler):
    """Batches of (index, flip) for steps start..stop-1 of a SamplePlan, micro-batches in order."""

    def __init__(self, plan: SamplePlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            for micro in range(self.plan.grad_accum):
                yield self.plan.batch(step, micro)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.grad_accum


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    sequence = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))
