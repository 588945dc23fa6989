"""Published training throughput the step-time model is checked against (`calibration.py`).

Each entry is one row of a public benchmark table, with where it comes from (repository, path,
commit and the date the table gives) and how this planner reproduces it: the Hydra overrides for
hardware, model, batch and precision, and the mesh by dim name. What the
planner cannot express (pipeline parallel, ZeRO-1, selective activation checkpointing, FP8
matmuls) is said in `differs`; rows that need pipeline parallel are left out, since no mesh here
reproduces them (Megatron-Bridge's DGX-H100 Llama 3 70B row: TP 4 x PP 8; Neuron's Trn1 Llama 3.1
70B row: TP 32 x PP 8). No Trn2 or Trn3 training throughput was found published.
"""

from __future__ import annotations

from dataclasses import dataclass

# Runs in bf16 with FSDP gathering bf16 weights and reducing in fp32 (torchtitan's defaults:
# mixed_precision_param bfloat16, mixed_precision_reduce float32).
_BF16_FSDP = ("trainer.precision=bf16-mixed", "parallelism.param_dtype=bfloat16",
              "parallelism.reduce_dtype=float32", "data.seq_len=8192")
# torchtitan's H100s were Grand Teton hosts: 96 GB HBM2e at 2.4 TB/s, 400 Gb/s RDMA per GPU (as
# p5's 3,200 Gbit/s per 8 GPUs), at a 500 W power limit (llama3_h100_202412_torchtitan.md).
_GRAND_TETON = ("hardware=h100", "hardware.memory_gib_per_chip=96", "hardware.memory_bw_gbs=2400")
_TORCHTITAN = ("pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md @31a17bf "
               "(runs 2024-12-26)")
_TORCHTITAN_8B = "torchtitan's llama3_8b.toml @08a5a9f: seq_len 8192, selective (op) AC"
_MEGATRON = ("NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md @df0289c, "
             "26.02 NeMo container")
_NEURON = ("aws-neuron/aws-neuron-sdk about-neuron/benchmarks/trn1/training_data_decoder.csv "
           "@7c165a3 (Neuron 2.24.0; page updated 2026-02-19)")


@dataclass(frozen=True)
class Published:
    """One published throughput figure and the planner run that stands for it."""

    label: str
    hardware: str  # catalog entry the figure is compared on
    source: str
    overrides: tuple[str, ...]
    nodes: int
    dims: dict[str, int]  # mesh dims by name; those not named are 1
    activation_checkpointing: bool
    tokens_per_s_per_chip: float
    precision: str  # "bf16", or "fp8" when the published run used FP8 matmuls
    differs: str  # how the published run differs from what the planner models


PUBLISHED: tuple[Published, ...] = (
    Published("Llama 3.1 8B, FSDP, 8 GPUs", "h100", f"{_TORCHTITAN} Table 1, row FSDP",
              (*_GRAND_TETON, "model=llama3_8b", *_BF16_FSDP, "data.micro_batch_size=2"),
              nodes=1, dims={"dp_shard": 8}, activation_checkpointing=False,
              tokens_per_s_per_chip=5762, precision="bf16",
              differs=f"{_TORCHTITAN_8B} (modelled as none); 500 W power limit"),
    Published("Llama 3.1 8B, FSDP + compile, 8 GPUs", "h100",
              f"{_TORCHTITAN} Table 1, row FSDP + torch.compile",
              (*_GRAND_TETON, "model=llama3_8b", *_BF16_FSDP, "data.micro_batch_size=2"),
              nodes=1, dims={"dp_shard": 8}, activation_checkpointing=False,
              tokens_per_s_per_chip=6667, precision="bf16",
              differs=f"torch.compile; {_TORCHTITAN_8B} (modelled as none); 500 W power limit"),
    Published("Llama 3.1 8B, FSDP, 128 GPUs", "h100", f"{_TORCHTITAN} Table 3, row FSDP",
              (*_GRAND_TETON, "model=llama3_8b", *_BF16_FSDP, "data.micro_batch_size=2"),
              nodes=16, dims={"dp_shard": 128}, activation_checkpointing=False,
              tokens_per_s_per_chip=5605, precision="bf16",
              differs=f"{_TORCHTITAN_8B} (modelled as none); 500 W power limit"),
    Published("Llama 3.1 70B, FSDP 32 x TP 8, 256 GPUs", "h100", f"{_TORCHTITAN} Table 4, row 2D",
              (*_GRAND_TETON, "model=llama3_70b", *_BF16_FSDP, "data.micro_batch_size=16",
               "parallelism.sequence_parallel=true"),
              nodes=32, dims={"dp_shard": 32, "tp": 8}, activation_checkpointing=True,
              tokens_per_s_per_chip=829, precision="fp8",
              differs="Float8 linears + torch.compile (the model assumes bf16 matmuls)"),
    Published("Llama 3 70B, FSDP, 64 GPUs", "gb200_nvl72",
              f"{_MEGATRON}, DGX-GB200, LLAMA3_70B FP8-CS row",
              ("hardware=gb200_nvl72", "model=llama3_70b", *_BF16_FSDP,
               "data.micro_batch_size=2", "data.global_batch_size=256"),
              nodes=16, dims={"dp_shard": 64}, activation_checkpointing=False,
              tokens_per_s_per_chip=4040, precision="fp8",
              differs="FP8 (current scaling) matmuls; recompute not stated (modelled as none); "
                      "DGX-GB200, not AWS's p6e-gb200"),
    Published("Llama 3.1 8B, TP 32 x DP 32, 32 trn1.32xlarge", "trn1",
              f"{_NEURON}, Llama-3.1-8B row: 47.95 seq/s x 8192 tokens / 512 chips",
              ("hardware=trn1", "model=llama3_8b", "trainer.precision=bf16-mixed",
               "data.seq_len=8192", "data.micro_batch_size=1", "data.global_batch_size=1024"),
              nodes=32, dims={"dp_replicate": 32, "tp": 32}, activation_checkpointing=False,
              tokens_per_s_per_chip=47.95 * 8192 / 512, precision="bf16",
              differs="ZeRO-1 (modelled as plain replication); tp 32 > 8 KV heads (NxD "
                      "replicates them; the planner would reject tp 32)"),
)
