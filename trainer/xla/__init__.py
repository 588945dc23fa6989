"""The XLA path: PyTorch/XLA (lazy tensors, `torch_xla.sync()` at step boundaries, the `xla`
process group, PJRT) for Trn1 and Neuron SDKs up to 2.29 through torch-neuronx, and XLA's own CPU
device for tests. The rest of ultramesh trains through a device mesh (`trainer.mesh`); a run takes
this path when `RunConfig.uses_xla` (strategy=xla, or hardware whose backend is xla).

Here: the runtime environment a run of this path needs, for the trainer (set before torch_xla is
imported) and for the launchers (exported on every node). Cheap to import: no torch_xla. The
Lightning side is `trainer.xla.strategy`; which plans the path runs is `trainer.plan.xla`.
"""

from __future__ import annotations

from trainer.config import KEY, RunConfig

XLA_INSTALL_HINT = (
    "torch_xla is not installed: the XLA path needs torch-xla matching this torch ({torch}); on "
    "Trainium it comes with torch-neuronx (Neuron SDK <= 2.29), for XLA's CPU device `pip install "
    "torch-xla==2.9.0 torch==2.9.0` (`make test-xla` builds that environment)")
# PJRT's device names (torch_xla.runtime.device_type()) for the hardware's device type.
PJRT_DEVICES = {"neuron": "NEURON", "cpu": "CPU"}
# Where the compile pass keeps its run (its outputs are graphs, not weights), under the run's
# output directory; the launchers delete it when the pass ends.
COMPILE_PASS_DIR = "neuron-compile-pass"


def pjrt_device(run: RunConfig) -> str:
    """PJRT_DEVICE for this run's hardware. torch-xla 2.9 on PyPI ships the CPU client; NEURON
    comes with torch-neuronx. CUDA through XLA needs a plugin PyPI does not carry (preflight
    refuses it)."""
    return PJRT_DEVICES.get(run.hardware.device_type, run.hardware.device_type.upper())


def runtime_env(run: RunConfig) -> dict[str, str]:
    """Environment variables of the XLA path (empty for other runs).

    Neuron's (AWS Neuron docs, "Neuron Runtime configuration" and "PyTorch Neuron environment
    variables", SDK 2.x): NEURON_CC_FLAGS reach neuronx-cc; NEURON_COMPILE_CACHE_URL puts the
    compiled graphs where every node (and the next run) finds them, a path or s3:// URL;
    NEURON_RT_STOCHASTIC_ROUNDING_EN rounds bf16 weight updates stochastically, which is how bf16
    weights train on Trainium now that XLA_USE_BF16 / XLA_DOWNCAST_BF16 are deprecated (the
    weights are cast by trainer.precision=bf16-true instead).
    """
    if not run.uses_xla:
        return {}
    env = {"PJRT_DEVICE": pjrt_device(run)}
    if run.hardware.device_type != "neuron":
        return env
    s = run.strategy
    env["NEURON_CC_FLAGS"] = s.neuron_cc_flags
    if s.compile_cache:
        env["NEURON_COMPILE_CACHE_URL"] = s.compile_cache
    bf16 = run.trainer.precision == "bf16-true"
    env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] = "1" if bf16 and s.stochastic_rounding else "0"
    return env


def compile_pass_overrides(run: RunConfig, run_dir: str) -> list[str]:
    """Overrides that turn a training command into Neuron's ahead-of-time compile pass: under
    `neuron_parallel_compile` the ranks trace `strategy.parallel_compile_steps` steps whose
    results are placeholders, so nothing they write may look like training: no MLflow run, no
    checkpoint where the real run resumes from (a local one, under its own output directory,
    which the launchers delete)."""
    scratch = f"{run_dir}/{COMPILE_PASS_DIR}"
    return [f"{KEY.trainer.max_steps}={run.strategy.parallel_compile_steps}",
            f"{KEY.tracking.backend}=none", f"{KEY.checkpoint}=local",
            f"{KEY.checkpoint.dir}={scratch}/checkpoints",
            f"{KEY.checkpoint.resume}=null", f"{KEY.optim.warmup_steps}=null",
            f"hydra.run.dir={scratch}"]


def wants_compile_pass(run: RunConfig) -> bool:
    """The launchers run `neuron_parallel_compile` first: Neuron hardware on the XLA path with
    strategy.parallel_compile_steps > 0."""
    return (run.uses_xla and run.hardware.device_type == "neuron"
            and run.strategy.parallel_compile_steps > 0)
