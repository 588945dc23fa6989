import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.models.llama.model import (
    Transformer,
    apply_rotary,
    block_causal_mask,
    document_positions,
    rotary_tables,
)
from trainer.models.llama.shape import LlamaArgs
from trainer.models.registry import shape_of

TINY = LlamaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64,
                 max_seq_len=16)
# Llama 3 8B (Meta's params.json); ffn_dim is the 14336 that its ffn_dim_multiplier produces
LLAMA3_8B = LlamaArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      ffn_dim=14336, max_seq_len=8192, rope_theta=500000.0)


def tiny(**changes) -> LlamaArgs:
    return LlamaArgs(**{**TINY.__dict__, **changes})


def random_tokens(args: LlamaArgs, batch: int = 2, seq_len: int | None = None) -> torch.Tensor:
    return torch.randint(args.vocab_size, (batch, seq_len or args.max_seq_len))


def test_forward_gives_logits_per_position():
    torch.manual_seed(0)
    logits = Transformer(TINY)(random_tokens(TINY, batch=3, seq_len=10))
    assert logits.shape == (3, 10, TINY.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
def test_a_packed_sequence_computes_each_document_as_if_alone(precision):
    """Document masking: the logits of each document inside a packed row equal the logits of that
    document run on its own (positions from 0, nothing seen of its neighbours)."""
    torch.manual_seed(0)
    model = Transformer(tiny(n_heads=4, n_kv_heads=2))
    lengths = [[5, 9, 2], [16], [1, 15]]  # three rows of 16 tokens: documents packed in each
    docs = [[random_tokens(TINY, batch=1, seq_len=n) for n in row] for row in lengths]
    packed = torch.cat([torch.cat(row, dim=1) for row in docs])
    documents = torch.cat([torch.cat([torch.full((1, n), i, dtype=torch.int32)
                                      for i, n in enumerate(row)], dim=1) for row in lengths])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32")
    with torch.no_grad(), autocast:
        together = model(packed, documents).float()
        alone = [[model(doc).float() for doc in row] for row in docs]
        unmasked = model(packed).float()
    tolerance = 1e-5 if precision == "float32" else 2e-2
    for r, row in enumerate(alone):
        torch.testing.assert_close(together[r:r + 1], torch.cat(row, dim=1),
                                   atol=tolerance, rtol=tolerance)
    # Without the documents the later documents see their neighbours: the logits differ.
    assert not torch.allclose(unmasked[0, 5:], together[0, 5:], atol=1e-3)
    assert torch.allclose(unmasked[0, :5], together[0, :5], atol=tolerance)


def test_document_positions_restart_and_the_mask_stays_inside_documents():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2]], dtype=torch.int32)
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = block_causal_mask(documents, torch.float32)[0, 0] == 0
    assert allowed.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0, 0],
                                      [1, 1, 1, 0, 0, 0],
                                      [0, 0, 0, 1, 0, 0],
                                      [0, 0, 0, 1, 1, 0],
                                      [0, 0, 0, 0, 0, 1]]


def test_a_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TINY)(random_tokens(TINY, seq_len=TINY.max_seq_len + 1))


def test_changing_a_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = Transformer(TINY)
    tokens = random_tokens(TINY, batch=1)
    changed = tokens.clone()
    t = 7
    changed[0, t] = (tokens[0, t] + 1) % TINY.vocab_size
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_counts_every_parameter(tie):
    args = tiny(tie_embeddings=tie)
    model = Transformer(args)
    assert args.num_params() == sum(p.numel() for p in model.parameters())
    table = model.tok_embeddings.weight.numel()
    expected_non_embedding = sum(p.numel() for p in model.parameters()) - (0 if tie else table)
    assert args.num_params(include_embedding=False) == expected_non_embedding


def test_num_params_of_llama3_8b_matches_the_built_model_and_meta_figure():
    with torch.device("meta"):
        model = Transformer(LLAMA3_8B)
    counted = sum(p.numel() for p in model.parameters())
    assert LLAMA3_8B.num_params() == counted
    # Meta publishes Llama 3 8B as 8.03B parameters (model card, April 2024)
    assert abs(counted - 8.03e9) / 8.03e9 < 0.01


def test_flops_per_token_matches_a_count_by_hand():
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=128)
    seq_len = 32
    # weights one token passes through: head_dim 16, so wk and wv are 64 x 32
    per_block = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # wq wk wv wo
                 + 3 * 64 * 128  # w1 w2 w3
                 + 2 * 64)  # two RMSNorm weights
    weights = 2 * per_block + 64 + 64 * 100  # + final norm + output projection
    # forward: 2 FLOPs (multiply, add) per weight; Q K^T and attention x V: 2 x seq_len x dim each
    forward = 2 * weights + 2 * (2 * seq_len * 64 + 2 * seq_len * 64)
    assert args.flops_per_token(seq_len) == 3 * forward  # backward costs twice the forward
    # the embedding table is a lookup, so tying it to the output projection costs the same
    assert LlamaArgs(**{**args.__dict__, "tie_embeddings": True}).flops_per_token(seq_len) \
        == 3 * forward


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_init_weights_equals_a_cpu_build(tie):
    args = tiny(tie_embeddings=tie)
    reference = Transformer(args)
    torch.manual_seed(7)
    reference.init_weights()

    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():  # whatever init_weights misses stays NaN and fails the comparison
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(math.nan)
    torch.manual_seed(7)
    model.init_weights()

    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(),
                                      strict=True):
        assert torch.equal(got, want), name
    for (name, got), (_, want) in zip(model.named_buffers(), reference.named_buffers(),
                                      strict=True):
        assert torch.equal(got, want), name
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert torch.isfinite(model(random_tokens(args))).all()


