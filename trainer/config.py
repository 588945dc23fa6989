"""The typed schema of every config key, and the checks that need several keys at once.

This is the one module that knows config key names. Hydra composes `configs/train.yaml` on top
of `RunConfig` (registered in the ConfigStore as `train_schema`), so a misspelt key or a wrong type
fails at compose time; `validate()` then turns the composed DictConfig into a `RunConfig` and runs
the semantic checks, raising `ConfigError` with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

DEVICE_TYPES = ("cpu", "cuda", "neuron")
BACKENDS = {"cpu": ("gloo",), "cuda": ("nccl", "gloo"), "neuron": ("neuron", "xla")}
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
CLUSTER_KINDS = ("local", "slurm", "eks")
TRACKING_BACKENDS = ("mlflow", "none")


class ConfigError(ValueError):
    """A config value that is wrong in context: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


@dataclass
class HardwareConfig:
    """One entry of the hardware catalog (`configs/hardware/*.yaml`). Figures are per chip."""

    name: str = MISSING
    description: str = ""
    device_type: str = MISSING  # cpu | cuda | neuron
    backend: str = MISSING  # process-group backend: gloo | nccl | neuron
    instance_type: str = MISSING
    chips_per_node: int = MISSING
    ranks_per_chip: int = 1  # logical NeuronCores per chip on Trainium, 1 for a GPU
    nodes_per_domain: int = 1  # nodes in one high-bandwidth domain (UltraServer, NVLink domain)
    memory_gib_per_chip: float = MISSING
    memory_bw_gbs: float = MISSING  # GB/s
    peak_tflops_bf16: float = MISSING  # dense
    peak_tflops_fp8: Optional[float] = None  # dense; null where not published
    intra_node_bw_gbs: float = MISSING  # GB/s per chip, one direction, to chips of its node
    intra_domain_bw_gbs: float = MISSING  # GB/s per chip, one direction, to its domain's nodes
    efa_bw_gbps: float = 0.0  # Gbit/s per node over EFA, the inter-domain link
    efa_interfaces: int = 0
    launch_env: dict[str, str] = field(default_factory=dict)
    k8s_resources: dict[str, int] = field(default_factory=dict)  # per node


@dataclass
class ModelConfig:
    """The reference decoder's shape (presets in `configs/model/`), or a user's LightningModule.

    `_target_` names the LightningModule class. The default builds the reference decoder from the
    shape keys; any other class is instantiated with `kwargs` and nothing else.
    """

    _target_: str = "trainer.module.LanguageModel"
    name: str = "tiny"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 256
    ffn_dim: int = 768
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "stdlib"
    # fsspec URL of a directory of token shards (see `python -m trainer.data prepare`);
    # null means the built-in corpus, prepared from Python's standard library on first use.
    path: Optional[str] = None
    seq_len: int = 256
    micro_batch_size: int = 8
    # null: micro_batch_size x data-parallel size (no gradient accumulation)
    global_batch_size: Optional[int] = None
    num_workers: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelismConfig:
    """Mesh dims; -1 fills one dim from the world size. `name: auto` asks the planner."""

    name: str = "ddp"
    dp_replicate: int = -1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    # dtype FSDP2 all-gathers parameters and reduces gradients in (null: the parameter dtype)
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio at max_steps
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off


@dataclass
class CheckpointConfig:
    name: str = "local"
    # fsspec URL or path; a relative path is under the run's output directory
    dir: str = "checkpoints"
    every_n_steps: int = 100
    keep_last: int = 2  # the newest N committed checkpoints stay
    keep_every: int = 0  # and so does every checkpoint whose step is a multiple of this (0: none)
    # stage to host memory and write from a thread while training goes on (one save in flight)
    async_save: bool = True
    io_threads: int = 4  # parallel writers per rank
    # null: start fresh; "last": the newest sound committed checkpoint under `dir`; or a URL
    resume: Optional[str] = None
    # fsspec options of `dir`: endpoint_url, key, secret, client_kwargs... (set without a `+`)
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    name: str = "mlflow"
    backend: str = "mlflow"  # mlflow | none
    # null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    uri: Optional[str] = None
    experiment: str = "ultramesh"
    run_name: Optional[str] = None
    log_every_n_steps: int = 1
    system_metrics: bool = False
    # an unreachable server at start: a warning and training goes on, unless this is true
    fail_on_unreachable: bool = False


@dataclass
class ClusterConfig:
    name: str = "local"
    kind: str = "local"  # local | slurm | eks
    nodes: int = 1
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    # ranks per node; null: the hardware's (chips_per_node x ranks_per_chip), 1 on cpu
    devices: Optional[int] = None
    precision: str = "32-true"
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class PlanConfig:
    validate: bool = False
    output: Optional[str] = None  # write the chosen plan as JSON here
    mfu: float = 0.4  # assumed fraction of peak FLOP/s that compute reaches
    memory_headroom: float = 0.9  # plans may use this fraction of a rank's memory


