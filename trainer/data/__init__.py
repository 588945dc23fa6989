"""Token data: shards of token ids behind an fsspec URL; a sampler whose position is checkpointed.

- `format`: the on-disk format (`index.json` + raw little-endian token files), `DataError`.
- `tokenizer`: the tokenizers `prepare` runs (bytes, ids, Hugging Face, tiktoken).
- `inputs`: inputs (text, JSONL, Parquet, Hugging Face datasets, `.npy`) and their documents.
- `progress`: the progress line of `prepare`.
- `writer`: `prepare`, tokenizing documents on every core into shards, resumable.
- `corpus`: the built-in corpus (Python's standard library), prepared on first use.
- `reader`: `TokenShards`, the shards as one memory-mapped stream; remote shards are cached locally;
  `split_by_document`, a held-out part.
- `sources`: which datasets a run reads (`data.path`, `data.sources`, `data.eval`), their indexes.
- `sampler`: `WindowSampler`, `MixtureSampler`, `TokenLoader` (batches whose position is part of
  the checkpoint) and `EvalLoader`.
- `datamodule`: `TokenDataModule`, the Lightning face of the above.
- `__main__`: `python -m trainer.data prepare|info`.

The torch and Lightning parts load on first use, so the command line starts without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainer.data.corpus import default_corpus_dir, ensure_default_corpus, stdlib_sources
from trainer.data.format import INDEX_FILE, DataError, read_index
from trainer.data.inputs import ReadOptions, resolve_inputs
from trainer.data.reader import Region, TokenShards, split_by_document
from trainer.data.tokenizer import TokenizerSpec, load_tokenizer
from trainer.data.writer import prepare

_LAZY = {"Batch": "sampler", "EvalLoader": "sampler", "MixtureSampler": "sampler",
         "TokenLoader": "sampler", "WindowSampler": "sampler", "TokenDataModule": "datamodule"}

__all__ = ["INDEX_FILE", "Batch", "DataError", "EvalLoader", "MixtureSampler", "ReadOptions",
           "Region", "TokenDataModule", "TokenLoader", "TokenShards", "TokenizerSpec",
           "WindowSampler", "default_corpus_dir", "ensure_default_corpus", "load_tokenizer",
           "prepare", "read_index", "resolve_inputs", "split_by_document", "stdlib_sources"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"trainer.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
