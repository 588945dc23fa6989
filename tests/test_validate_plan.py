"""`plan.validate=true`: the module's own configure_model at full world size in one process, and one
training step of it under FakeTensorMode with torch's memory tracker.

Expected figures are derived here from the model's shape and the sharding rules, not read back
from the code: FSDP2 splits dim 0 of each (tensor-parallel-local) weight into `dp_shard` chunks
of ceil(rows / dp_shard) rows and pads every rank's shard to that size; tensor parallel splits
columns-parallel weights by rows and row-parallel ones by columns, and keeps norms whole.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load
from trainer.models.llama.shape import LlamaArgs
from trainer.models.registry import shape_of
from trainer.plan import choose
from trainer.validate_plan import PlanValidationError, rank_ranges, validate

ROOT = Path(__file__).resolve().parents[1]
FP32 = 4

FULL_SCALE = {
    # Llama 3 70B on a 144-chip Trn3 UltraServer: 36 nodes x 16 ranks
    "70b_trn3_ultraserver": (["experiment=llama3_70b_trn3_ultraserver", "parallelism=fsdp_tp",
                              "parallelism.tp=4", "parallelism.sequence_parallel=true",
                              "parallelism.activation_checkpointing=true"], (1, 144, 1, 4)),
    # Llama 3 8B on a 64-chip Trn2 UltraServer: 4 nodes x 64 ranks, HSDP over 4 replicas
    "8b_trn2_ultraserver": (["experiment=llama3_8b_trn2_ultraserver", "parallelism=hsdp",
                             "parallelism.dp_shard=64",
                             "parallelism.activation_checkpointing=true"], (4, 64, 1, 1)),
    # Llama 3.1 405B on four GB200 NVL72 racks: 72 nodes x 4 GPUs
    "405b_gb200_4_racks": (["experiment=llama3_405b_gb200_nvl72", "cluster.nodes=72",
                            "parallelism=fsdp_tp", "parallelism.tp=4",
                            "parallelism.activation_checkpointing=true"], (1, 72, 1, 4)),
}


def padded_rank_elements(a: LlamaArgs, shard: int, tp: int) -> int:
    """Elements every rank allocates: each weight's FSDP chunk, ceil(local rows / shard)."""
    kv = a.n_kv_heads * a.head_dim

    def chunk(rows: int, cols: int) -> int:
        return math.ceil(rows / shard) * cols

    column_parallel = [(a.dim, a.dim), (kv, a.dim), (kv, a.dim), (a.ffn_dim, a.dim),
                       (a.ffn_dim, a.dim)]  # wq wk wv w1 w3: tp splits rows
    row_parallel = [(a.dim, a.dim), (a.dim, a.ffn_dim)]  # wo w2: tp splits columns
    block = (sum(chunk(rows // tp, cols) for rows, cols in column_parallel)
             + sum(chunk(rows, cols // tp) for rows, cols in row_parallel)
             + 2 * chunk(a.dim, 1))
    vocab = 2 * chunk(a.vocab_size // tp, a.dim)  # embedding and head, untied
    return a.n_layers * block + vocab + chunk(a.dim, 1)


def total_elements(a: LlamaArgs) -> int:
    kv = a.n_kv_heads * a.head_dim
    block = 2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.ffn_dim + 2 * a.dim
    return a.n_layers * block + 2 * a.vocab_size * a.dim + a.dim


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FULL_SCALE))
def test_full_scale_plans_validate_against_the_hand_count(case):
    overrides, shape = FULL_SCALE[case]
    run = load(overrides)
    chosen = choose(run)
    assert chosen.dims.shape == shape
    rep, shard, _, tp = shape

    report = validate(run, chosen, step=False)  # the step is the CLI test's below

    assert report.ok and len(report.ranks) == run.world_size
    args = shape_of(run.model)
    # what every rank allocates: FSDP pads the short last shards up to the first one's size
    padded = FP32 * padded_rank_elements(args, shard, tp)
    assert {r.allocated for r in report.ranks} == {padded}
    # what ranks hold, unpadded, adds up to every parameter once per replica, the norms (whole
    # on each tp rank) tp times
    norms = (2 * args.n_layers + 1) * args.dim
    held = sum(r.held for r in report.ranks)
    assert held == FP32 * rep * (total_elements(args) + (tp - 1) * norms)
    assert abs(padded / report.estimate - 1) < 0.05


def test_uneven_fsdp_padding_beyond_five_percent_fails_with_the_figures():
    # tiny (dim 256, kv 128, ffn 768) over 96 ranks: 256 rows pad to 3 x 96 = 288, 128 to 192
    run = load(["hardware=cpu", "trainer.devices=96", "parallelism=fsdp"])
    with pytest.raises(PlanValidationError) as info:
        validate(run, choose(run))
    report = info.value.report
    args = shape_of(run.model)
    expected = padded_rank_elements(args, 96, 1) / (total_elements(args) / 96) - 1
    assert report.deviation(report.worst) == pytest.approx(expected)
    assert f"{expected:+.1%}" in str(info.value) and "limit 5%" in str(info.value)
    assert not report.ok and "FAILED" in report.render()


def test_a_module_that_cannot_train_is_a_validation_error():
    # a bare LightningModule has no optimizer: its own step fails, and that is the finding
    run = load(["hardware=cpu", "trainer.devices=2", "parallelism=fsdp"])
    run.model._target_ = "pytorch_lightning.LightningModule"
    with pytest.raises(PlanValidationError, match="failed"):
        validate(run, choose(run))


def test_the_step_is_measured_by_component_beside_the_estimate():
    run = load(["hardware=cpu", "trainer.devices=4", "parallelism=fsdp"])
    report = validate(run, choose(run))
    step = report.step
    assert step is not None and step.rank == 0
    # optimizer states are AdamW's two fp32 moments of this rank's shards: twice its parameters
    assert step.measured["optimizer states"] == 2 * report.ranks[0].allocated
    assert step.measured["parameters"] >= report.ranks[0].allocated
    assert step.measured["activations"] > 0
    assert abs(step.deviation) <= report.step_tolerance
    table = report.render()
    for component in ("parameters", "gradients", "optimizer states", "activations", "peak"):
        assert component in table


def test_a_deep_tensor_parallel_step_peaks_where_the_planner_says():
    # Many blocks, a small vocabulary, one short sequence: activations are a few MiB, while the
    # model's full fp32 size (190 MiB) is as large as a rank's whole estimate. Under
    # FakeTensorMode the tracker books foreach ops on DTensors at their global size, so clipping
    # measured inside it would add the whole model to the peak (as it did on the 70B recipe).
    run = load(["hardware=cpu", "trainer.devices=4", "parallelism=fsdp_tp", "model.dim=512",
                "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=1536",
                "model.n_layers=16", "model.vocab_size=1024", "data.seq_len=32",
                "data.micro_batch_size=1"])
    report = validate(run, choose(run))
    full_model = FP32 * total_elements(shape_of(run.model))
    assert report.step is not None and report.step.measured["activations"] < full_model / 10
    assert abs(report.step.deviation) <= report.step_tolerance, report.render()


def test_rank_ranges_reads_short():
    assert rank_ranges([0, 1, 2, 5]) == "0-2, 5"
    assert rank_ranges([1, 5, 9, 13]) == "1-13 step 4"
    assert rank_ranges([7]) == "7"


def _plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.plan", *overrides, "plan.validate=true"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(("experiment", "ranks"), [("llama3_8b_trn2_ultraserver", 256),
                                                   ("llama3_70b_trn3_ultraserver", 576)])
def test_the_cli_validates_a_shipped_recipe_with_the_real_step(experiment, ranks):
    proc = _plan_cli(f"experiment={experiment}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fake process group of {ranks} ranks" in proc.stdout
    assert "limit 5%): ok" in proc.stdout
    assert "one training step at rank 0" in proc.stdout and "limit 15%): ok" in proc.stdout
    for component in ("parameters", "gradients", "optimizer states", "activations", "peak"):
        assert f"\n{component} " in proc.stdout


def test_the_cli_fails_a_plan_that_does_not_validate_in_one_line():
    proc = _plan_cli("hardware=cpu", "trainer.devices=96", "parallelism=fsdp")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "plan.validate" in lines[0], proc.stderr
