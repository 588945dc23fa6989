"""`python -m trainer.data prepare` then `python -m trainer` on what it wrote, as a user runs them:
a real tokenizer, a mixture, held-out evaluation, S3 through a real endpoint, a run killed and
resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tokenizer_files import hf_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
# A model of a few thousand parameters over the 400-token vocabulary: seconds per run.
SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.ffn_dim=64", "model.vocab_size=512", "data.seq_len=32", "data.micro_batch_size=4",
         "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "optim.lr=3e-3",
         "trainer.progress_bar=false", "trainer.eval_batches=4"]


def write_jsonl(path: Path, files: list[Path]) -> Path:
    """One document per file: the source of Python's standard library modules, as real text."""
    path.write_text("".join(json.dumps({"text": f.read_text(errors="replace")}) + "\n"
                            for f in files))
    return path


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]


def run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env or ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def history(cwd: Path, run_name: str, key: str) -> dict[int, float]:
    """step -> value of `key` in the one MLflow run called `run_name` (the newest value where a
    step was logged twice)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    points = sorted(client.get_metric_history(runs[0].info.run_id, key),
                    key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Two training corpora and a held-out one, prepared with a BPE tokenizer.json."""
    root = tmp_path_factory.mktemp("corpora")
    tokenizer = hf_tokenizer_dir(root / "tokenizer")
    files = stdlib_files()
    for name, part in (("prose", files[:8]), ("code", files[8:16]), ("heldout", files[16:])):
        write_jsonl(root / f"{name}.jsonl", part)
        run(root, "-m", "trainer.data", "prepare", "--tokenizer", f"hf:{tokenizer}",
            "--output", str(root / name), str(root / f"{name}.jsonl"))
    return root


def mixture(root: Path) -> list[str]:
    return [f"data.sources=[{{path:'{root / 'prose'}',weight:3}},"
            f"{{path:'{root / 'code'}',weight:1}}]"]


@pytest.mark.slow
def test_prepare_to_s3_with_a_tokenizer_then_train_a_mixture_with_evaluation(tmp_path,
                                                                             moto_server):
    """The issue's own commands: a JSONL corpus tokenized by a tokenizer.json into S3, trained on
    as a mixture with a held-out dataset; a model whose vocabulary is too small is refused."""
    tokenizer = hf_tokenizer_dir(tmp_path / "tok")
    files = stdlib_files()
    env = {**ENV, **moto_server.env, "FSSPEC_S3_ENDPOINT_URL": moto_server.endpoint}
    bucket = f"s3://{moto_server.bucket}/run-data"
    for name, part in (("c1", files[:8]), ("c2", files[8:16]), ("heldout", files[16:])):
        write_jsonl(tmp_path / f"{name}.jsonl", part)
        run(tmp_path, "-m", "trainer.data", "prepare", "--tokenizer", f"hf:{tokenizer}",
            "--text-field", "text", "--output", f"{bucket}/{name}", f"{name}.jsonl", env=env)

    sources = f"data.sources=[{{path:'{bucket}/c1',weight:2}},{{path:'{bucket}/c2'}}]"
    work = tmp_path / "work"
    work.mkdir()
    run(work, "-m", "trainer", *SMALL, sources, f"data.eval={bucket}/heldout",
        "trainer.max_steps=4", "trainer.eval_every_n_steps=2",
        "checkpoint.every_n_steps=0", "tracking.run_name=s3", env=env)
    evals = history(work, "s3", "eval/loss")
    assert sorted(evals) == [2, 4] and evals[4] < evals[2]
    assert history(work, "s3", "eval/perplexity")[4] == pytest.approx(2.718281828 ** evals[4])
    c1, c2 = history(work, "s3", "data/tokens/c1"), history(work, "s3", "data/tokens/c2")
    assert c1[4] + c2[4] == 4 * 4 * 32 and c1[4] > 0 and c2[4] > 0  # steps x batch x seq_len

    refused = subprocess.run([sys.executable, "-m", "trainer", sources, "model.vocab_size=256"],
                             cwd=tmp_path / "tok", capture_output=True, text=True, timeout=300,
                             env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"config error: model.vocab_size=256: the dataset {bucket}/c1 (data.sources[0], "
        f"tokenizer hf:{tokenizer}) has token ids up to 399; use a vocabulary of at least 400"]


@pytest.fixture(scope="module")
def with_eval(corpora: Path) -> Path:
    """A 10-step mixture run evaluated on the held-out dataset every 5 steps, checkpointed at 5."""
    work = corpora / "with-eval"
    work.mkdir()
    run(work, "-m", "trainer", *SMALL, *mixture(corpora), f"data.eval={corpora / 'heldout'}",
        "trainer.max_steps=10", "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=5",
        "tracking.run_name=straight", "hydra.run.dir=straight")
    return work


@pytest.mark.slow
def test_evaluation_does_not_change_the_training_losses(corpora: Path, with_eval: Path):
    work = corpora / "without-eval"
    work.mkdir()
    run(work, "-m", "trainer", *SMALL, *mixture(corpora), "trainer.max_steps=10",
        "checkpoint.every_n_steps=5", "tracking.run_name=plain")
    plain = history(work, "plain", "train/loss")
    assert len(plain) == 10
    assert history(with_eval, "straight", "train/loss") == plain
    assert sorted(history(with_eval, "straight", "eval/loss")) == [5, 10]


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_exactly(corpora: Path, with_eval: Path):
    job = [sys.executable, "-m", "trainer", *SMALL, *mixture(corpora),
           f"data.eval={corpora / 'heldout'}", "trainer.max_steps=10",
           "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=5",
           "tracking.run_name=resumed", "hydra.run.dir=resumed"]
    with subprocess.Popen(job, cwd=with_eval, stderr=subprocess.PIPE, text=True,
                          env=ENV) as proc:
        for line in proc.stderr:
            if "checkpoint step 5:" in line:
                proc.kill()
                break
    assert proc.returncode == -9
    run(with_eval, *job[1:], "checkpoint.resume=last")

    for key in ("train/loss", "data/tokens/prose", "data/tokens/code"):
        straight = history(with_eval, "straight", key)
        assert len(straight) == 10 and history(with_eval, "resumed", key) == straight, key
    assert history(with_eval, "resumed", "eval/loss")[10] == \
        history(with_eval, "straight", "eval/loss")[10]
