"""One rank of `tests/models/test_hf.py`'s 4-rank import: run under `torchrun --nproc_per_node=4`.

Every rank builds the module as the trainer does (the mesh of `parallelism=fsdp_tp`, then
`LanguageModel.configure_model`, which loads `model.init_from` into its own shards), runs the
forward pass on the token ids in the input file, and rank 0 writes the logits and every rank's
load figures (`LanguageModel.pretrained`) to the output directory.

    torchrun --nproc_per_node=4 hf_worker.py TOKENS.pt OUT_DIR [hydra overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import load
from trainer.mesh import build_mesh
from trainer.module import LanguageModel
from trainer.plan import choose


def main() -> None:
    tokens_file, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    run = load(["trainer.devices=4", "parallelism=fsdp_tp", *sys.argv[3:]])
    dims = choose(run).dims
    module = LanguageModel(run, dims)
    module._device_mesh = build_mesh(dims, "cpu")  # what the mesh strategy hands the module
    with torch.device("cpu"):
        module.configure_model()
    with torch.no_grad():
        logits = module(torch.load(tokens_file))
    figures: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(figures, module.pretrained)
    if dist.get_rank() == 0:
        torch.save(logits, out / "logits.pt")
        (out / "load.json").write_text(json.dumps({"mesh": dims.mesh_str, "ranks": figures}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
