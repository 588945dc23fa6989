"""`parallelize()`: the layout it gives each parameter (one process, PyTorch's fake process group,
meta device), and training that matches an unsharded model (four real gloo processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from trainer.config import ParallelismConfig
from trainer.models.llama.model import Transformer
from trainer.models.llama.parallelize import parallelize
from trainer.models.llama.shape import LlamaArgs
from trainer.models.parallel import mixed_precision_policy
from trainer.plan import ParallelDims
from trainer.validate_plan import fake_world

ROOT = Path(__file__).resolve().parents[2]
DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=128,
                 max_seq_len=16)


def parallelized(shape: tuple[int, int, int, int], *, args: LlamaArgs = ARGS,
                 **options) -> Transformer:
    """The meta-device model as rank 0 of a fake world of the mesh's size lays it out."""
    world = shape[0] * shape[1] * shape[2] * shape[3]
    with fake_world(0, world):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=DIMS)
        with torch.device("meta"):
            model = Transformer(args)
        dims = ParallelDims(shape, options.pop("activation_checkpointing", False))
        return parallelize(model, mesh, dims, ParallelismConfig(**options))


def layout(param: torch.Tensor) -> dict[str, object]:
    """{mesh dim name: placement} of a DTensor parameter; {} for a plain tensor."""
    if not isinstance(param, DTensor):
        return {}
    return dict(zip(param.device_mesh.mesh_dim_names, param.placements, strict=True))


# ------------------------------------------------------------------------------------------------
# Layout, one process


def test_tensor_parallel_splits_projections_megatron_style_and_fsdp_shards_dim_0():
    model = parallelized((2, 2, 1, 2))
    block = model.layers["0"]
    # column-parallel: tp splits the output rows; FSDP then splits dim 0 again, strided
    for linear in (block.attention.wq, block.attention.wk, block.feed_forward.w1):
        placements = layout(linear.weight)
        assert placements["tp"] == Shard(0)
        assert isinstance(placements["dp_shard"], _StridedShard)
        assert placements["dp_replicate"] == Replicate()
    # row-parallel: tp splits the input columns; FSDP the rows
    for linear in (block.attention.wo, block.feed_forward.w2):
        assert layout(linear.weight) == {"dp_replicate": Replicate(), "dp_shard": Shard(0),
                                         "tp": Shard(1)}
    # vocabulary-parallel embedding and head
    assert layout(model.tok_embeddings.weight)["tp"] == Shard(0)
    assert layout(model.output.weight)["tp"] == Shard(0)
    # norms are whole on every tp rank: only HSDP touches them
    assert layout(block.attention_norm.weight) == {"dp_replicate": Replicate(),
                                                   "dp_shard": Shard(0)}


def test_sequence_parallel_puts_the_norms_on_the_tp_mesh():
    model = parallelized((1, 2, 1, 2), sequence_parallel=True)
    for norm in (model.layers["1"].ffn_norm, model.norm):
        assert layout(norm.weight) == {"dp_shard": Shard(0), "tp": Replicate()}


def test_fsdp_units_are_the_blocks_the_embedding_and_norm_with_head_then_the_root():
    model = parallelized((1, 4, 1, 1))
    units = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    # fully_shard([norm, output]) makes both FSDP modules of one group
    assert units == {"", "layers.0", "layers.1", "tok_embeddings", "norm", "output"}
    assert all(layout(p) == {"dp_shard": Shard(0)} for p in model.parameters())


def test_tied_embeddings_stay_one_parameter_under_tp_and_fsdp():
    model = parallelized((1, 2, 1, 2), args=LlamaArgs(**{**ARGS.__dict__,
                                                         "tie_embeddings": True}))
    assert model.output.weight is model.tok_embeddings.weight
    assert not isinstance(model.tok_embeddings, FSDPModule)  # the root's unit holds it


def test_tensor_parallel_alone_uses_no_fsdp():
    model = parallelized((1, 1, 1, 2))
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert layout(model.layers["0"].attention.wq.weight) == {"tp": Shard(0)}
    assert not isinstance(model.norm.weight, DTensor)


def test_checkpointing_wraps_blocks_without_changing_state_dict_keys():
    plain = parallelized((1, 2, 1, 1))
    checkpointed = parallelized((1, 2, 1, 1), activation_checkpointing=True)
    wrapped = [name for name, _ in checkpointed.named_parameters()
               if "._checkpoint_wrapped_module." in name]
    assert len(wrapped) == 2 * 9  # every parameter of both blocks
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()


def test_a_single_rank_mesh_leaves_the_model_alone():
    model = parallelized((1, 1, 1, 1))
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert not any(isinstance(m, FSDPModule) for m in model.modules())


def test_mixed_precision_policy_follows_the_parallelism_dtypes():
    policy = mixed_precision_policy(ParallelismConfig(param_dtype="bfloat16",
                                                      reduce_dtype="float32"))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(ParallelismConfig()).param_dtype is None


# ------------------------------------------------------------------------------------------------
# Training, four processes


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    """tests/models/parallel_worker.py under torchrun: 4 gloo ranks, every scenario."""
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
         "--standalone", "-m", "tests.models.parallel_worker", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


SCENARIOS = ["fsdp2_x_tp_sequence_parallel_tied_checkpointed", "hsdp", "replicas_x_tp",
             "tp4_sequence_parallel_compiled", "fsdp2_x_tp_compiled_checkpointed"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_training_matches_one_process(worker_results, scenario):
    result = worker_results[scenario]
    # float32 sums in another order differ by ~1e-6; a wrong split of heads, batches or
    # gradients moves the loss by 1e-2 or more and the weights by tens of percent
    assert result["init_abs_diff"] == 0.0  # born sharded, the same weights as one process
    assert result["loss_diff"] < 1e-4
    assert result["grad_norm_rel_diff"] < 1e-4
    assert result["weight_rel_diff"] < 1e-3


@pytest.mark.slow
def test_weights_that_differ_across_tp_ranks_are_refused(worker_results):
    assert "norm.weight" in worker_results["diverged_error"]
    assert "differ between TP ranks" in worker_results["diverged_error"]
