"""Token data: shards of token ids behind an fsspec URL; a sampler whose position is checkpointed.

A dataset is a directory (local path, `file://`, `s3://`, any fsspec URL) holding `index.json` and
raw little-endian token files. The index records the format version, the dtype (`uint16` while
every id is below 65536, else `uint32`), `vocab_size` (largest id + 1), the tokenizer, the document
separator and each shard's file name, token count and SHA-256. The index is written last: a
directory without one is not a dataset, so an interrupted `prepare` never looks finished.

Byte-level tokens (the default tokenizer) are a file's raw bytes; documents end with byte 0xFF,
which never occurs in UTF-8 text, so splitting a decoded stream on it gives the documents back and
the vocabulary stays at 256. Ids from any other tokenizer come in as `.npy` files of integers.

Training reads the shards as one concatenated stream, cut into windows of `seq_len + 1` tokens at a
stride of `seq_len` (inputs and their one-token-shifted targets). Local shards are memory-mapped;
remote ones are first copied into a local cache named by their checksum, then memory-mapped.

Run `python -m trainer.data --help` for the command line (`prepare`, `info`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from trainer.config import DataConfig

log = logging.getLogger(__name__)

FORMAT = "ultramesh-tokens"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZERS = ("bytes", "ids")
BYTES_SEPARATOR = 0xFF  # invalid anywhere in UTF-8, so it cannot collide with text
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB per shard at uint16
DEFAULT_CORPUS_BYTES = 4 << 20  # enough for a demo run, prepared in about a second
SUFFIXES = {"bytes": (".txt", ".md", ".py"), "ids": (".npy",)}
UINT16_LIMIT = 1 << 16
UINT32_LIMIT = 1 << 32
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})

Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """An input or dataset problem a user can fix; its message is one line naming the culprit."""


# ------------------------------------------------------------------------------------------------
# Where things live


def cache_root() -> Path:
    """$ULTRAMESH_CACHE, else ~/.cache/ultramesh."""
    configured = os.environ.get("ULTRAMESH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "ultramesh"


def default_corpus_dir() -> Path:
    return cache_root() / "data" / "stdlib-bytes"


def _remote_cache_dir() -> Path:
    return cache_root() / "data" / "remote"


# ------------------------------------------------------------------------------------------------
# The built-in corpus


def stdlib_sources(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The standard library's `*.py` files in sorted order, cut before the total passes `max_bytes`.

    Installed packages (site-packages) are left out, so the corpus depends only on the Python
    version, never on what else is installed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in _files_under(root, (".py",), skip_dirs=_SKIPPED_STDLIB_DIRS):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def ensure_default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The built-in corpus's directory, preparing it on first use.

    It is prepared into a private staging directory and renamed into place; a rename onto a
    directory another process has already completed fails, and that process's copy is used.
    """
    target = default_corpus_dir()
    if (target / INDEX_FILE).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        log.info("preparing the built-in corpus (Python's standard library) in %s", target)
        prepare([str(path) for path in stdlib_sources(max_bytes)], str(staging))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / INDEX_FILE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# ------------------------------------------------------------------------------------------------
# Writing


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
        index = _make_index(shards, dtype, tokenizer, separator, writer.max_id + 1)
        _commit_index(fs, root, index)
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
        return list(_files_under(path, suffixes))
    if path.is_file():
        return [path]
    raise DataError(f"{item}: no such file or directory")


