"""The XLA path's config, plans, preflight and runtime environment: what runs without torch_xla.
Training on XLA itself is tests/xla (make test-xla)."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load
from trainer.plan import choose
from trainer.plan.planner import RunFacts, dim_links, step_time
from trainer.preflight import check_xla
from trainer.xla import compile_pass_overrides, runtime_env, wants_compile_pass


def test_trn1_takes_the_xla_path_and_strategy_xla_takes_it_anywhere():
    assert load(["hardware=trn1"]).uses_xla
    assert load(["strategy=xla"]).uses_xla
    assert not load([]).uses_xla
    assert not load(["hardware=trn2"]).uses_xla


def test_auto_plans_data_parallel_on_trn1():
    dims = choose(load(["hardware=trn1"])).dims
    assert dims.shape == (32, 1, 1, 1) and not dims.activation_checkpointing


AUTO_FITS = "parallelism=auto fits: dp_replicate=32"


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["parallelism=fsdp"], "parallelism.dp_shard=32", ["use dp_replicate", AUTO_FITS]),
    (["parallelism=tp"], "parallelism.tp=32", ["TorchNeuron", AUTO_FITS]),
    (["parallelism=ddp", "parallelism.activation_checkpointing=true"],
     "parallelism.activation_checkpointing=True", ["XLA", AUTO_FITS]),
    (["parallelism=ddp", "parallelism.param_dtype=bfloat16"], "parallelism.param_dtype",
     ["FSDP2's"]),
    (["parallelism=ddp", "parallelism.compile=true"], "parallelism.compile=True", ["XLA"]),
])
def test_the_planner_refuses_what_the_xla_path_cannot_run_in_one_line(overrides, key, words):
    with pytest.raises(ConfigError) as refused:
        choose(load(["hardware=trn1", *overrides]))
    line = str(refused.value)
    assert line.startswith(key) and "\n" not in line
    for word in words:
        assert word in line


def test_the_same_plans_run_on_the_mesh_path():
    # the refusals above are the XLA path's, not the plans': on Trn2 they run
    for overrides in (["parallelism=fsdp"], ["parallelism.tp=4"]):
        assert choose(load(["hardware=trn2", *overrides])).feasible


def test_the_xla_step_hides_no_gradient_traffic_behind_compute():
    # the mesh path counts plan.overlap of the replicas' all-reduce as hidden; XLA runs it after
    # backward, so all of it adds to the step
    run = load(["hardware=trn1", "cluster.nodes=2", "parallelism=ddp"])
    chosen = choose(run)
    facts = RunFacts.of(run)
    mesh_times = step_time(facts, chosen.dims, dim_links(facts.topology, chosen.dims.shape))
    assert mesh_times["replicate"] > 0
    estimate = chosen.estimate
    assert estimate.time["exposed_dp"] == pytest.approx(mesh_times["replicate"])
    assert estimate.step_seconds == pytest.approx(mesh_times["compute"] + mesh_times["replicate"])
    assert mesh_times["step"] < estimate.step_seconds


def test_mixed_precision_is_refused_on_the_xla_path():
    with pytest.raises(ConfigError, match=r"^trainer.precision='bf16-mixed': the XLA path"):
        load(["hardware=trn1", "trainer.precision=bf16-mixed"])
    load(["hardware=trn2", "trainer.precision=bf16-mixed"])  # the mesh path keeps it


def test_runtime_environment_of_a_trn1_run():
    run = load(["hardware=trn1", "trainer.precision=bf16-true",
                "strategy.compile_cache=s3://bucket/neuron-cache",
                "strategy.neuron_cc_flags='--model-type=transformer -O1'"])
    assert runtime_env(run) == {
        "PJRT_DEVICE": "NEURON", "NEURON_CC_FLAGS": "--model-type=transformer -O1",
        "NEURON_COMPILE_CACHE_URL": "s3://bucket/neuron-cache",
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1"}
    fp32 = runtime_env(load(["hardware=trn1"]))
    assert fp32["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"  # fp32 weights round exactly
    assert "NEURON_COMPILE_CACHE_URL" not in fp32
    assert not {"XLA_USE_BF16", "XLA_DOWNCAST_BF16"} & set(fp32)  # deprecated
    assert runtime_env(load(["strategy=xla"])) == {"PJRT_DEVICE": "CPU"}
    assert runtime_env(load(["hardware=trn2"])) == {}


def test_the_compile_pass_is_a_short_run_that_writes_nothing_training_reads():
    base = ["hardware=trn1", "checkpoint=s3", "checkpoint.dir=s3://bucket/run",
            "checkpoint.resume=last", "optim.warmup_steps=50", "strategy.parallel_compile_steps=8"]
    run = load(base)
    assert wants_compile_pass(run)
    assert not wants_compile_pass(load(["hardware=trn1"]))
    assert not wants_compile_pass(load(["strategy=xla", "strategy.parallel_compile_steps=8"]))
    compile_pass = load(base + compile_pass_overrides(run, "/runs/r1"))
    assert compile_pass.trainer.max_steps == 8
    assert compile_pass.tracking.backend == "none"
    assert compile_pass.checkpoint.dir == "/runs/r1/neuron-compile-pass/checkpoints"
    assert compile_pass.checkpoint.resume is None
    assert compile_pass.model == run.model and compile_pass.data == run.data


def _check(overrides, *, missing=None, in_cluster=True):
    check_xla(load(overrides), xla_missing=missing, in_cluster=in_cluster)


def test_preflight_refuses_what_the_xla_path_cannot_start_here():
    _check(["strategy=xla"])  # one process on XLA's CPU device: fine
    _check(["hardware=trn1"], in_cluster=True)
    with pytest.raises(ConfigError, match=r"^trainer.devices=2: .*distributed runtime"):
        _check(["strategy=xla", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"^strategy.name='xla': .*CUDA plugin"):
        _check(["hardware=h100", "strategy=xla"])
    with pytest.raises(ConfigError, match=r"^strategy.name='auto': .*pip install"):
        _check(["hardware=trn1"], missing="torch_xla is not installed: pip install")
    with pytest.raises(ConfigError, match=r"^cluster.kind='local': .*torchrun"):
        _check(["hardware=trn1"], in_cluster=False)
    _check([], missing="not asked")  # runs off the XLA path never look


def test_strategy_names_are_checked():
    with pytest.raises(ConfigError, match=r"^strategy.name='jax': allowed: auto, xla"):
        load(["strategy.name=jax"])
    with pytest.raises(ConfigError, match=r"^strategy.parallel_compile_steps=-1"):
        load(["strategy.parallel_compile_steps=-1"])
