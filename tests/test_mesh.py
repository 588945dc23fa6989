"""`MeshStrategy` end to end: real processes on CPU/gloo train the tiny model over N-D meshes and
match a one-process run of the same global batch.

Each run is the user's command line (`python -m trainer ...` with Lightning's own launcher, or
`torchrun ... -m trainer ...`, the path clusters use). What a run did is read from its real
outputs: the per-step losses from its log (`step N/M  loss X`, printed every step with
trainer.log_every_n_steps=1) and the weights from its final checkpoint (a file for one process, a
torch.distributed.checkpoint directory for a mesh).

The one-process reference reads micro_batch_size x dp rows per step; the data sampler hands each
of dp ranks its share of the same global batch (trainer/data/sampler.py), so every run sees the same
tokens each step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dcp_weights import assert_close, weights
from trainer.hardware import HardwareSpec
from trainer.mesh import (
    build_mesh,
    data_parallel_rank,
    neuron_accelerator,
    process_group_backend,
)
from trainer.plan import ParallelDims
from trainer.validate_plan import fake_world

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
STEPS = 5
COMMON = ["hardware=cpu", "tracking=none", f"trainer.max_steps={STEPS}",
          "trainer.log_every_n_steps=1", "trainer.progress_bar=true", "model.n_layers=2",
          "data.seq_len=32", "optim.warmup_steps=1", "checkpoint.every_n_steps=0"]
LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss ([0-9.]+)")


# ------------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize("shape", [(2, 2, 1, 2), (1, 4, 1, 2), (8, 1, 1, 1)])
def test_data_parallel_rank_is_replica_major_and_shared_by_tp_peers(shape):
    rep, shard, cp, tp = shape
    world = rep * shard * cp * tp
    plan = ParallelDims(shape)
    for rank in range(world):
        # row-major over (dp_replicate, dp_shard, cp, tp): tp varies fastest
        expected = (rank // (shard * cp * tp)) * shard + (rank // (cp * tp)) % shard
        with fake_world(rank, world):
            assert data_parallel_rank(build_mesh(plan, "cpu")) == (rep * shard, expected)


def test_mesh_dims_are_named_as_the_plan_says():
    with fake_world(0, 8):
        mesh = build_mesh(ParallelDims((2, 2, 1, 2)), "cpu")
        assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard", "cp", "tp")
        assert tuple(mesh.shape) == (2, 2, 1, 2)
        assert mesh["tp"].mesh.tolist() == [0, 1]  # a tp group is consecutive ranks


def test_process_group_backend_comes_from_the_hardware():
    assert process_group_backend(HardwareSpec.load("cpu")) == "gloo"
    assert process_group_backend(HardwareSpec.load("h100")) == "nccl"
    # DCP plans checkpoint writes with CPU collectives, which need gloo beside neuron
    assert process_group_backend(HardwareSpec.load("trn2")) == "neuron:neuron,cpu:gloo"


def test_neuron_without_torch_neuronx_says_what_to_install():
    if _importable("torch_neuronx"):  # never here: AWS's index is out of reach (NOTES.md)
        pytest.skip("torch-neuronx is installed")
    with pytest.raises(ImportError) as info:
        neuron_accelerator()
    message = str(info.value)
    assert "torch-neuronx==" in message and "pip.repos.neuron.amazonaws.com" in message


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------
# End to end, real processes


def train(tmp_path: Path, name: str, overrides: list[str], *, torchrun: int = 0) -> Path:
    """Run one training job in its own directory; returns that directory."""
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "trainer", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    if torchrun:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={torchrun}", "-m", "trainer"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    log = proc.stdout + proc.stderr
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "test-output.txt").write_text(log)
    assert proc.returncode == 0, log[-5000:]
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in
            LOSS_LINE.findall((run_dir / "test-output.txt").read_text())}


def assert_matches(run_dir: Path, checkpoints: Path, reference: Path, steps: range) -> None:
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(steps), got
    for step in steps:  # the log prints 4 decimals
        assert got[step] == pytest.approx(want[step], abs=2e-4), (step, got, want)
    final = f"step-{STEPS:08d}.ckpt"
    assert_close(weights(str(checkpoints / final)),
                 weights(str(reference / "checkpoints" / final)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mesh")


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """One process reading the whole global batch each step."""
    run_dir = train(workdir, "reference", [f"data.micro_batch_size={GLOBAL_BATCH}"])
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


MESHES = {
    # name: (overrides, data-parallel size, torchrun processes or 0 for Lightning's launcher)
    "fsdp2": (["trainer.devices=2", "parallelism=fsdp"], 2, 0),
    "tp": (["trainer.devices=2", "parallelism=tp"], 1, 0),
    "fsdp2_x_tp": (["trainer.devices=4", "parallelism.tp=2", "parallelism.dp_shard=2"], 2, 0),
    "hsdp": (["trainer.devices=4", "parallelism=hsdp", "parallelism.dp_shard=2"], 4, 4),
}
_runs: dict[str, Path] = {}


def mesh_run(workdir: Path, name: str) -> Path:
    """Train mesh `name` once per module. fsdp2_x_tp keeps its checkpoints behind a file:// URL
    (the fsspec path s3:// takes), every 3 steps, for the resume test."""
    if name not in _runs:
        overrides, dp, nproc = MESHES[name]
        overrides = [*overrides, f"data.micro_batch_size={GLOBAL_BATCH // dp}"]
        if name == "fsdp2_x_tp":
            overrides += [f"checkpoint.dir=file://{workdir / 'url-checkpoints'}",
                          "checkpoint.every_n_steps=3"]
        _runs[name] = train(workdir, name, overrides, torchrun=nproc)
    return _runs[name]


def checkpoints_of(workdir: Path, name: str) -> Path:
    return workdir / ("url-checkpoints" if name == "fsdp2_x_tp" else f"{name}/checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_training_matches_one_process(name, reference, workdir):
    run_dir = mesh_run(workdir, name)
    log = (run_dir / "test-output.txt").read_text()
    shape = dict(re.findall(r"(dp_replicate|dp_shard|cp|tp)=(\d+)", log.split("final loss")[-1]))
    assert int(shape["dp_replicate"]) * int(shape["dp_shard"]) == MESHES[name][1]
    assert_matches(run_dir, checkpoints_of(workdir, name), reference, range(1, STEPS + 1))
    assert losses(run_dir)[STEPS] < losses(run_dir)[1] - 0.5  # it trains


# What each rank held, read from the outside: the final checkpoint's DCP metadata lists every
# rank's shard of each tensor as (offsets, sizes). The tiny decoder: dim 256, 8 heads of 32, 4 KV
# heads (wk: 128 rows), vocabulary 256. Derived by hand from the plan's placements.
HALF_ROWS = {((0, 0), (128, 256)), ((128, 0), (128, 256))}
SHARDS = {
    "fsdp2": {"attention.wq.weight": HALF_ROWS, "attention.wo.weight": HALF_ROWS,
              "attention.wk.weight": {((0, 0), (64, 256)), ((64, 0), (64, 256))},
              "tok_embeddings.weight": HALF_ROWS},
    # wq column-parallel (output rows), wo row-parallel (input columns), embedding by vocabulary
    "tp": {"attention.wq.weight": HALF_ROWS,
           "attention.wo.weight": {((0, 0), (256, 128)), ((0, 128), (256, 128))},
           "attention.wk.weight": {((0, 0), (64, 256)), ((64, 0), (64, 256))},
           "tok_embeddings.weight": HALF_ROWS},
    # tp splits first, FSDP splits each tp shard's rows again: four quarters of 64 rows
    "fsdp2_x_tp": {"attention.wq.weight": {((r, 0), (64, 256)) for r in (0, 64, 128, 192)},
                   "attention.wo.weight": {((r, c), (128, 128)) for r in (0, 128)
                                           for c in (0, 128)},
                   "tok_embeddings.weight": {((r, 0), (64, 256)) for r in (0, 64, 128, 192)}},
}


def saved_shards(checkpoint: Path, suffix: str) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    block_zero = suffix.startswith("tok_") or "layers.0." in suffix
    (key,) = [k for k in metadata if k.endswith(suffix) and (block_zero or "layers.0." in k)]
    return {(tuple(c.offsets), tuple(c.sizes)) for c in metadata[key].chunks}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHARDS))
