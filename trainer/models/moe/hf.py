"""The MoE family in Hugging Face's layout (`transformers.Qwen3MoeForCausalLM`): config.json both
ways and every tensor's name.

Qwen's checkpoints store each expert of an MoE layer as its own three matrices
(`mlp.experts.<e>.gate_proj/up_proj/down_proj.weight`, what `save_pretrained` writes and what
transformers 5 fuses into 3-D `gate_up_proj`/`down_proj` only in memory); the family keeps
them stacked, one [experts, out, in] tensor each, so the adapter maps every expert to one
matrix of the stack (`WeightMap.stacked`): on import each rank reads only its own experts'
files' bytes, and export writes the experts out one by one. Rotary embeddings use Qwen's own
half-split layout, so no row is permuted.

What Qwen3-MoE cannot express is refused in one line: shared experts, dense layers other than
the first n_dense_layers, a routing bias trained by bias_update_rate (Qwen3-MoE routes by the
probabilities alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.config import KEY
from trainer.models.hf import PretrainedError, WeightMap
from trainer.models.moe.shape import MoEArgs

ATTENTION = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
DENSE = {"feed_forward.w1.weight": "mlp.gate_proj.weight",
         "feed_forward.w3.weight": "mlp.up_proj.weight",
         "feed_forward.w2.weight": "mlp.down_proj.weight"}
EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Qwen3MoeHF:
    architecture = "Qwen3MoeForCausalLM"

    def config(self, shape: MoEArgs, dtype: str) -> dict[str, Any]:
        if shape.n_shared_experts:
            raise PretrainedError(f"{KEY.model.n_shared_experts}={shape.n_shared_experts}: "
                                  "Qwen3-MoE has no shared experts")
        if shape.bias_update_rate:
            raise PretrainedError(f"{KEY.model.bias_update_rate}={shape.bias_update_rate}: the "
                                  "model routes by a trained bias Qwen3-MoE does not have")
        return {
            "architectures": [self.architecture],
            "model_type": "qwen3_moe",
            "hidden_size": shape.dim,
            "intermediate_size": shape.ffn_dim,
            "moe_intermediate_size": shape.moe_ffn_dim,
            "num_hidden_layers": shape.n_layers,
            "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_kv_heads,
            "head_dim": shape.head_size,
            "num_experts": shape.n_experts,
            "num_experts_per_tok": shape.top_k,
            "norm_topk_prob": shape.norm_topk_prob,
            "decoder_sparse_step": shape.moe_every,
            "mlp_only_layers": list(range(shape.n_dense_layers)),
            "router_aux_loss_coef": shape.aux_loss_coef,
            "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_seq_len,
            "rms_norm_eps": shape.norm_eps,
            "rope_theta": shape.rope_theta,  # read by serving stacks of the transformers 4 era
            "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
            "torch_dtype": dtype,
            "bos_token_id": None,
            "eos_token_id": None,
        }

    def shape_values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        if config.get("model_type") != "qwen3_moe":
            raise PretrainedError(f"its config.json is model_type {config.get('model_type')!r}; "
                                  "the moe family reads qwen3_moe")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise PretrainedError(f"its rotary embedding is {rope_type!r} (rope scaling), which "
                                  "the moe family does not implement")
        for key, plain in (("hidden_act", "silu"), ("attention_bias", False),
                           ("use_sliding_window", False), ("tie_word_embeddings", False)):
            if config.get(key, plain) != plain:
                raise PretrainedError(f"{key}={config[key]!r} in its config.json; the moe "
                                      f"family has {plain!r}")
        dense = sorted(config.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise PretrainedError(f"mlp_only_layers={dense} in its config.json; the moe family's "
                                  "dense layers are the first n_dense_layers")
        heads = config["num_attention_heads"]
        return {
            "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim", config["hidden_size"] // heads),
            "vocab_size": config["vocab_size"],
            "ffn_dim": config["intermediate_size"],
            "moe_ffn_dim": config["moe_intermediate_size"],
            "n_experts": config.get("num_experts", config.get("num_local_experts")),
            "top_k": config["num_experts_per_tok"],
            "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
            "moe_every": config.get("decoder_sparse_step", 1),
            "n_dense_layers": len(dense),
            "n_shared_experts": 0,
            "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            "norm_eps": float(config["rms_norm_eps"]),
        }

    def weights(self, shape: MoEArgs) -> list[WeightMap]:
        maps = [WeightMap("tok_embeddings.weight", "model.embed_tokens.weight"),
                WeightMap("norm.weight", "model.norm.weight"),
                WeightMap("output.weight", "lm_head.weight")]
        for layer in range(shape.n_layers):
            ours, theirs = f"layers.{layer}", f"model.layers.{layer}"
            maps += [WeightMap(f"{ours}.{a}", f"{theirs}.{b}") for a, b in ATTENTION.items()]
            if not shape.is_moe_layer(layer):
                maps += [WeightMap(f"{ours}.{a}", f"{theirs}.{b}") for a, b in DENSE.items()]
                continue
            maps.append(WeightMap(f"{ours}.moe.router.gate.weight", f"{theirs}.mlp.gate.weight"))
            for name, hf_name in EXPERT.items():
                maps += [WeightMap(f"{ours}.moe.experts.{name}",
                                   f"{theirs}.mlp.experts.{e}.{hf_name}.weight", stacked=e)
                         for e in range(shape.n_experts)]
        return maps


ADAPTER = Qwen3MoeHF()