def _files_under(root: Path, suffixes: tuple[str, ...],
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


def _make_index(shards: list[dict], dtype: np.dtype, tokenizer: str, separator: int | None,
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


def _commit_index(fs: fsspec.AbstractFileSystem, root: str, index: dict) -> None:
    """Write the index under a temporary name and move it into place, so it appears whole."""
    staged = f"{root}/.{INDEX_FILE}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(staged, json.dumps(index, indent=1).encode())
    fs.mv(staged, f"{root}/{INDEX_FILE}")


# ------------------------------------------------------------------------------------------------
# Reading


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


# ------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class WindowSampler:
    """Which windows each data-parallel rank reads, batch by batch, epoch by epoch.

    Epoch e orders all windows by a permutation from its own generator, seeded by (seed, e).
    Global batch b is positions [b*G, (b+1)*G) of that permutation, G = batch_size x num_replicas,
    and rank r takes every num_replicas-th of them starting at r. Positions past the last full
    global batch (the ragged tail) are left for later epochs' permutations, so every rank sees the
    same number of batches. Because a global batch does not depend on how it is split, a position
    saved at one data-parallel size resumes at another with the same G.
    """

    num_windows: int
    batch_size: int
    seed: int
    num_replicas: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside 0..{self.num_replicas - 1}")
        if self.seed < 0:
            raise ValueError(f"seed {self.seed}: must be 0 or more")
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.num_windows} windows make no global batch of "
                            f"{self.batch_size} x {self.num_replicas} ranks; use more data, a "
                            "shorter data.seq_len or a smaller data.micro_batch_size")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def epoch_windows(self, epoch: int) -> torch.Tensor:
        """int64 [batches_per_epoch, batch_size]: this rank's window ids, batch by batch."""
        order = torch.randperm(self.num_windows, generator=_epoch_generator(self.seed, epoch))
        used = order[: self.batches_per_epoch * self.global_batch]
        return used.view(self.batches_per_epoch, self.global_batch)[:, self.rank::self.num_replicas]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes both numbers into well-spread state, so nearby (seed, epoch) pairs do not
    # give related permutations, and the global RNG is never touched.
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class TokenLoader:
    """(inputs, targets) batches, int64 [batch_size, seq_len], targets shifted one token ahead.

    Its position, (epoch, batches consumed in that epoch), is its `state_dict`; Lightning stores
    that in checkpoints and loads it before iterating, and iteration continues from it. One epoch
    is `len(self)` batches; iterating again after an epoch is used up starts the next one.
    """

    def __init__(self, shards: TokenShards, sampler: WindowSampler, seq_len: int,
                 num_workers: int = 0):
        self.shards, self.sampler, self.seq_len = shards, sampler, seq_len
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_consumed = 0

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        batches = _EpochBatches(self.shards, self.sampler.epoch_windows(self.epoch), self.seq_len)
        remaining = range(self.batches_consumed, len(self))
        if self.num_workers == 0:
            return self._count(batches[b] for b in remaining)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=remaining,
                                             num_workers=self.num_workers)
        return self._count(loader)

    def _count(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        # Counted before the batch is handed out: a checkpoint taken while the step runs must
        # resume after this batch, not repeat it.
        for batch in batches:
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "seed": self.sampler.seed, "num_windows": self.sampler.num_windows,
                "global_batch": self.sampler.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        here = self.state_dict()
        for key in ("seed", "num_windows", "global_batch"):
            if state[key] != here[key]:
                raise DataError(
                    f"the saved data position has {key}={state[key]} but this run has "
                    f"{here[key]}; resuming needs the same dataset, data.seq_len, seed and "
                    "micro_batch_size x data-parallel size")
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]


class _EpochBatches(torch.utils.data.Dataset):
    """Batch b of one epoch, built with one gather from the memory-mapped shards."""

    def __init__(self, shards: TokenShards, windows: torch.Tensor, seq_len: int):
        self.shards, self.windows, self.seq_len = shards, windows, seq_len

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, batch: int) -> Batch:
        starts = self.windows[batch].numpy() * self.seq_len
        tokens = torch.from_numpy(self.shards.windows(starts, self.seq_len + 1))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


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


# ------------------------------------------------------------------------------------------------
# Command line

_EPILOG = """\
examples:
  python -m trainer.data prepare --output data/mybooks books/ notes/*.md
  python -m trainer.data prepare --tokenizer ids --output s3://bucket/corpus ids/*.npy
  python -m trainer.data info s3://bucket/corpus

S3-compatible endpoints and credentials: fsspec reads FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY,
FSSPEC_S3_SECRET (or the usual AWS_* variables)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make and inspect token shard datasets for training (data.path=URL).")
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="turn text files (or token id arrays) into shards",
        description="Tokenize INPUTs into a shard directory. Byte-level tokens by default:\n"
                    f"each file's bytes, each document ended by byte {BYTES_SEPARATOR:#x}.")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="file, directory (searched recursively: *.txt *.md *.py for bytes, "
                           "*.npy for ids) or glob pattern")
    prep.add_argument("--output", default="tokens", metavar="URL",
                      help="directory or fsspec URL (s3://bucket/prefix) to write (default: "
                           "./tokens); it must not hold a dataset already")
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes",
                      help="bytes: raw bytes of text files; ids: .npy arrays of integer ids "
                           "from any tokenizer, one document per file (default: bytes)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                      help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})")
    prep.add_argument("--separator", type=int, default=None, metavar="ID",
                      help=f"token id that ends each document (default: {BYTES_SEPARATOR} for "
                           "bytes, none for ids)")

    info = commands.add_parser("info", help="print a dataset's size and vocabulary",
                               description="Print the tokens, shards and vocabulary of a dataset.")
    info.add_argument("url", metavar="URL", help="dataset directory or fsspec URL")
    return parser


def _print_info(url: str, index: dict) -> None:
    separator = index["separator"]
    print(f"dataset:    {url}")
    print(f"tokens:     {index['num_tokens']}")
    print(f"shards:     {len(index['shards'])}")
    print(f"vocab_size: {index['vocab_size']}")
    print(f"dtype:      {index['dtype']}")
    print(f"tokenizer:  {index['tokenizer']} (separator: "
          f"{'none' if separator is None else separator})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prepare":
            index = prepare(args.inputs, args.output, tokenizer=args.tokenizer,
                            shard_tokens=args.shard_tokens, separator=args.separator)
            _print_info(args.output, index)
        else:
            _print_info(args.url, read_index(args.url))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
