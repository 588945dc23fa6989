"""What is logged once per run, built without a server: artifacts and params."""

from __future__ import annotations

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from trainer import tracking
from trainer.config import compose, validate

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HF_TOKEN = "hf_abcdefghijklmnop"
MESH = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}


def test_a_launch_script_becomes_a_redacted_artifact():
    # `python -m launch` hands tracking the script it rendered; no trainer run carries one
    cfg = compose(["trainer.max_steps=8", "optim.warmup_steps=1"])
    script = (f"#!/bin/bash\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
              f"export HF_TOKEN={HF_TOKEN}\nsrun python -m trainer\n")
    record = tracking.RunRecord.build(
        validate(cfg), resolved_config=OmegaConf.to_container(cfg, resolve=True), overrides=[],
        mesh_shape=MESH, sweep=None, launch_artifact=("sbatch.sh", script),
        redactor=tracking.Redactor.from_env({"AWS_SECRET_ACCESS_KEY": AWS_SECRET}))
    logged = record.artifacts["launch/sbatch.sh"]
    assert "srun python -m trainer" in logged
    assert AWS_SECRET not in logged and HF_TOKEN not in logged


def test_long_values_are_truncated_with_a_marker():
    long = "x" * (MAX_PARAM_VAL_LENGTH + 500)
    params = tracking.config_params({"model": {"kwargs": {"notes": long}, "dim": 64}},
                                    tracking.Redactor())
    value = params["model.kwargs.notes"]
    assert len(value) <= MAX_PARAM_VAL_LENGTH and "truncated" in value
    assert value.startswith("x" * 1000) and params["model.dim"] == "64"
