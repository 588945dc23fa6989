"""Checkpoints end to end, as a user runs them: `python -m trainer` processes saving to a real
HTTP S3 server (moto_server on loopback), killed, resumed, listed and exported through
`python -m trainer.checkpoint`. Runs are shared between assertions and kept tiny.

What a run did is read from its real outputs: losses from its log (`step N/M  loss X`), weights
from its checkpoints, read back with torch's own DCP reader.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch

from tests.checkpoint.faulty_s3 import FaultyS3
from tests.dcp_weights import assert_close, weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = ["tracking=none", "model.n_layers=1", "data.seq_len=32", "optim.warmup_steps=1",
          "trainer.log_every_n_steps=1", "trainer.progress_bar=true", f"trainer.max_steps={STEPS}",
          "checkpoint.io_threads=2"]
TWO_RANKS = ["trainer.devices=2", "data.micro_batch_size=2"]  # global batch 4
ONE_RANK = ["data.micro_batch_size=4"]
LOSS_LINE = re.compile(r"step (\d+)/\d+\s+loss ([0-9.]+)")


# ------------------------------------------------------------------------------------------------
# helpers


def run_env(s3, **extra: str) -> dict[str, str]:
    return {**os.environ, **s3.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def trainer_cmd(workdir: Path, name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer", *COMMON, *overrides,
            f"hydra.run.dir={workdir / name}"]


def train(workdir: Path, name: str, overrides: list[str], env: dict[str, str],
          expect_rc: int = 0) -> str:
    proc = subprocess.run(trainer_cmd(workdir, name, overrides), cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (workdir / f"{name}.log").write_text(log)
    assert proc.returncode == expect_rc, log[-5000:]
    return log


def losses(log: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(log)}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.checkpoint", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def committed_steps(url: str, env: dict[str, str], *options: str) -> dict[int, str]:
    """`list` as the user reads it: {step: checksums column} of the committed rows."""
    proc = cli("list", url, *options, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if line[:1] == " "]
    return {int(r[0]): r[2] for r in rows if len(r) > 2 and r[1] == "yes"}


# ------------------------------------------------------------------------------------------------
# shared runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def straight(moto_server, workdir) -> dict:
    """Two processes, async saves every step to s3:// with the endpoint in storage_options,
    retention keep_last=2 + keep_every=4."""
    url = f"s3://{moto_server.bucket}/straight"
    log = train(workdir, "straight", [
        *TWO_RANKS, f"checkpoint.dir={url}", "checkpoint.every_n_steps=1",
        "checkpoint.async_save=true", "checkpoint.keep_last=2", "checkpoint.keep_every=4",
        f"checkpoint.storage_options.endpoint_url={moto_server.endpoint}"], run_env(moto_server))
    return {"url": url, "log": log, "losses": losses(log)}


def test_async_two_rank_run_commits_to_s3_and_retention_keeps_exactly_the_set(
        straight, moto_server):
    assert sorted(straight["losses"]) == list(range(1, STEPS + 1))
    # keep_last=2 -> 5, 6; keep_every=4 -> 4; everything else went, and all three are sound
    assert committed_steps(straight["url"], run_env(moto_server),
                           "-o", f"endpoint_url={moto_server.endpoint}") == {
        4: "ok", 5: "ok", 6: "ok"}
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(straight["url"][5:]))
    assert names == [f"step-0000000{s}.ckpt" for s in (4, 5, 6)]
    manifest = json.loads(fs.cat_file(f"{straight['url'][5:]}/step-00000006.ckpt/manifest.json"))
    assert manifest["step"] == 6 and manifest["world_size"] == 2
    assert {"meta.pt", ".metadata", "rng-rank00000.pt", "rng-rank00001.pt"} <= set(
        manifest["files"])
    assert "testing" not in json.dumps(manifest)  # no credential in the checkpoint


def test_sigkill_then_resume_equals_the_uninterrupted_run(straight, moto_server, workdir):
    """Synchronous saves, endpoint from AWS_ENDPOINT_URL; the whole job is SIGKILLed once its
    step-4 checkpoint is committed, then started again with resume=last."""
    url = f"s3://{moto_server.bucket}/killed"
    env = run_env(moto_server, AWS_ENDPOINT_URL=moto_server.endpoint)
    overrides = [*TWO_RANKS, f"checkpoint.dir={url}", "checkpoint.every_n_steps=2",
                 "checkpoint.async_save=false", "checkpoint.keep_last=10",
                 "checkpoint.resume=last"]
    with subprocess.Popen(trainer_cmd(workdir, "killed", overrides), cwd=workdir, env=env,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "checkpoint step 4:" in line:
                os.killpg(proc.pid, signal.SIGKILL)  # every rank, no handler runs
                break
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    log = train(workdir, "killed", overrides, env)
    assert "step-00000004.ckpt" in log.split("resumed from")[1].splitlines()[0]
    assert losses(log) == {s: straight["losses"][s] for s in (5, 6)}
    assert committed_steps(url, env) == {2: "ok", 4: "ok", 6: "ok"}
    ours = weights(f"{url}/step-00000006.ckpt", {"endpoint_url": moto_server.endpoint})
    theirs = weights(f"{straight['url']}/step-00000006.ckpt",
                     {"endpoint_url": moto_server.endpoint})
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # bitwise


def test_s3_stopping_mid_save_is_reported_training_goes_on_and_resume_loads_the_last_commit(
        moto_server, workdir, tmp_path):
    faulty = FaultyS3(moto_server.endpoint, trigger="step-00000004.ckpt")
    try:
        url = f"s3://{moto_server.bucket}/faulty"
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        overrides = [*ONE_RANK, f"checkpoint.dir={url}", "checkpoint.every_n_steps=2",
                     "checkpoint.async_save=true", "checkpoint.keep_last=10",
                     "checkpoint.resume=last", f"checkpoint.storage_options.endpoint_url="
                     f"{faulty.endpoint}", "tracking=mlflow", f"tracking.uri={store}",
                     "tracking.run_name=faulty",
                     # botocore's own retries of a dead endpoint take a minute; s3fs still
                     # retries five times
                     "checkpoint.storage_options.config_kwargs.retries.max_attempts=1"]
        env = run_env(moto_server)
        # the last save (step 6) fails too: the run exits 1, saying what was lost
        log = train(workdir, "faulty", overrides, env, expect_rc=1)
        assert faulty.dropped > 0
        assert sorted(losses(log)) == list(range(1, STEPS + 1))  # training went on
        failed = [line for line in log.splitlines() if "checkpoint step 4 FAILED" in line]
        assert failed and "step-00000002.ckpt" in failed[0]
        last = log.strip().splitlines()[-1]
        assert last.startswith("error: the run's last checkpoint (step 6, ") and \
            "newest committed: " in last and last.count("step-00000002.ckpt") == 1, last

        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                          "checkpoint/failed")] == [4, 6]
        assert run.data.tags["checkpoint.last_failure"].startswith("step 6 at ")
        assert run.data.tags["checkpoint.latest_step"] == "2"
        assert run.info.status == "FAILED"

        faulty.trigger = "(never again)"  # the resumed run saves step 4 too
        faulty.up()
        assert committed_steps(url, env, "-o", f"endpoint_url={faulty.endpoint}") == {2: "ok"}
        resumed = train(workdir, "faulty-resumed", overrides, env)
        assert "step-00000002.ckpt" in resumed.split("resumed from")[1].splitlines()[0]
        assert losses(resumed) == {s: losses(log)[s] for s in range(3, STEPS + 1)}
    finally:
        faulty.close()


def test_an_async_save_overlaps_training_and_a_failed_one_is_agreed_by_both_ranks(
        moto_server, workdir):
    """Two ranks save asynchronously at steps 3 and 6 through a proxy that holds every upload of
    step 3 until the trainer has logged step 5: steps 4 and 5 can only complete while step 3's
    write is in flight (were training waiting for it, the run would never get there). The proxy
    refuses rank 1's shard of step 6: both ranks must agree that save failed (it is the last, so
    each exits 1 saying so), and step 3 stays the newest commit."""
    # a run that waited for the save would hang until the hold times out, then pass it before
    # step 5: the held uploads would go through before the release
    proxy = FaultyS3(moto_server.endpoint, hold="step-00000003.ckpt/",
                     refuse="step-00000006.ckpt/__1_", hold_timeout_s=120)
    try:
        url = f"s3://{moto_server.bucket}/overlap"
        overrides = [*TWO_RANKS, f"checkpoint.dir={url}", "checkpoint.every_n_steps=3",
                     "checkpoint.async_save=true", "checkpoint.keep_last=10",
                     f"checkpoint.storage_options.endpoint_url={proxy.endpoint}",
                     "checkpoint.storage_options.config_kwargs.retries.max_attempts=1"]
        env = run_env(moto_server)
        seen: list[str] = []
        released_at = float("inf")
        with subprocess.Popen(trainer_cmd(workdir, "overlap", overrides), cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) as proc:
            for line in proc.stderr:
                seen.append(line)
                if "step 5/6" in line:
                    released_at = time.monotonic()
                    proxy.release()
        log = "".join(seen)
        assert proc.returncode == 1, log[-4000:]
        assert proxy.held and all(when >= released_at for _, when in proxy.held)
        assert any(path.endswith(".distcp") for path, _ in proxy.held)  # the shards, not just
        assert any(path.endswith("manifest.json") for path, _ in proxy.held)  # the commit
        order = [n for n, line in enumerate(seen) if LOSS_LINE.search(line) or
                 "checkpoint step 3:" in line]
        steps = [LOSS_LINE.search(seen[n]) for n in order]
        reported = next(i for i, m in enumerate(steps) if m is None)
        assert [int(m[1]) for m in steps[:reported]][-3:] == [3, 4, 5]  # before step 3 committed

        assert proxy.refused and all("__1_" in path for path in proxy.refused)
        failed = [line for line in seen if "checkpoint step 6 FAILED" in line]
        assert len(failed) == 1 and "rank 1: PermissionError" in failed[0], log[-4000:]
        lost = [line for line in seen if line.startswith("error: the run's last checkpoint "
                                                         "(step 6, ")]
        assert len(lost) == 2, log[-4000:]  # each rank, with the same verdict
        assert all(f"newest committed: {url}/step-00000003.ckpt" in line for line in lost)
        assert committed_steps(url, env, "-o", f"endpoint_url={moto_server.endpoint}") == {
            3: "ok"}
    finally:
        proxy.close()


def damaged_copy(straight, moto_server, name: str, steps: tuple[int, ...]) -> str:
    """A copy of the straight run's checkpoints (steps 4, 5, 6) with one byte changed in the
    shard of each of `steps`."""
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint)
    url = f"s3://{moto_server.bucket}/{name}"
    fs.copy(f"{straight['url'][5:]}/", f"{url[5:]}/", recursive=True)
    for step in steps:
        shard = f"{url[5:]}/step-{step:08d}.ckpt/__0_0.distcp"
        data = bytearray(fs.cat_file(shard))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(shard, bytes(data))
    return url


def test_corrupted_shards_are_reported_resume_falls_back_and_retention_keeps_them(
        straight, moto_server, workdir):
    """Steps 6 and 5 damaged: the run resumes from step 4, here on one rank (DCP reshards), and
    writes a sound step 6 again; with keep_last=1 retention would delete step 5, but a damaged
    checkpoint is evidence and stays."""
    url = damaged_copy(straight, moto_server, "corrupted", (5, 6))
    env, option = run_env(moto_server), f"endpoint_url={moto_server.endpoint}"
    log = train(workdir, "corrupted", [
        *ONE_RANK, f"checkpoint.dir={url}", "checkpoint.resume=last", "checkpoint.keep_last=1",
        f"checkpoint.storage_options.endpoint_url={moto_server.endpoint}"], env)
    for step in (6, 5):
        assert (f"step-{step:08d}.ckpt is damaged: __0_0.distcp does not match its checksum; "
                f"resuming from the one before, {url}/step-00000004.ckpt") in log
    assert "step-00000004.ckpt" in log.split("resumed from")[1].splitlines()[0]
    assert losses(log)[5] == pytest.approx(straight["losses"][5], abs=2e-4)
    assert losses(log)[6] == pytest.approx(straight["losses"][6], abs=2e-4)
    listed = committed_steps(url, env, "-o", option)
    assert sorted(listed) == [4, 5, 6] and listed[4] == listed[6] == "ok" and listed[5] != "ok"


def test_every_checkpoint_damaged_stops_the_resume_and_fresh_starts_over_keeping_them(
        straight, moto_server, workdir):
    url = damaged_copy(straight, moto_server, "all-damaged", (4, 5, 6))
    env, option = run_env(moto_server), f"endpoint_url={moto_server.endpoint}"
    overrides = [*ONE_RANK, f"checkpoint.dir={url}", "checkpoint.keep_last=1",
                 f"checkpoint.storage_options.endpoint_url={moto_server.endpoint}"]
    proc = subprocess.run(trainer_cmd(workdir, "all-damaged", [*overrides,
                                                              "checkpoint.resume=last"]),
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert line.startswith(f"config error: checkpoint.resume='last': no usable checkpoint under "
                           f"{url}: every committed one failed verification (")
    for step in (4, 5, 6):
        assert f"step-{step:08d}.ckpt: __0_0.distcp does not match its checksum" in line
    assert "checkpoint.resume=fresh" in line
    assert "step 1/" not in proc.stdout + proc.stderr
    assert not (workdir / "all-damaged").exists()  # Hydra's directory went too

    log = train(workdir, "all-damaged", [*overrides, "checkpoint.resume=fresh"], env)
    assert "resumed from" not in log
    # from step 1 on, as the straight run (2 ranks of 2 samples: the same global batch)
    assert losses(log)[1] == pytest.approx(straight["losses"][1], abs=2e-4)
    listed = committed_steps(url, env, "-o", option)
    # step 6 was written again; 4 and 5 were there before the fresh start and stay
    assert sorted(listed) == [4, 5, 6] and listed[6] == "ok" and listed[4] != "ok" != listed[5]


def test_a_directory_without_manifest_is_never_loaded(straight, moto_server, workdir):
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint)
    url = f"s3://{moto_server.bucket}/uncommitted/step-00000006.ckpt"
    fs.copy(f"{straight['url'][5:]}/step-00000006.ckpt/", f"{url[5:]}/", recursive=True)
    fs.rm(f"{url[5:]}/manifest.json")
    proc = subprocess.run(
        trainer_cmd(workdir, "uncommitted", [f"checkpoint.resume={url}",
                    f"checkpoint.storage_options.endpoint_url={moto_server.endpoint}"]),
        cwd=workdir, env=run_env(moto_server), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.resume=" in lines[0] and "manifest" in lines[0]
    assert "step 1/" not in proc.stdout + proc.stderr


def test_an_unwritable_destination_stops_before_any_step(moto_server, workdir):
    proc = subprocess.run(
        trainer_cmd(workdir, "unwritable", [
            "checkpoint.dir=s3://no-such-bucket/run",
            f"checkpoint.storage_options.endpoint_url={moto_server.endpoint}"]),
        cwd=workdir, env=run_env(moto_server), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: checkpoint.dir=")
    assert "no-such-bucket" in lines[0] and "step 1/" not in proc.stdout


def test_export_loads_in_transformers_with_equal_logits(straight, moto_server, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trainer.config import load
    from trainer.models.llama.model import Transformer
    from trainer.models.registry import shape_of

    proc = cli("export", straight["url"], "--step", "6", "--to", str(tmp_path / "hf"),
               "-o", f"endpoint_url={moto_server.endpoint}", env=run_env(moto_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = Transformer(shape_of(load(["model.n_layers=1"]).model))
    state = weights(f"{straight['url']}/step-00000006.ckpt",
                    {"endpoint_url": moto_server.endpoint})
    ours.load_state_dict({k.removeprefix("state_dict.model."): v for k, v in state.items()})
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), hf(tokens).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_export_without_a_step_takes_the_newest_committed_one(straight, moto_server, tmp_path):
    env, option = run_env(moto_server), f"endpoint_url={moto_server.endpoint}"
    listed = cli("list", straight["url"], "-o", option, "--no-verify", env=env)
    newest = max(int(line.split()[0]) for line in listed.stdout.splitlines()[1:]
                 if line.split()[1] == "yes")
    proc = cli("export", straight["url"], "--to", str(tmp_path / "hf"), "-o", option, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (f"exported {straight['url']}/step-{newest:08d}.ckpt to "
                                   f"{tmp_path / 'hf'}")
    empty = cli("export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x"), env=env)
    assert empty.returncode == 2 and "holds no committed checkpoint" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_four_ranks_to_two_to_one_resume_with_the_same_weights(workdir, moto_server):
    """FSDP over 4 ranks writes steps 1-4; tensor parallel over 2 ranks resumes its step 2 and
    trains steps 3-4; one rank resumes the 2-rank step 3 and trains step 4. Each matches the 4-rank
    run. (Every run has max_steps=4: the LR schedule depends on it.)"""
    env = run_env(moto_server)
    every = ["checkpoint.every_n_steps=1", "checkpoint.keep_last=10", "trainer.max_steps=4"]
    four = workdir / "four"
    a = train(workdir, "four", ["trainer.devices=4", "parallelism=fsdp",
                                "data.micro_batch_size=1", *every], env)
    b = train(workdir, "two", ["trainer.devices=2", "parallelism=tp", *ONE_RANK, *every,
                               f"checkpoint.resume={four}/checkpoints/step-00000002.ckpt"], env)
    c = train(workdir, "one", [*ONE_RANK, *every,
                               f"checkpoint.resume={workdir}/two/checkpoints/step-00000003.ckpt"],
              env)
    assert sorted(losses(b)) == [3, 4] and sorted(losses(c)) == [4]
    for step in (3, 4):
        assert losses(b)[step] == pytest.approx(losses(a)[step], abs=2e-4)
    assert losses(c)[4] == pytest.approx(losses(a)[4], abs=2e-4)
    assert_close(weights(f"{workdir}/two/checkpoints/step-00000004.ckpt"),
                 weights(f"{four}/checkpoints/step-00000004.ckpt"))
    assert_close(weights(f"{workdir}/one/checkpoints/step-00000004.ckpt"),
                 weights(f"{four}/checkpoints/step-00000004.ckpt"))


def test_a_bf16_checkpoint_resumes_in_an_fp32_run(workdir, moto_server):
    """The format carries no device or dtype: bf16 weights load into an fp32 CPU run."""
    env = run_env(moto_server)
    every = ["checkpoint.every_n_steps=1", "checkpoint.keep_last=10", "trainer.max_steps=2",
             *ONE_RANK]
    a = train(workdir, "bf16", [*every, "trainer.precision=bf16-true"], env)
    b = train(workdir, "fp32", [*every, "trainer.precision=32-true",
                                f"checkpoint.resume={workdir}/bf16/checkpoints/"
                                "step-00000001.ckpt"], env)
    assert sorted(losses(b)) == [2]
    # one step moved the loss by about 1 nat; bf16 against fp32 arithmetic differs by far less
    assert losses(b)[2] == pytest.approx(losses(a)[2], abs=0.05)
    assert losses(a)[1] - losses(a)[2] > 0.5
    saved_a = weights(f"{workdir}/bf16/checkpoints/step-00000001.ckpt")
    saved_b = weights(f"{workdir}/fp32/checkpoints/step-00000002.ckpt")
    assert {t.dtype for t in saved_a.values()} == {torch.bfloat16}
    assert {t.dtype for t in saved_b.values()} == {torch.float32}
