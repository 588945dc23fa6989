"""Export a committed checkpoint as a Hugging Face Llama: consolidated safetensors + config.json,
the hand-off to serving stacks (vLLM, TGI, Neuron's serving).

The reference decoder applies rotary embeddings to adjacent pairs of each head's dimensions; Hugging
Face's Llama rotates the first half against the second. The same rotation in HF's layout needs wq
and wk permuted per head (as HF's own Llama conversion script does):
`w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import trainer.checkpoint.manifest as mf
from trainer.checkpoint.io import MODEL_KEY, SafeLoadPlanner
from trainer.checkpoint.storage import join

PREFIX = "model."  # the LightningModule holds the decoder as `self.model`
LAYER_NAMES = {
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


class ExportError(ValueError):
    pass


def load_model_state(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, consolidated into whole tensors in this one process."""
    reader = FsspecReader(url, **(storage_options or {}))
    metadata = reader.read_metadata()
    prefix = f"{MODEL_KEY}."
    state = {key[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    wrapped = {MODEL_KEY: state}
    dcp.load(wrapped, storage_reader=FsspecReader(url, **(storage_options or {})),
             planner=SafeLoadPlanner(), no_dist=True)
    return wrapped[MODEL_KEY]


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Adjacent-pair rotary rows -> Hugging Face's half-split rows, per head."""
    rows, dim = w.shape
    head_dim = rows // heads
    return w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def to_hf(state: dict[str, torch.Tensor], shape: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor
        elif name == "output.weight":
            if not shape.get("tie_embeddings"):
                out["lm_head.weight"] = tensor
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if rest not in LAYER_NAMES:
                raise ExportError(f"unexpected weight {key}: not the reference decoder")
            if rest == "attention.wq.weight":
                tensor = permute_rotary(tensor, shape["n_heads"])
            elif rest == "attention.wk.weight":
                tensor = permute_rotary(tensor, shape["n_kv_heads"])
            out[f"model.layers.{index}.{LAYER_NAMES[rest]}"] = tensor
        else:
            raise ExportError(f"unexpected weight {key}: not the reference decoder")
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(shape: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["dim"],
        "intermediate_size": shape["ffn_dim"],
        "num_hidden_layers": shape["n_layers"],
        "num_attention_heads": shape["n_heads"],
        "num_key_value_heads": shape["n_kv_heads"],
        "head_dim": shape["dim"] // shape["n_heads"],
        "vocab_size": shape["vocab_size"],
        "max_position_embeddings": shape["max_seq_len"],
        "rms_norm_eps": shape["norm_eps"],
        "rope_theta": shape["rope_theta"],  # read by serving stacks of the transformers 4 era
        "rope_parameters": {"rope_type": "default", "rope_theta": shape["rope_theta"]},
        "tie_word_embeddings": bool(shape.get("tie_embeddings")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": None,
    }


def export(directory: str, step: int | None, out_dir: Path,
           storage_options: dict | None = None) -> str:
    """Write `model.safetensors` and `config.json` for checkpoint `step` under `directory` (None:
    the newest committed one) to `out_dir`; the URL of the checkpoint exported."""
    from safetensors.torch import save_file

    if step is None:
        newest = mf.newest_committed(directory, storage_options)
        if newest is None:
            raise ExportError(f"{directory} holds no committed checkpoint")
        step = newest.step
    url = join(directory, mf.step_name(step))
    manifest = mf.read_manifest(url, storage_options)
    if manifest is None:
        raise ExportError(f"{url} is not a committed checkpoint (no {mf.MANIFEST})")
    problems = mf.verify(url, manifest, storage_options)
    if problems:
        raise ExportError(f"{url} is damaged: {'; '.join(problems)}")
    if manifest.model is None:
        raise ExportError(f"{url} holds a user's model; export knows the reference decoder only")
    tensors = to_hf(load_model_state(url, storage_options), manifest.model)
    dtype = next(iter(tensors.values())).dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(manifest.model, dtype), indent=2))
    return url
