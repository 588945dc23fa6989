"""The Llama family in Hugging Face's layout (`transformers.LlamaForCausalLM`): config.json both
ways and every tensor's name.

Our decoder rotates adjacent pairs of each head's dimensions (Meta's layout); Hugging Face's
Llama rotates the first half against the second. The same rotation in its layout needs wq's and
wk's rows permuted within each head, as transformers' own Llama conversion script does; nothing
else changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.models.hf import PretrainedError, WeightMap
from trainer.models.llama.shape import LlamaArgs

LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def rotary_order(heads: int, head_dim: int) -> Any:
    """Hugging Face's row i of wq (wk) is our row order[i]: per head, the even rotary
    components first, then the odd ones."""
    import torch

    return torch.arange(heads * head_dim).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


class LlamaHF:
    architecture = "LlamaForCausalLM"

    def config(self, shape: LlamaArgs, dtype: str) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": "llama",
            "hidden_size": shape.dim,
            "intermediate_size": shape.ffn_dim,
            "num_hidden_layers": shape.n_layers,
            "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_kv_heads,
            "head_dim": shape.head_dim,
            "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_seq_len,
            "rms_norm_eps": shape.norm_eps,
            "rope_theta": shape.rope_theta,  # read by serving stacks of the transformers 4 era
            "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
            "tie_word_embeddings": shape.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": dtype,
            "bos_token_id": None,
            "eos_token_id": None,
        }

    def shape_values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        if config.get("model_type") != "llama":
            raise PretrainedError(f"its config.json is model_type {config.get('model_type')!r}; "
                                  "the llama family reads llama")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise PretrainedError(f"its rotary embedding is {rope_type!r} (rope scaling), which "
                                  "the llama family does not implement")
        for key, plain in (("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
            if config.get(key, plain) != plain:
                raise PretrainedError(f"{key}={config[key]!r} in its config.json; the llama "
                                      f"family has {plain!r}")
        heads = config["num_attention_heads"]
        if config.get("head_dim", config["hidden_size"] // heads) * heads != config["hidden_size"]:
            raise PretrainedError(f"head_dim={config['head_dim']} x {heads} heads is not "
                                  f"hidden_size={config['hidden_size']}")
        return {
            "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads", heads),
            "vocab_size": config["vocab_size"],
            "ffn_dim": config["intermediate_size"],
            "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            "norm_eps": float(config["rms_norm_eps"]),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        }

    def weights(self, shape: LlamaArgs) -> list[WeightMap]:
        maps = [WeightMap("tok_embeddings.weight", "model.embed_tokens.weight"),
                WeightMap("norm.weight", "model.norm.weight")]
        if not shape.tie_embeddings:  # tied: the head is the embedding table
            maps.append(WeightMap("output.weight", "lm_head.weight"))
        heads = {"attention.wq.weight": shape.n_heads, "attention.wk.weight": shape.n_kv_heads}
        for layer in range(shape.n_layers):
            for ours, theirs in LAYER.items():
                order = None
                if ours in heads:
                    n = heads[ours]
                    order = lambda n=n: rotary_order(n, shape.head_dim)  # noqa: E731
                maps.append(WeightMap(f"layers.{layer}.{ours}", f"model.layers.{layer}.{theirs}",
                                      order))
        return maps


ADAPTER = LlamaHF()
