"""fp8 / mxfp8 conversion (`trainer.models.low_precision`) as the Llama family's `parallelize`
applies it: which linears convert (and that the planner counts the same ones), that parameter
names do not change, which runs gather in float8, and that checkpoints see plain tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import ParallelismConfig, load
from trainer.models.llama.model import Transformer
from trainer.models.llama.parallelize import parallelize
from trainer.models.llama.shape import LlamaArgs
from trainer.models.low_precision import LowPrecision, describe, plain
from trainer.plan import ParallelDims

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=128,
                 max_seq_len=16)
ONE_RANK = ParallelDims((1, 1, 1, 1))
EMULATED = {"fp8": LowPrecision("fp8", "tensorwise", emulate=True, float8_all_gather=False),
            "mxfp8": LowPrecision("mxfp8", "rceil", emulate=True, float8_all_gather=False)}


def converted(args: LlamaArgs, fmt: str, device: str = "meta") -> Transformer:
    with torch.device(device):
        model = Transformer(args)
    return parallelize(model, None, ONE_RANK, ParallelismConfig(), low_precision=EMULATED[fmt])


def low_precision_linears(model: nn.Module) -> set[str]:
    """Linears torchao took over: a Float8Linear, or (MXFP8) a weight in its wrapper class."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (type(module) is not nn.Linear
                                                   or type(module.weight) is not nn.Parameter)}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8"])
def test_every_block_projection_converts_and_the_head_stays_bf16(fmt):
    model = converted(ARGS, fmt)
    projections = {f"layers.{i}.{name}" for i in range(ARGS.n_layers)
                   for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert low_precision_linears(model) == projections
    assert type(model.output) is nn.Linear


def test_parameter_names_stay_those_of_the_bf16_model():
    with torch.device("meta"):
        reference = Transformer(ARGS)
    for fmt in EMULATED:
        assert converted(ARGS, fmt).state_dict().keys() == reference.state_dict().keys()


def test_the_planner_counts_the_weights_parallelize_converts():
    # ffn_dim 100 is no multiple of 32: w1, w2, w3 stay bf16 and the shape must say so too
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=100)
    model = converted(args, "fp8")
    assert low_precision_linears(model) == {f"layers.{i}.attention.w{p}" for i in range(2)
                                            for p in "qkvo"}
    numel = sum(model.get_submodule(name).weight.numel() for name in low_precision_linears(model))
    counted = sum(g.per_unit * g.units for g in args.param_counts().groups if g.low_precision)
    assert counted == numel == 2 * (2 * 64 * 64 + 2 * 64 * 32)  # wq, wo: 64x64; wk, wv: 32x64
    assert args.low_precision_flops_per_token() == 6 * numel


def test_mxfp8_checkpoints_see_plain_tensors_that_share_the_weights():
    model = converted(ARGS, "mxfp8", device="cpu")
    wrapped = model.layers["0"].attention.wq.weight
    assert type(wrapped) is not nn.Parameter and type(wrapped).__module__.startswith("torchao")
    state = model.state_dict()
    saved = state["layers.0.attention.wq.weight"]
    assert type(saved) is torch.Tensor
    saved.fill_(0.5)  # a checkpoint loads into these tensors in place
    assert torch.equal(plain(wrapped), torch.full_like(saved, 0.5))


@pytest.mark.parametrize(("overrides", "fsdp", "expected"), [
    (["trainer.precision=fp8"], True,
     LowPrecision("fp8", "tensorwise", emulate=True, float8_all_gather=True)),
    (["trainer.precision=fp8"], False,
     LowPrecision("fp8", "tensorwise", emulate=True, float8_all_gather=False)),
    # torchao gathers in float8 for tensorwise scaling only
    (["trainer.precision=fp8", "trainer.fp8_recipe=rowwise"], True,
     LowPrecision("fp8", "rowwise", emulate=True, float8_all_gather=False)),
    (["trainer.precision=mxfp8"], True,
     LowPrecision("mxfp8", "rceil", emulate=True, float8_all_gather=False)),
    (["hardware=h100", "trainer.precision=fp8"], True,
     LowPrecision("fp8", "tensorwise", emulate=False, float8_all_gather=True)),
    (["trainer.precision=bf16-mixed"], True, None),
])
def test_what_a_run_asks_for(overrides, fsdp, expected):
    assert LowPrecision.of(load(overrides), fsdp=fsdp) == expected


def test_emulation_is_said_where_the_run_is_described():
    text = describe(load(["trainer.precision=fp8"]), fsdp=True)
    assert text == "fp8 (tensorwise, float8 all-gather; emulated by torchao on cpu, no speed-up)"
    assert describe(load(["trainer.precision=bf16-mixed"]), fsdp=True) == "bf16-mixed"
