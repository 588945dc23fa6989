"""`CheckpointIO`: every strategy's checkpoints, saved and loaded through
torch.distributed.checkpoint (DCP) over fsspec with one set of `storage_options`.

Strategies (`trainer.checkpoint.strategies`, `trainer.mesh.MeshStrategy`) are built with one and
hand it the module and optimizers to save or load; the periodic saver hands it the trainer's
state. Retention runs here, on rank 0 right after each commit.

A checkpoint is a directory `step-NNNNNNNN.ckpt` holding
- DCP's files: `state_dict` (the model) and `optimizer_<i>`, keyed by parameter name (FQN), each
  rank writing its own shards; the same layout whether one process, DDP or an N-D mesh wrote it,
  so any of them loads it, on any mesh and any device;
- `meta.pt`: the rest of the trainer's state (loop counters and the data sampler's position, LR
  schedulers, callback state such as the MLflow run id), written by rank 0;
- `rng-rank<r>.pt`: each rank's RNG states;
- `manifest.json`, written last: the commit (see manifest.py).

Nothing is unpickled beyond DCP's own `.metadata`: the small files and DCP's non-tensor entries are
read with `torch.load(weights_only=True)`.

An async save stages a copy of the state in host memory, returns, and writes from a thread; at most
one save is in flight (the next waits for it). Its collectives run on a process group of their own
(gloo), so they never interleave with training's.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import trainer.checkpoint.manifest as mf
from trainer.checkpoint.retention import Retention
from trainer.checkpoint.storage import HashingWriter, filesystem, join, one_line

log = logging.getLogger(__name__)
# One process (no process group) saving or loading alone is intended, not a mistake to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized")

META_FILE = "meta.pt"  # the name Lightning's own sharded checkpoints use
MODEL_KEY = "state_dict"
TENSOR_KEYS = ("state_dict", "optimizer_states")
# Keys `load` adds to the trainer state it returns, for callbacks' on_load_checkpoint.
RNG_KEY = "ultramesh/rng"  # this rank's RNG states, when the checkpoint's world size is this one's
RESUMED_FROM_KEY = "ultramesh/resumed_from"  # the URL loaded


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading non-tensor entries (optimizer hyper-parameters) without unpickling
    arbitrary objects."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@dataclass
class SaveResult:
    step: int
    url: str
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0  # from the call to the commit
    blocked_seconds: float = 0.0  # what training waited for
    nbytes: int = 0


class PendingSave:
    """A save that may still be writing in its thread."""

    def __init__(self, result: SaveResult, thread: threading.Thread | None):
        self.result = result
        self._thread = thread

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> SaveResult:
        if self._thread is not None:
            self._thread.join()
        return self.result


class CheckpointIO:
    """DCP over fsspec for every strategy: saves a module and its optimizers (DCP reshards them
    into whatever mesh loads them) with the trainer's other state.

    storage_options: fsspec options for every URL (endpoint, credentials).
    mesh, config_hash, model: recorded in each manifest (the model's family and shape let
        `export` work without the config).
    fallback: resume=last; a damaged newest checkpoint falls back to the one before.
    retention: what to keep after each commit (None: everything).
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, io_threads: int = 4,
                 mesh: dict[str, int] | None = None, config_hash: str = "",
                 model: dict[str, Any] | None = None, fallback: bool = False,
                 retention: Retention | None = None):
        self.storage_options = dict(storage_options or {})
        self.io_threads = io_threads
        self.mesh = dict(mesh or {})
        self.config_hash = config_hash
        self.model = model
        self.fallback = fallback
        self.retention = retention
        self._resumed_from: str | None = None  # retention never removes it
        self._group: Any = None
        self._inflight: PendingSave | None = None
        self._staged: Any = None  # the last async save's host copy, reused by the next

    # -------------------------------------------------------------------------------------------
    # Saving

    @property
    def rank(self) -> int:
        return dist.get_rank() if _distributed() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if _distributed() else 1

    def in_flight(self) -> PendingSave | None:
        return self._inflight

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight, if any; its result."""
        pending, self._inflight = self._inflight, None
        return pending.wait() if pending is not None else None

    def save(self, module: torch.nn.Module, optimizers: list[Any], trainer_state: dict[str, Any],
             url: str, step: int, *, blocking: bool) -> PendingSave:
        """Save `module` and `optimizers` (Lightning's wrappers or plain ones), `trainer_state`
        (rank 0's is kept) and this rank's RNG to `url`; every rank calls this. With
        blocking=False the state is copied to host memory and written from a thread. Any save in
        flight is waited for first."""
        start = time.perf_counter()
        previous = self.wait()
        if previous is not None:
            log.debug("checkpoint step %d waited for step %d", step, previous.step)
        group = self.group()
        optimizers = [getattr(o, "_optimizer", o) for o in optimizers]
        tensors: dict[str, Any] = {MODEL_KEY: get_model_state_dict(module)}
        for index, optimizer in enumerate(optimizers):
            tensors[f"optimizer_{index}"] = get_optimizer_state_dict(module, optimizer)
        extras = {rng_file(self.rank): _serialize(capture_rng())}
        if self.rank == 0:
            extras[META_FILE] = _serialize(trainer_state)
        result = SaveResult(step, url)
        if blocking:
            self._write(tensors, extras, group, result, start)
            result.blocked_seconds = time.perf_counter() - start
            return PendingSave(result, None)
        # the previous save is finished (waited for above): its buffers are free to reuse
        tensors = self._staged = stage(tensors, self._staged)
        result.blocked_seconds = time.perf_counter() - start
        thread = threading.Thread(target=self._write, args=(tensors, extras, group, result, start),
                                  name=f"checkpoint-step-{step}", daemon=True)
        thread.start()
        self._inflight = PendingSave(result, thread)
        return self._inflight

    def _write(self, tensors: dict[str, Any], extras: dict[str, bytes], group: Any,
               result: SaveResult, start: float) -> None:
        """Every rank: write, agree on the outcome, and rank 0 commits. Each step that can fail
        on one rank is followed by a collective, so no rank is left waiting in one alone."""
        writer = HashingWriter(result.url, self.storage_options, self.io_threads)
        errors = []
        try:
            if self.rank == 0:  # rewriting a step un-commits it first
                mf.remove_manifest(result.url, self.storage_options)
        except Exception as exc:
            errors.append(one_line(exc))
        try:
            dcp.save(tensors, storage_writer=writer, process_group=group,
                     no_dist=not _distributed())
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            errors.append(one_line(exc))
        try:
            for name, data in extras.items():
                writer.write_file(name, data)
        except Exception as exc:
            errors.append(one_line(exc))
        gathered = _all_gather((errors, writer.files()), group, self.world_size)
        outcome: list[Any] = [None]
        if self.rank == 0:
            outcome[0] = self._commit(result, gathered)
        if group is not None or _distributed():
            dist.broadcast_object_list(outcome, src=0, group=group)
        result.ok, result.error, result.nbytes = outcome[0]
        result.seconds = time.perf_counter() - start
        if result.ok and self.rank == 0 and self.retention is not None:
            protected = {u for u in (self._resumed_from, result.url) if u}
            try:
                self.retention.prune(self.storage_options, protected)
            except Exception as exc:
                log.warning("retention after checkpoint step %d: %s", result.step, one_line(exc))

    def _commit(self, result: SaveResult, gathered: list) -> tuple[bool, str | None, int]:
        errors = [f"rank {r}: {e}" for r, (errs, _) in enumerate(gathered) for e in errs]
        if errors:
            return False, "; ".join(dict.fromkeys(errors)), 0
        files = {name: {"bytes": n, "sha256": sha} for _, written in gathered
                 for name, (n, sha) in written.items()}
        manifest = mf.Manifest(step=result.step, world_size=self.world_size, mesh=self.mesh,
                               config_hash=self.config_hash, files=files, model=self.model)
        try:
            mf.write_manifest(result.url, manifest, self.storage_options)
        except Exception as exc:
            return False, f"manifest: {one_line(exc)}", 0
        return True, None, manifest.nbytes

    # -------------------------------------------------------------------------------------------
    # Loading

    def load(self, module: torch.nn.Module, optimizers: list[Any], url: str,
             strict: bool = True) -> dict[str, Any]:
        """Load `url` into `module` and `optimizers` (in place, resharded to their mesh); return
        the rest of the trainer's state as Lightning restores it, with this rank's RNG states
        (`RNG_KEY`, when the world size is the saved one) and the URL loaded
        (`RESUMED_FROM_KEY`) for callbacks. With `fallback` (resume=last), rank 0 checks
        checksums and falls back to an older checkpoint if needed; every rank then loads the one
        rank 0 chose."""
        group = self.group()
        chosen: list[Any] = [None]
        if self.rank == 0:
            try:
                chosen[0] = self._choose(url)
            except Exception as exc:  # every rank raises it, none is left waiting
                chosen[0] = f"{type(exc).__name__}: {exc}"
        if _distributed():
            dist.broadcast_object_list(chosen, src=0, group=group)
        if isinstance(chosen[0], str):
            raise RuntimeError(f"cannot resume from {url}: {chosen[0]}")
        if chosen[0] is None:
            log.warning("no sound checkpoint to resume from; starting fresh")
            return {"pytorch-lightning_version": pl.__version__, "optimizer_states": [],
                    "lr_schedulers": []}
        url, saved_world = chosen[0]
        optimizers = [getattr(o, "_optimizer", o) for o in optimizers]
        reader = FsspecReader(url, **self.storage_options)
        model_state = {MODEL_KEY: get_model_state_dict(module)}
        dcp.load(model_state, storage_reader=reader, planner=SafeLoadPlanner(),
                 process_group=group, no_dist=not _distributed())
        set_model_state_dict(module, model_state[MODEL_KEY],
                             options=StateDictOptions(strict=strict))
        for index, optimizer in enumerate(optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(state, storage_reader=FsspecReader(url, **self.storage_options),
                     planner=SafeLoadPlanner(), process_group=group, no_dist=not _distributed())
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key])
        fs, root = filesystem(url, self.storage_options)
        checkpoint = _deserialize(fs.cat_file(join(root, META_FILE)))
        checkpoint["optimizer_states"] = []  # loaded above; Lightning only checks the key
        if saved_world == self.world_size:  # another mesh draws other numbers anyway
            checkpoint[RNG_KEY] = _deserialize(fs.cat_file(join(root, rng_file(self.rank))))
        checkpoint[RESUMED_FROM_KEY] = self._resumed_from = url
        if self.rank == 0:
            log.info("resumed from %s (step %s)", url, checkpoint.get("global_step"))
        return checkpoint

    def _choose(self, url: str) -> tuple[str, int] | None:
        manifest = mf.read_manifest(url, self.storage_options)
        if manifest is None:
            raise FileNotFoundError(f"{url} has no {mf.MANIFEST}: not a committed checkpoint")
        problems = mf.verify(url, manifest, self.storage_options)
        if not problems:
            if self.config_hash and manifest.config_hash not in ("", self.config_hash):
                log.warning("checkpoint %s was written by another training config (hash %s, "
                            "this run %s): model, optimizer, data or seed differ", url,
                            manifest.config_hash, self.config_hash)
            return url, manifest.world_size
        message = f"checkpoint {url} is damaged: {'; '.join(problems)}"
        if not self.fallback:
            raise RuntimeError(message)
        log.error("%s; trying the one before", message)
        parent = url.rstrip("/").rsplit("/", 1)[0]
        found = mf.newest_sound(parent, self.storage_options, starting_at=manifest.step - 1)
        if found is None or found.manifest is None:
            return None
        return found.url, found.manifest.world_size

    # -------------------------------------------------------------------------------------------

    def group(self) -> Any:
        """A gloo process group of the checkpoint's own (made once, by every rank together)."""
        if not _distributed() or self.world_size == 1:
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather(obj: Any, group: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not _distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def stage(tree: Any, cache: Any = None) -> Any:
    """A copy of `tree` in host memory that training can no longer change: tensors copied (DTensors
    keep their layout), other values deep-copied (optimizer hyper-parameters change each step).
    Tensors go into the buffers of `cache` (the previous staging) where shapes match: writing
    into memory already touched is several times faster than into fresh pages."""
    if isinstance(tree, DTensor):
        old = cache.to_local() if isinstance(cache, DTensor) else None
        local = _copy_to_host(tree.to_local(), old)
        return DTensor.from_local(local, tree.device_mesh, tree.placements, run_check=False,
                                  shape=tree.shape, stride=tree.stride())
    if isinstance(tree, torch.Tensor):
        return _copy_to_host(tree, cache if isinstance(cache, torch.Tensor) else None)
    if isinstance(tree, dict):
        cached = cache if isinstance(cache, dict) else {}
        return {k: stage(v, cached.get(k)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        cached = cache if isinstance(cache, list | tuple) and len(cache) == len(tree) else None
        return type(tree)(stage(v, cached[i] if cached else None) for i, v in enumerate(tree))
    return copy.deepcopy(tree)


def _copy_to_host(tensor: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    tensor = tensor.detach()
    if (buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
            and buffer.device.type == "cpu" and buffer.stride() == tensor.stride()):
        return buffer.copy_(tensor)
    return tensor.to("cpu", copy=True)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in types `torch.load(weights_only=True)` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _deserialize(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)
