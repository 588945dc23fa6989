"""Token data: shards of token ids behind an fsspec URL; a sampler whose position is checkpointed.

- `format`: the on-disk format (`index.json` + raw little-endian token files), `DataError`.
- `tokenizer`: the tokenizers `prepare` runs (bytes, ids, Hugging Face, tiktoken).
- `inputs`: inputs (text, JSONL, Parquet, Hugging Face datasets, `.npy`) and their documents.
- `progress`: the progress line of `prepare`.
- `writer`: `prepare`, tokenizing documents on every core into shards, resumable.
- `corpus`: the built-in corpus (Python's standard library), prepared on first use.
- `reader`: `TokenShards`, the shards as one memory-mapped stream; remote shards are cached locally.
- `sampler`: `WindowSampler` and `TokenLoader`, batches whose position is part of the checkpoint.
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
from trainer.data.reader import TokenShards, dataset_vocab_size
from trainer.data.tokenizer import TokenizerSpec, load_tokenizer
from trainer.data.writer import prepare

_LAZY = {"Batch": "sampler", "TokenLoader": "sampler", "WindowSampler": "sampler",
         "TokenDataModule": "datamodule"}

__all__ = ["INDEX_FILE", "Batch", "DataError", "ReadOptions", "TokenDataModule", "TokenLoader",
           "TokenShards", "TokenizerSpec", "WindowSampler", "dataset_vocab_size",
           "default_corpus_dir", "ensure_default_corpus", "load_tokenizer", "prepare",
           "read_index", "resolve_inputs", "stdlib_sources"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"trainer.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
