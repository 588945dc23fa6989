"""The mesh planner: factorizations, rejection reasons, estimates checked by hand, auto plans for
the UltraServer-sized cases, and the `python -m trainer.plan` command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

from trainer.config import MESH_DIMS, ConfigError, RunConfig, load
from trainer.hardware import GIB, HardwareSpec
from trainer.models.llama.model import Transformer
from trainer.models.llama.shape import LlamaArgs
from trainer.models.registry import shape_of
from trainer.plan import Candidate, ParallelDims, RunFacts, candidates, choose
from trainer.plan.planner import dim_links

REPO = Path(__file__).resolve().parents[1]
# What large runs use: one 8k sequence per rank, bf16 compute, FSDP gathering bf16 weights.
LARGE = ["data.seq_len=8192", "data.micro_batch_size=1", "trainer.precision=bf16-mixed",
         "parallelism.param_dtype=bfloat16"]


def auto(*overrides: str) -> RunConfig:
    return load(["parallelism=auto", *overrides])


def by_shape(found: list[Candidate], shape: tuple[int, ...], ac: bool = False) -> Candidate:
    return next(c for c in found
                if c.dims.shape == shape and c.dims.activation_checkpointing == ac)


# --- factorizations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("devices", "factorizations"), [
    (1, 1),
    # 8 = 2^3: ordered (replicate, shard, tp) with exponents summing to 3: C(5, 2) = 10
    (8, 10),
    # 12 = 2^2 x 3: C(4, 2) ways for the 2s times C(3, 2) for the 3 = 18
    (12, 18),
])
def test_every_factorization_is_a_candidate_with_and_without_checkpointing(devices,
                                                                           factorizations):
    found = candidates(auto(f"trainer.devices={devices}"))
    assert len(found) == 2 * factorizations
    assert len({(c.dims.shape, c.dims.activation_checkpointing) for c in found}) == len(found)
    assert all(c.dims.world_size == devices and c.dims.cp == 1 for c in found)


def test_mesh_dims_are_outermost_first_and_tp_varies_fastest():
    p = ParallelDims((2, 3, 1, 4))
    assert p.dim_names == MESH_DIMS == ("dp_replicate", "dp_shard", "cp", "tp")
    assert p.shape == (2, 3, 1, 4) and p.world_size == 24 and p.dp_size == 6
    # torch lays a mesh out row-major over the ranks: the reference for every coordinate
    layout = torch.arange(24).reshape(p.shape)
    for coords in product(*(range(n) for n in p.shape)):
        rank = int(layout[coords])
        assert tuple(p.coordinates(rank).values()) == coords


# --- topology ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "ranks_per_node", "nodes_per_domain"), [
    ((2, 72, 1, 1), 4, 18),  # two NVL72 racks
    ((2, 36, 1, 4), 4, 18),
    ((1, 8, 1, 3), 8, 1),  # tp=3 on 8-rank nodes: some groups straddle
    ((4, 2, 1, 3), 6, 2),
    ((1, 4, 1, 64), 64, 4),  # a Trn2 UltraServer: 4 nodes, one domain
])
def test_each_dim_gets_the_slowest_link_its_groups_cross(shape, ranks_per_node, nodes_per_domain):
    world = math.prod(shape)
    run = auto(f"trainer.devices={ranks_per_node}",
               f"cluster.nodes={world // ranks_per_node}",
               f"hardware.nodes_per_domain={nodes_per_domain}")
    links = dim_links(RunFacts.of(run).topology, shape)

    layout = torch.arange(world).reshape(shape)
    for axis, name in enumerate(MESH_DIMS):
        groups = layout.movedim(axis, -1).reshape(-1, shape[axis])  # one row per group
        nodes = groups // ranks_per_node
        domains = groups // (ranks_per_node * nodes_per_domain)
        if (nodes == nodes[:, :1]).all():
            expected = "node"
        elif (domains == domains[:, :1]).all():
            expected = "domain"
        else:
            expected = "inter"
        assert links[name] == expected, name


# --- rejections --------------------------------------------------------------------------------


def reason_of(run: RunConfig, shape: tuple[int, ...], ac: bool = False) -> str:
    found = by_shape(candidates(run), shape, ac)
    assert found.reason is not None, f"{shape} should be rejected"
    return str(found.reason)


def test_tp_must_divide_the_query_heads():
    # tiny: 8 heads, 4 KV heads
    assert reason_of(auto("trainer.devices=6"), (1, 2, 1, 3)) == (
        "parallelism.tp=3: does not divide model.n_heads=8")


def test_tp_must_divide_the_kv_heads():
    run = auto("trainer.devices=4", "model.n_kv_heads=2")
    assert reason_of(run, (1, 1, 1, 4)) == "parallelism.tp=4: does not divide model.n_kv_heads=2"


def test_tp_never_spans_nodes():
    run = auto("hardware=gb200_nvl72", "cluster.nodes=2", "model=llama3_8b", *LARGE)
    assert reason_of(run, (1, 1, 1, 8)).startswith("parallelism.tp=8: spans nodes")


def test_tp_groups_may_not_straddle_nodes():
    # 6 GPUs used per node: tp=4 fits in a node's count but groups 4..7 cross into the next node
    run = auto("hardware=h100", "trainer.devices=6", "cluster.nodes=2", "model=llama3_8b", *LARGE)
    assert "straddle" in reason_of(run, (1, 3, 1, 4))


def test_a_plan_that_does_not_fit_in_memory_names_the_need_and_the_hardware():
    # 70B replicated on every GPU: 16 bytes per parameter alone are ~1 TiB per rank
    run = auto("hardware=h100", "model=llama3_70b", *LARGE)
    reason = reason_of(run, (8, 1, 1, 1))
    assert reason.startswith("parallelism=8x1x1x1: needs ")
    need = float(reason.split("needs ")[1].split(" GiB")[0])
    assert need > 16 * 70e9 / GIB
    assert "h100 has 80.0 GiB (72.0 usable at plan.memory_headroom=0.9)" in reason


def test_the_data_parallel_size_must_divide_the_global_batch():
    run = auto("trainer.devices=4", "data.global_batch_size=16")  # micro batch 8
    assert reason_of(run, (1, 4, 1, 1)) == ("data.global_batch_size=16: must be a multiple of "
                                            "data.micro_batch_size x data-parallel size = "
                                            "8 x 4 = 32")
    assert by_shape(candidates(run), (1, 2, 1, 2)).feasible


def test_a_dim_over_a_link_the_hardware_lacks_is_rejected():
    run = auto("cluster.nodes=2")  # cpu: no link between nodes
    assert "parallelism.dp_replicate=2: crosses the inter link" in reason_of(run, (2, 1, 1, 1))


def test_an_explicit_plan_that_cannot_run_raises_with_the_key():
    run = load(["parallelism=fsdp_tp", "trainer.devices=4", "parallelism.tp=4",
                "model.n_kv_heads=2"])
    with pytest.raises(ConfigError) as err:
        choose(run)
    assert err.value.key == "parallelism.tp" and err.value.value == 4


def test_an_explicit_plan_must_multiply_to_the_world_size():
    run = load(["parallelism=fsdp_tp", "trainer.devices=4"])
    run.parallelism.dp_shard = 4  # the dims now multiply to 8 on 4 ranks
    with pytest.raises(ConfigError, match="must equal the world size 4"):
        choose(run)


def test_an_explicit_plan_too_big_suggests_checkpointing_when_that_fits():
    run = load(["hardware=gb200_nvl72", "cluster.nodes=36", "model=llama3_405b",
                "parallelism=fsdp", *LARGE])
    with pytest.raises(ConfigError, match=r"with parallelism\.activation_checkpointing=true it "
                                          r"needs \d"):
        choose(run)


# --- explicit plans ----------------------------------------------------------------------------


def test_minus_one_fills_the_dim_from_the_world_size():
    chosen = choose(load(["parallelism=fsdp_tp", "trainer.devices=8"]))  # dp_shard=-1, tp=2
    assert chosen.dims.shape == (1, 4, 1, 2) and chosen.feasible


def test_the_default_run_is_one_rank():
    assert choose(load()).dims.shape == (1, 1, 1, 1)


# --- estimates, checked by hand ----------------------------------------------------------------

# tiny: dim 256, 4 layers, 8 heads of 32, 4 KV heads (kv dim 128), ffn 768, vocab 256
BLOCK_MATMUL = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768  # wq wo, wk wv, w1 w2 w3 = 786,432
BLOCK_NORMS = 2 * 256
TABLE = 256 * 256  # embedding; the head is the same size
TOTAL = 4 * (BLOCK_MATMUL + BLOCK_NORMS) + 2 * TABLE + 256
TOKENS = 8 * 256  # micro batch x seq_len
# Document masking (on by default): per token, the block-causal mask's row of seq_len entries in
# the compute dtype, kept once for every layer, and cos and sin at the token's position in its
# document (head_dim / 2 each) in the parameters' dtype.
MASK_FP32 = 256 * 4 + 32 * 4
MASK_BF16_COMPUTE = 256 * 2 + 32 * 4


def test_parameter_count_agrees_with_the_model():
    assert TOTAL == 3_279_104 == LlamaArgs().num_params() == LlamaArgs().param_counts().total
    tied = LlamaArgs(tie_embeddings=True)
    assert tied.param_counts().total == TOTAL - TABLE == tied.num_params()
    assert sum(p.numel() for p in Transformer(LlamaArgs()).parameters()) == TOTAL


def test_memory_of_fsdp_in_fp32_by_hand():
    found = by_shape(candidates(auto("trainer.devices=2")), (1, 2, 1, 1))
    per_rank = TOTAL / 2  # FSDP over 2 ranks
    # all fp32: a norm saves its input and scaled output, which the next matmuls save once; then
    # q, k (kv wide), v (kv wide) and the attention output; SwiGLU four ffn-wide tensors
    norm = (4 + 4) * 256
    block = 2 * (norm + 4 * 256) + 4 * (2 * 256 + 2 * 128 + 4 * 768)
    final_norm = norm + 4 * 256  # and the head's input
    assert found.estimate.memory == pytest.approx({
        "params": 4 * per_rank,
        "grads": 4 * per_rank,
        "optimizer": 8 * per_rank,
        "autocast_weights": 0,
        # the largest FSDP unit is a block: two gathered copies plus its unsharded gradient
        "fsdp_buffers": (BLOCK_MATMUL + BLOCK_NORMS) * (4 + 4 + 4),
        "ddp_buckets": 0,
        "activations": TOKENS * (4 * block + final_norm + MASK_FP32),
        "logits": TOKENS * 256 * (4 + 4 + 4),  # logits, fp32 log-softmax, its gradient
    })
    with_ac = by_shape(candidates(auto("trainer.devices=2")), (1, 2, 1, 1), ac=True)
    # each block keeps its fp32 input; one block is recomputed at a time
    assert with_ac.estimate.memory["activations"] == pytest.approx(
        TOKENS * (4 * 4 * 256 + block + final_norm + MASK_FP32))


def test_memory_of_tensor_parallel_under_bf16_autocast_by_hand():
    run = auto("trainer.devices=2", "trainer.precision=bf16-mixed")
    found = by_shape(candidates(run), (1, 1, 1, 2))
    tp_split = 4 * BLOCK_MATMUL + 2 * TABLE
    norms = 4 * BLOCK_NORMS + 256
    per_rank = tp_split / 2 + norms
    # residual stream fp32 under autocast; each matmul saves its own bf16 cast of the normed
    # input (wq, wk, wv; w1, w3); tp halves the attention and SwiGLU tensors
    norm = (4 + 4) * 256
    block = 2 * norm + 5 * 2 * 256 + 2 * (2 * 256 + 2 * 128 + 4 * 768) / 2
    final_norm = norm + 2 * 256
    assert found.estimate.memory == pytest.approx({
        "params": 4 * per_rank,
        "grads": 4 * per_rank,
        "optimizer": 8 * per_rank,
        "autocast_weights": 2 * (4 * BLOCK_MATMUL + TABLE) / 2,  # bf16 copy of local matmuls
        "fsdp_buffers": 0,
        "ddp_buckets": 0,
        "activations": TOKENS * (4 * block + final_norm + MASK_BF16_COMPUTE),
        "logits": TOKENS * 256 * (2 + 4 + 4 + 2),  # + the bf16 logits' own gradient
    })


def saved_bytes(model: Transformer, precision: str, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass (weights aside)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), autocast:
        model(*inputs)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_activation_estimate_matches_what_autograd_saves(precision):
    shape = ["model.dim=128", "model.n_layers=3", "model.ffn_dim=384", "model.vocab_size=64",
             "model.max_seq_len=256", "data.seq_len=256", "data.micro_batch_size=2",
             f"trainer.precision={precision}"]
    plain = choose(load([*shape, "data.document_mask=false"])).estimate.memory
    masked = choose(load([*shape, "data.document_mask=true"])).estimate.memory
    torch.manual_seed(0)
    model = Transformer(shape_of(load(shape).model))
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    tokens = torch.randint(64, (2, 256))
    # two rows packing 3 and 1 documents
    documents = torch.tensor([[0] * 40 + [1] * 160 + [2] * 56, [0] * 256], dtype=torch.int32)
    without, with_mask = (saved_bytes(model, precision, tokens),
                          saved_bytes(model, precision, tokens, documents))
    # under autocast the saved tensors include its 16-bit copies of the weights
    assert without == pytest.approx(plain["activations"] + plain["autocast_weights"], rel=0.02)
    assert with_mask == pytest.approx(masked["activations"] + masked["autocast_weights"],
                                      rel=0.02)
    # What masking adds, on its own (about a tenth of the whole here). The plain pass keeps
    # slices of the rotary buffers themselves, which the masked one replaces by tables gathered
    # per token.
    buffers = model.rope_cos.nbytes + model.rope_sin.nbytes
    assert with_mask - without + buffers == pytest.approx(
        masked["activations"] - plain["activations"], rel=0.02)


def test_plain_data_parallel_holds_whole_copies_and_a_bucketed_gradient():
    found = by_shape(candidates(auto("trainer.devices=2")), (2, 1, 1, 1))
    assert found.estimate.memory["params"] == 4 * TOTAL
    assert found.estimate.memory["optimizer"] == 8 * TOTAL
    assert found.estimate.memory["ddp_buckets"] == 4 * TOTAL
    assert found.estimate.memory["fsdp_buffers"] == 0


def test_step_time_of_one_rank_is_its_compute_at_the_assumed_mfu():
    found = choose(load()).estimate
    # 6 x non-embedding parameters + 12 x layers x dim x seq_len FLOPs per token
    flops = (6 * (TOTAL - TABLE) + 12 * 4 * 256 * 256) * TOKENS
    cpu = HardwareSpec.load("cpu")
    assert found.step_seconds == pytest.approx(flops / (0.2e12 * 0.4))
    assert found.tokens_per_s == pytest.approx(TOKENS / found.step_seconds)
    assert found.mfu == pytest.approx(0.4)
    assert cpu.peak_flops_per_rank() == 0.2e12


def test_tensor_parallel_traffic_by_hand():
    found = by_shape(candidates(auto("trainer.devices=2")), (1, 1, 1, 2))
    hidden = TOKENS * 256 * 4  # one fp32 [tokens, dim] activation
    # a 2-rank ring all-reduce sends the whole tensor once; an all-gather half of it
    sent = (4 * 4 * hidden  # 4 all-reduces per block
            + hidden  # embedding output
            + TOKENS * 256 * 4 / 2  # logits all-gather
            + hidden)  # head input gradient
    assert found.estimate.time["tp"] == pytest.approx(sent / 10e9)  # cpu: 10 GB/s in a node


# --- auto ----------------------------------------------------------------------------------


def assert_sound(chosen: Candidate, run: RunConfig) -> None:
    hw = HardwareSpec(run.hardware)
    dims, estimate = chosen.dims, chosen.estimate
    assert chosen.feasible and dims.world_size == run.world_size
    assert estimate.memory_bytes_per_rank <= hw.memory_bytes_per_rank * 0.9
    # every tp group lies inside one node, in torchrun's node-major rank numbering
    layout = torch.arange(dims.world_size).reshape(dims.shape)
    tp_groups = layout.reshape(-1, dims.tp)
    nodes = tp_groups // run.ranks_per_node
    assert (nodes == nodes[:, :1]).all()
    assert estimate.links["fsdp"] != "inter"  # sharding stays inside a domain


def test_auto_picks_the_fastest_feasible_plan():
    run = auto("trainer.devices=8")
    found = candidates(run)
    chosen = choose(run)
    assert_sound(chosen, run)
    assert chosen.estimate.tokens_per_s == max(c.estimate.tokens_per_s for c in found
                                               if c.feasible)


def test_llama3_8b_on_a_trn2_ultraserver():
    run = auto("model=llama3_8b", "hardware=trn2_ultraserver", "cluster.nodes=4", *LARGE)
    assert run.world_size == 256
    assert_sound(choose(run), run)


def test_llama3_70b_on_a_trn3_ultraserver():
    run = auto("model=llama3_70b", "hardware=trn3_ultraserver", "cluster.nodes=36", *LARGE)
    assert run.world_size == 576
    assert_sound(choose(run), run)


def test_llama3_405b_on_two_gb200_nvl72_racks():
    run = auto("model=llama3_405b", "hardware=gb200_nvl72", "cluster.nodes=36", *LARGE)
    chosen = choose(run)
    assert_sound(chosen, run)
    assert chosen.dims.dp_replicate >= 2 and chosen.estimate.links["dp_replicate"] == "inter"


def test_among_equally_fast_plans_sharding_stays_inside_the_domain():
    # 4 sequences per GPU: FSDP traffic hides behind compute even across racks, so sharding over
    # both racks is as fast as over one and uses less memory; auto still keeps it in one
    run = auto("model=llama3_8b", "hardware=gb200_nvl72", "cluster.nodes=36", *LARGE,
               "data.micro_batch_size=4")
    chosen = choose(run)
    tp = chosen.dims.tp
    across = by_shape(candidates(run), (1, 144 // tp, 1, tp), chosen.dims.activation_checkpointing)
    assert across.feasible and across.estimate.links["fsdp"] == "inter"
    assert across.estimate.tokens_per_s == pytest.approx(chosen.estimate.tokens_per_s)
    assert across.estimate.memory_bytes_per_rank < chosen.estimate.memory_bytes_per_rank
    assert chosen.estimate.links["fsdp"] == "domain"


def test_auto_reports_why_nothing_fits():
    # fp32 weights under autocast leave a 16-bit copy of every weight on each rank
    run = auto("model=llama3_405b", "hardware=gb200_nvl72", "cluster.nodes=36",
               "data.seq_len=8192", "data.micro_batch_size=1", "trainer.precision=bf16-mixed")
    with pytest.raises(ConfigError, match=r"autocast_weights .*parallelism\.param_dtype=bfloat16"):
        choose(run)


# --- command line ------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_prints_the_table_and_writes_the_chosen_plan(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("parallelism=auto", "trainer.devices=4", f"plan.output={out}")
    assert result.returncode == 0, result.stderr
    marked = [line for line in result.stdout.splitlines() if "->" in line]
    assert len(marked) == 1
    written = json.loads(out.read_text())
    assert written["world_size"] == 4 and written["reason"] is None
    shape = [written[d] for d in MESH_DIMS]
    assert shape == written["shape"] and math.prod(shape) == 4
    cells = [cell.strip() for cell in marked[0].split("│")]
    assert cells[2:6] == [str(n) for n in shape]  # the marked row is the plan written


def test_cli_refuses_a_bad_plan_in_one_line_with_exit_2():
    result = run_cli("parallelism=fsdp_tp", "parallelism.tp=3", "trainer.devices=6")
    assert result.returncode == 2
    # the refusal names what would fit: 6 ranks shard the tiny model 6 ways
    assert result.stderr.strip().splitlines() == [
        "config error: parallelism.tp=3: does not divide model.n_heads=8; parallelism=auto fits: "
        "dp_replicate=1 x dp_shard=6 x cp=1 x tp=1"]
    assert result.stdout == ""


def test_cli_refuses_a_bad_override_in_one_line(capsys):
    from trainer.plan.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["hardware=no_such_machine"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_machine" in err


def test_cli_help(capsys):
    from trainer.plan.__main__ import main

    assert main(["--help"]) == 0
    assert "usage: python -m trainer.plan" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The plan is the default: auto, with explicit dims as constraints


def test_auto_is_the_default_and_fits_70b_on_a_trn3_ultraserver():
    run = load(["model=llama3_70b", "hardware=trn3_ultraserver", "cluster.nodes=36"])
    assert run.parallelism.name == "auto"
    chosen = choose(run)
    assert chosen.feasible and chosen.dims.world_size == 576
    budget = HardwareSpec(run.hardware).memory_bytes_per_rank * run.plan.memory_headroom
    assert chosen.estimate.memory_bytes_per_rank <= budget


def test_explicit_dims_under_auto_are_kept():
    run = load(["hardware=h100", "model=llama3_8b", "parallelism.tp=4"])
    chosen = choose(run)
    assert chosen.dims.tp == 4 and chosen.dims.world_size == 8
    assert all(c.dims.tp == 4 for c in candidates(run))


def test_a_constraint_no_plan_can_keep_is_refused_naming_it():
    with pytest.raises(ConfigError) as info:
        choose(load(["hardware=h100", "parallelism.tp=16"]))
    assert "parallelism.tp=16" in str(info.value) and "\n" not in str(info.value)


def test_dtype_checks_run_under_auto():
    with pytest.raises(ConfigError, match=r"parallelism\.param_dtype"):
        load(["parallelism.param_dtype=float16"])
    with pytest.raises(ConfigError, match="bf16-true"):
        load(["trainer.precision=bf16-true", "parallelism.param_dtype=float32"])


# --- fp8 / mxfp8 (trainer.plan.precision) ---------------------------------------------------------

# Llama 3 8B, typed from its shape (configs/model/llama3_8b.yaml), not read from the code
D8, KV8, F8, L8 = 4096, 1024, 14336, 32
BLOCK_PROJECTIONS_8B = 2 * D8 * D8 + 2 * D8 * KV8 + 3 * D8 * F8  # wq wo, wk wv, w1 w2 w3
H100_BF16, H100_FP8, H100_HBM = 989e12, 1979e12, 3350e9  # configs/hardware/h100.yaml, cited there


def h100_8b(*overrides: str) -> RunConfig:
    return load(["hardware=h100", "model=llama3_8b", "trainer.devices=8", *LARGE, *overrides])


def test_fp8_runs_the_converted_matmuls_at_the_fp8_peak_and_the_rest_at_bf16():
    shape = (1, 8, 1, 1)
    bf16 = by_shape(candidates(h100_8b("parallelism=fsdp")), shape).estimate
    fp8 = by_shape(candidates(h100_8b("parallelism=fsdp", "trainer.precision=fp8")), shape)
    tokens = 8192  # one sequence per rank
    total = shape_of(load(["model=llama3_8b"]).model).flops_per_token(8192)
    converted = 6 * L8 * BLOCK_PROJECTIONS_8B  # the head and attention's products stay bf16
    assert bf16.time["compute"] == pytest.approx(tokens * total / (H100_BF16 * 0.4))
    assert fp8.estimate.time["compute"] == pytest.approx(
        tokens * ((total - converted) / H100_BF16 + converted / H100_FP8) / 0.4)
    assert fp8.precision == "fp8"


def test_fp8_casts_cost_memory_traffic_by_hand():
    found = by_shape(candidates(h100_8b("parallelism=fsdp", "trainer.precision=fp8")),
                     (1, 8, 1, 1)).estimate
    # per token each projection casts its input and its output's gradient (tp=1): in + out
    per_layer = (D8 + D8) * 2 + (D8 + KV8) * 2 + 2 * (D8 + F8) + (F8 + D8)
    # and per micro-batch its 1/8 shard of the weights (float8 all-gather casts before gathering)
    weights = L8 * BLOCK_PROJECTIONS_8B / 8
    nbytes = 8 * (L8 * per_layer * 8192 + weights)  # tensorwise: 8 bytes per element cast
    assert found.time["casts"] == pytest.approx(nbytes / H100_HBM)
    assert found.time["step"] >= found.time["compute"] + found.time["casts"]


def test_float8_all_gather_moves_the_converted_weights_in_one_byte():
    def fsdp_seconds(*overrides: str) -> float:
        run = h100_8b("parallelism=fsdp", "parallelism.reduce_dtype=float32", *overrides)
        return by_shape(candidates(run), (1, 8, 1, 1)).estimate.time["fsdp"]

    params = LlamaArgs(dim=D8, n_layers=L8, n_heads=32, n_kv_heads=8, vocab_size=128256,
                       ffn_dim=F8).num_params()
    converted = L8 * BLOCK_PROJECTIONS_8B
    nvlink = 450e9  # per GPU, one way
    # ring over 8: 7/8 of (bf16 gather forward + again backward + fp32 reduce-scatter)
    bf16 = 7 / 8 * (2 * 2 * params + 4 * params) / nvlink
    float8 = 7 / 8 * (2 * (2 * (params - converted) + 1 * converted) + 4 * params) / nvlink
    assert fsdp_seconds("trainer.precision=bf16-mixed") == pytest.approx(bf16)
    assert fsdp_seconds("trainer.precision=fp8") == pytest.approx(float8)
    # torchao gathers in float8 for tensorwise scaling only; rowwise and MXFP8 gather bf16
    assert fsdp_seconds("trainer.precision=fp8", "trainer.fp8_recipe=rowwise") == \
        pytest.approx(bf16)


def test_emulated_fp8_on_cpu_is_planned_no_faster_than_bf16():
    bf16 = choose(load(["trainer.precision=bf16-mixed"])).estimate
    fp8 = choose(load(["trainer.precision=fp8"])).estimate
    assert fp8.time["compute"] == pytest.approx(bf16.time["compute"])
    assert fp8.step_seconds > bf16.step_seconds  # the casts on top


@pytest.mark.parametrize(("hardware", "expected"), [
    ("h100", "fp8"),  # Hopper: fp8 only
    ("trn3_ultraserver", "mxfp8"),  # Trn3: MXFP8 through TorchAO Neuron, no plain fp8
    ("trn2_ultraserver", "bf16-mixed"),  # Trn2: no low-precision training stack
    ("cpu", "bf16-mixed"),  # emulation is for tests, never chosen
])
def test_auto_precision_picks_the_fastest_format_the_hardware_trains_with(hardware, expected):
    overrides = (["hardware=cpu"] if hardware == "cpu" else  # the tiny model
                 [f"hardware={hardware}", "model=llama3_8b", *LARGE, "cluster.nodes=2"])
    chosen = choose(load([*overrides, "trainer.precision=auto"]))
    assert chosen.precision == expected
    bf16 = choose(load([*overrides, "trainer.precision=bf16-mixed"]))
    assert chosen.estimate.tokens_per_s >= bf16.estimate.tokens_per_s
    if expected != "bf16-mixed":
        assert chosen.estimate.tokens_per_s > 1.2 * bf16.estimate.tokens_per_s


def test_auto_precision_resolves_before_anything_is_built():
    from trainer.plan import resolve_precision

    run = resolve_precision(load(["hardware=h100", "model=llama3_8b", *LARGE,
                                  "trainer.precision=auto"]))
    assert run.trainer.precision == "fp8"
    unchanged = load(["trainer.precision=bf16-true"])
    assert resolve_precision(unchanged) is unchanged


def test_cli_says_which_precision_auto_assumed():
    result = run_cli("hardware=trn3_ultraserver", "model=llama3_8b", *LARGE,
                     "trainer.precision=auto")
    assert result.returncode == 0, result.stderr
    assert "precision: mxfp8 (trainer.precision=auto: the fastest of bf16-mixed, mxfp8 on " \
           "trn3_ultraserver)" in result.stdout
