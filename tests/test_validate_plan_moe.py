"""`plan.validate=true` for models with routed experts: the module's own build with the experts'
mesh (dp_shard unflattened into dp_shard_mod_ep x ep) at full world size on the fake process
group, each rank's parameter bytes from the layouts, and one fake step beside the estimate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load
from trainer.models.registry import shape_of
from trainer.plan import choose
from trainer.validate_plan import validate

ROOT = Path(__file__).resolve().parents[1]


def test_expert_parallel_with_tensor_parallel_validates_against_the_hand_count():
    run = load(["model=moe_tiny", "trainer.devices=8", "parallelism=fsdp", "parallelism.ep=4",
                "parallelism.tp=2", "trainer.precision=bf16-mixed",
                "parallelism.param_dtype=bfloat16", "data.seq_len=128",
                "data.micro_batch_size=2"])
    chosen = choose(run)
    assert chosen.dims.mesh_str == "1x4x1x2 ep4"
    report = validate(run, chosen)
    assert report.ok, report.render()
    a = shape_of(run.model)
    # every rank: an eighth of the dense weights (FSDP 4 x tp 2 on the matrices; norms, router
    # and q/k norms only FSDP 4) and of the experts (ep 4 x tp 2; FSDP over 1)
    attention = 2 * a.dim * a.q_dim + 2 * a.dim * a.kv_dim
    split = (a.n_layers * attention + 3 * a.dim * a.ffn_dim + 2 * a.vocab_size * a.dim
             + 3 * 3 * a.dim * a.moe_ffn_dim * a.n_experts)
    whole = a.n_layers * (2 * a.dim + 2 * a.head_size) + a.dim + 3 * a.dim * a.n_experts
    expected = 4 * (split / 8 + whole / 4)  # fp32
    assert {r.held for r in report.ranks} == {expected}
    assert "peak deviation" in report.render() and abs(report.step.deviation) < 0.15


def _plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.plan", *overrides, "plan.validate=true"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=7200)


@pytest.mark.slow
@pytest.mark.parametrize(("experiment", "ranks"), [("qwen3_235b_a22b_trn3_ultraserver", 576),
                                                   ("qwen3_235b_a22b_gb200_nvl72", 72)])
def test_the_shipped_moe_recipes_validate_at_full_scale(experiment, ranks):
    proc = _plan_cli(f"experiment={experiment}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fake process group of {ranks} ranks" in proc.stdout
    assert "limit 5%): ok" in proc.stdout and "limit 15%): ok" in proc.stdout
    assert " ep" in proc.stdout.split("validated ")[1].split(" (")[0]  # the chosen mesh has ep
