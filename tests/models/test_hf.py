"""Hugging Face import and export against `transformers` itself: models the tests make with
transformers (no download) are loaded by the trainer, trained, exported and loaded back, with
logits and losses compared to transformers' own; the memory of import (per rank, 4 ranks) and of
export is measured on a model larger than the bounds asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, DataConfig, load
from trainer.data.datamodule import TokenDataModule
from trainer.models.hf import check_pretrained
from trainer.models.registry import family_of, shape_of
from trainer.module import LanguageModel
from trainer.plan import choose

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
SMALL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 160,
         "vocab_size": 256, "max_seq_len": 64}
# 57M parameters, 226 MB in fp32: larger than anything the memory bounds below allow
LARGE = {"dim": 768, "n_layers": 8, "n_heads": 12, "n_kv_heads": 4, "ffn_dim": 2048,
         "vocab_size": 4096, "max_seq_len": 64}
LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss ([0-9.]+)")


def overrides(shape: dict, **extra) -> list[str]:
    """The model keys of `shape`, and sequences as long as it allows."""
    model = [f"model.{k}={v}" for k, v in {**shape, **extra}.items()]
    return [*model, f"data.seq_len={shape['max_seq_len']}"]


def make_hf(directory: Path, shape: dict, *, tie: bool = False, seed: int = 0,
            **saved) -> transformers.LlamaForCausalLM:
    """A Llama made and saved by transformers, standing in for a downloaded one."""
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
        intermediate_size=shape["ffn_dim"], num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
        max_position_embeddings=shape["max_seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, **saved)
    return model


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    directory = tmp_path_factory.mktemp("hf") / "small"
    # sharded into several files with an index, as large checkpoints come
    return directory, make_hf(directory, SMALL, max_shard_size="100KB")


@pytest.fixture(scope="module")
def large_hf(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "large"
    make_hf(directory, LARGE, max_shard_size="50MB")
    return directory


def ours_from(directory: Path, shape: dict, *extra: str) -> LanguageModel:
    run = load([*overrides(shape), f"model.init_from={directory}", *extra])
    module = LanguageModel(run, choose(run).dims)
    module.configure_model()
    return module


# ------------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("tie", [False, True])
def test_imported_weights_give_transformers_logits(tmp_path, small_hf, tie):
    directory, hf = small_hf
    if tie:  # the head is the embedding table: one tensor in the file, one parameter here
        directory = tmp_path / "tied"
        hf = make_hf(directory, SMALL, tie=True, seed=1)
    ours = ours_from(directory, SMALL, f"model.tie_embeddings={tie}")
    tokens = torch.randint(SMALL["vocab_size"], (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-5)
    assert ours.pretrained is not None and ours.pretrained["tensors"] == 2 + 9 * 2 + (not tie)


@pytest.mark.parametrize(("change", "key"), [
    ({"n_layers": 3}, "model.n_layers"),
    ({"n_kv_heads": 4}, "model.n_kv_heads"),
    ({"rope_theta": 500000.0}, "model.rope_theta"),
])
def test_a_config_that_differs_is_refused_naming_the_key(small_hf, change, key):
    run = load([*overrides({**SMALL, **change}), f"model.init_from={small_hf[0]}"])
    with pytest.raises(ConfigError) as info:
        check_pretrained(family_of(run.model), shape_of(run.model), str(small_hf[0]))
    assert info.value.key == key
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_what_the_family_cannot_express_is_refused(tmp_path, small_hf):
    directory = tmp_path / "scaled"
    directory.mkdir()
    for item in small_hf[0].iterdir():
        (directory / item.name).symlink_to(item)
    config = json.loads((small_hf[0] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}
    (directory / "config.json").unlink()
    (directory / "config.json").write_text(json.dumps(config))
    run = load([*overrides(SMALL), f"model.init_from={directory}"])
    with pytest.raises(ConfigError, match=r"model\.init_from=.*'llama3' \(rope scaling\)"):
        check_pretrained(family_of(run.model), shape_of(run.model), str(directory))


def test_a_missing_tensor_or_directory_is_refused_in_one_line(tmp_path, small_hf):
    partial = tmp_path / "partial"
    make_hf(partial, {**SMALL, "n_layers": 1})
    config = json.loads((partial / "config.json").read_text())
    config["num_hidden_layers"] = 2  # claims two layers, holds one
    (partial / "config.json").write_text(json.dumps(config))
    run = load([*overrides(SMALL), f"model.init_from={partial}"])
    with pytest.raises(ConfigError, match=r"has no tensor model\.layers\.1\."):
        check_pretrained(family_of(run.model), shape_of(run.model), str(partial))
    with pytest.raises(ConfigError, match=r"model\.init_from=.*nowhere.: has no config\.json$"):
        check_pretrained(family_of(run.model), shape_of(run.model), str(tmp_path / "nowhere"))


def test_the_trainer_refuses_a_mismatch_before_anything_starts(tmp_path, small_hf):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *overrides({**SMALL, "ffn_dim": 128}),
         f"model.init_from={small_hf[0]}", "tracking=none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: model.ffn_dim=128: model.init_from={small_hf[0]} has 160 in its "
        "config.json; set model.ffn_dim=160 (or pick the matching model preset)"]
    assert list(tmp_path.iterdir()) == []  # no outputs/, no MLflow store


# ------------------------------------------------------------------------------------------------
# Real processes: train from the weights on a 4-rank mesh, export, load back in transformers


def first_global_batch(seq_len: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of the run's own data module, read by one rank: a global batch does not
    depend on how data parallel splits it."""
    data = TokenDataModule(DataConfig(seq_len=seq_len, micro_batch_size=global_batch), seed=1234)
    return next(iter(data.train_dataloader()))


