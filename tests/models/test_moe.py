"""The MoE family on one process: its shape's figures against the built model and by hand, the
routing and balancing rules, the experts' two code paths, mesh-independent init of 3-D expert
tensors, and the layout `parallelize` gives (PyTorch's fake process group, meta device)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from trainer.config import ConfigError, ParallelismConfig, load
from trainer.models import init
from trainer.models.moe.experts import expert_swiglu, host_counts, inverse
from trainer.models.moe.model import Router, Transformer
from trainer.models.moe.parallelize import parallelize
from trainer.models.moe.shape import MoEArgs
from trainer.models.registry import shape_of
from trainer.plan import ParallelDims, choose
from trainer.validate_plan import fake_world

TINY = MoEArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=96,
               ffn_dim=128, max_seq_len=16, n_experts=8, top_k=2, moe_ffn_dim=32,
               n_shared_experts=1, n_dense_layers=1)


def tiny(**changes) -> MoEArgs:
    return MoEArgs(**{**TINY.__dict__, **changes})


# --- shape and figures ---------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, {"n_shared_experts": 0, "n_dense_layers": 0},
                                     {"moe_every": 2, "n_dense_layers": 0}])
def test_parameter_counts_match_the_built_model(changes):
    args = tiny(**changes)
    model = Transformer(args)
    assert args.num_params() == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert args.active_params() == args.num_params() - experts * 6 // 8  # 2 of 8 experts work
    moe_layers = [k for k, block in model.layers.items() if hasattr(block, "moe")]
    assert moe_layers == [str(i) for i in range(args.n_layers) if args.is_moe_layer(i)]


@pytest.mark.parametrize(("preset", "total", "active"), [
    # Qwen's model cards: 30.5B parameters of which 3.3B activated; 235B of which 22B
    ("qwen3_30b_a3b", 30.5e9, 3.3e9), ("qwen3_235b_a22b", 235e9, 22e9)])
def test_the_qwen3_presets_have_their_published_sizes(preset, total, active):
    args = shape_of(load([f"model={preset}"]).model)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert args.num_params() == pytest.approx(total, rel=0.01)
    assert args.active_params() == pytest.approx(active, rel=0.02)


def test_flops_per_token_count_the_active_experts_by_hand():
    args = tiny(n_shared_experts=0, n_dense_layers=0, n_layers=2)
    seq_len = 16
    attention = 64 * 128 + 2 * 64 * 64 + 128 * 64  # wq (64 -> 4 x 32), wk, wv (2 x 32), wo
    experts_per_token = 2 * 3 * 64 * 32  # top_k experts of three 64 x 32 matrices
    per_block = attention + 64 * 8 + experts_per_token + 2 * 64 + 2 * 32  # router, norms
    weights = 2 * per_block + 64 + 96 * 64  # final norm, head
    assert args.flops_per_token(seq_len) == 6 * weights + 12 * 2 * 128 * seq_len
    assert args.routed_flops_per_token() == 6 * 2 * experts_per_token


@pytest.mark.parametrize(("changes", "key"), [
    ({"top_k": 9}, "model.top_k"),
    ({"n_dense_layers": 3}, "model.n_dense_layers"),
    ({"head_dim": 31}, "model.head_dim"),
    ({"n_kv_heads": 3}, "model.n_kv_heads"),
])
def test_a_shape_that_cannot_be_built_names_its_key(changes, key):
    with pytest.raises(ConfigError) as err:
        tiny(**changes).check()
    assert err.value.key == key


def test_a_key_only_another_family_reads_is_refused_when_changed():
    with pytest.raises(ConfigError) as err:
        shape_of(load(["model.n_experts=16"]).model)  # the default model is a Llama
    assert err.value.key == "model.n_experts" and "model.family=llama does not read it" in str(
        err.value)
    assert shape_of(load(["model=moe_tiny", "model.n_experts=16"]).model).n_experts == 16


# --- routing and balancing ------------------------------------------------------------------------


def test_routing_takes_the_top_k_probabilities_renormalised_and_the_bias_only_chooses():
    torch.manual_seed(0)
    router = Router(tiny(bias_update_rate=0.1))
    x = torch.randn(6, 64)
    weights, chosen = router(x, n_sequences=2)
    probs = F.softmax(x @ router.gate.weight.T, dim=-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(chosen, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    # a large bias on expert 7 makes every token choose it; its weight stays its probability
    router.expert_bias[7] = 10.0
    weights, chosen = router(x, n_sequences=2)
    assert (chosen == 7).any(dim=-1).all()
    other = chosen[:, 0] if (chosen[:, 1] == 7).all() else chosen[:, 1]
    expected = probs.gather(-1, chosen)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    assert other.shape == (6,)


def test_the_auxiliary_loss_is_a_per_sequence_mean_so_any_batch_split_gives_it():
    torch.manual_seed(0)
    router = Router(tiny(aux_loss_coef=1.0))
    x = torch.randn(4 * 5, 64)  # 4 sequences of 5 tokens
    router(x, n_sequences=4)
    whole = router.aux_loss
    halves = []
    for part in x.chunk(2):
        router(part, n_sequences=2)
        halves.append(router.aux_loss)
    torch.testing.assert_close(whole, torch.stack(halves).mean())
    # by hand for the first sequence: E x sum_e f_e P_e
    router(x[:5], n_sequences=1)
    probs = F.softmax(x[:5] @ router.gate.weight.T, dim=-1)
    chosen = probs.topk(2, dim=-1).indices
    share = torch.bincount(chosen.flatten(), minlength=8) / 10
    torch.testing.assert_close(router.aux_loss, 8 * (share * probs.mean(0)).sum())


def test_the_bias_moves_against_the_load_and_the_counts_reset():
    model = Transformer(tiny(bias_update_rate=0.5))
    with torch.no_grad():
        model(torch.randint(96, (2, 16)))
    router = model.routers()[0]
    loads = router.step_tokens.clone()
    assert loads.sum() == 2 * 16 * 2  # every token's two copies
    model.after_optimizer_step()
    assert torch.equal(router.expert_bias, 0.5 * torch.sign(loads.mean() - loads))
    assert router.step_tokens.sum() == 0


def test_router_metrics_read_the_window_and_reset_it():
    model = Transformer(tiny(aux_loss_coef=0.01))
    model(torch.randint(96, (2, 16)))
    router = model.routers()[0]
    loads = router.window_tokens.clone()
    metrics = model.router_metrics()
    assert set(metrics) == {"router/layer1/load_max_over_mean", "router/layer1/bias_spread",
                            "router/layer2/load_max_over_mean", "router/layer2/bias_spread",
                            "router/aux_loss"}
    assert metrics["router/layer1/load_max_over_mean"] == loads.max() / loads.mean()
    assert all(t.device.type == "cpu" and t.ndim == 0 for t in metrics.values())
    assert router.window_tokens.sum() == 0


# --- experts --------------------------------------------------------------------------------------


def test_grouped_gemm_and_the_per_expert_loop_agree_forward_and_backward():
    torch.manual_seed(0)
    # every expert gets a row and rows are 16-byte multiples: what CPU's kernel needs
    counts = torch.tensor([3, 5, 1, 7])
    x = torch.randn(16, 16, requires_grad=True)
    w1, w3 = (torch.randn(4, 8, 16, requires_grad=True) for _ in range(2))
    w2 = torch.randn(4, 16, 8, requires_grad=True)
    results = []
    for grouped in (True, False):
        out = expert_swiglu(x, w1, w2, w3, counts, grouped=grouped)
        grads = torch.autograd.grad(out.pow(2).sum(), (x, w1, w2, w3))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    # the loop is what each expert's SwiGLU gives its own rows
    rows = x.split(counts.tolist())
    expected = torch.cat([F.linear(F.silu(F.linear(r, w1[e])) * F.linear(r, w3[e]), w2[e])
                          for e, r in enumerate(rows)])
    torch.testing.assert_close(results[1][0], expected)


def test_fake_counts_split_evenly_and_inverse_undoes_a_permutation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.zeros(4, dtype=torch.long)
    assert host_counts(fake, 10) == [3, 3, 2, 2]
    assert host_counts(torch.tensor([1, 2]), 3) == [1, 2]
    order = torch.randperm(9)
    x = torch.arange(9) * 10
    assert torch.equal(x[order][inverse(order)], x)


def test_an_experts_stack_is_initialised_as_its_matrices_would_be():
    stack = torch.empty(3, 5, 4)
    init.fill_normal_(stack, "layers.1.moe.experts.w1", seed=7, std=0.02)
    for i in range(3):
        matrix = torch.empty(5, 4)
        init.fill_normal_(matrix, f"layers.1.moe.experts.w1.{i}", seed=7, std=0.02)
        assert torch.equal(stack[i], matrix)


def test_meta_build_then_init_equals_a_cpu_build():
    with torch.device("meta"):
        meta = Transformer(TINY)
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3, buffer_device="cpu")
    cpu = Transformer(TINY)
    cpu.init_weights(seed=3)
    for (name, a), b in zip(meta.state_dict().items(), cpu.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(n.endswith("router.expert_bias") for n in cpu.state_dict())  # checkpointed


def test_the_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(max_seq_len=32))
    tokens = torch.randint(96, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# --- layout (fake process group) ---------------------------------------------------------------


def parallelized(shape: tuple[int, int, int, int], ep: int, args: MoEArgs = TINY) -> Transformer:
    world = shape[0] * shape[1] * shape[2] * shape[3]
    with fake_world(0, world):
        mesh = init_device_mesh("cpu", shape,
                                mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
        with torch.device("meta"):
            model = Transformer(args)
        return parallelize(model, mesh, ParallelDims(shape, ep=ep), ParallelismConfig())


def layout(param: torch.Tensor) -> dict[str, object]:
    return dict(zip(param.device_mesh.mesh_dim_names, param.placements, strict=True))


def test_expert_parallel_splits_whole_experts_and_fsdp_shards_what_ep_leaves():
    model = parallelized((1, 8, 1, 1), ep=4)
    experts = model.layers["1"].moe.experts
    placements = layout(experts.w1)
    assert placements["ep"] == Shard(0)
    assert set(placements) == {"dp_shard_mod_ep", "ep"}
    assert experts.w1.to_local().shape == (1, 32, 64)  # 8 experts / ep 4 / FSDP 2
    assert experts.ep == 4 and experts.ep_group is not None and experts.tp_mesh is None
    # everything else is sharded by FSDP over all of dp_shard
    assert layout(model.layers["1"].moe.router.gate.weight) == {"dp_shard": Shard(0)}
    units = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    assert {"layers.1.moe.experts", "layers.2.moe.experts", "layers.1", "", "output"} <= units


def test_with_tensor_parallel_each_expert_is_split_on_its_hidden_size():
    model = parallelized((1, 2, 1, 2), ep=2)
    experts = model.layers["2"].moe.experts
    assert layout(experts.w1)["tp"] == Shard(1) and layout(experts.w3)["tp"] == Shard(1)
    assert layout(experts.w2)["tp"] == Shard(2)
    assert layout(experts.w1)["ep"] == Shard(0)
    assert experts.w2.to_local().shape == (4, 64, 16)  # 8 / ep 2 experts, 32 / tp 2 columns
    # the router and the per-head norms stay whole on every tp rank
    assert "tp" not in layout(model.layers["2"].moe.router.gate.weight)
    assert model.layers["2"].attention.q_norm.tp_mesh is not None
    assert layout(model.layers["2"].moe.shared.w1.weight)["tp"] == Shard(0)


def test_an_expert_stack_that_does_not_split_into_whole_experts_is_split_on_rows():
    # 8 experts over ep 2 leave 4 per rank, which FSDP over 8 ranks cannot split evenly
    model = parallelized((1, 16, 1, 1), ep=2)
    w1 = model.layers["1"].moe.experts.w1
    assert w1.to_local().shape == (4, 4, 64)  # rows 32 / 8
    assert isinstance(layout(w1)["dp_shard_mod_ep"], Shard) and layout(w1)["ep"] == Shard(0)


def test_compile_and_sequence_parallel_are_refused_for_the_moe_family():
    with fake_world(0, 2):
        mesh = init_device_mesh("cpu", (1, 1, 1, 2),
                                mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
        with torch.device("meta"):
            model = Transformer(TINY)
        with pytest.raises(ValueError, match=r"parallelism\.sequence_parallel=true"):
            parallelize(model, mesh, ParallelDims((1, 1, 1, 2)),
                        ParallelismConfig(sequence_parallel=True))


@pytest.mark.parametrize(("override", "key"), [
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.precision=mxfp8", "trainer.precision"),
    ("parallelism.compile=true", "parallelism.compile"),
    ("parallelism.sequence_parallel=true", "parallelism.sequence_parallel"),
])
def test_what_the_moe_family_does_not_train_with_is_a_config_error_before_planning(override, key):
    run = load(["model=moe_tiny", override])
    with pytest.raises(ConfigError, match=r"not offered for model\.family=moe") as refused:
        choose(run)
    assert refused.value.key == key


def test_a_packed_sequence_computes_each_document_as_if_alone():
    """Document masking, as Llama's: each document in a packed row gets the logits it gets alone
    (routing is per token, so the experts see the same rows either way)."""
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    lengths = [[5, 9, 2], [16]]
    docs = [[torch.randint(TINY.vocab_size, (1, n)) for n in row] for row in lengths]
    packed = torch.cat([torch.cat(row, dim=1) for row in docs])
    documents = torch.cat([torch.cat([torch.full((1, n), i, dtype=torch.int32)
                                      for i, n in enumerate(row)], dim=1) for row in lengths])
    with torch.no_grad():
        together = model(packed, documents)
        alone = [torch.cat([model(doc) for doc in row], dim=1) for row in docs]
        unmasked = model(packed)
    for r, row in enumerate(alone):
        torch.testing.assert_close(together[r:r + 1], row, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[0, 5:], together[0, 5:], atol=1e-3)


def test_a_single_rank_leaves_the_experts_plain():
    model = parallelized((1, 1, 1, 1), ep=1)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert Replicate() is not None
