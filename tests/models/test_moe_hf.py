"""The MoE family against `transformers`' Qwen3-MoE: a model transformers makes (no download) and
saves with one tensor per expert is imported (one process, and four ranks splitting the experts
and their columns), trained by `python -m trainer` with expert parallel, exported with
`python -m trainer.checkpoint export` and loaded back by transformers, logits compared each way;
what Qwen3-MoE cannot express is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load
from trainer.models.hf import PretrainedError, check_pretrained
from trainer.models.moe.hf import ADAPTER
from trainer.models.registry import family_of, shape_of
from trainer.module import LanguageModel
from trainer.plan import choose

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
# a dense first layer and three MoE layers of 8 experts, 2 per token
SHAPE = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32,
         "vocab_size": 256, "ffn_dim": 128, "moe_ffn_dim": 32, "n_experts": 8, "top_k": 2,
         "n_dense_layers": 1, "max_seq_len": 64, "norm_eps": 1e-6}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def overrides(**extra) -> list[str]:
    return ["model=moe_tiny", *(f"model.{k}={v}" for k, v in {**SHAPE, **extra}.items()),
            f"data.seq_len={SHAPE['max_seq_len']}"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> tuple[Path, transformers.Qwen3MoeForCausalLM]:
    """A Qwen3-MoE made and saved by transformers, in files of 100 KB with an index."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"],
        intermediate_size=SHAPE["ffn_dim"], moe_intermediate_size=SHAPE["moe_ffn_dim"],
        num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
        num_key_value_heads=SHAPE["n_kv_heads"], head_dim=SHAPE["head_dim"],
        num_experts=SHAPE["n_experts"], num_experts_per_tok=SHAPE["top_k"],
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=SHAPE["max_seq_len"],
        rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("qwen") / "qwen3_moe"
    model.save_pretrained(directory, max_shard_size="100KB")
    return directory, model


def ours_from(directory: Path, *extra: str) -> LanguageModel:
    run = load([*overrides(), f"model.init_from={directory}", *extra])
    module = LanguageModel(run, choose(run).dims)
    module.configure_model()
    return module


def test_the_checkpoint_holds_one_tensor_per_expert_as_qwen_ships_them(qwen):
    index = json.loads((qwen[0] / "model.safetensors.index.json").read_text())
    names = index["weight_map"]
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert not any(name.endswith("gate_up_proj") for name in names)


def test_imported_weights_give_transformers_logits(qwen):
    directory, hf = qwen
    ours = ours_from(directory)
    tokens = torch.randint(SHAPE["vocab_size"], (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-5)
    # embedding, norm, head; per layer 8 attention tensors; the dense layer's 3; each MoE
    # layer's router and 8 experts x 3 matrices
    assert ours.pretrained["tensors"] == 3 + 4 * 8 + 3 + 3 * (1 + 24)
    assert ours.pretrained["read_bytes"] == ours.pretrained["shard_bytes"]


@pytest.mark.parametrize(("change", "key"), [({"n_experts": 16}, "model.n_experts"),
                                             ({"top_k": 4}, "model.top_k"),
                                             ({"n_dense_layers": 0}, "model.n_dense_layers")])
def test_a_config_that_differs_is_refused_naming_the_key(qwen, change, key):
    run = load([*overrides(**change), f"model.init_from={qwen[0]}"])
    with pytest.raises(ConfigError) as info:
        check_pretrained(family_of(run.model), shape_of(run.model), str(qwen[0]))
    assert info.value.key == key and "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "words"), [
    ({"n_shared_experts": 1}, "model.n_shared_experts=1: Qwen3-MoE has no shared experts"),
    ({"bias_update_rate": 0.001}, "model.bias_update_rate=0.001: the model routes by a trained "
                                  "bias Qwen3-MoE does not have")])
def test_what_qwen3_moe_cannot_express_is_refused(change, words):
    shape = shape_of(load(overrides(**change)).model)
    with pytest.raises(PretrainedError, match=words.replace(".", r"\.")):
        ADAPTER.config(shape, "float32")


@pytest.mark.slow
def test_four_ranks_splitting_experts_and_columns_load_transformers_logits(tmp_path, qwen):
    directory, hf = qwen
    tokens = torch.randint(SHAPE["vocab_size"], (2, 16))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
         str(ROOT / "tests/models/hf_worker.py"), str(tmp_path / "tokens.pt"), str(tmp_path),
         *overrides(), f"model.init_from={directory}", "parallelism.ep=2"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["mesh"] == "1x2x1x2 ep2"  # dp_shard 2 = ep 2, tp 2
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), hf(tokens).logits,
                                   atol=1e-4, rtol=1e-4)
    experts = 3 * 3 * 8 * 32 * 64 * 4  # three MoE layers' stacks, fp32
    for rank in report["ranks"]:
        # each rank reads its 4 of 8 experts, half their columns' rows: a quarter of the experts
        assert rank["read_bytes"] < rank["shard_bytes"] + experts / 2


@pytest.mark.slow
def test_trained_with_expert_parallel_then_exported_loads_in_transformers(tmp_path, qwen):
    directory, hf = qwen
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *overrides(), f"model.init_from={directory}",
         "trainer.devices=4", "parallelism=fsdp", "parallelism.ep=2", "trainer.max_steps=2",
         "data.micro_batch_size=2", "tracking=none", "checkpoint.dir=checkpoints",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "ep=2 (of dp_shard)" in log
    exported = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint", "export", str(tmp_path / "run/checkpoints"),
         "--to", str(exported), "--max-shard-size", "100KB"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert names.keys() == json.loads(
        (directory / "model.safetensors.index.json").read_text())["weight_map"].keys()
    trained = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(trained).__name__ == "Qwen3MoeForCausalLM"
    resumed = ours_from(exported)  # the same checkpoint, imported back
    tokens = torch.randint(SHAPE["vocab_size"], (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(resumed(tokens), trained(tokens).logits, atol=2e-5,
                                   rtol=1e-5)
        assert not torch.allclose(trained(tokens).logits, hf(tokens).logits)  # it did train
