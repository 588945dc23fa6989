"""Hugging Face checkpoints in and out, streamed: no process ever holds a whole large model.

A family's `HFAdapter` says how its shape maps to a `config.json` and how each of its tensors is
named in Hugging Face's layout (`WeightMap`, with a row permutation where the layouts differ, such
as Llama's rotary halves). This module does the rest, the same for every family:
- `HFCheckpoint` reads `config.json` and the safetensors files (one, or sharded with
  `model.safetensors.index.json`) from a directory or any fsspec URL, by byte ranges: a tensor's
  rows come without reading the rest of the file;
- `check_pretrained` compares the config with the run's shape and the tensors' names and shapes
  with the adapter's, before any process group exists;
- `load_pretrained` fills each rank's shards of an already laid-out model with just the rows and
  columns that rank holds, a bounded block of rows at a time;
- `SafetensorsWriter` writes a file tensor by tensor (the header first: shapes are known before
  any tensor is read), so an export holds one tensor at a time.
"""

from __future__ import annotations

import json
import math
import posixpath
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from trainer.config import KEY, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.models.family import ModelFamily

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Rows read at once are at most this many bytes: what a rank holds beyond its shards while loading.
BLOCK_BYTES = 64 << 20
# safetensors' dtype names (the format's specification, huggingface/safetensors README).
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool"}


class PretrainedError(ValueError):
    """A Hugging Face checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class WeightMap:
    """One tensor of ours and its Hugging Face counterpart. `order`, when set, gives the row
    permutation between the layouts: Hugging Face's row i is our row order[i]. `stacked`, when
    set, says that Hugging Face's tensor is one matrix of ours, ours[stacked]: Hugging Face
    stores each expert of an MoE layer on its own, the MoE family stacks them on dim 0 (where
    expert parallel splits them)."""

    ours: str  # parameter name in the family's model
    hf: str  # tensor name in the Hugging Face checkpoint
    order: Callable[[], torch.Tensor] | None = None
    stacked: int | None = None


class HFAdapter(Protocol):
    """What a family tells Hugging Face import and export."""

    architecture: str  # the `architectures` entry transformers instantiates

    def config(self, shape: Any, dtype: str) -> dict[str, Any]:
        """`config.json` for a model of `shape` whose weights are stored in `dtype`."""

    def shape_values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The `model.*` shape keys a `config.json` implies; PretrainedError for a config this
        family cannot express (another architecture, a feature it lacks)."""

    def weights(self, shape: Any) -> list[WeightMap]:
        """Every tensor of a model of `shape`, ours and theirs."""


# ------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    start: int  # byte offset of the first element in the file


