"""One rank of `tests/test_validate_plan.py`'s activation-checkpointing test: run under
`torchrun --nproc_per_node=2`, argv[1] the JSON file rank 0 writes, the rest config overrides.

Twice, without and with activation checkpointing, every rank builds the module as the trainer
does (the plan's real gloo mesh, `build_module`, its own `configure_model`) and measures one
training step with the validation's own code (`trainer.validate_plan.measure_step`), on real
tensors: what FakeTensorMode cannot show for a checkpointed FSDP2 model (its recomputed blocks
are never freed there), a real run does.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from trainer.config import load
from trainer.mesh import build_mesh
from trainer.module import build_module, precision_plugin
from trainer.plan import choose
from trainer.validate_plan import _model_of, measure_step


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {}
    for checkpointing in (False, True):
        run = load([*overrides, f"parallelism.activation_checkpointing={checkpointing}"])
        chosen = choose(run)
        assert chosen.dims.activation_checkpointing == checkpointing
        module = build_module(run, chosen.dims)
        module._device_mesh = build_mesh(chosen.dims, "cpu")  # as the mesh strategy hands it
        precision = precision_plugin(run)
        with precision.module_init_context():
            module.configure_model()
        step = measure_step(run, chosen, module, _model_of(module), precision, dist.get_rank())
        results["on" if checkpointing else "off"] = {"measured": step.measured,
                                                      "estimated": step.estimated}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
