"""What must hold before a validated run starts, beyond the config itself: a mesh that works,
a node count this entry point can start, devices this machine can drive, every URL it names
reachable, a dataset that exists and fits the model. Cheap to import (no Lightning), so a refused
run costs little time."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import fsspec
import torch

from trainer.config import KEY, ConfigError, RunConfig, eval_fraction
from trainer.data.sources import Source, eval_source, indexes, training_sources
from trainer.data.tokenizer import BYTES_DIGEST, HF_FILE, hf_vocabulary, vocabulary_digest
from trainer.plan import ParallelDims, choose
from trainer.urls import check_url
from trainer.xla import XLA_INSTALL_HINT

# checkpoint.resume values that name no URL (trainer/checkpoint/resume.py)
_NOT_URLS = (None, "", "none", "last", "fresh")


def check_startable(run: RunConfig) -> ParallelDims:
    """Everything that can refuse a validated run before any process, directory or MLflow run
    exists: the mesh, the node count, this machine's devices, the dataset's index. Returns the
    mesh's dims. `python -m trainer` calls it for every job of its command line before Hydra starts;
    `fit` calls it again for callers that come in without that preflight."""
    dims = choose(run).dims
    in_cluster = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ
    check_launchable(run, in_cluster=in_cluster)
    check_drivable(run, **_devices_here(run))
    check_xla(run, xla_missing=_xla_missing(run), in_cluster=in_cluster)
    check_reachable(run, rank=global_rank(run))
    found = indexes(run.data)
    check_datasets(run, indexes=found)
    check_pretrained_weights(run)
    check_pretrained_tokenizer(run, vocabulary=_pretrained_vocabulary(run), indexes=found)
    return dims


def global_rank(run: RunConfig) -> int:
    """This process's rank before any process group exists: torchrun and SLURM export it;
    Lightning's own launcher exports only the local rank to the processes it starts."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", "0"))
    return node * run.ranks_per_node + int(os.environ.get("LOCAL_RANK", "0"))


_reached: set[str] = set()  # URL checks this process passed: a sweep's jobs share most URLs


def check_reachable(run: RunConfig, *, rank: int) -> None:
    """Every URL the run names answers (`trainer.urls.check_url`): the datasets', the pretrained
    weights', the checkpoint directory (a probe object written and deleted; a relative one lives
    under the run directory, which `fit` checks once it exists), the resume URL (a committed
    checkpoint); on rank 0, which alone talks to it, the tracking URI."""
    d, m, c = run.data, run.model, run.checkpoint
    checks: list[tuple[Any, ...]] = []
    for source in [*training_sources(d), *filter(None, [eval_source(d)])]:
        if source.url:
            checks.append((source.key, source.url, d.storage_options, False,
                           KEY.data.storage_options))
    if m.init_from:
        checks.append((KEY.model.init_from, m.init_from, m.storage_options, False,
                       KEY.model.storage_options))
    if "://" in c.dir or Path(c.dir).is_absolute():
        checks.append((KEY.checkpoint.dir, c.dir, c.storage_options, True,
                       KEY.checkpoint.storage_options))
    for key, url, options, writable, options_key in checks:
        done = json.dumps([key, url, options, writable], sort_keys=True, default=str)
        if done not in _reached:
            check_url(key, url, options, writable=writable, options_key=str(options_key))
            _reached.add(done)
    if c.resume not in _NOT_URLS:  # reached, and committed (rank 0 verifies it in `fit`)
        from trainer.checkpoint.resume import decide

        decide(c.resume, c.dir, c.storage_options, verify=False)
    if run.tracking.backend == "mlflow" and rank == 0:
        from trainer.tracking.store import check_uri, resolve_uri

        check_uri(resolve_uri(run.tracking.uri), reachable=run.tracking.fail_on_unreachable)


def _devices_here(run: RunConfig) -> dict[str, Any]:
    """The facts `check_drivable` judges: visible GPUs, and why TorchNeuron is missing."""
    neuron_missing = None
    if run.hardware.device_type == "neuron" and run.hardware.backend == "neuron":
        from trainer.mesh import import_torch_neuronx

        try:
            import_torch_neuronx()
        except ImportError as exc:
            neuron_missing = str(exc)
    cuda = torch.cuda.device_count() if run.hardware.device_type == "cuda" else 0
    return {"cuda_devices": cuda, "neuron_missing": neuron_missing}


