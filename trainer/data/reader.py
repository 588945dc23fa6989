"""Reading a dataset: its shards as one stream of tokens. Local shards are memory-mapped; remote
ones are first copied into a local cache named by their checksum, then memory-mapped."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from trainer.data.format import BYTES_VOCAB_SIZE, DataError, cache_root, read_index

if TYPE_CHECKING:
    from trainer.config import DataConfig

log = logging.getLogger(__name__)


def _remote_cache_dir() -> Path:
    return cache_root() / "data" / "remote"


class TokenShards:
    """A dataset's shards as one stream of tokens, memory-mapped from local files."""

    def __init__(self, index: dict, paths: list[str]):
        self.index = index
        self.paths = paths
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        counts = [shard["tokens"] for shard in index["shards"]]
        for path, count in zip(paths, counts, strict=True):
            _check_size(path, count * self.dtype.itemsize)
        self._maps = [np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))
                      for path, count in zip(paths, counts, strict=True)]
        self._offsets = np.cumsum([0, *counts])

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> TokenShards:
        """Open a local dataset in place; copy a remote one's shards into the local cache first."""
        index = read_index(url, storage_options)
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        root = root.rstrip("/")
        if isinstance(fs, LocalFileSystem):
            paths = [f"{root}/{shard['file']}" for shard in index["shards"]]
        else:
            itemsize = np.dtype(index["dtype"]).itemsize
            paths = [_cached_copy(fs, f"{root}/{shard['file']}", shard["sha256"],
                                  shard["tokens"] * itemsize) for shard in index["shards"]]
        return cls(index, paths)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def tokenizer(self) -> str:
        return self.index["tokenizer"]

    @property
    def separator(self) -> int | None:
        return self.index["separator"]

    @property
    def num_shards(self) -> int:
        return len(self._maps)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64."""
        return self.gather(np.arange(start, stop))

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: the `length` tokens from each start position."""
        return self.gather(np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at stream `positions` (any shape) as int64, one fancy index per shard."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside the stream of {len(self)} tokens")
        out = np.empty(positions.shape, dtype=np.int64)
        if len(self._maps) == 1:
            out[...] = self._maps[0][positions]
            return out
        shard_of = np.searchsorted(self._offsets, positions, side="right") - 1
        for shard in np.unique(shard_of):
            here = shard_of == shard
            out[here] = self._maps[shard][positions[here] - self._offsets[shard]]
        return out

    # Worker processes get the paths and map the files again: pickling a memmap copies its data.
    def __getstate__(self) -> dict:
        return {"index": self.index, "paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["index"], state["paths"])


def _check_size(path: str, expected: int) -> None:
    found = os.path.getsize(path)
    if found != expected:
        raise DataError(f"{path}: {found} bytes where the index says {expected} (truncated?)")


def _cached_copy(fs: fsspec.AbstractFileSystem, remote: str, sha256: str, nbytes: int) -> str:
    """A local copy of `remote`, named by its checksum: reused by later runs and other ranks.

    Each process downloads into its own temporary file, checks it and renames it into place, so
    ranks that race for the same shard never see a partial file.
    """
    local = _remote_cache_dir() / f"{sha256}.bin"
    if local.exists() and local.stat().st_size == nbytes:
        return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
    try:
        log.info("copying %s to %s", remote, local)
        fs.get_file(remote, str(partial))
        if _sha256_of(partial) != sha256:
            raise DataError(f"{remote}: its checksum differs from the index's "
                            "(was the dataset rewritten while this run read it?)")
        os.replace(partial, local)
    finally:
        partial.unlink(missing_ok=True)
    return str(local)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_vocab_size(cfg: DataConfig) -> int:
    """The vocabulary a run's dataset needs, from its index alone (no shard is read or copied):
    the check a run makes before it starts. The built-in corpus is byte tokens."""
    if cfg.path is None:
        return BYTES_VOCAB_SIZE
    return read_index(cfg.path, dict(cfg.storage_options))["vocab_size"]
