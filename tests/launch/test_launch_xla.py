"""Jobs of the XLA path (hardware=trn1): the Neuron runtime environment on every node and
Neuron's optional ahead-of-time compile pass before training, as SLURM and EKS render them
(dry runs: no Trainium, no cluster here)."""

from __future__ import annotations

import shlex

import yaml

from tests.launch.helpers import launch
from tests.launch.test_launch_eks import render
from trainer.config import load

TRN1 = ["hardware=trn1", "cluster.nodes=2", "trainer.precision=bf16-true",
        "strategy.compile_cache=s3://bucket/neuron-cache"]
SLURM = ["cluster=slurm", "cluster.partition=trn1", "launch.dry_run=true", *TRN1]
NEURON_ENV = {"PJRT_DEVICE": "NEURON", "NEURON_CC_FLAGS": "--model-type=transformer",
              "NEURON_COMPILE_CACHE_URL": "s3://bucket/neuron-cache",
              "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1", "FI_PROVIDER": "efa"}


def trainer_overrides(command: str) -> list[str]:
    """The overrides after `-m trainer` in a rendered shell command."""
    words = shlex.split(command)
    return words[words.index("trainer") + 1:]


def test_a_slurm_job_on_trn1_exports_the_neuron_runtime_and_compiles_first():
    proc = launch(*SLURM, "strategy.parallel_compile_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in script.splitlines()
                   if line.startswith("export ") and "=" in line)
    assert {k: exports.get(k) for k in NEURON_ENV} == NEURON_ENV
    assert not {"XLA_USE_BF16", "XLA_DOWNCAST_BF16"} & set(exports)
    compile_at = script.index("neuron_parallel_compile ")
    compile_end = script.index(" || exit", compile_at)
    train_at = script.index("-m torch.distributed.run", compile_end)  # the pass, then training
    compile_cmd = script[compile_at:compile_end].replace("\\\n", " ")
    compile_pass = load(trainer_overrides(compile_cmd))
    assert compile_pass.uses_xla and compile_pass.trainer.max_steps == 10
    assert compile_pass.tracking.backend == "none"
    assert "neuron-compile-pass" in compile_pass.checkpoint.dir
    training = load(trainer_overrides(script[train_at:].split(" &\n")[0].replace("\\\n", " ")))
    assert training.uses_xla and training.checkpoint.resume == "last"
    assert training.trainer.max_steps == load(TRN1).trainer.max_steps


def test_without_compile_steps_there_is_no_compile_pass():
    proc = launch(*SLURM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "neuron_parallel_compile" not in proc.stdout
    assert "export PJRT_DEVICE=NEURON" in proc.stdout


def test_an_eks_trainjob_on_trn1_carries_the_neuron_runtime_and_compiles_first():
    text = render(*TRN1, "strategy.parallel_compile_steps=10", "cluster.job_kind=trainjob")
    job = next(d for d in yaml.safe_load_all(text) if d["kind"] == "TrainJob")
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert {k: env.get(k) for k in NEURON_ENV} == NEURON_ENV
    lines = job["spec"]["trainer"]["command"][2].splitlines()
    compile_line = next(i for i, line in enumerate(lines)
                        if line.startswith("neuron_parallel_compile torchrun "))
    train_line = next(i for i, line in enumerate(lines) if line.startswith("exec torchrun "))
    assert compile_line < train_line
    assert load(trainer_overrides(lines[compile_line])).trainer.max_steps == 10
