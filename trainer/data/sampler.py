"""Which windows each data-parallel rank reads, and the loaders that read them.

Training reads each dataset as one concatenated stream, cut into windows of `seq_len + 1` tokens
at a stride of `seq_len` (inputs and their one-token-shifted targets). One dataset is sampled by
`WindowSampler`; a mixture of several (`data.sources`) by `MixtureSampler`. `TokenLoader` serves
either, and its position (with every source's, for a mixture) is its `state_dict`, which Lightning
saves in checkpoints. `EvalLoader` reads held-out windows in a fixed order and keeps no position.

A batch is (inputs, targets), int64 [batch_size, seq_len], targets one token ahead; given the
end-of-document id (`eod`), a third tensor says which document of its row each input token is in:
int32, 0 for the first, one more after each end token (`documents_of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from trainer.config import KEY
from trainer.data.format import DataError

Batch = tuple[torch.Tensor, ...]


class Stream(Protocol):
    """What the loaders read: a dataset's tokens (`TokenShards`) or a part of them (`Region`)."""

    def __len__(self) -> int: ...

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray: ...


def num_windows(stream: Stream, seq_len: int) -> int:
    return (len(stream) - 1) // seq_len


def _no_global_batch(windows: int, batch_size: int, replicas: int) -> DataError:
    return DataError(f"{windows} windows make no global batch of {batch_size} x {replicas} "
                     f"ranks; use more data, a shorter {KEY.data.seq_len} or a smaller "
                     f"{KEY.data.micro_batch_size}")


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of one rank: window ids [batches, batch_size], and for a mixture the source of
    each (None: one source)."""

    windows: torch.Tensor
    sources: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class _Split:
    """How each global batch is split: batch_size windows per rank, num_replicas data-parallel
    ranks, this one `rank`; `seed` orders the windows."""

    batch_size: int
    seed: int
    num_replicas: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.num_replicas)
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must be 0 or more")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas


def _check_rank(rank: int, replicas: int) -> None:
    if not 0 <= rank < replicas:
        raise ValueError(f"rank {rank} outside 0..{replicas - 1}")


@dataclass(frozen=True)
class WindowSampler(_Split):
    """Which windows each data-parallel rank reads, batch by batch, epoch by epoch.

    Epoch e orders all windows by a permutation from its own generator, seeded by (seed, e).
    Global batch b is positions [b*G, (b+1)*G) of that permutation, G = batch_size x num_replicas,
    and rank r takes every num_replicas-th of them starting at r. Positions past the last full
    global batch (the ragged tail) are left for later epochs' permutations, so every rank sees the
    same number of batches. Because a global batch does not depend on how it is split, a position
    saved at one data-parallel size resumes at another with the same G.
    """

    num_windows: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batches_per_epoch == 0:
            raise _no_global_batch(self.num_windows, self.batch_size, self.num_replicas)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def epoch_windows(self, epoch: int) -> torch.Tensor:
        """int64 [batches_per_epoch, batch_size]: this rank's window ids, batch by batch."""
        order = torch.randperm(self.num_windows, generator=_epoch_generator(self.seed, epoch))
        used = order[: self.batches_per_epoch * self.global_batch]
        return used.view(self.batches_per_epoch, self.global_batch)[:, self.rank::self.num_replicas]

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.epoch_windows(epoch))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes both numbers into well-spread state, so nearby (seed, epoch) pairs do not
    # give related permutations, and the global RNG is never touched.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