# The checks take the facts as arguments (gathered above), so each is tested without the
# machine it describes.


def check_launchable(run: RunConfig, *, in_cluster: bool) -> None:
    """What `python -m trainer` itself can start: one node (more go through `launch`)."""
    if run.cluster.nodes > 1 and not in_cluster:
        raise ConfigError(KEY.cluster.nodes, run.cluster.nodes,
                          "a run of several nodes starts through `python -m launch` (SLURM, EKS) "
                          "or torchrun on each node; `python -m trainer` alone runs one node")


def check_drivable(run: RunConfig, *, cuda_devices: int, neuron_missing: str | None) -> None:
    """Whether this machine can drive `run.hardware`: `cuda_devices` GPUs are visible and
    `neuron_missing` says why TorchNeuron cannot be imported (None: it can). Planning needs none
    of this (`python -m trainer.plan` plans a GPU cluster from a laptop); training does."""
    hw = run.hardware
    plan_hint = f"plan it here with `python -m trainer.plan hardware={hw.name}`"
    if hw.device_type == "neuron" and neuron_missing:
        raise ConfigError(KEY.hardware, hw.name, neuron_missing)
    if hw.device_type == "cuda" and cuda_devices == 0:
        raise ConfigError(KEY.hardware, hw.name,
                          "needs CUDA GPUs and torch sees none on this machine; run it on a GPU "
                          f"node (`python -m launch`), or {plan_hint}")
    if hw.device_type == "cuda" and cuda_devices < run.ranks_per_node:
        raise ConfigError(KEY.trainer.devices, run.ranks_per_node,
                          f"this machine has {cuda_devices} CUDA GPU(s); set trainer.devices to "
                          f"at most {cuda_devices}")


def check_pretrained_weights(run: RunConfig) -> None:
    """`model.init_from`'s config and tensors must fit the model (read: config.json and the
    safetensors headers, no weights)."""
    if run.model.init_from and run.uses_family_model:
        from trainer.models.hf import check_pretrained
        from trainer.models.registry import family_of, shape_of

        check_pretrained(family_of(run.model), shape_of(run.model), run.model.init_from,
                         run.model.storage_options)


def _xla_missing(run: RunConfig) -> str | None:
    """Why the XLA path cannot start here (its package is missing), or None. Found without
    importing it: PJRT reads its environment when torch_xla starts, which the strategy sets."""
    if not run.uses_xla:
        return None
    if importlib.util.find_spec("torch_xla") is None:
        return XLA_INSTALL_HINT.format(torch=torch.__version__)
    if run.hardware.device_type == "neuron" and importlib.util.find_spec("torch_neuronx") is None:
        return ("torch-neuronx is not installed: PJRT's NEURON device comes with it, from AWS's "
                "package index (Neuron SDK <= 2.29; docs/hardware/trainium-xla.md)")
    return None


def check_xla(run: RunConfig, *, xla_missing: str | None, in_cluster: bool) -> None:
    """What the XLA path needs beyond its plan (`trainer.plan.xla`): torch_xla, a PJRT device
    it has, and for several ranks torchrun (PJRT takes each process's device from torchrun's
    variables) and a device whose collectives cross processes."""
    if not run.uses_xla:
        return
    hw, where = run.hardware, f"strategy={run.strategy.name} on hardware={run.hardware.name}"
    if hw.device_type == "cuda":
        raise ConfigError(KEY.strategy.name, run.strategy.name,
                          f"{where}: XLA on NVIDIA GPUs needs torch-xla's CUDA plugin, which "
                          "ultramesh does not drive; CUDA trains through the device mesh "
                          "(strategy=auto)")
    if xla_missing:
        raise ConfigError(KEY.strategy.name, run.strategy.name, f"{where}: {xla_missing}")
    if run.world_size > 1 and hw.device_type == "cpu":
        raise ConfigError(KEY.trainer.devices, run.ranks_per_node,
                          f"{where}: XLA's CPU device trains one process only: torch-xla 2.9 "
                          "builds its CPU client without a distributed runtime, so each process "
                          "is a world of its own and an all-reduce returns the local value "
                          "(docs/hardware/trainium-xla.md); use trainer.devices=1, or "
                          "strategy=auto for several CPU ranks")
    if run.world_size > 1 and not in_cluster:
        raise ConfigError(KEY.cluster.kind, run.cluster.kind,
                          f"{where}: several XLA ranks start through torchrun, which sets each "
                          "process's device; use `python -m launch` (cluster=local runs torchrun)")


