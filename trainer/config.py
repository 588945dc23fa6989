"""The typed schema of every config key, and the checks that need several keys at once.

This is the one module that knows config key names. Hydra composes `configs/train.yaml` on top
of `RunConfig` (registered in the ConfigStore as `train_schema`), so a misspelt key or a wrong type
fails at compose time; `validate()` then turns the composed DictConfig into a `RunConfig` and runs
the semantic checks, raising `ConfigError` with the key, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

DEVICE_TYPES = ("cpu", "cuda", "neuron")
BACKENDS = {"cpu": ("gloo",), "cuda": ("nccl", "gloo"), "neuron": ("neuron", "xla")}
# Lightning's precisions, then the low-precision formats (matmuls through torchao, the rest as
# bf16-mixed), then `auto`: the planner picks the fastest the hardware trains with.
LOW_PRECISION_FORMATS = ("fp8", "mxfp8")
PRECISION_AUTO = "auto"
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", *LOW_PRECISION_FORMATS,
              PRECISION_AUTO)
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values
CLUSTER_KINDS = ("local", "slurm", "eks")
EKS_JOB_KINDS = ("trainjob", "pytorchjob", "job")
TRACKING_BACKENDS = ("mlflow", "none")
# With optim.warmup_steps null the warmup is this fraction of trainer.max_steps, so a short run
# (trainer.max_steps=20) gets a short warmup instead of a refusal.
WARMUP_FRACTION = 0.1
EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """A config value that is wrong in context: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        key = str(key)
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


