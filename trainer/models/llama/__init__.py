"""The Llama family: the reference decoder (`model.py`), its shape and costs (`shape.py`), its
layout over a mesh (`parallelize.py`) and its Hugging Face names (`hf.py`)."""

from __future__ import annotations

from typing import Any

from trainer.models.family import ModelFamily
from trainer.models.llama.shape import LlamaArgs


def _build(args: LlamaArgs) -> Any:
    from trainer.models.llama.model import Transformer

    return Transformer(args)


def _parallelize(*args: Any, **kwargs: Any) -> Any:
    from trainer.models.llama.parallelize import parallelize

    return parallelize(*args, **kwargs)


def _init_weights(model: Any, seed: int, buffer_device: Any) -> None:
    model.init_weights(seed=seed, buffer_device=buffer_device)


def _hf() -> Any:
    from trainer.models.llama.hf import ADAPTER

    return ADAPTER


FAMILY = ModelFamily(name="llama", shape=LlamaArgs, build=_build, parallelize=_parallelize,
                     init_weights=_init_weights, hf=_hf)