@dataclass
class RunConfig:
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 1234

    @property
    def ranks_per_node(self) -> int:
        if self.trainer.devices is not None:
            return self.trainer.devices
        if self.hardware.device_type == "cpu":
            return 1
        return self.hardware.chips_per_node * self.hardware.ranks_per_chip

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.ranks_per_node

    @property
    def uses_reference_model(self) -> bool:
        return self.model._target_ == ModelConfig._target_


# Free-form option dicts: `group.storage_options.endpoint_url=...` adds a key without a `+`.
OPEN_DICTS = ("checkpoint.storage_options", "data.storage_options")


def register_schema() -> None:
    schema = OmegaConf.structured(RunConfig)
    for key in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(schema, key), False)
    ConfigStore.instance().store(name="train_schema", node=schema)


register_schema()


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m trainer <overrides>` would run, composed without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def load(overrides: Sequence[str] = ()) -> RunConfig:
    return validate(compose(overrides))


# What a bad command line or config file raises: the entry points print these as one line, exit 2.
CONFIG_ERRORS = (ConfigError, HydraException, OmegaConfBaseException)


def describe(exc: BaseException) -> str:
    """A config error as one line: Hydra's and OmegaConf's messages carry multi-line context
    (full_key, object_type) that repeats what the first lines say."""
    if isinstance(exc, ConfigError):
        return str(exc)
    noise = ("full_key:", "object_type=", "reference_type=", "Set the environment variable",
             "Config search path", "provider=")
    messages = [str(exc)]
    if exc.__cause__ is not None and str(exc.__cause__) not in messages[0]:
        messages.append(str(exc.__cause__))
    lines = [ln.strip() for msg in messages for ln in msg.splitlines() if ln.strip()]
    text = " ".join(ln for ln in lines if not ln.startswith(noise)) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def locate(dotted: str) -> Any:
    """The object a `_target_` names, e.g. `pkg.module.Class`."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ImportError(f"{dotted!r} is not a dotted path")
    return getattr(importlib.import_module(module_name), attr)


def validate(cfg: DictConfig) -> RunConfig:
    """The composed config as a typed `RunConfig`, after every check that needs several keys."""
    _reject_undeclared_keys(cfg, RunConfig)
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    for check in (_check_hardware, _check_model, _check_data, _check_parallelism, _check_optim,
                  _check_trainer, _check_checkpoint, _check_tracking, _check_cluster):
        check(run)
    return run


def _reject_undeclared_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema does not declare. Hydra's `+key=value` adds a key even to a typed
    node, and to_object() would carry it along silently."""
    hints = typing.get_type_hints(schema)
    declared = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        if key not in declared:
            raise ConfigError(f"{prefix}{key}", OmegaConf.select(node, str(key)),
                              f"not a key of {prefix.rstrip('.') or 'the root config'}; allowed: "
                              f"{', '.join(sorted(declared))}")
        if dataclasses.is_dataclass(hints.get(str(key))):
            _reject_undeclared_keys(node[key], hints[str(key)], f"{prefix}{key}.")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, value, "must be positive")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {', '.join(map(str, allowed))}")


def _check_hardware(run: RunConfig) -> None:
    hw = run.hardware
    _one_of("hardware.device_type", hw.device_type, DEVICE_TYPES)
    _one_of("hardware.backend", hw.backend, BACKENDS[hw.device_type])
    for key in ("chips_per_node", "ranks_per_chip", "nodes_per_domain", "memory_gib_per_chip",
                "peak_tflops_bf16"):
        _positive(f"hardware.{key}", getattr(hw, key))


def _check_model(run: RunConfig) -> None:
    if not run.uses_reference_model:
        _check_user_module(run.model._target_)
        return
    m = run.model
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    if m.dim % m.n_heads:
        raise ConfigError("model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.dim", m.dim,
                          "dim / n_heads must be even (rotary embeddings rotate pairs)")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError("model.n_kv_heads", m.n_kv_heads,
                          f"must divide model.n_heads={m.n_heads}")


def _check_user_module(target: str) -> None:
    import pytorch_lightning as pl

    try:
        cls = locate(target)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("model._target_", target, f"cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ConfigError("model._target_", target, "must name a LightningModule subclass")


def _check_data(run: RunConfig) -> None:
    d = run.data
    _positive("data.seq_len", d.seq_len)
    _positive("data.micro_batch_size", d.micro_batch_size)
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", d.num_workers, "must be 0 or more")
    if run.uses_reference_model and d.seq_len > run.model.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len,
                          f"must be at most model.max_seq_len={run.model.max_seq_len}")


MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # outermost to innermost


def mesh_dims(run: RunConfig) -> dict[str, int]:
    """The explicit `parallelism.*` dims with the one -1 filled from the world size."""
    p = run.parallelism
    dims = {name: getattr(p, name) for name in MESH_DIMS}
    for name, size in dims.items():
        if size == 0 or size < -1:
            raise ConfigError(f"parallelism.{name}", size, "must be a positive size, or -1 to fill")
    filled = [name for name, size in dims.items() if size == -1]
    if len(filled) > 1:
        raise ConfigError(f"parallelism.{filled[1]}", -1,
                          f"only one dim may be -1 (parallelism.{filled[0]} already is)")
    fixed = math.prod(size for size in dims.values() if size > 0)
    world = run.world_size
    if filled:
        if world % fixed:
            raise ConfigError(f"parallelism.{filled[0]}", -1,
                              f"the other dims multiply to {fixed}, which does not divide the "
                              f"world size {world} (cluster.nodes x trainer.devices)")
        dims[filled[0]] = world // fixed
    elif fixed != world:
        raise ConfigError("parallelism", "x".join(str(v) for v in dims.values()),
                          f"dp_replicate x dp_shard x cp x tp = {fixed} must equal the world "
                          f"size {world} (cluster.nodes x trainer.devices)")
    return dims


def dp_size(run: RunConfig) -> int:
    """Data-parallel size (dp_replicate x dp_shard) of an explicit mesh."""
    dims = mesh_dims(run)
    return dims["dp_replicate"] * dims["dp_shard"]


def _check_parallelism(run: RunConfig) -> None:
    p = run.parallelism
    if p.name == "auto":
        return
    mesh_dims(run)
    if p.cp != 1:
        raise ConfigError("parallelism.cp", p.cp, "context parallel is not implemented yet; use 1")
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(p, key)
        if value is not None:
            _one_of(f"parallelism.{key}", value, ("float32", "bfloat16"))


def _check_optim(run: RunConfig) -> None:
    o = run.optim
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "must be between 0 and 1")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, "must be 0 or more")
    if o.warmup_steps >= run.trainer.max_steps:
        raise ConfigError("optim.warmup_steps", o.warmup_steps,
                          f"must be less than trainer.max_steps={run.trainer.max_steps}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    if o.weight_decay < 0 or o.grad_clip < 0:
        key = "optim.weight_decay" if o.weight_decay < 0 else "optim.grad_clip"
        raise ConfigError(key, getattr(o, key.split(".")[1]), "must be 0 or more")


def _check_trainer(run: RunConfig) -> None:
    t = run.trainer
    _positive("trainer.max_steps", t.max_steps)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    if t.devices is not None:
        _positive("trainer.devices", t.devices)
        hw = run.hardware
        per_node = hw.chips_per_node * hw.ranks_per_chip
        if hw.device_type != "cpu" and t.devices > per_node:
            raise ConfigError("trainer.devices", t.devices,
                              f"{hw.name} has {per_node} ranks per node")
    if run.hardware.device_type == "cpu" and t.precision == "16-mixed":
        raise ConfigError("trainer.precision", t.precision,
                          "fp16 needs an accelerator; on cpu use 32-true or bf16-mixed")
    d = run.data
    if d.global_batch_size is not None and run.parallelism.name != "auto":
        per_step = d.micro_batch_size * dp_size(run)
        if d.global_batch_size % per_step:
            raise ConfigError("data.global_batch_size", d.global_batch_size,
                              f"must be a multiple of data.micro_batch_size x data-parallel size "
                              f"= {d.micro_batch_size} x {dp_size(run)} = {per_step}")


def _check_checkpoint(run: RunConfig) -> None:
    c = run.checkpoint
    if c.every_n_steps < 0:
        raise ConfigError("checkpoint.every_n_steps", c.every_n_steps, "must be 0 (off) or more")
    _positive("checkpoint.keep_last", c.keep_last)
    if c.keep_every < 0:
        raise ConfigError("checkpoint.keep_every", c.keep_every, "must be 0 (off) or more")
    _positive("checkpoint.io_threads", c.io_threads)
    if c.name == "s3" and not c.dir.startswith("s3://"):
        raise ConfigError("checkpoint.dir", c.dir, "checkpoint=s3 needs an S3 URL: "
                          "checkpoint.dir=s3://bucket/prefix")


def _check_tracking(run: RunConfig) -> None:
    t = run.tracking
    _one_of("tracking.backend", t.backend, TRACKING_BACKENDS)
    _positive("tracking.log_every_n_steps", t.log_every_n_steps)


def _check_cluster(run: RunConfig) -> None:
    c = run.cluster
    _one_of("cluster.kind", c.kind, CLUSTER_KINDS)
    _positive("cluster.nodes", c.nodes)
