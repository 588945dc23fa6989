"""What `prepare` reads: inputs (files, directories, glob patterns; local paths or any fsspec URL)
resolved into files of known formats, and the documents in them, streamed one at a time.

- `text`: `*.txt *.md *.py`; a document is a whole file.
- `jsonl`: `*.jsonl *.ndjson` (also `.gz`, `.bz2`); a document is a line's `--text-field`.
- `parquet`: `*.parquet`; a document is a row's `--column`.
- `datasets`: a `save_to_disk` directory, or `*.csv *.arrow *.json` read by `datasets`; a
  document is a row's `--column`.
- `npy` (with `--tokenizer ids`): `*.npy`; a document is a whole file of ids.

Each document comes with how far through the input bytes the reading has got, for the progress
line's ETA. `datasets` and `pyarrow` are imported only by the formats that need them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from fsspec.compression import compr
from fsspec.utils import infer_compression

from trainer.data.format import DataError

FORMATS = ("auto", "text", "jsonl", "parquet", "datasets", "npy")
SUFFIXES = {
    "text": (".txt", ".md", ".py"),
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.bz2"),
    "parquet": (".parquet",),
    "datasets": (".csv", ".arrow", ".json"),
    "npy": (".npy",),
}
TEXT_FORMATS = ("text", "jsonl", "parquet", "datasets")
# Files a `save_to_disk` directory holds: a Dataset's state.json, a DatasetDict's dataset_dict.json.
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_DATASETS_BUILDERS = {".csv": "csv", ".arrow": "arrow", ".json": "json"}
_ROWS_PER_BATCH = 1024

Document = str | bytes | np.ndarray


@dataclass(frozen=True)
class InputFile:
    """One input: a file (or a saved dataset's directory), its size in bytes and its format."""

    url: str
    size: int
    format: str

    def describe(self) -> dict:
        return {"url": self.url, "size": self.size, "format": self.format}


@dataclass(frozen=True)
class ReadOptions:
    """How documents are taken out of rows: the field or column, the split, text or bytes."""

    text_field: str = "text"  # JSONL
    column: str = "text"  # Parquet and datasets
    split: str = "train"  # a saved DatasetDict
    decode: bool = True  # text files as str (hf, tiktoken) or raw bytes (the bytes tokenizer)

    def describe(self) -> dict:
        return {"text_field": self.text_field, "column": self.column, "split": self.split}


def resolve_inputs(inputs: list[str], fmt: str = "auto", *, ids: bool = False,
                   storage_options: dict | None = None) -> list[InputFile]:
    """Each input as files of a known format, in order; an input that names nothing is an error,
    not a no-op. Directories are searched recursively (sorted by relative path) for the
    suffixes of `fmt` (every text format's with auto); a saved dataset's directory is one input."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if not inputs:
        raise DataError("no inputs given")
    if ids and fmt not in ("auto", "npy"):
        raise DataError(f"--tokenizer ids reads .npy files of ids; --format {fmt} is for text")
    if not ids and fmt == "npy":
        raise DataError("--format npy holds token ids: use it with --tokenizer ids")
    wanted = ("npy",) if ids else (TEXT_FORMATS if fmt == "auto" else (fmt,))
    suffixes = tuple(s for name in wanted for s in SUFFIXES[name])
    files: list[InputFile] = []
    for item in inputs:
        found = _expand(item, fmt, wanted, suffixes, storage_options or {})
        if not found:
            raise DataError(f"{item}: no files to read (looked for "
                            f"{' '.join('*' + s for s in suffixes)})")
        files.extend(found)
    return files


def _expand(item: str, fmt: str, wanted: tuple[str, ...], suffixes: tuple[str, ...],
            options: dict) -> list[InputFile]:
    fs, path = fsspec.core.url_to_fs(item, **options)
    protocol = _protocol(item)
    if glob.has_magic(item):
        matches = sorted(fs.glob(path))
        return [found for match in matches
                for found in _expand(protocol + match, fmt, wanted, suffixes, options)]
    if fs.isdir(path):
        if any(fs.exists(f"{path.rstrip('/')}/{m}") for m in _SAVED_DATASET_MARKERS):
            if "datasets" not in wanted:
                raise DataError(f"{item}: a saved Hugging Face dataset; read it with "
                                "--format datasets or auto")
            return [InputFile(item, int(fs.du(path)), "datasets")]
        listed = fs.find(path, detail=True)
        root = path.rstrip("/") + "/"
        chosen = sorted((name for name, info in listed.items() if name.endswith(suffixes)),
                        key=lambda name: name[len(root):])
        return [InputFile(protocol + name, int(listed[name]["size"]),
                          _format_of(name, fmt, wanted)) for name in chosen]
    if fs.isfile(path):
        return [InputFile(item, int(fs.size(path)), _format_of(path, fmt, wanted, strict=True))]
    raise DataError(f"{item}: no such file or directory")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def _format_of(name: str, fmt: str, wanted: tuple[str, ...], strict: bool = False) -> str:
    if fmt != "auto":
        return fmt
    for candidate in wanted:
        if name.endswith(SUFFIXES[candidate]):
            return candidate
    if strict:
        known = " ".join("*" + s for c in wanted for s in SUFFIXES[c])
        raise DataError(f"{name}: unknown format (known: {known}); name it with --format")
    return wanted[0]


def read_documents(files: list[InputFile], options: ReadOptions,
                   storage_options: dict | None = None) -> Iterator[tuple[Document, int]]:
    """Every document of `files` in order, each with the input bytes read so far (an estimate
    inside a file for the row formats: rows read / rows in it)."""
    done = 0
    for file in files:
        read = _READERS[file.format]
        for document, fraction in read(file, options, storage_options or {}):
            yield document, done + int(file.size * fraction)
        done += file.size


def _read_text(file: InputFile, options: ReadOptions, storage: dict):
    with fsspec.open(file.url, "rb", **storage) as handle:
        data = handle.read()
    if options.decode:
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{file.url}: not UTF-8 text (byte {exc.start}); the bytes "
                            "tokenizer takes any bytes") from None
    yield data, 1.0


def _read_jsonl(file: InputFile, options: ReadOptions, storage: dict):
    field = options.text_field
    fs, path = fsspec.core.url_to_fs(file.url, **storage)
    with fs.open(path, "rb") as raw:
        compression = infer_compression(path)
        lines = compr[compression](raw, mode="rb") if compression else raw
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{file.url}:{number}: not a JSON line ({exc})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{file.url}:{number}: no field {field!r} (found: {keys}); "
                                "name the text's field with --text-field")
            yield _string(row[field], f"{file.url}:{number}: field {field!r}"), \
                min(1.0, raw.tell() / max(1, file.size))


def _read_parquet(file: InputFile, options: ReadOptions, storage: dict):
    import pyarrow.parquet as pq

    with fsspec.open(file.url, "rb", **storage) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:  # pyarrow's ArrowInvalid and friends
            raise DataError(f"{file.url}: not a Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        if options.column not in names:
            raise DataError(f"{file.url}: no column {options.column!r} (found: "
                            f"{', '.join(names)}); name the text's column with --column")
        total = max(1, parquet.metadata.num_rows)
        rows = 0
        for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[options.column]):
            for value in batch.column(0).to_pylist():
                rows += 1
                yield _string(value, f"{file.url}: row {rows - 1}, column {options.column!r}"), \
                    rows / total


def _read_datasets(file: InputFile, options: ReadOptions, storage: dict):
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(file.url).suffix
    if suffix in _DATASETS_BUILDERS:  # a data file `datasets` knows how to read, streamed
        data = datasets.load_dataset(_DATASETS_BUILDERS[suffix], data_files=file.url,
                                     split="train", streaming=True, storage_options=storage)
        total = None
    else:
        data = datasets.load_from_disk(file.url, storage_options=storage or None)
        if isinstance(data, datasets.DatasetDict):
            if options.split not in data:
                raise DataError(f"{file.url}: no split {options.split!r} (found: "
                                f"{', '.join(data)}); choose one with --split")
            data = data[options.split]
        total = max(1, data.num_rows)
    names = data.column_names
    if names is not None and options.column not in names:
        raise DataError(f"{file.url}: no column {options.column!r} (found: {', '.join(names)}); "
                        "name the text's column with --column")
    rows = 0
    for batch in data.select_columns([options.column]).iter(batch_size=_ROWS_PER_BATCH):
        if options.column not in batch:
            raise DataError(f"{file.url}: no column {options.column!r} (found: "
                            f"{', '.join(batch)}); name the text's column with --column")
        for value in batch[options.column]:
            rows += 1
            yield _string(value, f"{file.url}: row {rows - 1}, column {options.column!r}"), \
                rows / total if total else 0.0


def _string(value: object, where: str) -> str:
    if value is None:
        return ""  # a missing text is an empty document, which the writer skips
    if not isinstance(value, str):
        raise DataError(f"{where}: holds {type(value).__name__}, not text")
    return value


def load_ids(url: str, storage: dict | None = None) -> np.ndarray:
    """A `.npy` file of token ids: 1-D integers (local files are memory-mapped)."""
    try:
        if "://" not in url or url.startswith("file://"):
            ids = np.load(url.removeprefix("file://"), mmap_mode="r", allow_pickle=False)
        else:
            with fsspec.open(url, "rb", **(storage or {})) as handle:
                ids = np.load(handle, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{url}: not a .npy array of token ids ({exc})") from exc
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise DataError(f"{url}: token ids must be a 1-D integer array, "
                        f"found {ids.ndim}-D {ids.dtype}")
    return ids


def _read_npy(file: InputFile, options: ReadOptions, storage: dict):
    yield load_ids(file.url, storage), 1.0


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "datasets": _read_datasets, "npy": _read_npy}


def files_under(root: Path, suffixes: tuple[str, ...],
                skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Local files under `root` ending in one of `suffixes`, sorted by their path relative to
    `root`, leaving out directories named in `skip_dirs`."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in skip_dirs]
        found += [Path(directory, name) for name in names if name.endswith(suffixes)]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())
