"""The run's data as a Lightning DataModule: training batches from one dataset or a mixture, and
held-out batches for evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from trainer.config import eval_fraction
from trainer.data.corpus import ensure_default_corpus
from trainer.data.evaluation import Evaluation, SourceTokens
from trainer.data.reader import TokenShards, split_by_document
from trainer.data.sampler import (
    EvalLoader,
    MixtureSampler,
    Stream,
    TokenLoader,
    WindowSampler,
    num_windows,
)
from trainer.data.sources import Source, eval_source, training_sources

if TYPE_CHECKING:
    from trainer.config import DataConfig, TrainerConfig


class TokenDataModule(pl.LightningDataModule):
    """The run's data: `cfg.path`'s shards (the built-in corpus when null) or the mixture of
    `cfg.sources`; with `cfg.eval`, a held-out dataset or the last documents of each source.

    The data-parallel rank and size come from the trainer's strategy, so tensor-parallel peers
    read the same batches. Lightning injects no sampler of its own: the loaders are not
    `torch.utils.data.DataLoader`s, whatever `use_distributed_sampler` says.
    """

    def __init__(self, cfg: DataConfig, seed: int, eval_batches: int | None = None,
                 document_mask: bool = False):
        super().__init__()
        self.cfg, self.seed, self.eval_batches = cfg, seed, eval_batches
        self.document_mask = document_mask  # the model takes documents (`RunConfig.uses_...`)
        self.sources: list[Source] = training_sources(cfg)
        self.streams: list[Stream] | None = None
        self.eval_streams: list[Stream] = []
        self._loader: TokenLoader | None = None
        self.evaluation = Evaluation() if cfg.eval is not None else None

    def prepare_data(self) -> None:
        if any(source.url is None for source in self.sources):
            ensure_default_corpus()

    def setup(self, stage: str | None = None) -> None:
        if self.streams is not None:
            return
        options = dict(self.cfg.storage_options)
        opened = [TokenShards.open(s.url or ensure_default_corpus(), options)
                  for s in self.sources]
        fraction = eval_fraction(self.cfg)
        if fraction is not None:
            parts = [split_by_document(shards, fraction, s.url or s.name)
                     for shards, s in zip(opened, self.sources, strict=True)]
            self.streams = [train for train, _ in parts]
            self.eval_streams = [held_out for _, held_out in parts]
        else:
            self.streams = list(opened)
            held_out = eval_source(self.cfg)
            if held_out is not None:
                self.eval_streams = [TokenShards.open(held_out.url, options)]
        if self.document_mask:
            rank_zero_info("document masking: %s", "on, documents end at token id "
                           f"{self.eod}" if self.eod is not None else
                           "off, the data has no end-of-document token")

    @property
    def shards(self) -> list[TokenShards]:
        """The datasets training reads (whole, before any held-out part is cut)."""
        self.setup()
        return [getattr(s, "shards", s) for s in self.streams or []]

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

    def val_dataloader(self) -> EvalLoader | list:
        self.setup()
        if not self.eval_streams:
            return []
        rank, size = self.data_parallel()
        return EvalLoader(self.eval_streams, self.cfg.seq_len, self.cfg.micro_batch_size,
                          num_replicas=size, rank=rank, max_batches=self.eval_batches,
                          eod=self.eod)

    @property
    def batches_per_epoch(self) -> int:
        return self.train_dataloader().batches_per_epoch

    @property
    def vocab_size(self) -> int:
        return max(shards.vocab_size for shards in self.shards)

    @property
    def eod(self) -> int | None:
        """The end-of-document id batches find documents by: None when document masking is off
        or a dataset has no end tokens (its rows are then one causal sequence each)."""
        if not self.document_mask:
            return None
        separators = {shards.separator for shards in self.shards}
        return separators.pop() if len(separators) == 1 else None

    def callbacks(self) -> list[pl.Callback]:
        """The data's own callbacks: held-out evaluation, per-source token counts of a mixture."""
        found: list[pl.Callback] = []
        if self.evaluation is not None:
            found.append(self.evaluation)
        if self.cfg.sources:
            found.append(SourceTokens(self))
        return found

    def trainer_arguments(self, trainer: TrainerConfig, accumulation: int) -> dict[str, Any]:
        """Lightning Trainer arguments for the validation loop that evaluation runs in."""
        if self.evaluation is None:
            return {"limit_val_batches": 0, "num_sanity_val_steps": 0}
        return self.evaluation.trainer_arguments(trainer, accumulation)

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn so far from each source of a mixture, across all ranks."""
        loader = self._loader
        if loader is None:
            return {}
        return {name: windows * self.cfg.seq_len
                for name, windows in loader.source_windows().items()}

    def _build_loader(self, rank: int, size: int) -> TokenLoader:
        self.setup()
        assert self.streams is not None
        seq_len, batch = self.cfg.seq_len, self.cfg.micro_batch_size
        if self.cfg.sources:
            sampler: WindowSampler | MixtureSampler = MixtureSampler(
                num_windows=tuple(num_windows(s, seq_len) for s in self.streams),
                weights=tuple(s.weight for s in self.sources), batch_size=batch, seed=self.seed,
                num_replicas=size, rank=rank)
        else:
            sampler = WindowSampler(num_windows=num_windows(self.streams[0], seq_len),
                                    batch_size=batch, seed=self.seed, num_replicas=size,
                                    rank=rank)
        return TokenLoader(self.streams, sampler, seq_len, self.cfg.num_workers,
                           names=[s.name for s in self.sources], eod=self.eod)