@dataclass
class HardwareConfig:
    """One entry of the hardware catalog (`configs/hardware/*.yaml`). Figures are per chip."""

    name: str = MISSING  # the catalog entry; part of the default MLflow run name
    description: str = ""  # one line for people: chips, memory, links
    device_type: str = MISSING  # the torch device the ranks use: cpu | cuda | neuron
    backend: str = MISSING  # process-group backend: gloo | nccl | neuron
    # the software stack runs expert parallel's all-to-all (false: MoE is planned without EP)
    expert_parallel: bool = True
    instance_type: str = MISSING  # EC2 instance type of one node, e.g. p5.48xlarge; "local" on cpu
    chips_per_node: int = MISSING  # accelerator chips (GPUs, Trainium chips) in one node
    ranks_per_chip: int = 1  # logical NeuronCores per chip on Trainium, 1 for a GPU
    nodes_per_domain: int = 1  # nodes in one high-bandwidth domain (UltraServer, NVLink domain)
    memory_gib_per_chip: float = MISSING  # device memory (HBM) per chip, GiB
    memory_bw_gbs: float = MISSING  # device memory bandwidth per chip, GB/s
    peak_tflops_bf16: float = MISSING  # dense bf16 TFLOP/s per chip; MFU is measured against it
    peak_tflops_fp8: Optional[float] = None  # dense fp8 TFLOP/s per chip; null where unpublished
    # dense MXFP8 (block-scaled fp8) TFLOP/s per chip; null where unpublished
    peak_tflops_mxfp8: Optional[float] = None
    # low-precision formats this hardware's software stack trains with (trainer.precision): fp8,
    # mxfp8; [] for bf16 only. Each entry says where its list comes from.
    low_precision: list[str] = field(default_factory=list)
    intra_node_bw_gbs: float = MISSING  # GB/s per chip, one direction, to chips of its node
    intra_domain_bw_gbs: float = MISSING  # GB/s per chip, one direction, to its domain's nodes
    efa_bw_gbps: float = 0.0  # Gbit/s per node over EFA, the inter-domain link
    efa_interfaces: int = 0  # EFA network interfaces per node (0: no inter-node link)
    launch_env: dict[str, str] = field(default_factory=dict)  # exported on every node at launch
    # Kubernetes extended resources one node asks for (devices, EFA interfaces)
    k8s_resources: dict[str, int] = field(default_factory=dict)
    # Power and price, read by `python -m trainer.plan compare`. null where not published: shown
    # as nf and never guessed; a user who knows the figure supplies it (hardware.power_w=...).
    power_w: Optional[float] = None  # W per chip: the vendor's TDP / board power
    node_power_w: Optional[float] = None  # W per node, the whole server, where published
    price_per_hour: Optional[float] = None  # USD per node (instance) hour, on demand
    price_date: Optional[str] = None  # when price_per_hour was read (YYYY-MM-DD)
    price_region: Optional[str] = None  # the AWS region it is quoted for
    # Relative claims a vendor makes (e.g. "4x energy efficiency vs Trn2"): shown, labelled as
    # claims, never used in a figure.
    vendor_claims: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """The model: a family's shape (presets in `configs/model/`), or a user's LightningModule.

    `family` picks the model family (`trainer/models/registry.py`), which reads the shape keys it
    knows and checks them. `_target_` names the LightningModule class: the default builds the
    family's model from the shape; any other class is instantiated with `kwargs` and nothing else.
    """

    _target_: str = "trainer.module.LanguageModel"  # dotted path of the LightningModule class
    family: str = "llama"  # the model family: llama | moe
    name: str = "tiny"  # the preset; part of the default MLflow run name
    # Hugging Face checkpoint to start from: a directory or fsspec URL (s3://...) holding
    # config.json and *.safetensors; its config must match the shape keys. null: random init.
    init_from: Optional[str] = None
    # fsspec options of `init_from`, e.g. endpoint_url for an S3-compatible store
    storage_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 256  # width of the residual stream (hidden size)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # attention (query) heads; dim / n_heads is the head size
    n_kv_heads: int = 4  # key/value heads (grouped-query attention); divides n_heads
    vocab_size: int = 256  # token ids the embedding and output head cover (256: bytes)
    ffn_dim: int = 768  # hidden size of the SwiGLU feed-forward block
    max_seq_len: int = 256  # longest sequence the rotary tables are built for
    rope_theta: float = 10000.0  # base of the rotary position embedding frequencies
    norm_eps: float = 1e-5  # epsilon of RMSNorm
    tie_embeddings: bool = False  # the output head shares the token embedding's weights
    # model.family=moe (docs/moe.md); another family refuses these keys when changed:
    # the size of one attention head (null: dim / n_heads)
    head_dim: Optional[int] = None
    n_experts: int = 8  # routed experts in each MoE layer
    top_k: int = 2  # experts each token is routed to
    moe_ffn_dim: int = 256  # hidden size of one expert's SwiGLU (ffn_dim is the dense layers')
    n_shared_experts: int = 0  # experts every token also goes through (DeepSeek's shared experts)
    moe_every: int = 1  # every Nth layer is MoE (Hugging Face's decoder_sparse_step)
    n_dense_layers: int = 0  # the first N layers are dense (DeepSeek-V3's first_k_dense_replace)
    norm_topk_prob: bool = True  # rescale each token's top-k routing weights to sum to one
    # load balancing, either, both or neither: the auxiliary loss's weight (0: off)
    aux_loss_coef: float = 0.001
    # and DeepSeek-V3's auxiliary-loss-free bias update rate, its gamma (0: off)
    bias_update_rate: float = 0.0
    # keyword arguments for a user's `_target_` class (a family's model ignores them)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One dataset of a mixture (`data.sources`)."""

    path: str = MISSING  # fsspec URL of a token dataset (`python -m trainer.data prepare`)
    weight: float = 1.0  # its share of the samples, relative to the other sources' weights
    name: Optional[str] = None  # its label in MLflow (data/tokens/NAME); null: the path's last part


