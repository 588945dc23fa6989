"""Where checkpoints live: fsspec URLs (local paths, file://, s3://) opened with the configured
`storage_options` (reached and probed by `trainer.urls`), and a DCP writer that records the size
and SHA-256 of every byte it writes (the manifest's checksums cost no second read)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

from trainer.urls import filesystem, is_local, one_line, probe

__all__ = ["HashingWriter", "filesystem", "is_local", "join", "one_line", "probe"]

# boto reports at INFO which credential and endpoint source it used, per client and rank: noise in
# a run's log (and a preflight error must stay one line).
for _name in ("botocore.credentials", "aiobotocore.credentials", "botocore.configprovider"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def join(url: str, *names: str) -> str:
    """`url` with `names` appended; local paths stay paths, URLs keep their protocol."""
    return posixpath.join(url.rstrip("/"), *names)


class _HashingStream:
    """A write stream that hashes what passes through it."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.nbytes += view.nbytes
        return self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Buffer(io.RawIOBase):
    """An object's bytes in memory, handed to the store without another copy. DCP's stream
    wrappers close it before the upload; it keeps its bytes until `release()`."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.data += data
        return len(memoryview(data).cast("B"))

    def tell(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass

    def release(self) -> None:
        self.data = bytearray()


class HashingFileSystem(FileSystem):
    """DCP's fsspec filesystem, recording {path: (bytes, sha256)} of each file it writes."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        super().__init__()
        self.fs = fs
        self.written: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()  # DCP writes with several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = os.fspath(path)
        if is_local(path):
            with super().create_stream(path, mode) as stream:
                hashing = _HashingStream(stream)
                yield hashing
        else:
            # An object store takes a whole object in one request (s3fs splits a large one into
            # parts uploaded in parallel); a stream would upload serial parts as its buffer fills.
            buffer = _Buffer()
            hashing = _HashingStream(buffer)
            yield hashing
            self.fs.pipe_file(path, buffer.data)
            buffer.release()
        with self._lock:
            self.written[path] = (hashing.nbytes, hashing.sha256.hexdigest())

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            self.written[os.fspath(new_path)] = self.written.pop(os.fspath(path))


class HashingWriter(FsspecWriter):
    """DCP's fsspec writer whose files are hashed as they are written."""

    def __init__(self, url: str, storage_options: dict[str, Any], thread_count: int):
        # fsync means something on a local disk only; an object store commits on close
        super().__init__(url, sync_files=is_local(url), thread_count=thread_count,
                         **storage_options)
        self.fs = HashingFileSystem(self.fs.fs)

    def files(self) -> dict[str, tuple[int, str]]:
        """{name relative to the checkpoint: (bytes, sha256)} of what this rank wrote."""
        root = os.fspath(self.path).rstrip("/")
        return {posixpath.relpath(path, root): value for path, value in self.fs.written.items()}

    def write_file(self, name: str, data: bytes) -> None:
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            stream.write(data)
