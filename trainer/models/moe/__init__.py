"""The MoE family: a Qwen3-MoE-shaped decoder with routed experts (`model.py`, `experts.py`), its
shape and costs (`shape.py`), its layout with expert parallel (`parallelize.py`) and its Hugging
Face names (`hf.py`). docs/moe.md says how to use it."""

from __future__ import annotations

from typing import Any

from trainer.config import KEY, LOW_PRECISION_FORMATS, ConfigError
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


def _refuse_options(run: Any) -> None:
    """What the MoE family does not train with yet (docs/moe.md): torch.compile and sequence
    parallel (the token exchange's sizes change every step), fp8 / mxfp8 (the experts are
    grouped matmuls, which torchao's float8 linears do not convert)."""
    p, precision = run.parallelism, run.trainer.precision
    for key, on in ((KEY.parallelism.compile, p.compile),
                    (KEY.parallelism.sequence_parallel, p.sequence_parallel)):
        if on:
            raise ConfigError(key, on, f"not offered for {KEY.model.family}=moe; use false "
                                       "(docs/moe.md)")
    if precision in LOW_PRECISION_FORMATS:
        raise ConfigError(KEY.trainer.precision, precision,
                          f"not offered for {KEY.model.family}=moe: its experts are grouped "
                          "matmuls, which torchao's float8 linears do not convert; use "
                          "bf16-mixed (docs/moe.md)")


FAMILY = ModelFamily(name="moe", shape=MoEArgs, build=_build, parallelize=_parallelize,
                     init_weights=_init_weights, hf=_hf, refuse_options=_refuse_options)
