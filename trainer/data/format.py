"""The token shard format: a directory (any fsspec URL) holding `index.json` and raw
little-endian token files.

The index records the format version, the dtype (`uint16` while every id is below 65536, else
`uint32`), `vocab_size` (largest id + 1), the tokenizer, the document separator and each shard's
file name, token count and SHA-256. The index is written last: a directory without one is not a
dataset, so an interrupted `prepare` never looks finished.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np

FORMAT = "ultramesh-tokens"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZERS = ("bytes", "ids")
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


def make_index(shards: list[dict], dtype: np.dtype, tokenizer: str, separator: int | None,
                vocab_size: int) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "tokenizer": tokenizer,
        "separator": separator,
        "vocab_size": vocab_size,
        "num_tokens": sum(shard["tokens"] for shard in shards),
        "shards": shards,
    }


def commit_index(fs: fsspec.AbstractFileSystem, root: str, index: dict) -> None:
    """Write the index under a temporary name and move it into place, so it appears whole."""
    staged = f"{root}/.{INDEX_FILE}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(staged, json.dumps(index, indent=1).encode())
    fs.mv(staged, f"{root}/{INDEX_FILE}")


def read_index(url: str, storage_options: dict | None = None) -> dict:
    """The dataset's index, checked for format and version."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        index = json.loads(fs.cat_file(f"{root.rstrip('/')}/{INDEX_FILE}"))
    except FileNotFoundError:
        raise DataError(f"{url}: not a token dataset (no {INDEX_FILE}); "
                        "make one with `python -m trainer.data prepare`") from None
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DataError(f"{url}: {INDEX_FILE} is {index.get('format')!r} version "
                        f"{index.get('version')!r}; this reader knows {FORMAT!r} {FORMAT_VERSION}")
    return index