class HFCheckpoint:
    """A Hugging Face model directory at `url` (path or fsspec URL), read lazily."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        self._tensors: dict[str, TensorInfo] | None = None

    def _path(self, name: str) -> str:
        return posixpath.join(self.root.rstrip("/"), name)

    def config(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self._path(CONFIG)))
        except FileNotFoundError:
            raise PretrainedError(f"has no {CONFIG}") from None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's file, dtype, shape and offset, from the safetensors headers."""
        if self._tensors is None:
            self._tensors = {}
            for file in self._files():
                self._tensors.update(self._header(file))
        return self._tensors

    def _files(self) -> list[str]:
        if self.fs.exists(self._path(INDEX)):
            index = json.loads(self.fs.cat_file(self._path(INDEX)))
            return sorted(set(index["weight_map"].values()))
        if self.fs.exists(self._path(SINGLE)):
            return [SINGLE]
        raise PretrainedError(f"has neither {INDEX} nor {SINGLE}")

    def _header(self, file: str) -> dict[str, TensorInfo]:
        with self.fs.open(self._path(file), "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        found = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                raise PretrainedError(f"{file}: {name} has dtype {entry['dtype']}, not one of "
                                      f"{', '.join(DTYPES)}")
            begin, _ = entry["data_offsets"]
            found[name] = TensorInfo(file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                     8 + length + begin)
        return found

    def read_rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows first..first+count of tensor `name` (a 1-D tensor has rows of one element), in
        the dtype it is stored in, as [count, row length]."""
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, info.dtype)
        row = math.prod(info.shape[1:])
        width = torch.empty((), dtype=dtype).element_size()
        with self.fs.open(self._path(info.file), "rb") as f:
            f.seek(info.start + first * row * width)
            data = bytearray(f.read(count * row * width))
        return torch.frombuffer(data, dtype=dtype).view(count, row)


# ------------------------------------------------------------------------------------------------
# Checking and loading


def check_pretrained(family: ModelFamily, shape: Any, url: str,
                     storage_options: Mapping[str, Any] | None = None) -> HFCheckpoint:
    """Refuse, in one line naming the key, a checkpoint whose config or tensors do not fit a
    model of `shape`: a config value that differs from the run's, a missing tensor, a tensor of
    another shape. Reads config.json and the safetensors headers only."""
    import dataclasses

    adapter = family.hf()
    source = HFCheckpoint(url, storage_options)
    where = f"{KEY.model.init_from}={url}"
    try:
        implied = adapter.shape_values(source.config())
        ours = dataclasses.asdict(shape)
        for key, value in implied.items():
            if not _same(ours[key], value):
                raise ConfigError(getattr(KEY.model, key), ours[key],
                                  f"{where} has {value!r} in its {CONFIG}; set "
                                  f"{getattr(KEY.model, key)}={value} (or pick the matching "
                                  f"model preset)")
        tensors = source.tensors
        expected = _expected_shapes(family, shape)
        for mapping in adapter.weights(shape):
            if mapping.hf not in tensors:
                raise ConfigError(KEY.model.init_from, url,
                                  f"has no tensor {mapping.hf}, which {family.name} needs")
            needed = expected[mapping.ours][1 if mapping.stacked is not None else 0:]
            if tensors[mapping.hf].shape != needed:
                raise ConfigError(KEY.model.init_from, url,
                                  f"{mapping.hf} is {list(tensors[mapping.hf].shape)}, the model "
                                  f"needs {list(needed)}")
    except ConfigError:
        raise
    except PretrainedError as exc:
        raise ConfigError(KEY.model.init_from, url, str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:  # unreadable: missing, denied, not JSON
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(KEY.model.init_from, url,
                          f"cannot be read as a Hugging Face model directory "
                          f"({type(exc).__name__}: {first})") from None
    return source


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-6)
    return ours == theirs


def _expected_shapes(family: ModelFamily, shape: Any) -> dict[str, tuple[int, ...]]:
    import torch

    from trainer.models.init import canonical_name

    with torch.device("meta"):
        model = family.build(shape)
    return {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}


@dataclass(frozen=True)
class LoadReport:
    tensors: int
    bytes_read: int  # what this rank read from storage
    local_bytes: int  # what its shards hold


def load_pretrained(model: nn.Module, family: ModelFamily, shape: Any, url: str,
                    storage_options: Mapping[str, Any] | None = None) -> LoadReport:
    """Fill every parameter of `model` (laid out over its mesh, shards allocated) with the
    checkpoint's values: each rank reads only the rows its shards hold, `BLOCK_BYTES` at a time,
    and keeps of them the columns it holds."""
    import torch

    from trainer.models.init import canonical_name

    source = HFCheckpoint(url, storage_options)
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    read = 0
    mappings = family.hf().weights(shape)
    for mapping in mappings:
        with torch.no_grad():
            read += _fill(params[mapping.ours], source, mapping)
    # each parameter once: a stack of experts is many Hugging Face tensors
    held = sum(_local(params[name]).numel() * _local(params[name]).element_size()
               for name in {m.ours for m in mappings})
    return LoadReport(len(mappings), read, held)


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _fill(param: torch.Tensor, source: HFCheckpoint, mapping: WeightMap) -> int:
    """Copy this rank's part of `mapping` into `param`; returns the bytes read."""
    import torch

    from trainer.models.init import global_indices

    local = _local(param)
    if local.numel() == 0:
        return 0
    if mapping.stacked is not None:  # one matrix of a stack: only a rank that holds it reads
        mine = (global_indices(param, 0) == mapping.stacked).nonzero().flatten()
        if len(mine) == 0:
            return 0
        local = local[int(mine[0])]
    dim = 1 if mapping.stacked is not None else 0
    rows = global_indices(param, dim)
    cols = (global_indices(param, dim + 1) if param.ndim == dim + 2
            else torch.zeros(1, dtype=torch.long))
    if mapping.order is not None:
        # Hugging Face's row i is our row order[i]: ours r is theirs inverse[r]
        order = mapping.order()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        rows = inverse[rows]
    info = source.tensors[mapping.hf]
    row_bytes = math.prod(info.shape[1:]) * torch.empty((), dtype=getattr(torch, info.dtype)
                                                        ).element_size()
    block = max(1, BLOCK_BYTES // row_bytes)
    values = torch.empty(len(rows), len(cols), dtype=local.dtype)
    read = 0
    for first, count, where in _row_blocks(rows, block):
        chunk = source.read_rows(mapping.hf, first, count)
        read += chunk.numel() * chunk.element_size()
        values[where] = chunk[rows[where] - first][:, cols].to(local.dtype)
    local.copy_(values.view(local.shape))
    return read


def _row_blocks(rows: torch.Tensor, block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, row count, mask of `rows` inside) for blocks of at most `block` consecutive
    rows that together cover `rows`, skipping the gaps between them."""
    import torch

    remaining = torch.ones(len(rows), dtype=torch.bool)
    while remaining.any():
        first = int(rows[remaining].min())
        inside = remaining & (rows >= first) & (rows < first + block)
        count = int(rows[inside].max()) - first + 1
        yield first, count, inside
        remaining &= ~inside


# ------------------------------------------------------------------------------------------------
# Writing


_SAFETENSORS_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsWriter:
    """One safetensors file written tensor by tensor: `plan` fixes every tensor's name, dtype and
    shape (and so the header) before the first is written, and `write` must then be called for
    each in that order. The file object is any writable binary file (local or fsspec)."""

    def __init__(self, file: Any, plan: list[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        import torch

        self.file = file
        self.plan = plan
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format asks for 8-byte aligned data
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        expected = self.plan[self._next]
        got = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"safetensors file planned {expected} next, got {got}")
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))  # the tensor's own bytes, no copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            raise ValueError(f"{len(self.plan) - self._next} tensor(s) were not written")
