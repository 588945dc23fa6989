"""The MoE family: a Qwen3-MoE-shaped decoder with routed experts (`model.py`, `experts.py`), its
shape and costs (`shape.py`), its layout with expert parallel (`parallelize.py`) and its Hugging
Face names (`hf.py`). docs/moe.md says how to use it."""

from __future__ import annotations

from typing import Any

from trainer.models.family import ModelFamily
from trainer.models.moe.shape import MoEArgs


def _build(args: MoEArgs) -> Any:
    from trainer.models.moe.model import Transformer

    return Transformer(args)


def _parallelize(*args: Any, **kwargs: Any) -> Any:
    from trainer.models.moe.parallelize import parallelize

    return parallelize(*args, **kwargs)


def _init_weights(model: Any, seed: int, buffer_device: Any) -> None:
    model.init_weights(seed=seed, buffer_device=buffer_device)


def _hf() -> Any:
    from trainer.models.moe.hf import ADAPTER

    return ADAPTER


FAMILY = ModelFamily(name="moe", shape=MoEArgs, build=_build, parallelize=_parallelize,
                     init_weights=_init_weights, hf=_hf)
