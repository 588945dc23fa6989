"""The planner for models with routed experts: expert parallel as a dim borrowed from dp_shard,
its memory and all-to-all checked by hand, the rules it keeps (experts split evenly, FSDP can
shard what is left, the scale-up domain, hardware without an EP backend) and the shipped MoE
recipes at full scale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, load
from trainer.models.registry import shape_of
from trainer.plan import Candidate, candidates, choose

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=moe_tiny", "data.seq_len=64", "data.micro_batch_size=2"]


def auto(*overrides: str) -> RunConfig:
    return load(["parallelism=auto", *TINY, *overrides])


def found(run: RunConfig, shape: tuple[int, ...], ep: int, ac: bool = False) -> Candidate:
    return next(c for c in candidates(run) if c.dims.shape == shape and c.dims.ep == ep
                and c.dims.activation_checkpointing == ac)


def test_ep_degrees_are_the_divisors_of_dp_shard_that_split_the_experts():
    run = auto("trainer.devices=8")
    eps = sorted({c.dims.ep for c in candidates(run) if c.dims.shape == (1, 8, 1, 1)})
    assert eps == [1, 2, 4, 8]  # 8 experts
    run = auto("trainer.devices=8", "model.n_experts=6", "model.top_k=2")
    eps = sorted({c.dims.ep for c in candidates(run) if c.dims.shape == (1, 8, 1, 1)})
    assert eps == [1, 2]
    dense = load(["parallelism=auto", "trainer.devices=8"])  # a Llama: no expert parallel
    assert {c.dims.ep for c in candidates(dense)} == {1}


def test_expert_memory_by_hand():
    """FSDP shards every parameter over all 8 ranks whatever ep is; what ep changes is the
    experts' unit FSDP gathers (its local experts) and the busiest rank's routed activations."""
    run = auto("trainer.devices=8")
    a = shape_of(run.model)
    d, e, f, n_moe = 128, 8, 128, 3  # moe_tiny: 3 of 4 layers route
    experts = 3 * d * f * e
    attention = 2 * d * 128 + 2 * d * 64  # wq, wo (4 x 32) and wk, wv (2 x 32)
    moe_block = attention + d * e + 2 * d + 2 * 32  # + router, norms, q/k norms
    dense_block = attention + 3 * d * 384 + 2 * d + 2 * 32
    total = n_moe * (moe_block + experts) + dense_block + 2 * 256 * d + d
    assert a.num_params() == total
    for ep in (1, 2, 4, 8):
        memory = found(run, (1, 8, 1, 1), ep).estimate.memory
        assert memory["params"] == pytest.approx(4 * total / 8)
        # two gathered units and a gradient unit: the largest is the experts' local share
        largest = max(experts / ep, moe_block, dense_block)
        assert memory["fsdp_buffers"] == pytest.approx(largest * (2 * 4 + 4))
    one, two = (found(run, (1, 8, 1, 1), ep).estimate.memory["activations"] for ep in (1, 2))
    routed = n_moe * 2 * (2 * 4 * d + 4 * 4 * f + 16 + 4)  # top_k copies per token
    assert two - one == pytest.approx(0.25 * 128 * routed)  # plan.expert_load 1.25, 128 tokens


def test_all_to_all_and_imbalanced_compute_by_hand():
    run = auto("trainer.devices=8")
    a = shape_of(run.model)
    one, four = (found(run, (1, 8, 1, 1), ep).estimate for ep in (1, 4))
    tokens = 128  # a rank's micro-batch
    # per MoE layer: dispatch and combine forward and backward, top_k copies of 4-byte rows,
    # 3 of 4 going to other ranks; the busiest rank gets 1.25x: on cpu's 10 GB/s
    sent = 1.25 * tokens * 3 * 4 * 2 * 128 * 4 * 3 / 4
    assert four.time["ep"] == pytest.approx(sent / 10e9)
    assert one.time["ep"] == 0
    extra = 0.25 * a.routed_flops_per_token() * tokens
    assert four.time["compute"] - one.time["compute"] == pytest.approx(extra / (0.2e12 * 0.4))


def test_hardware_without_an_ep_backend_plans_without_it_and_refuses_it_in_one_line():
    run = load(["experiment=qwen3_235b_a22b_trn3_ultraserver", "hardware=trn2_ultraserver",
                "cluster.nodes=16"])
    chosen = choose(run)
    assert chosen.dims.ep == 1 and chosen.feasible
    assert all(not c.feasible for c in candidates(run) if c.dims.ep > 1)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.plan", "experiment=qwen3_235b_a22b_trn3_ultraserver",
         "hardware=trn2_ultraserver", "cluster.nodes=16", "parallelism=fsdp",
         "parallelism.ep=8"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "config error: parallelism.ep=8: trn2_ultraserver's software stack has no "
        "expert-parallel backend"), proc.stderr


def test_auto_keeps_expert_parallel_inside_the_scale_up_domain_and_says_why():
    # h100: the NVLink domain is one 8-GPU node; 4 nodes
    run = load(["model=qwen3_30b_a3b", "hardware=h100", "cluster.nodes=4",
                "parallelism=auto", "data.seq_len=4096", "data.micro_batch_size=1",
                "trainer.precision=bf16-mixed", "parallelism.param_dtype=bfloat16"])
    chosen = choose(run)
    assert chosen.dims.ep > 1 and chosen.estimate.links["ep"] == "node"
    across = found(run, (1, 32, 1, 1), 16)
    assert str(across.reason) == (
        "parallelism.ep=16: its groups of 16 (x tp=1) ranks would cross h100's scale-up domain "
        "(8 ranks): expert parallel's all-to-all stays on the domain's own links, never EFA")


def test_explicit_expert_parallel_is_checked():
    with pytest.raises(ConfigError) as err:
        choose(load([*TINY, "parallelism=fsdp", "trainer.devices=4", "parallelism.ep=3"]))
    assert str(err.value) == ("parallelism.ep=3: must divide parallelism.dp_shard=4: expert "
                              "parallel borrows its ranks from it")
    with pytest.raises(ConfigError) as err:
        choose(load(["parallelism=fsdp", "trainer.devices=4", "parallelism.ep=2"]))
    assert err.value.key == "parallelism.ep" and "has no experts" in str(err.value)
    with pytest.raises(ConfigError, match=r"parallelism\.ep=0: must be a positive size"):
        load(["parallelism.ep=0"])
    chosen = choose(load([*TINY, "parallelism=fsdp", "trainer.devices=4", "parallelism.ep=2"]))
    assert (chosen.dims.dp_shard, chosen.dims.ep) == (4, 2)
    assert chosen.dims.mesh_str == "1x4x1x1 ep2"


def test_a_mesh_fsdp_cannot_shard_the_experts_of_is_refused():
    # 576 ranks = 2^6 x 9: ep 8 leaves 72 ranks for [16, 1536, 4096] expert stacks
    run = load(["experiment=qwen3_235b_a22b_trn3_ultraserver"])
    reason = found(run, (1, 576, 1, 1), 8, ac=True).reason
    assert str(reason).startswith("parallelism.ep=8: leaves each rank's experts [16, 1536, 4096] "
                                  "to FSDP over 72 ranks, which divide none of those dims")


@pytest.mark.parametrize(("experiment", "ranks"), [("qwen3_235b_a22b_trn3_ultraserver", 576),
                                                   ("qwen3_235b_a22b_gb200_nvl72", 72)])
def test_the_shipped_moe_recipes_plan_expert_parallel_inside_their_domain(experiment, ranks):
    chosen = choose(load([f"experiment={experiment}"]))
    assert chosen.feasible and chosen.dims.world_size == ranks
    assert chosen.dims.ep > 1 and chosen.estimate.links["ep"] != "inter"
    assert chosen.estimate.time["ep"] > 0


def test_the_cli_prints_the_ep_column_and_total_against_active_parameters():
    proc = subprocess.run([sys.executable, "-m", "trainer.plan", *TINY, "trainer.devices=4"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "┃ ep ┃" in proc.stdout and "links tp/fsdp/rep/ep" in proc.stdout
    assert "moe_tiny: 1.59M parameters, 0.71M active per token (2 of 8 experts)" in proc.stdout


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("changes", [[], ["model.n_shared_experts=1", "model.n_dense_layers=0"]])
def test_activation_estimate_matches_what_autograd_saves(precision, changes):
    import torch

    from trainer.models.moe.model import Transformer

    run = load(["model=moe_tiny", "model.n_layers=3", "model.vocab_size=64",
                "model.max_seq_len=64", "data.seq_len=64", "data.micro_batch_size=2",
                f"trainer.precision={precision}", *changes])
    estimate = choose(run).estimate.memory  # one rank: every routed copy is its own
    torch.manual_seed(0)
    model = Transformer(shape_of(run.model))
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), autocast:
        model(torch.randint(64, (2, 64)))
    # under autocast the saved tensors include its 16-bit copies of the weights (the experts'
    # stacks cast once per layer)
    expected = estimate["activations"] + estimate["autocast_weights"]
    assert sum(saved.values()) == pytest.approx(expected, rel=0.02)
