"""Bad input to `python -m launch` stops before anything is submitted: exit 2, one line naming
the key. And what a rendered SLURM or local job asks for."""

from __future__ import annotations

import contextlib
import io

import pytest

from launch.__main__ import main
from tests.launch.helpers import launch
from trainer.config import ConfigError, time_limit_seconds

SLURM = ["cluster=slurm", "cluster.partition=debug", "launch.dry_run=true"]


@pytest.mark.parametrize("overrides,key", [
    ([*SLURM, "cluster.time_limit=1:xx"], "cluster.time_limit"),
    ([*SLURM, "cluster.time_limit=0"], "cluster.time_limit"),
    ([*SLURM, "cluster.time_limit=00:05:00", "cluster.preempt_warning_s=600"],
     "cluster.preempt_warning_s"),
    ([*SLURM, "cluster.nodes=2", "parallelism=fsdp", "parallelism.dp_shard=4",
      "hardware.efa_bw_gbps=10"], "parallelism"),
    (["cluster=local", "cluster.nodes=2", "hardware.efa_bw_gbps=10"], "cluster.nodes"),
    (["cluster=local", "launch.max_restarts=-1"], "launch.max_restarts"),
])
def test_bad_input_is_refused_in_one_line(overrides, key, capsys):
    assert main(overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"config error: {key}"), err


def test_the_command_line_exits_2_with_one_line():
    done = launch("cluster=slurm", "cluster.time_limit=soon")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: cluster.time_limit='soon': a time sbatch --time accepts: minutes, MM:SS, "
        "HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"]
    assert done.stdout == ""


@pytest.mark.parametrize("text,seconds", [
    ("90", 5400), ("10:30", 630), ("01:00:00", 3600), ("2-12", 2 * 86400 + 12 * 3600),
    ("1-00:30", 86400 + 1800), ("1-00:00:10", 86410)])
def test_time_limits_read_as_sbatch_reads_them(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3:4", "-5", "1-", "a-01:00"])
def test_time_limits_sbatch_would_refuse(text):
    with pytest.raises(ConfigError):
        time_limit_seconds(text)


def test_the_sbatch_script_asks_for_what_the_config_says():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*SLURM, "cluster.nodes=2", "parallelism=fsdp", "hardware.efa_bw_gbps=10",
                     "cluster.account=ml", "cluster.qos=high", "cluster.time_limit=2:00:00",
                     "cluster.preempt_warning_s=300", "cluster.image=nvcr.io/x:1",
                     "launch.run_dir=/shared/run"]) == 0
    text = out.getvalue()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
                 "#SBATCH --time=2:00:00", "#SBATCH --partition=debug", "#SBATCH --account=ml",
                 "#SBATCH --qos=high", "#SBATCH --output=/shared/run/slurm-%j.out",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
        assert f"\n{line}\n" in text, line
    assert "--container-image=nvcr.io/x:1" in text
    assert "--rdzv_backend=c10d" in text and '--rdzv_id="$SLURM_JOB_ID"' in text
    assert "RDZV_PORT=$(( 29500 + SLURM_JOB_ID % 1000 ))" in text
    assert "checkpoint.resume=last" in text and "hydra.run.dir=/shared/run" in text
    assert "launch.dry_run" not in text  # launcher-only keys stay with the launcher


def test_without_a_partition_sbatch_uses_the_clusters_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["cluster=slurm", "launch.dry_run=true"]) == 0
    assert "#SBATCH --nodes=1\n" in out.getvalue() and "--partition" not in out.getvalue()


@pytest.mark.parametrize("cluster", [["cluster=local"], SLURM[:2]])
def test_every_node_starts_where_the_user_launched(cluster, tmp_path, monkeypatch):
    # run from a project directory, not the repository: relative overrides keep their meaning
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*cluster, "launch.dry_run=true", "data.path=data/mine"]) == 0
    text = out.getvalue()
    assert f"cd {tmp_path}\n" in text and "data.path=data/mine" in text
    assert f"hydra.run.dir={tmp_path}/outputs/launch/" in text