def check_datasets(run: RunConfig, *, indexes: dict[Source, dict]) -> None:
    """What the indexes of the run's datasets (training sources first, then the held-out one)
    must say: every token id has an embedding; one tokenizer made them all; a held-out fraction
    has document ends to cut at."""
    for source, index in indexes.items():
        vocab = index["vocab_size"]
        if run.uses_family_model and vocab > run.model.vocab_size:
            raise ConfigError(KEY.model.vocab_size, run.model.vocab_size,
                              f"the dataset {source.url or source.name} ({source.key}, "
                              f"tokenizer {index['tokenizer']['name']}) has token ids up to "
                              f"{vocab - 1}; use a vocabulary of at least {vocab}")
    (first, first_index), *others = indexes.items()
    for source, index in others:
        if _tokenizer_identity(index) != _tokenizer_identity(first_index):
            raise ConfigError(source.key, source.url,
                              f"tokenized with {_tokenizer_words(index)}, but {first.key} "
                              f"with {_tokenizer_words(first_index)}; the datasets of a run "
                              "must share one tokenizer")
    if run.data.document_mask:
        for source, index in indexes.items():
            if index["separator"] is None:
                raise ConfigError(KEY.data.document_mask, True,
                                  f"{source.url} ({source.key}) has no end-of-document token to "
                                  "find documents by; prepare it with --separator, or use null")
    if eval_fraction(run.data) is not None:
        for source, index in indexes.items():
            if index["separator"] is None:
                raise ConfigError(KEY.data.eval, run.data.eval,
                                  f"{source.url} ({source.key}) has no end-of-document token to "
                                  "hold documents out by; give a held-out dataset URL")


def _tokenizer_identity(index: dict) -> tuple:
    tokenizer = index["tokenizer"]
    return tokenizer["kind"], tokenizer["sha256"], tokenizer["eod_id"]


def _tokenizer_words(index: dict) -> str:
    tokenizer = index["tokenizer"]
    digest = f", sha256 {tokenizer['sha256'][:12]}" if tokenizer["sha256"] else ""
    return f"{tokenizer['name']} (end of document {tokenizer['eod_id']}{digest})"


def _pretrained_vocabulary(run: RunConfig) -> tuple[str, int] | None:
    """(digest, size) of the vocabulary in `model.init_from`'s tokenizer.json; None without
    init_from or without a tokenizer.json there (then there is nothing to compare)."""
    if not run.model.init_from:
        return None
    url = f"{run.model.init_from.rstrip('/')}/{HF_FILE}"
    try:
        with fsspec.open(url, "rb", **run.model.storage_options) as file:
            source = file.read()
    except FileNotFoundError:
        return None
    vocabulary = hf_vocabulary(source, url)
    return vocabulary_digest(vocabulary), len(vocabulary)


def check_pretrained_tokenizer(run: RunConfig, *, vocabulary: tuple[str, int] | None,
                               indexes: dict[Source, dict]) -> None:
    """A model initialised from `model.init_from` must train on data its own tokenizer made:
    `vocabulary` is (digest, size) of the tokenizer.json there, compared with the vocabulary each
    dataset was prepared with (by content, so a Llama 3 .tiktoken file matches its
    tokenizer.json). Datasets of bare ids say nothing of their tokenizer and are let through."""
    if vocabulary is None:
        return
    digest, size = vocabulary
    for source, index in indexes.items():
        tokenizer = index["tokenizer"]
        theirs = tokenizer.get("vocab_sha256") or (
            BYTES_DIGEST if tokenizer["kind"] == "bytes" else None)
        if theirs is not None and theirs != digest:
            raise ConfigError(KEY.model.init_from, run.model.init_from,
                              f"its tokenizer.json ({size} tokens) is not the tokenizer "
                              f"{source.url or source.name} ({source.key}) was prepared with "
                              f"({tokenizer['name']}, {tokenizer['vocab_size']} tokens); prepare "
                              f"the data with --tokenizer hf:{run.model.init_from}")
