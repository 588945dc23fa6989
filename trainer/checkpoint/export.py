"""Export a committed checkpoint in Hugging Face's layout: sharded safetensors with
`model.safetensors.index.json` (one `model.safetensors` when it fits in one shard) and
`config.json`, the hand-off to transformers and serving stacks (vLLM, TGI, Neuron's serving).

Streamed: tensor by tensor from the DCP checkpoint into each output file, whose header is written
first from the checkpoint's metadata. The process holds about three copies of the largest tensor
(DCP's read buffer, the consolidated tensor, its permuted copy) whatever the model's size; a 405B
checkpoint exports on an ordinary host. The model's family (in the manifest) names the tensors.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

import trainer.checkpoint.manifest as mf
from trainer.checkpoint.io import MODEL_KEY, SafeLoadPlanner
from trainer.checkpoint.storage import filesystem, is_local, join
from trainer.models.hf import CONFIG, INDEX, SINGLE, SafetensorsWriter, WeightMap
from trainer.models.registry import family

PREFIX = "model."  # the LightningModule holds the family's model as `self.model`
# transformers' save_pretrained default (max_shard_size="5GB"), as bytes.
MAX_SHARD_BYTES = 5 * 10**9


class ExportError(ValueError):
    pass


class _Reader(FsspecReader):
    """DCP's fsspec reader, reading the checkpoint's metadata once for every tensor loaded."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def export(directory: str, step: int | None, out: str, storage_options: dict | None = None, *,
           max_shard_bytes: int = MAX_SHARD_BYTES, dtype: str | None = None) -> str:
    """Write checkpoint `step` under `directory` (None: the newest committed one) to `out` (a
    path or fsspec URL) in Hugging Face's layout, in `dtype` (None: as stored); the URL of the
    checkpoint exported."""
    url = _committed(directory, step, storage_options)
    manifest = mf.read_manifest(url, storage_options)
    if manifest is None or manifest.model is None:
        raise ExportError(f"{url} holds a user's model; export knows the model families only")
    shape_keys = dict(manifest.model)
    fam = family(shape_keys.pop("family", "llama"))
    shape = fam.shape(**{k: shape_keys[k] for k in fam.shape_keys()})
    adapter = fam.hf()
    reader = _Reader(url, **(storage_options or {}))
    stored = {key: md for key, md in reader.read_metadata().state_dict_metadata.items()
              if isinstance(md, TensorStorageMetadata)}
    maps = adapter.weights(shape)
    missing = [m.ours for m in maps if _key(m) not in stored]
    if missing:
        raise ExportError(f"{url} lacks {len(missing)} tensor(s) of the {fam.name} model "
                          f"(first: {missing[0]})")
    out_dtype = dtype or str(stored[_key(maps[0])].properties.dtype).removeprefix("torch.")
    config = adapter.config(shape, out_dtype)  # refuses what the layout cannot express: first
    shards = _shards(maps, stored, out_dtype, max_shard_bytes)
    fs, root = filesystem(out, storage_options if not is_local(out) else None)
    if is_local(out):
        fs.makedirs(root, exist_ok=True)
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    stack: tuple[str, torch.Tensor] | None = None  # the expert stack being written, loaded once
    for name, shard in zip(names, shards, strict=True):
        plan = [(m.hf, out_dtype, _hf_size(m, stored)) for m in shard]
        with fs.open(posixpath.join(root, name), "wb") as f:
            writer = SafetensorsWriter(f, plan)
            for m in shard:
                if m.stacked is None:
                    tensor = _load_one(reader, _key(m), stored[_key(m)])
                else:  # one matrix of a stack (an MoE layer's experts)
                    if stack is None or stack[0] != _key(m):
                        stack = None  # the previous stack goes before the next one loads
                        stack = (_key(m), _load_one(reader, _key(m), stored[_key(m)]))
                    tensor = stack[1][m.stacked]
                if m.order is not None:
                    tensor = tensor[m.order()]
                writer.write(m.hf, tensor.to(getattr(torch, out_dtype)))
                total += tensor.numel() * torch.empty((), dtype=getattr(torch, out_dtype)
                                                      ).element_size()
                del tensor
            writer.close()
        weight_map.update(dict.fromkeys((m.hf for m in shard), name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        fs.pipe_file(posixpath.join(root, INDEX), json.dumps(index, indent=2).encode())
    fs.pipe_file(posixpath.join(root, CONFIG), json.dumps(config, indent=2).encode())
    return url


def _committed(directory: str, step: int | None, storage_options: dict | None) -> str:
    """The URL of committed checkpoint `step` (None: the newest), its checksums verified."""
    if step is None:
        newest = mf.newest_committed(directory, storage_options)
        if newest is None:
            raise ExportError(f"{directory} holds no committed checkpoint")
        step = newest.step
    url = join(directory, mf.step_name(step))
    manifest = mf.read_manifest(url, storage_options)
    if manifest is None:
        raise ExportError(f"{url} is not a committed checkpoint (no {mf.MANIFEST})")
    problems = mf.verify(url, manifest, storage_options)
    if problems:
        raise ExportError(f"{url} is damaged: {'; '.join(problems)}")
    return url


def _key(mapping: WeightMap) -> str:
    return f"{MODEL_KEY}.{PREFIX}{mapping.ours}"


def _hf_size(m: WeightMap, stored: dict[str, TensorStorageMetadata]) -> tuple[int, ...]:
    """The shape of `m`'s Hugging Face tensor: ours, or one matrix of our stack."""
    size = tuple(stored[_key(m)].size)
    return size[1:] if m.stacked is not None else size


def _shards(maps: list[WeightMap], stored: dict[str, TensorStorageMetadata], dtype: str,
            limit: int) -> list[list[WeightMap]]:
    """The tensors in order, cut into files of at most `limit` bytes (a larger tensor alone)."""
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    shards: list[list[WeightMap]] = [[]]
    size = 0
    for m in maps:
        nbytes = math.prod(_hf_size(m, stored)) * width
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    return shards


def _load_one(reader: _Reader, key: str, md: TensorStorageMetadata) -> torch.Tensor:
    """One whole tensor of the checkpoint, however many ranks' shards it was saved in."""
    tensor = torch.empty(md.size, dtype=md.properties.dtype)
    prefix, _, name = key.partition(".")
    state = {prefix: {name: tensor}}
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return state[prefix][name]
