"""One rank of `tests/models/test_moe_parallel.py`: run under `torchrun --nproc_per_node=4`.

For each scenario (a mesh shape, an expert-parallel degree and options) every rank builds the MoE
decoder as the trainer does (meta device, parallelize, its own shards allocated and initialised
from the seed), checks that the gathered initial weights equal a one-process build's exactly, and
trains a few steps on its data-parallel slice of each global batch (loss = cross entropy + the
balancing loss, the bias update after each step) beside an unsharded copy trained on the whole
global batch, the one-process reference (`parallel_worker.train_beside_reference`). Rank 0
writes the differences per scenario as JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.models.parallel_worker import train_beside_reference
from trainer.config import ParallelismConfig
from trainer.mesh import data_parallel_rank
from trainer.models.moe.model import Transformer
from trainer.models.moe.parallelize import parallelize
from trainer.models.moe.shape import MoEArgs
from trainer.plan import ParallelDims

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
# 8 experts split over ep 2 or 4; a dense first layer, a shared expert; heads and expert
# hidden sizes split over tp 2; aux loss strong enough to move the router
ARGS = MoEArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=96,
               ffn_dim=128, max_seq_len=16, n_experts=8, top_k=2, moe_ffn_dim=32,
               n_shared_experts=1, n_dense_layers=1, aux_loss_coef=0.01)
SEED = 1234  # steps, batch, optimizer and clipping: tests/models/parallel_worker.py's


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
    grad_diff = first_gradients_difference(model, reference, mesh, args)
    results = train_beside_reference(
        model, reference, mesh, args.vocab_size, args.max_seq_len, loss_of=loss_with_balance,
        after_step=lambda m: m.after_optimizer_step(),
        # whole rows, whose draws route no token near a top-k tie: a tie that float sums break
        # the other way sends a token to another expert (other batches moved experts by 1%).
        # Packed documents are proven by the first gradients above.
        packed=False)
    biases = [(r.expert_bias - ref.expert_bias).abs().max().item()
              for r, ref in zip(model.routers(), reference.routers(), strict=True)]
    return {**results, "grad_rel_diff": grad_diff, "bias_abs_diff": max(biases),
            "bias_moved": max(r.expert_bias.abs().max().item() for r in reference.routers())}


def first_gradients_difference(model: Transformer, reference: Transformer, mesh,
                               args: MoEArgs) -> float:
    """Largest ||g - g_ref|| / ||g_ref|| over parameters after one backward pass on the same
    global batch (each rank its slice), once with whole rows and once with rows that pack
    documents: Adam and clipping hide a gradient's scale, this does not. The routers' counts are
    reset after it."""
    replicas, dp_rank = data_parallel_rank(mesh)
    data = torch.Generator().manual_seed(7)
    tokens = torch.randint(args.vocab_size, (2 * replicas, args.max_seq_len + 1), generator=data)
    starts = torch.rand(tokens[:, :-1].shape, generator=data) < 0.2
    mine = slice(2 * dp_rank, 2 * dp_rank + 2)
    worst = 0.0
    for documents in ([], [starts.cumsum(dim=1, dtype=torch.int32)]):
        loss_with_balance(model, tokens[mine, :-1], tokens[mine, 1:],
                          *(d[mine] for d in documents)).backward()
        loss_with_balance(reference, tokens[:, :-1], tokens[:, 1:], *documents).backward()
        ref = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            expected = ref[name.replace("_checkpoint_wrapped_module.", "")].grad
            worst = max(worst, ((grad - expected).norm() / expected.norm()).item())
        for m in (model, reference):
            m.zero_grad()
            for router in m.routers():
                router.step_tokens.zero_()
                router.window_tokens.zero_()
    return worst


def loss_with_balance(model: Transformer, inputs, targets, *documents) -> torch.Tensor:
    """What the training step computes: cross entropy (attention per document where the batch
    packs documents) plus the balancing loss."""
    loss = F.cross_entropy(model(inputs, *documents).flatten(0, 1), targets.flatten())
    return loss + model.auxiliary_loss() if model.args.aux_loss_coef else loss


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