@dataclass(frozen=True)
class MixtureSampler(_Split):
    """Windows from several sources, each sample's source drawn by weight.

    Every slot of every global batch draws its source from `weights` with a generator seeded by
    (seed, epoch), the same on every rank. Each source is read as its own endless sequence of
    epochs (a permutation of its windows per (seed, source, source epoch)), so a small source is
    repeated and a large one is never exhausted early; the k-th draw from source s is window k of
    that sequence. Where each source stands at the start of an epoch is the loader's state. An
    epoch is as many global batches as all sources' windows fill once.
    """

    num_windows: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.num_windows) != len(self.weights) or not self.weights:
            raise ValueError("one weight per source")
        for windows in self.num_windows:
            if windows == 0:
                raise _no_global_batch(0, self.batch_size, self.num_replicas)
        if self.batches_per_epoch == 0:
            raise _no_global_batch(sum(self.num_windows), self.batch_size, self.num_replicas)

    @property
    def batches_per_epoch(self) -> int:
        return sum(self.num_windows) // self.global_batch

    def assignments(self, epoch: int) -> np.ndarray:
        """int64 [batches_per_epoch, global_batch]: the source of every slot, every rank's."""
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, epoch], spawn_key=(1,))))
        p = np.asarray(self.weights, dtype=np.float64)
        return rng.choice(len(p), size=(self.batches_per_epoch, self.global_batch), p=p / p.sum())

    def drawn(self, epoch: int, start: Sequence[int], batches: int) -> list[int]:
        """How many windows each source has given after `batches` batches of `epoch`, which
        began with `start` drawn."""
        counts = np.bincount(self.assignments(epoch)[:batches].ravel(),
                             minlength=len(self.weights))
        return [int(s + c) for s, c in zip(start, counts, strict=True)]

    def plan(self, epoch: int, start: Sequence[int]) -> EpochPlan:
        sources = self.assignments(epoch)
        windows = np.empty_like(sources)
        flat_sources, flat_windows = sources.ravel(), windows.ravel()
        for source, size in enumerate(self.num_windows):
            slots = np.flatnonzero(flat_sources == source)
            draws = start[source] + np.arange(slots.size)
            for source_epoch in np.unique(draws // size):
                here = draws // size == source_epoch
                order = self._source_order(source, int(source_epoch))
                flat_windows[slots[here]] = order[draws[here] % size]
        mine = np.s_[:, self.rank::self.num_replicas]
        return EpochPlan(torch.from_numpy(windows[mine].copy()),
                         torch.from_numpy(sources[mine].copy()))

    def _source_order(self, source: int, source_epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, source_epoch], spawn_key=(2, source))))
        return rng.permutation(self.num_windows[source])


class TokenLoader:
    """(inputs, targets) batches, int64 [batch_size, seq_len], targets shifted one token ahead.

    Its position, (epoch, batches consumed in that epoch) and for a mixture each source's draws
    at the start of the epoch, is its `state_dict`; Lightning stores that in checkpoints and loads
    it before iterating, and iteration continues from it. One epoch is `len(self)` batches;
    iterating again after an epoch is used up starts the next one.
    """

    def __init__(self, streams: Stream | Sequence[Stream],
                 sampler: WindowSampler | MixtureSampler, seq_len: int, num_workers: int = 0,
                 names: Sequence[str] = (), eod: int | None = None):
        self.streams = list(streams) if isinstance(streams, (list, tuple)) else [streams]
        self.sampler, self.seq_len, self.eod = sampler, seq_len, eod
        self.num_workers = num_workers
        self.names = list(names) or [f"source{i}" for i in range(len(self.streams))]
        self.epoch = 0
        self.batches_consumed = 0
        self.epoch_start = [0] * len(self.streams)  # a mixture's draws per source before `epoch`

    @property
    def mixture(self) -> bool:
        return isinstance(self.sampler, MixtureSampler)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.batches_consumed >= len(self):
            if self.mixture:
                self.epoch_start = self.sampler.drawn(self.epoch, self.epoch_start, len(self))
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        plan = (self.sampler.plan(self.epoch, self.epoch_start) if self.mixture
                else self.sampler.plan(self.epoch))
        batches = _PlannedBatches(self.streams, plan, self.seq_len, self.eod)
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

    def source_windows(self) -> dict[str, int]:
        """Windows drawn so far from each source across all ranks (a mixture's; else empty)."""
        if not self.mixture:
            return {}
        drawn = self.sampler.drawn(self.epoch, self.epoch_start, self.batches_consumed)
        return dict(zip(self.names, drawn, strict=True))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch, "batches_consumed": self.batches_consumed,
            "seed": self.sampler.seed, "num_windows": sum(self._windows()),
            "global_batch": self.sampler.global_batch}
        if self.mixture:
            state["sources"] = [{"name": n, "windows": w, "weight": p} for n, w, p in zip(
                self.names, self.sampler.num_windows, self.sampler.weights, strict=True)]
            state["epoch_start"] = list(self.epoch_start)
            state["drawn"] = list(self.source_windows().values())  # for people reading it
        return state

    def _windows(self) -> tuple[int, ...]:
        windows = self.sampler.num_windows
        return windows if isinstance(windows, tuple) else (windows,)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        here = self.state_dict()
        for key in ("seed", "num_windows", "global_batch", "sources"):
            if state.get(key) != here.get(key):
                raise DataError(
                    f"the saved data position has {key}={state.get(key)} but this run has "
                    f"{here.get(key)}; resuming needs the same dataset(s) "
                    f"({KEY.data.path}, {KEY.data.sources}), {KEY.data.seq_len}, {KEY.seed} and "
                    f"{KEY.data.micro_batch_size} x data-parallel size")
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]
        self.epoch_start = list(state.get("epoch_start", self.epoch_start))


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch b of one epoch's plan, one gather per source from the memory-mapped shards."""

    def __init__(self, streams: list[Stream], plan: EpochPlan, seq_len: int, eod: int | None):
        self.streams, self.plan, self.seq_len, self.eod = streams, plan, seq_len, eod

    def __len__(self) -> int:
        return len(self.plan.windows)

    def __getitem__(self, batch: int) -> Batch:
        starts = self.plan.windows[batch].numpy() * self.seq_len
        sources = None if self.plan.sources is None else self.plan.sources[batch].numpy()
        return _read_windows(self.streams, sources, starts, self.seq_len, self.eod)


