"""Writing a dataset: inputs (text files or `.npy` token ids) tokenized into shards and an index.

Byte-level tokens (the default tokenizer) are a file's raw bytes; documents end with byte 0xFF,
which never occurs in UTF-8 text, so splitting a decoded stream on it gives the documents back and
the vocabulary stays at 256. Ids from any other tokenizer come in as `.npy` files of integers.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from trainer.data.format import (
    BYTES_SEPARATOR,
    INDEX_FILE,
    TOKENIZERS,
    UINT16_LIMIT,
    UINT32_LIMIT,
    DataError,
    commit_index,
    make_index,
)

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB per shard at uint16
SUFFIXES = {"bytes": (".txt", ".md", ".py"), "ids": (".npy",)}


def prepare(inputs: list[str], output: str, *, tokenizer: str = "bytes",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, separator: int | None = None,
            storage_options: dict | None = None) -> dict:
    """Tokenize `inputs` into shards under the fsspec URL `output`; returns the index it wrote.

    `inputs` are files, directories (searched recursively for `*.txt`, `*.md`, `*.py` with the
    bytes tokenizer, `*.npy` with ids) or glob patterns. `separator` ends every document: 0xFF for
    bytes by default; none for ids, whose files usually carry their tokenizer's own end token.
    Everything is checked before anything is written; a failure while writing removes what was
    written.
    """
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer {tokenizer!r}: allowed: {', '.join(TOKENIZERS)}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens}: must be positive")
    if separator is None and tokenizer == "bytes":
        separator = BYTES_SEPARATOR
    _check_id_range("separator", separator)
    files = resolve_inputs(inputs, SUFFIXES[tokenizer])
    documents, dtype = _documents_and_dtype(files, tokenizer, separator)

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.exists(f"{root}/{INDEX_FILE}"):
        raise DataError(f"{output} already holds a token dataset ({INDEX_FILE}); "
                        "choose another output or delete it first")
    writer = _ShardWriter(fs, root, dtype, shard_tokens)
    try:
        _write_documents(writer, documents, separator)
        shards = writer.close()
        if not shards:
            raise DataError(f"{' '.join(inputs)}: no tokens (every input is empty)")
        index = make_index(shards, dtype, tokenizer, separator, writer.max_id + 1)
        commit_index(fs, root, index)
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %s: %d tokens in %d shards", output, index["num_tokens"], len(shards))
    return index


def _documents_and_dtype(files: list[Path], tokenizer: str,
                         separator: int | None) -> tuple[Iterable[np.ndarray], np.dtype]:
    """The documents to write and the narrowest dtype that holds every id (checked up front)."""
    if tokenizer == "bytes":
        largest = max(255, separator or 0)
        documents: Iterable[np.ndarray] = _byte_documents(files)
    else:
        largest = max(_check_id_files(files), -1 if separator is None else separator)
        documents = _id_documents(files)
    return documents, np.dtype("<u2") if largest < UINT16_LIMIT else np.dtype("<u4")


def _write_documents(writer: _ShardWriter, documents: Iterable[np.ndarray],
                     separator: int | None) -> None:
    for document in documents:
        if document.size == 0:
            continue
        writer.write(document)
        if separator is not None:
            writer.write(np.array([separator]))


def resolve_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Each input as files, in order; an input that names nothing is an error, not a no-op."""
    if not inputs:
        raise DataError("no inputs given")
    files: list[Path] = []
    for item in inputs:
        found = _expand_input(item, suffixes)
        if not found:
            raise DataError(f"{item}: no {'/'.join(suffixes)} files found")
        files.extend(found)
    return files


def _expand_input(item: str, suffixes: tuple[str, ...]) -> list[Path]:
    if glob.has_magic(item):
        matches = [Path(match) for match in sorted(glob.glob(item, recursive=True))]
        return [found for match in matches for found in _expand_input(str(match), suffixes)]
    path = Path(item)
    if path.is_dir():
        return list(files_under(path, suffixes))
    if path.is_file():
        return [path]
    raise DataError(f"{item}: no such file or directory")


def files_under(root: Path, suffixes: tuple[str, ...],
                 skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `root` ending in one of `suffixes`, sorted by their path relative to `root`."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in skip_dirs]
        found += [Path(directory, name) for name in names if name.endswith(suffixes)]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _byte_documents(files: list[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield np.frombuffer(path.read_bytes(), dtype=np.uint8)


def _load_ids(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a .npy array of token ids ({exc})") from exc
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise DataError(f"{path}: token ids must be a 1-D integer array, "
                        f"found {ids.ndim}-D {ids.dtype}")
    return ids


def _check_id_files(files: list[Path]) -> int:
    """The largest id across `files`, after checking every id fits uint32."""
    largest = -1
    for path in files:
        ids = _load_ids(path)
        if ids.size:
            _check_id_range(str(path), int(ids.min()))
            _check_id_range(str(path), int(ids.max()))
            largest = max(largest, int(ids.max()))
    return largest


def _check_id_range(what: str, token: int | None) -> None:
    if token is not None and not 0 <= token < UINT32_LIMIT:
        raise DataError(f"{what}: token id {token} is outside [0, 2**32)")


def _id_documents(files: list[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield _load_ids(path)


class _ShardWriter:
    """Streams tokens into numbered shard files of `shard_tokens` tokens each, hashing them."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, dtype: np.dtype,
                 shard_tokens: int):
        self.fs, self.root, self.dtype, self.shard_tokens = fs, root, dtype, shard_tokens
        self.shards: list[dict] = []
        self.max_id = -1
        self._file: Any = None
        self._hash = hashlib.sha256()
        self._count = 0
        # Only a local directory this writer made is removed on abort; object stores have none.
        self._made_root = isinstance(fs, LocalFileSystem) and not fs.exists(root)

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False)
        self.max_id = max(self.max_id, int(data.max()))
        while data.size:
            if self._file is None:
                self._start_shard()
            chunk, data = np.split(data, [self.shard_tokens - self._count])
            payload = chunk.tobytes()
            self._file.write(payload)
            self._hash.update(payload)
            self._count += chunk.size
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def abort(self) -> None:
        """Remove every shard this writer started, finished or not."""
        if self._file is not None:
            self._file.close()
        for name in [shard["file"] for shard in self.shards] + [self._current_name()]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self.root}/{name}")
        if self._made_root:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)

    def _current_name(self) -> str:
        return f"shard-{len(self.shards):05d}.bin"

    def _start_shard(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self._file = self.fs.open(f"{self.root}/{self._current_name()}", "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _finish_shard(self) -> None:
        self._file.close()
        self._file = None
        shard = {"file": self._current_name(), "tokens": self._count,
                 "sha256": self._hash.hexdigest()}
        self.shards.append(shard)
        log.info("%s/%s: %d tokens", self.root, shard["file"], shard["tokens"])
