"""The token shard format: a directory (any fsspec URL) holding `index.json` and raw
little-endian token files.

The index records the format version, the dtype (`uint16` while every id is below 65536, else
`uint32`), `vocab_size` (the tokenizer's vocabulary; for `ids`, the largest id + 1), the tokenizer
(kind, name, vocabulary size, its file's SHA-256, the end-of-document id and a digest of its
vocabulary, `trainer.data.tokenizer.vocabulary_digest`), the document separator
(that same id), the number of documents and each shard's file name, token count and SHA-256. The
index is written last: a directory without one is not a dataset, so an interrupted `prepare`
never looks finished. Version 1 indexes (the tokenizer as a bare name) are read as well.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np

FORMAT = "ultramesh-tokens"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
BYTES_SEPARATOR = 0xFF  # invalid anywhere in UTF-8, so it cannot collide with text
BYTES_VOCAB_SIZE = 256  # the bytes tokenizer's ids, separator included
UINT16_LIMIT = 1 << 16
UINT32_LIMIT = 1 << 32


class DataError(ValueError):
    """An input or dataset problem a user can fix; its message is one line naming the culprit."""


def cache_root() -> Path:
    """$ULTRAMESH_CACHE, else ~/.cache/ultramesh."""
    configured = os.environ.get("ULTRAMESH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "ultramesh"


def make_index(shards: list[dict], dtype: np.dtype, tokenizer: dict, vocab_size: int,
               num_documents: int) -> dict:
    """The index of a finished dataset; `tokenizer` is `TokenizerSpec.record()`."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "tokenizer": tokenizer,
        "separator": tokenizer["eod_id"],
        "vocab_size": vocab_size,
        "num_tokens": sum(shard["tokens"] for shard in shards),
        "num_documents": num_documents,
        "shards": shards,
    }


def commit_json(fs: fsspec.AbstractFileSystem, root: str, name: str, value: dict) -> None:
    """Write `name` under a temporary name and move it into place, so it appears whole."""
    staged = f"{root}/.{name}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(staged, json.dumps(value, indent=1).encode())
    fs.mv(staged, f"{root}/{name}")


def read_index(url: str, storage_options: dict | None = None) -> dict:
    """The dataset's index, checked for format and version."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        index = json.loads(fs.cat_file(f"{root.rstrip('/')}/{INDEX_FILE}"))
    except FileNotFoundError:
        raise DataError(f"{url}: not a token dataset (no {INDEX_FILE}); "
                        "make one with `python -m trainer.data prepare`") from None
    if index.get("format") != FORMAT or index.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{url}: {INDEX_FILE} is {index.get('format')!r} version "
                        f"{index.get('version')!r}; this reader knows {FORMAT!r} "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    if isinstance(index["tokenizer"], str):  # version 1: the tokenizer's kind alone
        kind = index["tokenizer"]
        index["tokenizer"] = {"kind": kind, "name": kind, "sha256": None,
                              "vocab_size": BYTES_VOCAB_SIZE if kind == "bytes" else None,
                              "eod_id": index["separator"], "eod_token": None,
                              "vocab_sha256": None}
        index.setdefault("num_documents", None)
    return index
