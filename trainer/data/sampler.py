"""Which windows each data-parallel rank reads, and the loader whose position is checkpointed.

Training reads the shards as one concatenated stream, cut into windows of `seq_len + 1` tokens at a
stride of `seq_len` (inputs and their one-token-shifted targets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import KEY
from trainer.data.format import DataError
from trainer.data.reader import TokenShards

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class WindowSampler:
    """Which windows each data-parallel rank reads, batch by batch, epoch by epoch.

    Epoch e orders all windows by a permutation from its own generator, seeded by (seed, e).
    Global batch b is positions [b*G, (b+1)*G) of that permutation, G = batch_size x num_replicas,
    and rank r takes every num_replicas-th of them starting at r. Positions past the last full
    global batch (the ragged tail) are left for later epochs' permutations, so every rank sees the
    same number of batches. Because a global batch does not depend on how it is split, a position
    saved at one data-parallel size resumes at another with the same G.
    """

    num_windows: int
    batch_size: int
    seed: int
    num_replicas: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside 0..{self.num_replicas - 1}")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must be 0 or more")
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.num_windows} windows make no global batch of "
                            f"{self.batch_size} x {self.num_replicas} ranks; use more data, a "
                            f"shorter {KEY.data.seq_len} or a smaller {KEY.data.micro_batch_size}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def epoch_windows(self, epoch: int) -> torch.Tensor:
        """int64 [batches_per_epoch, batch_size]: this rank's window ids, batch by batch."""
        order = torch.randperm(self.num_windows, generator=_epoch_generator(self.seed, epoch))
        used = order[: self.batches_per_epoch * self.global_batch]
        return used.view(self.batches_per_epoch, self.global_batch)[:, self.rank::self.num_replicas]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes both numbers into well-spread state, so nearby (seed, epoch) pairs do not
    # give related permutations, and the global RNG is never touched.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class TokenLoader:
    """(inputs, targets) batches, int64 [batch_size, seq_len], targets shifted one token ahead.

    Its position, (epoch, batches consumed in that epoch), is its `state_dict`; Lightning stores
    that in checkpoints and loads it before iterating, and iteration continues from it. One epoch
    is `len(self)` batches; iterating again after an epoch is used up starts the next one.
    """

    def __init__(self, shards: TokenShards, sampler: WindowSampler, seq_len: int,
                 num_workers: int = 0):
        self.shards, self.sampler, self.seq_len = shards, sampler, seq_len
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        batches = _EpochBatches(self.shards, self.sampler.epoch_windows(self.epoch), self.seq_len)
        remaining = range(self.batches_consumed, len(self))
        if self.num_workers == 0:
            return self._count(batches[b] for b in remaining)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=remaining,
                                             num_workers=self.num_workers)
        return self._count(loader)

    def _count(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        # Counted before the batch is handed out: a checkpoint taken while the step runs must
        # resume after this batch, not repeat it.
        for batch in batches:
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "seed": self.sampler.seed, "num_windows": self.sampler.num_windows,
                "global_batch": self.sampler.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        here = self.state_dict()
        for key in ("seed", "num_windows", "global_batch"):
            if state[key] != here[key]:
                raise DataError(
                    f"the saved data position has {key}={state[key]} but this run has "
                    f"{here[key]}; resuming needs the same dataset, {KEY.data.seq_len}, "
                    f"{KEY.seed} and {KEY.data.micro_batch_size} x data-parallel size")
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]


class _EpochBatches(torch.utils.data.Dataset):
    """Batch b of one epoch, built with one gather from the memory-mapped shards."""

    def __init__(self, shards: TokenShards, windows: torch.Tensor, seq_len: int):
        self.shards, self.windows, self.seq_len = shards, windows, seq_len

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, batch: int) -> Batch:
        starts = self.windows[batch].numpy() * self.seq_len
        tokens = torch.from_numpy(self.shards.windows(starts, self.seq_len + 1))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
