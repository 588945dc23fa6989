"""A user's own LightningModule is planned as itself: counted from its own meta build, trained as
DDP replicas when it cannot shard, given the mesh when it shards itself in `configure_model`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, load
from trainer.plan import RunFacts, choose

ROOT = Path(__file__).resolve().parents[2]
VOCAB, DIM = 256, 64

MODULES = '''
import torch
import pytorch_lightning as pl
from torch import nn
from torch.distributed.fsdp import fully_shard


class Lm(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_train_end(self):
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                    for p in self.parameters())
        print(f"rank {self.global_rank} holds {local} of {self.count()}", flush=True)

    def count(self):
        return sum(p.numel() for p in self.parameters())


def layers(vocab, dim):
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.ReLU(),
                         nn.Linear(dim, vocab))


class Plain(Lm):
    """No configure_model: it cannot be born sharded."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.net = layers(vocab, dim)


class SelfSharding(Lm):
    """Builds and shards itself over the data-parallel dim of the mesh it is given."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.vocab, self.dim, self.net = vocab, dim, None

    def configure_model(self):
        if self.net is not None:
            return
        self.net = layers(self.vocab, self.dim)
        if self.device_mesh is not None:
            for layer in (self.net[0], self.net[1], self.net[3]):
                fully_shard(layer, mesh=self.device_mesh["dp_shard"])
            fully_shard(self.net, mesh=self.device_mesh["dp_shard"])


class Unbuildable(Lm):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.net = layers(vocab, dim)
        self.scale = float(torch.ones(1).sum())  # reads a value: impossible on the meta device
'''
PARAMS = VOCAB * DIM + (DIM * DIM + DIM) + (DIM * VOCAB + VOCAB)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "user_modules.py").write_text(MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def user(name: str, *overrides: str) -> list[str]:
    return [f"model._target_=user_modules.{name}", f"+model.kwargs.vocab={VOCAB}",
            f"+model.kwargs.dim={DIM}", *overrides]


def test_auto_plans_a_plain_module_from_its_own_count_as_replicas(modules):
    run = load(user("Plain", "trainer.devices=4"))
    assert RunFacts.of(run).params.total == PARAMS
    chosen = choose(run)
    assert chosen.dims.shape == (4, 1, 1, 1)
    # fp32 AdamW: parameters, gradients, two moments, and DDP's gradient buckets
    memory = chosen.estimate.memory
    assert memory["params"] + memory["grads"] + memory["optimizer"] == 16 * PARAMS
    assert memory["ddp_buckets"] == 4 * PARAMS
    assert memory["activations"] == 0  # not known from a count: plan.validate measures it


def test_a_sharded_plan_for_a_module_that_cannot_shard_is_refused_in_one_line(modules):
    with pytest.raises(ConfigError) as info:
        choose(load(user("Plain", "trainer.devices=2", "parallelism=fsdp")))
    message = str(info.value)
    assert message.startswith("parallelism='1x2x1x1': model._target_=user_modules.Plain has no "
                              "configure_model hook")
    assert "parallelism=ddp" in message and "\n" not in message


def test_a_module_that_shards_itself_is_planned_sharded(modules):
    chosen = choose(load(user("SelfSharding", "trainer.devices=4")))
    assert chosen.dims.shape == (1, 4, 1, 1)
    assert chosen.estimate.memory["params"] == 4 * PARAMS / 4


def test_a_module_the_meta_device_cannot_build_refuses_auto_not_ddp(modules):
    with pytest.raises(ConfigError, match=r"^parallelism='auto': model\._target_=user_modules\."
                                          r"Unbuildable cannot be built on the meta device"):
        choose(load(user("Unbuildable", "trainer.devices=2")))
    assert choose(load(user("Unbuildable", "trainer.devices=2", "parallelism=ddp"))
                  ).dims.shape == (2, 1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "devices", "mesh", "local"), [
    ("Plain", 2, "dp_replicate=2", PARAMS),
    ("SelfSharding", 4, "dp_shard=4", None),
])
def test_user_modules_train_on_several_ranks(tmp_path, name, devices, mesh, local):
    (tmp_path / "user_modules.py").write_text(MODULES)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *user(name, f"trainer.devices={devices}"),
         "trainer.max_steps=3", "data.seq_len=32", "data.micro_batch_size=2", "tracking=none",
         "checkpoint.every_n_steps=0", "trainer.progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert mesh in log
    # ranks print to one pipe: lines may run together
    held = re.findall(r"rank (\d+) holds (\d+) of (\d+)", proc.stdout)
    assert sorted(int(rank) for rank, _, _ in held) == list(range(devices))
    for _, mine, total in held:
        assert int(total) == PARAMS
        # DDP: every replica whole; FSDP: a quarter each (every dim 0 splits evenly here)
        assert int(mine) == (local or PARAMS // devices)