@pytest.mark.slow
def test_fine_tune_on_fsdp_x_tp_from_transformers_weights_and_export_back(tmp_path, small_hf):
    directory, hf = small_hf
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *overrides(SMALL), f"model.init_from={directory}",
         "trainer.devices=4", "parallelism=fsdp_tp", "trainer.max_steps=2",
         "trainer.log_every_n_steps=1", "data.seq_len=64", "data.micro_batch_size=2",
         "tracking=none", "checkpoint.dir=checkpoints", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "mesh dp_replicate=1 x dp_shard=2 x cp=1 x tp=2" in log
    losses = {int(s): float(v) for s, v in LOSS_LINE.findall(log)}
    inputs, targets = first_global_batch(64, 2 * 2)
    with torch.no_grad():
        theirs = F.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert losses[1] == pytest.approx(theirs, abs=1e-4)  # the log prints 4 decimals

    exported = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint", "export", str(tmp_path / "run/checkpoints"),
         "--to", str(exported), "--max-shard-size", "100KB"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    trained = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    # ours, from the same checkpoint: the round trip import -> train -> export is exact
    resumed = ours_from(exported, SMALL)
    tokens = torch.randint(SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(resumed(tokens), trained(tokens).logits, atol=2e-5,
                                   rtol=1e-5)
        assert not torch.allclose(trained(tokens).logits, hf(tokens).logits)  # it did train


@pytest.mark.slow
def test_four_ranks_load_only_their_shards_and_compute_transformers_logits(tmp_path, large_hf):
    tokens = torch.randint(LARGE["vocab_size"], (2, 16))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
         str(ROOT / "tests/models/hf_worker.py"), str(tmp_path / "tokens.pt"), str(tmp_path),
         *overrides(LARGE), f"model.init_from={large_hf}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["mesh"] == "1x2x1x2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(large_hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), hf(tokens).logits,
                                   atol=1e-4, rtol=1e-4)
    whole = 4 * sum(p.numel() for p in hf.parameters())
    largest = 4 * max(p.numel() for p in hf.parameters())
    for rank in report["ranks"]:
        # a quarter of the model, give or take the norms every tp rank keeps whole
        assert rank["shard_bytes"] == pytest.approx(whole / 4, rel=0.01)
        # what a rank reads: its rows (whole rows of the column-split weights), never everything
        assert rank["read_bytes"] < 0.6 * whole
        # memory while loading: the rows being copied, bounded by the largest tensor
        assert 0 <= rank["peak_beyond_bytes"] < 3 * largest + 16 * MIB, rank
        assert rank["shard_bytes"] + rank["peak_beyond_bytes"] < 0.6 * whole


@pytest.mark.slow
def test_export_holds_a_few_tensors_not_the_model(tmp_path, large_hf):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *overrides(LARGE), f"model.init_from={large_hf}",
         "trainer.max_steps=1", "data.seq_len=16", "data.micro_batch_size=1", "tracking=none",
         "checkpoint.dir=checkpoints", "checkpoint.async_save=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    def peak_rss_of(*args: str) -> int:
        """Peak RSS of one child process (forked from a small probe, so the figure is its own)."""
        probe = ("import resource, subprocess, sys\n"
                 "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                 "assert proc.returncode == 0, proc.stderr[-3000:]\n"
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
        out = subprocess.run([sys.executable, "-c", probe, sys.executable, *args], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout)

    imports_only = peak_rss_of("-c", "import trainer.checkpoint.__main__, trainer.checkpoint."
                                     "export")
    exporting = peak_rss_of("-m", "trainer.checkpoint", "export", str(tmp_path / "run/checkpoints"),
                            "--to", str(tmp_path / "out"), "--max-shard-size", "20MB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    whole = 4 * sum(p.numel() for p in hf.parameters())
    largest = 4 * max(p.numel() for p in hf.parameters())
    above = exporting - imports_only
    assert above < 3 * largest + 32 * MIB < whole / 2, (above / MIB, largest / MIB, whole / MIB)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= whole // (20 * 10**6)
