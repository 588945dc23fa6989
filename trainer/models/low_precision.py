"""Low-precision training (trainer.precision=fp8 or mxfp8) through torchao.

`LowPrecision.of(run, fsdp=...)` says what a run asks for: the format, fp8's scaling recipe,
whether torchao emulates the low-precision matmuls (on the CPU, where no hardware has them) and
whether FSDP2 all-gathers the converted weights in float8. `convert` is what a family's
`parallelize` applies, before tensor parallel, compile and FSDP, to the linears the family
chooses; everything else computes as under bf16-mixed. No state of its own: tensorwise and
rowwise scales are computed from each tensor as it is cast (torchao's dynamic scaling), so a
checkpoint holds the same plain weights a bf16 run's does.

torch and torchao are imported where the conversion runs: the planner and the config read the
descriptor without them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from trainer.config import LOW_PRECISION_FORMATS, RunConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

# torchao's MXFP8 recipe for linears: e8m0 block scales rounded up (RCEIL), as NVIDIA's
# cuBLAS computes them; the only rounding its training recipes offer with hardware kernels.
MXFP8_RECIPE = "rceil"


def float8_all_gather(fmt: str, recipe: str, *, fsdp: bool) -> bool:
    """Whether FSDP2 gathers the converted weights in float8: torchao supports it for tensorwise
    scaling only (Float8LinearConfig refuses it otherwise); rowwise and MXFP8 gather the bf16
    weight and cast it after (the Neuron docs' MXFP8 tutorial says the same of TorchAO
    Neuron's FSDP2 path)."""
    return fsdp and fmt == "fp8" and recipe == "tensorwise"


@dataclass(frozen=True)
class LowPrecision:
    """How a run's converted linears train. `format`: fp8 | mxfp8; `recipe`: fp8's scaling
    (tensorwise | rowwise) or MXFP8_RECIPE; `emulate`: torchao computes the low-precision
    matmuls in high precision from the quantized values (the CPU's only way; no speed-up)."""

    format: str
    recipe: str
    emulate: bool
    float8_all_gather: bool

    @classmethod
    def of(cls, run: RunConfig, *, fsdp: bool) -> LowPrecision | None:
        """What `run` asks for (None: no low-precision format). `fsdp`: FSDP2 wraps the model.
        trainer.precision must be resolved (not auto): the planner picks it."""
        fmt = run.trainer.precision
        if fmt not in LOW_PRECISION_FORMATS:
            return None
        recipe = run.trainer.fp8_recipe if fmt == "fp8" else MXFP8_RECIPE
        return cls(fmt, recipe, emulate=run.hardware.device_type == "cpu",
                   float8_all_gather=float8_all_gather(fmt, recipe, fsdp=fsdp))

    @property
    def label(self) -> str:
        """What the progress line shows: `fp8`, or `fp8 emulated`."""
        return f"{self.format} emulated" if self.emulate else self.format

    def describe(self) -> str:
        """`fp8 (tensorwise, float8 all-gather; emulated by torchao on cpu)`."""
        parts = [self.recipe] + (["float8 all-gather"] if self.float8_all_gather else [])
        emulated = "; emulated by torchao on cpu, no speed-up" if self.emulate else ""
        return f"{self.format} ({', '.join(parts)}{emulated})"


def describe(run: RunConfig, *, fsdp: bool) -> str:
    """The run's precision as the progress line and MLflow state it."""
    low = LowPrecision.of(run, fsdp=fsdp)
    return low.describe() if low else run.trainer.precision


def convert(model: nn.Module, low: LowPrecision, include: Callable[[str], bool]) -> list[str]:
    """Swap the `nn.Linear`s of `model` whose qualified names `include` accepts for torchao's
    training linears of `low`, in place (on the meta device too: nothing is allocated);
    returns their names. Parameter names stay the same, so checkpoints and Hugging Face
    export see the same weights as in bf16."""
    from torch import nn

    converted: list[str] = []

    def chosen(module: nn.Module, fqn: str) -> bool:
        if isinstance(module, nn.Linear) and include(fqn):
            converted.append(fqn)
            return True
        return False

    with _quiet_torchao():
        if low.format == "fp8":
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            config = replace(Float8LinearConfig.from_recipe_name(low.recipe),
                             emulate=low.emulate,
                             enable_fsdp_float8_all_gather=low.float8_all_gather)
            convert_to_float8_training(model, module_filter_fn=chosen, config=config)
        else:
            from torchao.prototype.moe_training.config import (
                MXFP8TrainingOpConfig,
                MXFP8TrainingRecipe,
            )
            from torchao.quantization import quantize_

            recipe = (MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL if low.emulate
                      else MXFP8TrainingRecipe.MXFP8_RCEIL)
            quantize_(model, MXFP8TrainingOpConfig.from_recipe(recipe), filter_fn=chosen)
            for name in converted:
                model.get_submodule(name).register_forward_pre_hook(_input_in_weight_dtype)
    model.register_state_dict_post_hook(_plain_weights)
    return converted


def _input_in_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    """torchao's MXFP8 matmul takes its input and weight in one dtype; under autocast with fp32
    weights (no FSDP casting them to bf16) the input arrives in bf16, so it follows the weight."""
    return (args[0].to(module.weight.dtype), *args[1:])


def _plain_weights(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """Checkpoints hold plain tensors: torchao keeps a converted weight inside a tensor subclass
    (MXFP8's wrapper; float8 all-gather's), which a checkpoint would pickle as that class. The
    plain tensor inside shares its storage, so loading into it loads the weight."""
    for key, value in state_dict.items():
        if key.startswith(prefix):
            state_dict[key] = plain(value)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor a torchao training subclass wraps (through a DTensor's local shard),
    sharing its storage; `tensor` itself if it wraps none."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        local = plain(tensor._local_tensor)
        if local is tensor._local_tensor:
            return tensor
        return DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                                  shape=tensor.shape, stride=tensor.stride())
    if type(tensor).__module__.startswith("torchao."):
        # float8 all-gather's WeightWithDynamicFloat8CastTensor keeps it in _tensor, MXFP8's
        # MXFP8TrainingWeightWrapperTensor in _data
        for attribute in ("_tensor", "_data"):
            inner = getattr(tensor, attribute, None)
            if inner is not None:
                return inner
    return tensor


def after_optimizer_step(model: nn.Module, low: LowPrecision | None) -> None:
    """With float8 all-gather: compute every converted weight's scale in one all-reduce after
    the optimizer changed them (torchao's precompute_float8_dynamic_scale_for_fsdp), instead of
    one small all-reduce per weight inside the next all-gather."""
    if low is None or not low.float8_all_gather or _fake(model):
        return
    with _quiet_torchao():
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def _fake(model: nn.Module) -> bool:
    """Parameters under FakeTensorMode (the plan validation's step): they hold no values to take
    scales of, and torchao's weight class tests a precomputed scale for truth, which a fake
    tensor cannot answer. Each all-gather then computes its own scale, as without precompute."""
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(plain(p)) for p in model.parameters())


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """Import torchao without its warnings about the CUDA kernels a CPU build of torch cannot
    load (and torch's about an Enum torchao registers): the conversions here use none of them."""
    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)
