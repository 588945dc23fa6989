"""`LanguageModel.configure_model`: born sharded. A rank allocates its own shards and nothing more,
and a plan that shards never falls back to an unsharded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load
from trainer.module import LanguageModel
from trainer.plan import choose

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# One rank of a 64-rank FSDP world (one trn2.48xlarge) builds Llama 3 8B through the module's own
# hook, in a fresh process so that its peak RSS is its own.
_ONE_RANK = """
import json, resource, sys, torch
from trainer.config import load
from trainer.module import LanguageModel
from trainer.plan import choose
from trainer.mesh import build_mesh
from trainer.validate_plan import fake_world
from torch.distributed.tensor import DTensor

run = load(["model=llama3_8b", "hardware=trn2", "parallelism=fsdp",
           "parallelism.activation_checkpointing=true"])
dims = choose(run).dims
with fake_world(0, dims.world_size):
    mesh = build_mesh(dims, "cpu")
    module = LanguageModel(run, dims)
    module._device_mesh = mesh
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.device("cpu"):
        module.configure_model()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = list(module.model.parameters())
    local = sum(p.to_local().untyped_storage().nbytes() for p in params)
    json.dump({"world": dims.world_size, "before": before, "after": after, "local": local,
               "sharded": all(isinstance(p, DTensor) for p in params),
               "nonzero": all(p.to_local().abs().sum().item() > 0 for p in params)}, sys.stdout)
"""


@pytest.mark.slow
def test_llama3_8b_at_64_ranks_allocates_its_shard_plus_a_small_constant():
    proc = subprocess.run([sys.executable, "-c", _ONE_RANK], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["world"] == 64 and result["sharded"] and result["nonzero"]
    # Llama 3 8B in fp32 is 32 GB; its 1/64th is about 0.5 GB. Building it whole first (what
    # Lightning does by itself) would raise the peak by 32 GB.
    assert 400 * MIB < result["local"] < 600 * MIB
    growth = result["after"] - result["before"]
    assert growth < result["local"] + 256 * MIB, (growth / MIB, result["local"] / MIB)


def test_a_sharding_plan_without_a_mesh_fails_loudly():
    run = load(["hardware=cpu", "trainer.devices=2", "parallelism=fsdp"])
    module = LanguageModel(run, choose(run).dims)
    with pytest.raises(RuntimeError, match="no device mesh"):
        module.configure_model()


def test_a_single_rank_builds_the_whole_model_from_the_seed():
    run = load(["hardware=cpu"])
    dims = choose(run).dims
    first, second = LanguageModel(run, dims), LanguageModel(run, dims)
    first.configure_model()
    second.configure_model()
    pairs = zip(first.model.parameters(), second.model.parameters(), strict=True)
    assert all(a.equal(b) and a.device.type == "cpu" for a, b in pairs)
