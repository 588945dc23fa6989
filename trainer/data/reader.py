"""Reading a dataset: its shards as one stream of tokens. Local shards are memory-mapped; remote
ones are first copied into a local cache named by their checksum, then memory-mapped."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from trainer.data.format import DataError, cache_root, read_index

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


class Region:
    """Tokens [start, stop) of a dataset, read like the whole of it (`len`, `windows`)."""

    def __init__(self, shards: TokenShards, start: int, stop: int):
        self.shards, self.start, self.stop = shards, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        return self.shards.windows(np.asarray(starts, dtype=np.int64) + self.start, length)


_SCAN_TOKENS = 1 << 20  # tokens read at a time when looking for a document boundary


def split_by_document(shards: TokenShards, fraction: float, what: str) -> tuple[Region, Region]:
    """(training, held out): the last documents of `shards`, about `fraction` of its tokens,
    held out whole. The cut is the first document start at or after the nominal point, else the
    last one before it; a dataset without end-of-document tokens cannot be split by document."""
    eod = shards.separator
    if eod is None:
        raise DataError(f"{what}: its documents have no end token (separator none), so a "
                        "fraction cannot be held out by document; give a held-out dataset URL")
    total = len(shards)
    nominal = total - max(1, round(fraction * total))
    cut = _next_document_start(shards, eod, nominal)
    if cut is None:
        cut = _previous_document_start(shards, eod, nominal)
    if cut is None or cut == 0:
        raise DataError(f"{what}: one document only, nothing to hold out by document")
    return Region(shards, 0, cut), Region(shards, cut, total)


def _next_document_start(shards: TokenShards, eod: int, position: int) -> int | None:
    start = max(0, position - 1)
    while start < len(shards) - 1:
        stop = min(len(shards) - 1, start + _SCAN_TOKENS)  # an end token as the last token
        found = np.flatnonzero(shards.read(start, stop) == eod)  # starts no document
        if found.size:
            return start + int(found[0]) + 1
        start = stop
    return None


def _previous_document_start(shards: TokenShards, eod: int, position: int) -> int | None:
    stop = position
    while stop > 0:
        start = max(0, stop - _SCAN_TOKENS)
        found = np.flatnonzero(shards.read(start, stop) == eod)
        if found.size:
            return start + int(found[-1]) + 1
        stop = start
    return None
