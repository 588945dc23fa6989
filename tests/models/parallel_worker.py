"""One rank of `tests/models/test_parallelize.py`: run under `torchrun --nproc_per_node=4`.

For each scenario (a mesh shape and parallelism options) every rank builds the decoder as the
trainer does (meta device, parallelize, then its own shards allocated and initialised from the
seed), checks that the gathered initial weights equal a one-process build's exactly, and trains
a few steps on its data-parallel slice of each global batch with the project's AdamW
(`trainer.optim.build_optimizer`), clipping with `trainer.optim.clip_grad_norm`; the middle step's
rows pack several documents each (document masking). Beside it,
every rank trains an unsharded copy on the whole global batch: the one-process reference.
Rank 0 writes, per scenario, the initial weights' difference, the largest loss difference, the
largest relative weight difference after training and the gradient norms both measured, as
JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from trainer.config import OptimConfig, ParallelismConfig
from trainer.mesh import data_parallel_rank
from trainer.models.llama.model import Transformer
from trainer.models.llama.parallelize import parallelize
from trainer.models.llama.shape import LlamaArgs
from trainer.optim import build_optimizer, clip_grad_norm
from trainer.plan import ParallelDims

DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
# n_kv_heads = n_heads = 4 lets tp go up to 4; vocab 96 splits evenly over 2 and 4
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, ffn_dim=128,
                 max_seq_len=16)
STEPS, MICRO_BATCH, MAX_NORM, SEED = 3, 2, 0.5, 1234
OPTIM = OptimConfig(lr=1e-2)


@dataclass(frozen=True)
class Scenario:
    name: str
    shape: tuple[int, int, int, int]
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    compile_backend: str | None = None
    tie_embeddings: bool = False


SCENARIOS = [
    Scenario("fsdp2_x_tp_sequence_parallel_tied_checkpointed", (1, 2, 1, 2),
             sequence_parallel=True, activation_checkpointing=True, tie_embeddings=True),
    Scenario("hsdp", (2, 2, 1, 1)),
    Scenario("replicas_x_tp", (2, 1, 1, 2)),
    # aot_eager: the real dynamo capture (fullgraph) and AOT autograd, without inductor's codegen,
    # which takes half a minute per process on a small CPU
    Scenario("tp4_sequence_parallel_compiled", (1, 1, 1, 4), sequence_parallel=True,
             compile_backend="aot_eager"),
    Scenario("fsdp2_x_tp_compiled_checkpointed", (1, 2, 1, 2), activation_checkpointing=True,
             compile_backend="aot_eager"),
]


def run(scenario: Scenario) -> dict[str, float]:
    # Each scenario compiles a new model, as a run's own process does: without a reset, the
    # shapes of earlier scenarios' graphs make dynamo trace this one's with symbolic shapes, and
    # tracing the document-masked checkpointed block that way overflows Python's recursion limit
    # (torch 2.13, aot_eager).
    torch._dynamo.reset()
    args = LlamaArgs(**{**ARGS.__dict__, "tie_embeddings": scenario.tie_embeddings})
    mesh = init_device_mesh("cpu", scenario.shape, mesh_dim_names=DIMS)
    dims = ParallelDims(scenario.shape, scenario.activation_checkpointing)
    cfg = ParallelismConfig(sequence_parallel=scenario.sequence_parallel,
                            compile=scenario.compile_backend is not None)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, mesh, dims, cfg, backend=scenario.compile_backend)
    model.to_empty(device="cpu")
    model.init_weights(seed=SEED)
    reference = Transformer(args)
    reference.init_weights(seed=SEED)
    return train_beside_reference(model, reference, mesh, args.vocab_size, args.max_seq_len)


def train_beside_reference(model: torch.nn.Module, reference: torch.nn.Module, mesh,
                           vocab_size: int, seq_len: int, *,
                           loss_of=None, after_step=None,
                           packed: bool = True) -> dict[str, float]:
    """Train `model` (sharded over `mesh`, this rank's data-parallel slice of each global batch)
    and the unsharded `reference` (the whole global batch) side by side for STEPS steps with the
    project's AdamW and clipping; the differences measured. `loss_of(model, inputs, targets,
    *documents)` replaces the cross entropy; `after_step(model)` runs after each optimizer step;
    with `packed`, odd steps pack several documents into each row (document masking)."""
    loss_of = loss_of or (lambda m, x, y, *d: F.cross_entropy(m(x, *d).flatten(0, 1),
                                                              y.flatten()))
    init_diff = _weight_difference(model, reference, absolute=True)
    replicas, dp_rank = data_parallel_rank(mesh)

    optimizer = build_optimizer(model, OPTIM)
    ref_optimizer = build_optimizer(reference, OPTIM)
    data = torch.Generator().manual_seed(1)
    loss_diff = norm_diff = 0.0
    for step in range(STEPS):
        tokens = torch.randint(vocab_size, (replicas * MICRO_BATCH, seq_len + 1), generator=data)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        documents = []
        if packed:  # odd steps: rows pack documents (one starts where a draw falls under 0.2)
            starts = torch.rand(inputs.shape, generator=data) < 0.2
            documents = [starts.cumsum(dim=1, dtype=torch.int32)] if step % 2 else []
        mine = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
        losses, norms = [], []
        for m, opt, clip, rows in ((model, optimizer, clip_grad_norm, mine),
                                   (reference, ref_optimizer, torch.nn.utils.clip_grad_norm_,
                                    slice(None))):
            loss = loss_of(m, inputs[rows], targets[rows], *(d[rows] for d in documents))
            loss.backward()
            norms.append(clip(m.parameters(), MAX_NORM))
            opt.step()
            opt.zero_grad()
            if after_step is not None:
                after_step(m)
            losses.append(loss.detach().clone())
        mean_loss, ref_loss = losses
        dist.all_reduce(mean_loss)  # tp peers count their shared loss alike: a plain mean works
        mean_loss /= dist.get_world_size()
        loss_diff = max(loss_diff, abs(mean_loss.item() - ref_loss.item()))
        norm_diff = max(norm_diff, abs(norms[0].item() - norms[1].item()) / norms[1].item())
    return {"init_abs_diff": init_diff, "loss_diff": loss_diff, "grad_norm_rel_diff": norm_diff,
            "weight_rel_diff": _weight_difference(model, reference)}


def _weight_difference(model: torch.nn.Module, reference: torch.nn.Module, *,
                       absolute: bool = False) -> float:
    """Largest ||w - w_ref|| / ||w_ref|| (or largest |w - w_ref| with absolute=True) over
    parameters, each gathered whole."""
    ref = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        expected = ref[name.replace("_checkpoint_wrapped_module.", "")]
        diff = ((full - expected).abs().max() if absolute
                else (full - expected).norm() / expected.norm())
        worst = max(worst, diff.item())
    return worst


def diverged_tp_ranks() -> str:
    """A norm weight (which tensor parallel keeps whole) that differs between TP ranks: the
    check must refuse to go on. Returns its message, or "" if it let the model through."""
    mesh = init_device_mesh("cpu", (1, 2, 1, 2), mesh_dim_names=DIMS)
    torch.manual_seed(0)
    model = Transformer(ARGS)
    with torch.no_grad():
        model.norm.weight.add_(dist.get_rank())
    try:
        parallelize(model, mesh, ParallelDims((1, 2, 1, 2)), ParallelismConfig())
    except RuntimeError as exc:
        return str(exc)
    return ""


def main() -> None:
    dist.init_process_group("gloo")
    results: dict[str, object] = {}
    for scenario in SCENARIOS:
        if dist.get_rank() == 0:
            print("scenario", scenario.name, flush=True)
        results[scenario.name] = run(scenario)
    results["diverged_error"] = diverged_tp_ranks()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