def _read_windows(streams: list[Stream], sources: np.ndarray | None, starts: np.ndarray,
                  seq_len: int, eod: int | None = None) -> Batch:
    if sources is None:
        rows = streams[0].windows(starts, seq_len + 1)
    else:
        rows = np.empty((len(starts), seq_len + 1), dtype=np.int64)
        for source in np.unique(sources):
            here = sources == source
            rows[here] = streams[source].windows(starts[here], seq_len + 1)
    tokens = torch.from_numpy(rows)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if eod is None:
        return inputs, targets
    return inputs, targets, documents_of(inputs, eod)


def documents_of(inputs: torch.Tensor, eod: int) -> torch.Tensor:
    """int32 [rows, seq_len]: the document each token of a row is in, counted from the row's
    start. An end token belongs to the document it ends; the next token starts the next one."""
    documents = torch.zeros(inputs.shape, dtype=torch.int32)
    torch.cumsum(inputs[:, :-1] == eod, dim=1, dtype=torch.int32, out=documents[:, 1:])
    return documents


class EvalLoader:
    """Held-out batches in a fixed order, the same at every evaluation: the windows of `streams`
    one after another, global batch b their positions [b*G, (b+1)*G), rank r every
    num_replicas-th of those. It keeps no position and draws no random number, so evaluating
    changes nothing about the training batches that follow."""

    def __init__(self, streams: Sequence[Stream], seq_len: int, batch_size: int,
                 num_replicas: int = 1, rank: int = 0, max_batches: int | None = None,
                 eod: int | None = None):
        _check_rank(rank, num_replicas)
        self.streams, self.seq_len, self.eod = list(streams), seq_len, eod
        counts = [num_windows(s, seq_len) for s in self.streams]
        self._sources = np.repeat(np.arange(len(counts)), counts)
        self._windows = np.concatenate([np.arange(c) for c in counts]) if counts else np.array([])
        global_batch = batch_size * num_replicas
        available = len(self._windows) // global_batch
        if available == 0:
            raise _no_global_batch(len(self._windows), batch_size, num_replicas)
        self.batches = available if max_batches is None else min(available, max_batches)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        global_batch = self.batch_size * self.num_replicas
        for b in range(self.batches):
            mine = np.s_[b * global_batch + self.rank:(b + 1) * global_batch:self.num_replicas]
            yield _read_windows(self.streams, self._sources[mine],
                                self._windows[mine] * self.seq_len, self.seq_len, self.eod)