@dataclass
class DataConfig:
    name: str = "stdlib"  # the option: stdlib (built in) or shards (yours)
    # fsspec URL of a directory of token shards (see `python -m trainer.data prepare`);
    # null means the built-in corpus, prepared from Python's standard library on first use.
    path: Optional[str] = None
    seq_len: int = 256  # tokens per sample; at most model.max_seq_len
    micro_batch_size: int = 8  # samples per rank per forward/backward pass
    # null: micro_batch_size x data-parallel size (no gradient accumulation)
    global_batch_size: Optional[int] = None
    num_workers: int = 0  # DataLoader worker processes per rank (0: load in the training process)
    # fsspec options for `path`, e.g. endpoint_url for an S3-compatible store
    storage_options: dict[str, Any] = field(default_factory=dict)
    # A mixture instead of `path`: [{path: URL, weight: W, name: N}, ...]; each sample comes from
    # one source, drawn by weight with the run's seed; every source's position is checkpointed.
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out evaluation: a dataset URL, or a fraction (e.g. 0.01) of the training data held
    # out by document (the last documents of each source); null: no evaluation.
    eval: Optional[str] = None
    # Block-causal attention over packed documents: a token attends to the earlier tokens of its
    # own document only, and positions restart at each document. null: on for a model family's
    # attention wherever the datasets have end-of-document tokens (off on the XLA path)
    document_mask: Optional[bool] = None


# The mesh's dims, outermost first: ranks are laid out row-major over them, so tp varies fastest.
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelismConfig:
    """The device mesh: dp_replicate x dp_shard x cp x tp (outermost first).

    `name: auto` (the default) asks the planner for the fastest plan that fits; any dim set under
    auto is a constraint the planner keeps (or refuses in one line), and null dims are free.
    Any other name is an explicit plan: null dims are 1, and one dim may be -1 to fill the world
    size. activation_checkpointing: null lets auto decide (off in an explicit plan).
    """

    name: str = "auto"  # the preset; `auto` lets the planner choose the dims left null
    dp_replicate: Optional[int] = None  # full replicas of the model; gradients all-reduced
    dp_shard: Optional[int] = None  # FSDP2: parameters, gradients, optimizer state split
    cp: Optional[int] = None  # context parallel (not implemented yet: 1 or null)
    tp: Optional[int] = None  # tensor parallel: each matmul split over these ranks, in a node
    # expert parallel (model.family=moe): each MoE layer's experts split over ep of dp_shard's
    # ranks, tokens exchanged by all-to-all; ep divides dp_shard (docs/moe.md)
    ep: Optional[int] = None
    sequence_parallel: bool = False  # with tp: norms and residual stream split by sequence
    # recompute each block in backward to save memory (null: the planner decides)
    activation_checkpointing: Optional[bool] = None
    compile: bool = False  # torch.compile each block (inductor; backend "neuron" on Trainium)
    # dtype FSDP2 all-gathers parameters and reduces gradients in (null: the parameter dtype)
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None  # dtype of FSDP2 gradient reduction (null: param_dtype)


