"""Which datasets a run reads: `data.path` (or the built-in corpus) or the `data.sources` of a
mixture, and the `data.eval` dataset; and what their indexes say before anything is opened, for
the checks a run makes before it starts."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import KEY, DataConfig, eval_fraction, source_names
from trainer.data.format import BYTES_SEPARATOR, BYTES_VOCAB_SIZE, read_index
from trainer.data.tokenizer import BYTES_DIGEST

BUILTIN = "stdlib"  # the built-in corpus's name in messages and metrics


@dataclass(frozen=True)
class Source:
    key: str  # the config key that names it, for messages: data.path, data.sources[1], data.eval
    url: str | None  # None: the built-in corpus
    name: str
    weight: float = 1.0


def training_sources(cfg: DataConfig) -> list[Source]:
    if cfg.sources:
        return [Source(f"{KEY.data.sources}[{i}]", s.path, name, s.weight)
                for i, (s, name) in enumerate(zip(cfg.sources, source_names(cfg), strict=True))]
    if cfg.path is None:
        return [Source(KEY.data.path, None, BUILTIN)]
    return [Source(KEY.data.path, cfg.path, cfg.path.rstrip("/").rsplit("/", 1)[-1])]


def eval_source(cfg: DataConfig) -> Source | None:
    """The held-out dataset named by URL; None when there is none or it is a fraction."""
    if cfg.eval is None or eval_fraction(cfg) is not None:
        return None
    return Source(KEY.data.eval, cfg.eval, "eval")


def builtin_index() -> dict:
    """What the built-in corpus's index says, without preparing it."""
    return {"vocab_size": BYTES_VOCAB_SIZE, "separator": BYTES_SEPARATOR,
            "tokenizer": {"kind": "bytes", "name": "bytes", "vocab_size": BYTES_VOCAB_SIZE,
                          "sha256": None, "eod_id": BYTES_SEPARATOR, "eod_token": None,
                          "vocab_sha256": BYTES_DIGEST}}


def indexes(cfg: DataConfig) -> dict[Source, dict]:
    """Every dataset the run reads and its index (read, not its shards: nothing is copied)."""
    found = [*training_sources(cfg), *filter(None, [eval_source(cfg)])]
    options = dict(cfg.storage_options)
    return {s: builtin_index() if s.url is None else read_index(s.url, options) for s in found}
