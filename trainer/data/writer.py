"""Writing a dataset: documents read from the inputs, tokenized on every core, streamed into
shards, and an index written last.

Tokenization runs in worker processes (one per core by default) on chunks of documents; at most a
few chunks per worker are in flight, so memory stays bounded whatever the corpus size, and chunks
come back in input order, so the dataset does not depend on the number of workers. Each document
ends with the tokenizer's end-of-document id.

After every finished shard a journal (`prepare.json`) records how far the inputs have been
written. An interrupted `prepare` (Ctrl-C, SIGTERM, a lost connection, a killed process) leaves
the finished shards and the journal; the same command run again resumes after the last finished
shard, and any other command is refused. A bad input (a `DataError`) removes everything written.
Without `index.json` a directory is never read as a dataset, so nothing half-written looks whole.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from trainer.data.format import (
    INDEX_FILE,
    UINT16_LIMIT,
    UINT32_LIMIT,
    DataError,
    commit_json,
    make_index,
)
from trainer.data.inputs import InputFile, ReadOptions, load_ids, read_documents, resolve_inputs
from trainer.data.progress import Progress
from trainer.data.tokenizer import TokenizerSpec, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB per shard at uint16
JOURNAL_FILE = "prepare.json"
CHUNK_DOCUMENTS = 256  # documents per task sent to a worker ...
CHUNK_BYTES = 1 << 20  # ... or fewer, once they hold this much text
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: enough to keep it busy, bounded memory


def prepare(inputs: list[str], output: str, *, tokenizer: str = "bytes", fmt: str = "auto",
            read: ReadOptions | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            separator: int | None = None, eod_token: str | None = None,
            workers: int | None = None, storage_options: dict | None = None,
            progress: Progress | None = None) -> dict:
    """Tokenize `inputs` into shards under the fsspec URL `output`; returns the index it wrote.

    `tokenizer` is `bytes`, `ids`, `hf:<tokenizer.json or directory>` or `tiktoken:<file>`;
    `fmt` and `read` say how documents come out of the inputs (`trainer.data.inputs`);
    `separator` (bytes, ids) or `eod_token` (hf, tiktoken) is the end-of-document token;
    `workers` tokenizer processes (default: one per core). Everything that can be checked
    before writing is; an output that holds a journal of another command is refused.
    """
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens={shard_tokens}: must be positive")
    _check_id_range("separator", separator)
    spec = load_tokenizer(tokenizer, eod_token=eod_token, separator=separator,
                          storage_options=storage_options)
    read = ReadOptions(**{**(read or ReadOptions()).__dict__, "decode": spec.kind != "bytes"})
    files = resolve_inputs(inputs, fmt, ids=spec.kind == "ids", storage_options=storage_options)
    largest = _largest_id(spec, files, storage_options)
    dtype = np.dtype("<u2") if largest < UINT16_LIMIT else np.dtype("<u4")

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.exists(f"{root}/{INDEX_FILE}"):
        raise DataError(f"{output} already holds a token dataset ({INDEX_FILE}); "
                        "choose another output or delete it first")
    job = {"tokenizer": spec.record(), "inputs": [f.describe() for f in files],
           "read": read.describe(), "shard_tokens": shard_tokens, "dtype": dtype.name}
    resumed = _resume_point(fs, root, output, job)
    writer = _ShardWriter(fs, root, dtype, shard_tokens, job, resumed)
    progress = progress or Progress(total_bytes=sum(f.size for f in files))
    documents = _numbered(read_documents(files, read, storage_options), writer.next_document)
    encoded = _encoded(documents, spec, workers)
    try:
        for number, ids, position in encoded:
            writer.write_document(number, ids, spec.eod_id)
            progress.update(writer.documents, writer.tokens, position)
        shards = writer.close()
        if not shards:
            raise DataError(f"{' '.join(inputs)}: no tokens (every input is empty)")
        vocab_size = (writer.max_id + 1 if spec.vocab_size is None
                      else max(spec.vocab_size, (spec.eod_id or 0) + 1))
        index = make_index(shards, dtype, spec.record(), vocab_size, writer.documents)
        commit_json(fs, root, INDEX_FILE, index)
        writer.forget_journal()
    except DataError:
        writer.abort()
        raise
    except BaseException:
        writer.suspend()
        if writer.shards:
            log.error("prepare stopped after %d finished shard(s); the same command resumes "
                      "there (or delete %s)", len(writer.shards), output)
        raise
    finally:
        encoded.close()  # stops the worker processes now, not whenever the generator is freed
        progress.close()
    log.info("wrote %s: %d tokens, %d documents in %d shards", output, index["num_tokens"],
             index["num_documents"], len(shards))
    return index


def _largest_id(spec: TokenizerSpec, files: list[InputFile], storage: dict | None) -> int:
    """The largest id the dataset can hold: the tokenizer's, or (ids) the files' own, checked to
    fit uint32 before anything is written."""
    if spec.kind != "ids":
        return max(spec.vocab_size - 1, spec.eod_id or 0)
    largest = -1 if spec.eod_id is None else spec.eod_id
    for file in files:
        ids = load_ids(file.url, storage)
        if ids.size:
            _check_id_range(file.url, int(ids.min()))
            _check_id_range(file.url, int(ids.max()))
            largest = max(largest, int(ids.max()))
    return largest


def _check_id_range(what: str, token: int | None) -> None:
    if token is not None and not 0 <= token < UINT32_LIMIT:
        raise DataError(f"{what}: token id {token} is outside [0, 2**32)")


def _numbered(documents: Iterable[tuple[Any, int]], start: int) -> Iterator[tuple[int, Any, int]]:
    """(number, document, position) from document `start` on; earlier ones are read, not kept."""
    for number, (document, position) in enumerate(documents):
        if number >= start:
            yield number, document, position


def _resume_point(fs: fsspec.AbstractFileSystem, root: str, output: str, job: dict) -> dict | None:
    """The journal of an interrupted run of this same job, or None to start afresh."""
    try:
        journal = json.loads(fs.cat_file(f"{root}/{JOURNAL_FILE}"))
    except FileNotFoundError:
        return None
    if journal.get("job") != job:
        changed = sorted(k for k in job if journal.get("job", {}).get(k) != job[k])
        raise DataError(f"{output} holds an interrupted prepare of another command (its "
                        f"{', '.join(changed) or 'job'} differ); rerun that command to finish "
                        "it, or delete the directory")
    log.info("resuming the prepare of %s after %d finished shard(s)", output,
             len(journal["shards"]))
    return journal


# ---- tokenizing in worker processes ------------------------------------------------------------

_worker_encoder: Any = None


def _start_worker(spec: TokenizerSpec) -> None:
    global _worker_encoder
    # One process per core already: the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = spec.encoder()


def _encode_in_worker(documents: list) -> list[np.ndarray]:
    return _worker_encoder(documents)


@dataclass
class _Chunk:
    numbers: list[int]
    documents: list
    positions: list[int]


def _chunks(documents: Iterable[tuple[int, Any, int]]) -> Iterator[_Chunk]:
    chunk, size = _Chunk([], [], []), 0
    for number, document, position in documents:
        chunk.numbers.append(number)
        chunk.documents.append(document)
        chunk.positions.append(position)
        size += len(document)
        if len(chunk.numbers) == CHUNK_DOCUMENTS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = _Chunk([], [], []), 0
    if chunk.numbers:
        yield chunk


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _encoded(documents: Iterable[tuple[int, Any, int]], spec: TokenizerSpec,
             workers: int | None) -> Iterator[tuple[int, np.ndarray, int]]:
    """(number, ids, position) of each document, in input order."""
    if spec.kind == "ids":
        yield from documents
        return
    workers = default_workers() if workers is None else workers
    if workers <= 1 or spec.kind == "bytes":  # bytes need no tokenizing: a process adds nothing
        encode = spec.encoder()
        for chunk in _chunks(documents):
            yield from zip(chunk.numbers, encode(chunk.documents), chunk.positions, strict=True)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with fsspec's threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(spec,)) as pool:
        pending: collections.deque[tuple[_Chunk, Future]] = collections.deque()
        try:
            for chunk in _chunks(documents):
                pending.append((chunk, pool.submit(_encode_in_worker, chunk.documents)))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    yield from _finished(*pending.popleft())
            while pending:
                yield from _finished(*pending.popleft())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise


def _finished(chunk: _Chunk, future: Future) -> Iterator[tuple[int, np.ndarray, int]]:
    yield from zip(chunk.numbers, future.result(), chunk.positions, strict=True)


# ---- shards ----------------------------------------------------------------------------------

class _ShardWriter:
    """Streams documents into numbered shard files of `shard_tokens` tokens each, hashing them,
    and journals how far the inputs have been written after each finished shard."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, dtype: np.dtype,
                 shard_tokens: int, job: dict, resumed: dict | None):
        self.fs, self.root, self.dtype, self.shard_tokens = fs, root, dtype, shard_tokens
        self.job = job
        resumed = resumed or {}
        self.shards: list[dict] = resumed.get("shards", [])
        self.max_id = resumed.get("max_id", -1)
        self.documents = resumed.get("documents", 0)  # documents written (empty ones are not)
        self.next_document = resumed.get("next_document", 0)  # the input document to read next
        self._skip = resumed.get("tokens_into_document", 0)  # of it, tokens already written
        self.tokens = sum(shard["tokens"] for shard in self.shards)
        self._file: Any = None
        self._hash = hashlib.sha256()
        self._count = 0
        # Only a local directory this writer made is removed on abort; object stores have none.
        self._made_root = isinstance(fs, LocalFileSystem) and not fs.exists(root)

    def write_document(self, number: int, ids: np.ndarray, eod: int | None) -> None:
        """Input document `number`, its end token appended; an empty document is skipped."""
        if ids.size == 0:
            self.next_document = number + 1
            return
        tokens = np.empty(ids.size + (eod is not None), dtype=self.dtype)
        tokens[:ids.size] = ids
        if eod is not None:
            tokens[-1] = eod
        data = tokens
        if self._skip:  # resuming inside this document: its first tokens are in the last shard
            data, self._skip = data[self._skip:], 0
        else:
            self.documents += 1
        self.max_id = max(self.max_id, int(data.max()))
        written = tokens.size - data.size
        while data.size:
            if self._file is None:
                self._start_shard()
            chunk, data = np.split(data, [self.shard_tokens - self._count])
            payload = chunk.tobytes()
            self._file.write(payload)
            self._hash.update(payload)
            self._count += chunk.size
            self.tokens += chunk.size
            written += chunk.size
            if self._count == self.shard_tokens:
                inside = written < tokens.size
                self._finish_shard(next_document=number if inside else number + 1,
                                   tokens_into_document=written if inside else 0)
        self.next_document = number + 1

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard(next_document=self.next_document, tokens_into_document=0)
        return self.shards

    def forget_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.root}/{JOURNAL_FILE}")

    def suspend(self) -> None:
        """Stopped before the end: the finished shards and the journal stay for a resume; the
        shard being written goes."""
        self._drop_current()
        if not self.shards:
            self._remove_root()

    def abort(self) -> None:
        """Remove every shard this run or an earlier one wrote, and the journal."""
        self._drop_current()
        for shard in self.shards:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self.root}/{shard['file']}")
        self.forget_journal()
        self._remove_root()

    def _drop_current(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self.root}/{self._current_name()}")

    def _remove_root(self) -> None:
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

    def _finish_shard(self, *, next_document: int, tokens_into_document: int) -> None:
        self._file.close()
        self._file = None
        shard = {"file": self._current_name(), "tokens": self._count,
                 "sha256": self._hash.hexdigest()}
        self.shards.append(shard)
        commit_json(self.fs, self.root, JOURNAL_FILE, {
            "job": self.job, "shards": self.shards, "max_id": self.max_id,
            "documents": self.documents, "next_document": next_document,
            "tokens_into_document": tokens_into_document})
        log.debug("%s/%s: %d tokens", self.root, shard["file"], shard["tokens"])