@dataclass
class OptimConfig:
    name: str = "adamw"  # the preset (AdamW is the one optimizer)
    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio at max_steps
    # linear warmup to lr over this many steps; null: WARMUP_FRACTION of trainer.max_steps
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.1  # AdamW decay, on matrices only (not norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off

    def warmup(self, max_steps: int) -> int:
        """The warmup steps of a run of `max_steps`: `warmup_steps`, or its share when null."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(max_steps * WARMUP_FRACTION)


@dataclass
class CheckpointConfig:
    name: str = "local"  # the preset
    # fsspec URL or path; a relative path is under the run's output directory
    dir: str = "checkpoints"
    every_n_steps: int = 100  # save every N optimizer steps and at the last; 0: the last only
    keep_last: int = 2  # the newest N committed checkpoints stay
    keep_every: int = 0  # and so does every checkpoint whose step is a multiple of this (0: none)
    # stage to host memory and write from a thread while training goes on (one save in flight)
    async_save: bool = True
    io_threads: int = 4  # parallel writers per rank
    # null: start at step 0; "last": the newest committed checkpoint under `dir` that passes
    # verification (none committed: step 0; all damaged: refused); "fresh": step 0 on purpose,
    # keeping what `dir` holds; or the URL of one committed checkpoint
    resume: Optional[str] = None
    # fsspec options of `dir`: endpoint_url, key, secret, client_kwargs... (set without a `+`)
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    name: str = "mlflow"  # the preset: mlflow or none
    backend: str = "mlflow"  # mlflow | none
    # null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    uri: Optional[str] = None
    experiment: str = "ultramesh"  # MLflow experiment the run goes in (created if missing)
    run_name: Optional[str] = None  # null: <model>-<hardware>-<world size>r
    log_every_n_steps: int = 1  # send at most one point every N steps
    system_metrics: bool = False  # MLflow's CPU/memory/disk/network (and GPU) sampler
    # an unreachable server at start: a warning and training goes on, unless this is true
    fail_on_unreachable: bool = False


@dataclass
class ClusterConfig:
    """Where `python -m launch` sends the run (`configs/cluster/`; docs/launch.md)."""

    name: str = "local"  # the preset
    kind: str = "local"  # local | slurm | eks
    nodes: int = 1  # nodes (machines) of the job; world size = nodes x ranks per node
    # container image: optional on SLURM (pyxis/enroot --container-image), required on EKS
    image: Optional[str] = None
    # SLURM
    partition: Optional[str] = None  # sbatch --partition (null: the cluster's default partition)
    account: Optional[str] = None  # sbatch --account to charge
    qos: Optional[str] = None  # sbatch --qos
    time_limit: str = "01:00:00"  # sbatch --time: minutes, [D-]HH:MM:SS, MM:SS
    preempt_warning_s: int = 120  # USR1 this long before the time limit (--signal=B:USR1@N)
    max_requeues: int = 3  # a job that keeps being preempted stops requeueing after this many
    chain: int = 1  # jobs chained with --dependency=afterany, for runs past the partition limit
    rdzv_port: int = 29500  # torchrun's c10d rendezvous port on the first node (+ job id % 1000)
    # EKS
    job_kind: str = "trainjob"  # trainjob (Kubeflow Trainer v2) | pytorchjob | job (Indexed Job)
    # the Kubernetes namespace the job runs in (EKS; null: kubectl's current context's)
    namespace: Optional[str] = None
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob refers to
    service_account: Optional[str] = None  # S3 and MLflow credentials via IRSA / Pod Identity
    queue: Optional[str] = None  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name)
    shm_gib: int = 64  # memory-backed /dev/shm for data-loader workers and NCCL


@dataclass
class LaunchConfig:
    """What `python -m launch` does with the rendered job; the trainer only reads `rendered`."""

    dry_run: bool = False  # print the job, submit nothing
    max_restarts: int = 0  # torchrun --max-restarts (cluster=local)
    # where the run's outputs, checkpoints and the rendered job go; null:
    # outputs/launch/<date>/<time> under the directory the launcher runs in
    run_dir: Optional[str] = None
    wait: bool = False  # SLURM/EKS: wait for the job to end and report its MLflow run
    # set by the launcher: the rendered job file, logged (redacted) to the MLflow run
    rendered: Optional[str] = None
    # set by the sweep launcher (hydra/launcher=slurm|eks): one MLflow parent run per sweep dir
    sweep_dir: Optional[str] = None
    job_num: int = 0  # set by the sweep launcher: this job's number in the sweep


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps to train; the LR schedule ends here
    # ranks per node; null: the hardware's (chips_per_node x ranks_per_chip), 1 on cpu
    devices: Optional[int] = None
    # Lightning precision (32-true, bf16-mixed, bf16-true, 16-mixed), a low-precision format
    # (fp8, mxfp8: the family's linears through torchao, the rest as bf16-mixed; the hardware
    # must list it in hardware.low_precision, and cpu runs torchao's emulation), or auto: the
    # fastest the planner finds among bf16-mixed and the hardware's formats
    precision: str = "32-true"
    fp8_recipe: str = "tensorwise"  # scaling of trainer.precision=fp8: tensorwise | rowwise
    log_every_n_steps: int = 10  # a progress line and a metrics point every N steps
    progress_bar: bool = True  # progress (loss, tok/s, MFU): a bar on a terminal, else log lines
    # With data.eval: evaluate every N optimizer steps and after the last (0: after the last only)
    eval_every_n_steps: int = 100
    eval_batches: Optional[int] = None  # micro batches per rank per evaluation; null: all of it


@dataclass
class PlanConfig:
    # `python -m trainer.plan`: also build the chosen mesh at full size on a fake process group
    validate: bool = False
    output: Optional[str] = None  # write the chosen plan as JSON here
    # The step-time model's assumptions (trainer/plan/planner.py step_time). Sources of the
    # defaults, and how far they miss published throughput: docs/planning.md, "Calibration".
    # mfu: fraction of dense peak FLOP/s the matmuls reach. torchtitan measured 33-39% MFU for
    # Llama 3.1 8B FSDP on H100 at 500 W (pytorch/torchtitan benchmarks/
    # llama3_h100_202412_torchtitan.md @31a17bf); NVIDIA/Megatron-LM's README: "up to 47% MFU on
    # H100 clusters".
    mfu: float = 0.4
    # overlap: fraction of compute time FSDP / replica traffic can hide behind. FSDP2 prefetches
    # the next unit's all-gather during this unit's compute and reduce-scatters during backward.
    overlap: float = 1.0
    # link_efficiency: fraction of a link's nominal one-way bandwidth a large collective reaches.
    # nccl-tests all-reduce bus bandwidth on 8x H100 SXM NVLink: 460-480 GB/s against 450 GB/s
    # nominal (docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests): no derating.
    link_efficiency: float = 1.0
    # pue: facility power over IT power, for energy figures. AWS data centers' global average
    # for 2025: 1.14 (sustainability.aboutamazon.com/environment/the-cloud, read 2026-12).
    pue: float = 1.14
    memory_headroom: float = 0.9  # plans may use this fraction of a rank's memory
    # expert_load: tokens the busiest expert-parallel rank receives, as a multiple of the mean
    # (routing is dropless, so imbalance costs time and memory). Switch Transformer trained at
    # capacity factors 1.0-1.25 (Fedus et al. 2022, table 1); 1.25 assumes balancing holds that.
    expert_load: float = 1.25


# The XLA path (trainer/xla/): torch-neuronx's PyTorch/XLA for Trn1 and Neuron SDKs up to 2.29,
# and XLA's CPU device for tests. `auto` takes it where hardware.backend is xla.
STRATEGIES = ("auto", "xla")
XLA_PRECISIONS = ("32-true", "bf16-true")  # XLA casts the weights; no autocast on this path


@dataclass
class StrategyConfig:
    """How the ranks train (`configs/strategy/`; docs/hardware/trainium-xla.md). `auto`: the
    hardware's own path, a device mesh (cpu, cuda, TorchNeuron), or PyTorch/XLA where
    hardware.backend is xla (trn1). `xla`: PyTorch/XLA on the hardware's PJRT device (NEURON on
    Trainium, CPU on cpu). The other keys apply to the XLA path only."""

    name: str = "auto"  # auto | xla
    # NEURON_CC_FLAGS: neuronx-cc options (AWS's Trn1 training recipes pass this model type)
    neuron_cc_flags: str = "--model-type=transformer"
    # NEURON_COMPILE_CACHE_URL: compiled graphs shared by every node and run (path or s3:// URL);
    # null: the Neuron default, /var/tmp/neuron-compile-cache on each node
    compile_cache: Optional[str] = None
    # NEURON_RT_STOCHASTIC_ROUNDING_EN under trainer.precision=bf16-true (bf16 weights)
    stochastic_rounding: bool = True
    # the SLURM and EKS launchers run `neuron_parallel_compile` for this many steps before
    # training, filling the compile cache (0: none; graphs compile as training meets them)
    parallel_compile_steps: int = 0


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
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    seed: int = 1234  # seeds the weights, the data order and every RNG; same seed, same losses

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
    def uses_family_model(self) -> bool:
        """The model is the family's (the default `_target_`), not a user's own module."""
        return self.model._target_ == ModelConfig._target_

    @property
    def uses_document_mask(self) -> bool:
        """Batches carry document boundaries to the family's attention (`data.document_mask`);
        a dataset without end-of-document tokens has none to carry."""
        if self.data.document_mask is None:
            return self.uses_family_model and not self.uses_xla
        return self.data.document_mask

    @property
    def uses_xla(self) -> bool:
        """PyTorch/XLA trains this run: strategy=xla, or auto on hardware whose backend is xla."""
        return self.strategy.name == "xla" or (self.strategy.name == "auto"
                                               and self.hardware.backend == "xla")


class Key(str):
    """A config key's dotted name, whose attributes are its sub-keys: `KEY.parallelism.tp` is
    "parallelism.tp". Built from the schema, so other modules name keys in errors without
    spelling them, and a key that does not exist fails as an AttributeError where it is named."""

    def __getattr__(self, name: str) -> Key:
        raise AttributeError(f"{self or 'the root config'} has no key {name!r}")


def _keys(schema: type, prefix: str = "") -> Key:
    node = Key(prefix.rstrip("."))
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        sub = (_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint)
               else Key(f"{prefix}{f.name}"))
        object.__setattr__(node, f.name, sub)
    return node


KEY = _keys(RunConfig)


# Free-form option dicts: `group.storage_options.endpoint_url=...` adds a key without a `+`.
OPEN_DICTS = ("checkpoint.storage_options", "data.storage_options", "model.storage_options")


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
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    for key, (group, option) in mandatory_keys(choices).items():
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(key, "???", f"{group}={option} needs it: give {key}=...")
    return cfg


def mandatory_keys(choices: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """{key: (group, option)} for each value a chosen option marks `???` (Hydra's mandatory
    value). OmegaConf keeps a default when `???` is merged over it, so a recipe's `???` would
    otherwise become the schema's null without a word."""
    found: dict[str, tuple[str, str]] = {}
    for group, option in choices.items():
        path = CONFIG_DIR / group / f"{option}.yaml"
        if option is None or group.startswith("hydra") or not path.is_file():
            continue
        text = path.read_text()
        prefix = "" if "@package _global_" in text.split("\n", 1)[0] else f"{group}."
        for key in _missing_leaves(OmegaConf.create(text)):
            found[prefix + key] = (group, option)
    return found