def test_rotary_tables_are_not_saved_in_checkpoints():
    model = Transformer(TINY)
    assert {"rope_cos", "rope_sin"} <= {name for name, _ in model.named_buffers()}
    assert not any(key.startswith("rope") for key in model.state_dict())


def test_init_scales_output_projections_by_depth():
    torch.manual_seed(0)
    args = tiny(dim=256, ffn_dim=512, n_heads=8, n_kv_heads=8, n_layers=8)
    model = Transformer(args)
    block = model.layers["3"]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for out_proj in (block.attention.wo, block.feed_forward.w2):
        assert out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(block.ffn_norm.weight, torch.ones(args.dim))


def test_rotary_matches_complex_multiplication_and_encodes_relative_position():
    head_dim, theta = 8, 10000.0
    cos, sin = rotary_tables(head_dim, 32, theta)
    x = torch.randn(1, 32, 1, head_dim)
    # RoFormer's form: pair (a, b) as a + ib, turned by e^(i m theta_j), theta_j = theta^(-2j/d)
    freqs = theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.arange(32).double()[:, None] * freqs
    turned = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) \
        * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    torch.testing.assert_close(apply_rotary(x, cos, sin),
                               torch.view_as_real(turned).flatten(-2).float())

    q, k = torch.randn(2, 1, 1, 1, head_dim).unbind(0)

    def score(q_pos: int, k_pos: int) -> float:
        rq = apply_rotary(q, cos[q_pos:q_pos + 1], sin[q_pos:q_pos + 1])
        rk = apply_rotary(k, cos[k_pos:k_pos + 1], sin[k_pos:k_pos + 1])
        return (rq * rk).sum().item()

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def expand_kv_heads(weight: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """A wk/wv weight with each KV head repeated for the query heads that share it."""
    group = args.n_heads // args.n_kv_heads
    heads = weight.view(args.n_kv_heads, args.head_dim, args.dim)
    return heads.repeat_interleave(group, dim=0).reshape(-1, args.dim)


def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads():
    torch.manual_seed(0)
    gqa_args, mha_args = TINY, tiny(n_kv_heads=TINY.n_heads)
    gqa, mha = Transformer(gqa_args), Transformer(mha_args)
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("wk.weight", "wv.weight")):
            state[key] = expand_kv_heads(state[key], gqa_args)
    mha.load_state_dict(state)
    tokens = random_tokens(gqa_args)
    torch.testing.assert_close(mha(tokens), gqa(tokens))


def head_shard(attention: nn.Module, args: LlamaArgs, rank: int, ranks: int) -> nn.Module:
    """What one tensor-parallel rank holds: wq/wk/wv rows (ColwiseParallel) and wo columns
    (RowwiseParallel) of its heads only."""
    q_rows = args.n_heads // ranks * args.head_dim
    kv_rows = args.n_kv_heads // ranks * args.head_dim
    shard = copy.deepcopy(attention)
    for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
        weight = getattr(attention, name).weight
        getattr(shard, name).weight = nn.Parameter(weight[rank * rows:(rank + 1) * rows])
    shard.wo.weight = nn.Parameter(attention.wo.weight[:, rank * q_rows:(rank + 1) * q_rows])
    return shard


def test_attention_split_by_heads_sums_to_the_whole():
    torch.manual_seed(0)
    args = tiny(n_heads=4, n_kv_heads=2)
    model = Transformer(args)
    attention = model.layers["0"].attention
    x = torch.randn(2, 12, args.dim)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    ranks = 2
    partials = [head_shard(attention, args, r, ranks)(x, cos, sin) for r in range(ranks)]
    torch.testing.assert_close(sum(partials), attention(x, cos, sin))


def test_model_args_take_the_shape_keys_of_a_model_config():
    cfg = ModelConfig(name="small", dim=64, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=99,
                      ffn_dim=160, max_seq_len=48, rope_theta=5e5, norm_eps=1e-6,
                      tie_embeddings=True, kwargs={"ignored": 1})
    assert shape_of(cfg) == LlamaArgs(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=99, ffn_dim=160, max_seq_len=48,
        rope_theta=5e5, norm_eps=1e-6, tie_embeddings=True)


def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = Transformer(TINY)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tokens = random_tokens(TINY)
    torch.testing.assert_close(compiled(tokens), model(tokens))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(TINY)
    batch = random_tokens(TINY, batch=4)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), rel=0.1)  # uniform at init
    assert losses[-1] < losses[0] / 2
