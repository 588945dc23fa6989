"""One rank of `tests/models/test_moe_parallel.py`: run under `torchrun --nproc_per_node=4`.

For each scenario (a mesh shape, an expert-parallel degree and options) every rank builds the MoE
decoder as the trainer does (meta device, parallelize, its own shards allocated and initialised
from the seed), checks that the gathered initial weights equal a one-process build's exactly, and
trains a few steps on its data-parallel slice of each global batch (loss = cross entropy + the
balancing loss, the project's AdamW and clipping, the bias update after each step), beside an
unsharded copy trained on the whole global batch: the one-process reference. Rank 0 writes the
differences per scenario as JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from tests.models.parallel_worker import _weight_difference
from trainer.config import OptimConfig, ParallelismConfig
from trainer.mesh import data_parallel_rank
from trainer.models.moe.model import Transformer
from trainer.models.moe.parallelize import parallelize
from trainer.models.moe.shape import MoEArgs
from trainer.optim import build_optimizer, clip_grad_norm
from trainer.plan import ParallelDims

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
# 8 experts split over ep 2 or 4; a dense first layer, a shared expert; heads and expert
# hidden sizes split over tp 2; aux loss strong enough to move the router
ARGS = MoEArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=96,
               ffn_dim=128, max_seq_len=16, n_experts=8, top_k=2, moe_ffn_dim=32,
               n_shared_experts=1, n_dense_layers=1, aux_loss_coef=0.01)
STEPS, MICRO_BATCH, MAX_NORM, SEED = 3, 2, 0.5, 1234
OPTIM = OptimConfig(lr=1e-2)


@dataclass(frozen=True)
class Scenario:
    name: str
    shape: tuple[int, int, int, int]
    ep: int
    activation_checkpointing: bool = False
    changes: dict = field(default_factory=dict)  # to ARGS


SCENARIOS = [
    Scenario("ep2_in_dp_shard4", (1, 4, 1, 1), ep=2),
    Scenario("ep2_x_tp2", (1, 2, 1, 2), ep=2),
    Scenario("ep4_bias_balanced_checkpointed", (1, 4, 1, 1), ep=4, activation_checkpointing=True,
             changes={"aux_loss_coef": 0.0, "bias_update_rate": 0.05}),
    Scenario("hsdp_x_ep2", (2, 2, 1, 1), ep=2),
    Scenario("tp4_without_ep", (1, 1, 1, 4), ep=1,
             changes={"n_heads": 4, "n_kv_heads": 4}),
]


def run(scenario: Scenario) -> dict[str, float]:
    args = MoEArgs(**{**ARGS.__dict__, **scenario.changes})
    mesh = init_device_mesh("cpu", scenario.shape, mesh_dim_names=DIMS)
    dims = ParallelDims(scenario.shape, scenario.activation_checkpointing, ep=scenario.ep)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, mesh, dims, ParallelismConfig())
    model.to_empty(device="cpu")
    model.init_weights(seed=SEED, buffer_device="cpu")
    reference = Transformer(args)
    reference.init_weights(seed=SEED)
    init_diff = _weight_difference(model, reference, absolute=True)
    replicas, dp_rank = data_parallel_rank(mesh)

    optimizer = build_optimizer(model, OPTIM)
    ref_optimizer = build_optimizer(reference, OPTIM)
    data = torch.Generator().manual_seed(1)
    loss_diff = norm_diff = 0.0
    for _ in range(STEPS):
        tokens = torch.randint(args.vocab_size, (replicas * MICRO_BATCH, args.max_seq_len + 1),
                               generator=data)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mine = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
        loss = train_step(model, optimizer, inputs[mine], targets[mine])
        norm = clip_grad_norm(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step()

        ref_loss = train_step(reference, ref_optimizer, inputs, targets)
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        reference.after_optimizer_step()

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # tp peers count their shared loss alike: a plain mean works
        mean_loss /= dist.get_world_size()
        loss_diff = max(loss_diff, abs(mean_loss.item() - ref_loss.item()))
        norm_diff = max(norm_diff, abs(norm.item() - ref_norm.item()) / ref_norm.item())
    biases = [(r.expert_bias - ref.expert_bias).abs().max().item()
              for r, ref in zip(model.routers(), reference.routers(), strict=True)]
    return {"init_abs_diff": init_diff, "loss_diff": loss_diff, "grad_norm_rel_diff": norm_diff,
            "weight_rel_diff": _weight_difference(model, reference),
            "bias_abs_diff": max(biases),
            "bias_moved": max(r.expert_bias.abs().max().item() for r in reference.routers())}


def train_step(model: Transformer, optimizer, inputs, targets) -> torch.Tensor:
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss = loss + model.auxiliary_loss() if model.args.aux_loss_coef else loss
    loss.backward()
    return loss


def main() -> None:
    dist.init_process_group("gloo")
    only = set(sys.argv[2:])
    results: dict[str, object] = {}
    for scenario in SCENARIOS:
        if only and scenario.name not in only:
            continue
        if dist.get_rank() == 0:
            print("scenario", scenario.name, flush=True)
        results[scenario.name] = run(scenario)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