def _missing_leaves(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        if key == "defaults":
            continue
        if OmegaConf.is_missing(node, key):
            keys.append(f"{prefix}{key}")
        elif isinstance(node[key], DictConfig):
            keys += _missing_leaves(node[key], f"{prefix}{key}.")
    return keys


def load(overrides: Sequence[str] = ()) -> RunConfig:
    return validate(compose(overrides))


# What a bad command line or config file raises: the entry points print these as one line, exit 2.
CONFIG_ERRORS = (ConfigError, HydraException, OmegaConfBaseException)


@contextlib.contextmanager
def exit_on_config_error(*also: type[BaseException]) -> Iterator[None]:
    """A config error (or one of `also`, e.g. a missing dataset) raised inside becomes one line on
    stderr and exit code 2: how every entry point reports bad input."""
    try:
        yield
    except (*CONFIG_ERRORS, *also) as exc:
        print(f"config error: {describe(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


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
                  _check_trainer, _check_checkpoint, _check_tracking, _check_cluster, _check_plan,
                  _check_strategy):
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
    for key in ("power_w", "node_power_w", "price_per_hour"):
        if getattr(hw, key) is not None:
            _positive(f"hardware.{key}", getattr(hw, key))
    for fmt in hw.low_precision:
        _one_of("hardware.low_precision", fmt, LOW_PRECISION_FORMATS)
        if getattr(hw, f"peak_tflops_{fmt}") is None:
            raise ConfigError("hardware.low_precision", fmt,
                              f"the planner needs its peak: set hardware.peak_tflops_{fmt}")


def _check_model(run: RunConfig) -> None:
    """A user's module must be importable; a family checks its own shape keys when the planner
    asks it (`trainer.models.registry.model_costs`), so this module needs no family."""
    if not run.uses_family_model:
        _check_user_module(run.model._target_)
        if run.model.init_from:
            raise ConfigError("model.init_from", run.model.init_from,
                              f"loads a model family's weights; model._target_="
                              f"{run.model._target_} is a module of your own, which loads its own")


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
    if run.uses_family_model and d.seq_len > run.model.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len,
                          f"must be at most model.max_seq_len={run.model.max_seq_len}")
    if d.document_mask and not run.uses_family_model:
        raise ConfigError("data.document_mask", d.document_mask,
                          "masks a model family's attention; a user's module (model._target_) "
                          "gets (inputs, targets) batches: use null or false")
    if d.sources and d.path is not None:
        raise ConfigError("data.path", d.path, "set data.path or data.sources, not both "
                          "(a single dataset is a one-source mixture: data.path=null)")
    for i, source in enumerate(d.sources):
        _positive(f"data.sources[{i}].weight", source.weight)
    names = source_names(d)
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", [s.path for s in d.sources],
                          f"two sources share the name {_first_repeat(names)!r}; give them "
                          "distinct `name`s")
    fraction = eval_fraction(d)
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigError("data.eval", d.eval, "a held-out fraction must be between 0 and 1 "
                          "(e.g. 0.01), or give a dataset URL")