def test_each_rank_held_the_shards_its_plan_gives_it(name, workdir):
    mesh_run(workdir, name)
    checkpoint = checkpoints_of(workdir, name) / f"step-{STEPS:08d}.ckpt"
    for suffix, expected in SHARDS[name].items():
        assert saved_shards(checkpoint, suffix) == expected, suffix


@pytest.mark.slow
def test_a_url_checkpoint_resumes_on_another_mesh(reference, workdir):
    """4 ranks (FSDP2 x TP) wrote step 3 through fsspec; 2 ranks of tensor parallel alone read it
    back and finish the run as the reference did."""
    mesh_run(workdir, "fsdp2_x_tp")
    saved = f"file://{workdir / 'url-checkpoints' / 'step-00000003.ckpt'}"
    run_dir = train(workdir, "resumed", ["trainer.devices=2", "parallelism=tp",
                                         f"data.micro_batch_size={GLOBAL_BATCH}",
                                         f"checkpoint.resume={saved}"])
    assert_matches(run_dir, run_dir / "checkpoints", reference, range(4, STEPS + 1))


def test_a_plan_that_cannot_run_fails_before_any_process_starts(tmp_path):
    # tiny has 4 KV heads: tensor parallel over 8 ranks cannot split them
    proc = subprocess.run([sys.executable, "-m", "trainer", "hardware=cpu", "tracking=none",
                           "trainer.devices=8", "parallelism=tp"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallelism.tp=8" in lines[0] and "n_kv_heads" in lines[0]
    assert not (tmp_path / "outputs").exists()
