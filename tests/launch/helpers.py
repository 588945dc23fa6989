"""What the launch tests share: `python -m launch` as a user runs it, and reading its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A small run that trains FSDP over two ranks and checkpoints twice on the way.
SMALL = ["parallelism=fsdp", "trainer.max_steps=12", "checkpoint.every_n_steps=4",
         "optim.warmup_steps=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=true",
         "data.micro_batch_size=4", "data.seq_len=64"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}


def launch(*overrides: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *overrides], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def committed_step(run_dir: Path) -> int | None:
    """The step of the newest committed checkpoint (one whose manifest exists), or None."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.checkpoint.manifest import step_of

    directory = run_dir / "checkpoints"
    url = latest_checkpoint(str(directory)) if directory.exists() else None
    return step_of(url) if url else None


def losses(client, run: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run, "train/loss")}