def source_names(d: DataConfig) -> list[str]:
    """The label of each of `data.sources`: its `name`, else the last part of its path."""
    return [s.name or s.path.rstrip("/").rsplit("/", 1)[-1] for s in d.sources]


def _first_repeat(names: list[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


def eval_fraction(d: DataConfig) -> float | None:
    """`data.eval` as a held-out fraction, or None when it is null or a dataset URL."""
    if d.eval is None:
        return None
    try:
        return float(d.eval)
    except ValueError:
        return None


FSDP_DTYPES = ("float32", "bfloat16")


def _check_parallelism(run: RunConfig) -> None:
    """Each dim on its own, and the dtypes against the precision, whatever the parallelism: the
    shape against the world size, the model and the hardware is the planner's to check."""
    p = run.parallelism
    filled = []
    for name in MESH_DIMS:
        size = getattr(p, name)
        if size is None:
            continue
        if size == 0 or size < -1:
            raise ConfigError(f"parallelism.{name}", size, "must be a positive size, or -1 to fill")
        if size == -1:
            filled.append(name)
    if len(filled) > 1:
        raise ConfigError(f"parallelism.{filled[1]}", -1,
                          f"only one dim may be -1 (parallelism.{filled[0]} already is)")
    if p.ep is not None and p.ep < 1:
        raise ConfigError("parallelism.ep", p.ep,
                          "must be a positive size (it divides dp_shard; -1 is not allowed)")
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(p, key)
        if value is not None:
            _one_of(f"parallelism.{key}", value, FSDP_DTYPES)
    if run.trainer.precision == "bf16-true" and p.param_dtype == "float32":
        raise ConfigError("parallelism.param_dtype", p.param_dtype,
                          "with trainer.precision=bf16-true the weights are bf16 already; "
                          "gathering them as float32 doubles the traffic for no precision: use "
                          "bfloat16 or null")


def _check_optim(run: RunConfig) -> None:
    o = run.optim
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", o.min_lr_ratio, "must be between 0 and 1")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, "must be 0 or more")
    if o.warmup_steps is not None and o.warmup_steps >= run.trainer.max_steps:
        raise ConfigError("optim.warmup_steps", o.warmup_steps,
                          f"must be less than trainer.max_steps={run.trainer.max_steps} (or null: "
                          f"{WARMUP_FRACTION:.0%} of it)")
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
    if t.eval_every_n_steps < 0:
        raise ConfigError("trainer.eval_every_n_steps", t.eval_every_n_steps,
                          "must be 0 (after the last step only) or more")
    if t.eval_batches is not None:
        _positive("trainer.eval_batches", t.eval_batches)
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
    _check_low_precision(run)
    if run.data.global_batch_size is not None:
        _positive("data.global_batch_size", run.data.global_batch_size)


def _check_low_precision(run: RunConfig) -> None:
    """fp8 / mxfp8 only where the hardware's stack trains with it (cpu: torchao's emulation, for
    tests), and only for a model family, whose `parallelize` converts its linears."""
    t, hw = run.trainer, run.hardware
    _one_of("trainer.fp8_recipe", t.fp8_recipe, FP8_RECIPES)
    if t.precision not in (*LOW_PRECISION_FORMATS, PRECISION_AUTO):
        return
    if not run.uses_family_model:
        raise ConfigError("trainer.precision", t.precision,
                          "converts a model family's linears; a module of your own "
                          f"(model._target_={run.model._target_}) picks its own precision: use "
                          "32-true, bf16-mixed, bf16-true or 16-mixed")
    if t.precision == PRECISION_AUTO or hw.device_type == "cpu":
        return
    if t.precision not in hw.low_precision:
        formats = ", ".join(hw.low_precision) or "none (bf16 only)"
        raise ConfigError("trainer.precision", t.precision,
                          f"{hw.name} does not train in {t.precision}; its stack trains with: "
                          f"{formats} (hardware.low_precision); use bf16-mixed or auto")


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
    _one_of("cluster.job_kind", c.job_kind, EKS_JOB_KINDS)
    time_limit_seconds(c.time_limit)
    for key in ("preempt_warning_s", "max_requeues"):
        if getattr(c, key) < 0:
            raise ConfigError(f"cluster.{key}", getattr(c, key), "must be 0 or more")
    _positive("cluster.chain", c.chain)
    _positive("cluster.shm_gib", c.shm_gib)
    if not 0 < c.rdzv_port < 65536:
        raise ConfigError("cluster.rdzv_port", c.rdzv_port, "must be a TCP port, 1-65535")
    if run.launch.max_restarts < 0:
        raise ConfigError("launch.max_restarts", run.launch.max_restarts, "must be 0 or more")


def time_limit_seconds(text: str) -> int:
    """`cluster.time_limit` in seconds, read the way sbatch --time reads it: minutes, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    allowed = "a time sbatch --time accepts: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"
    text = str(text).strip()
    has_days = "-" in text
    days, _, rest = text.partition("-") if has_days else ("", "", text)
    parts = rest.split(":")
    if (has_days and not days.isdigit()) or not all(p.isdigit() for p in parts) \
            or len(parts) > 3:
        raise ConfigError("cluster.time_limit", text, allowed)
    nums = [int(p) for p in parts]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = [*nums, 0, 0][:3]
        seconds = int(days) * 86400 + h * 3600 + m * 60 + s
    elif len(nums) == 1:
        seconds = nums[0] * 60
    elif len(nums) == 2:
        seconds = nums[0] * 60 + nums[1]
    else:
        seconds = nums[0] * 3600 + nums[1] * 60 + nums[2]
    if seconds <= 0:
        raise ConfigError("cluster.time_limit", text, "must be longer than zero; " + allowed)
    return seconds


def _check_plan(run: RunConfig) -> None:
    p = run.plan
    for key in ("mfu", "link_efficiency"):
        if not 0 < getattr(p, key) <= 1:
            raise ConfigError(f"plan.{key}", getattr(p, key), "must be in (0, 1]")
    if not 0 <= p.overlap <= 1:
        raise ConfigError("plan.overlap", p.overlap, "must be in [0, 1]")
    if p.pue < 1:
        raise ConfigError("plan.pue", p.pue, "must be 1 or more (facility power / IT power)")
    if p.expert_load < 1:
        raise ConfigError("plan.expert_load", p.expert_load,
                          "must be 1 or more (the busiest expert rank's tokens over the mean)")


def _check_strategy(run: RunConfig) -> None:
    s = run.strategy
    _one_of("strategy.name", s.name, STRATEGIES)
    if s.parallel_compile_steps < 0:
        raise ConfigError("strategy.parallel_compile_steps", s.parallel_compile_steps,
                          "must be 0 (no compile pass) or more")
    if run.uses_xla and run.trainer.precision not in XLA_PRECISIONS:
        raise ConfigError("trainer.precision", run.trainer.precision,
                          f"the XLA path (strategy={s.name}, hardware={run.hardware.name}) "
                          f"takes {' or '.join(XLA_PRECISIONS)}: bf16 weights with stochastic "
                          "rounding stand in for mixed precision there")
