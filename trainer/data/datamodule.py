"""The run's training data as a Lightning DataModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytorch_lightning as pl

from trainer.data.corpus import ensure_default_corpus
from trainer.data.reader import TokenShards
from trainer.data.sampler import TokenLoader, WindowSampler

if TYPE_CHECKING:
    from trainer.config import DataConfig


class TokenDataModule(pl.LightningDataModule):
    """The run's training data: `cfg.path`'s shards, or the built-in corpus when it is null.

    The data-parallel rank and size come from the trainer's strategy, so tensor-parallel peers
    read the same batches. Lightning injects no sampler of its own: the loader is not a
    `torch.utils.data.DataLoader`, whatever `use_distributed_sampler` says.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.shards: TokenShards | None = None
        self._loader: TokenLoader | None = None

    def prepare_data(self) -> None:
        if self.cfg.path is None:
            ensure_default_corpus()

    def setup(self, stage: str | None = None) -> None:
        if self.shards is None:
            url = self.cfg.path or ensure_default_corpus()
            self.shards = TokenShards.open(url, dict(self.cfg.storage_options))

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process among the data-parallel replicas."""
        strategy = getattr(self.trainer, "strategy", None)
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)

    def train_dataloader(self) -> TokenLoader:
        rank, size = self.data_parallel()
        loader = self._loader
        if loader is None or (loader.sampler.rank, loader.sampler.num_replicas) != (rank, size):
            # Kept across calls: a loader asked for again (a dataloader reload) keeps its position.
            self._loader = loader = self._build_loader(rank, size)
        return loader

    @property
    def batches_per_epoch(self) -> int:
        return self.train_dataloader().batches_per_epoch

    @property
    def vocab_size(self) -> int:
        self.setup()
        assert self.shards is not None
        return self.shards.vocab_size

    def _build_loader(self, rank: int, size: int) -> TokenLoader:
        self.setup()
        assert self.shards is not None
        seq_len = self.cfg.seq_len
        sampler = WindowSampler(num_windows=(len(self.shards) - 1) // seq_len,
                                batch_size=self.cfg.micro_batch_size, seed=self.seed,
                                num_replicas=size, rank=rank)
        return TokenLoader(self.shards, sampler, seq_len, self.cfg.num_workers)
