"""Data throughput, each side against a baseline measured in the same run.

1. **prepare**: `python -m trainer.data prepare --tokenizer hf:DIR` on a JSONL corpus (the command a
   user runs, in a process of its own: start-up, reading, the worker processes and writing
   included) against the tokenizer's own batch encoding in one process (`Tokenizer.
   encode_batch_fast` on the same documents, already in memory, with the library's own thread
   pool). Ratio = prepare tokens/s / batch-encoding tokens/s.
2. **loader**: the training loader a run builds (`TokenDataModule.train_dataloader()`), iterated
   alone, against what a training step consumes: `trainer.fit.fit()` on the same config, timed from
   inside (the end of every batch; steps 2..N-1). Margin = loader samples/s / step samples/s:
   above 1 the loader is not the bottleneck, and by that factor. Two configs: the default run (the
   built-in byte corpus, model=tiny) and a two-source mixture of the prepared corpus.

The corpus is the source of Python's standard library (one document per module, up to --mb MB),
the tokenizer a byte-level BPE of --vocab tokens trained on it here by `tokenizers` (no download).
Each measurement runs --repeats times, the two sides alternately after a warm-up; medians are
printed.

    python bench/data.py [--mb 16] [--vocab 8192] [--repeats 3] [--steps 30] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tokenizer_files: the tests' own tokenizer builder

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tokenizer_files import hf_tokenizer_dir  # noqa: E402

import trainer.fit  # noqa: E402
from trainer.config import compose, validate  # noqa: E402
from trainer.data.datamodule import TokenDataModule  # noqa: E402
from trainer.data.format import read_index  # noqa: E402


def corpus(directory: Path, megabytes: float) -> tuple[Path, list[str]]:
    """The standard library's modules as JSONL, one document each, about `megabytes` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        texts.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    jsonl = directory / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return jsonl, texts


def time_prepare(jsonl: Path, tokenizer: Path, output: Path,
                 workers: int | None) -> tuple[float, int]:
    """Seconds of `python -m trainer.data prepare`, start to exit, and the tokens it wrote."""
    argv = [sys.executable, "-m", "trainer.data", "prepare", "--tokenizer", f"hf:{tokenizer}",
            "--output", str(output), str(jsonl)]
    if workers:
        argv += ["--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    return seconds, read_index(str(output))["num_tokens"]


def time_batch_encoding(texts: list[str], tokenizer: Path) -> tuple[float, int]:
    """Seconds of the tokenizer's own batch encoding of `texts`, and the tokens (eod included,
    one per document, as prepare writes them)."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    start = time.perf_counter()
    encoded = encoder.encode_batch_fast(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(e.ids) for e in encoded) + len(texts)


def bench_prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    jsonl, texts = corpus(work, args.mb)
    tokenizer = hf_tokenizer_dir(work / "tokenizer", vocab_size=args.vocab, texts=texts)
    print(f"prepare: {len(texts)} documents, {jsonl.stat().st_size / 1e6:.1f} MB of JSONL, "
          f"BPE vocabulary {args.vocab}, prepare --workers {args.workers or 'default'}")
    ours, theirs = [], []
    for round_ in range(args.repeats + 1):  # round 0 warms caches up and is not counted
        sides = ["prepare", "encode_batch"]
        for side in sides if round_ % 2 else reversed(sides):
            if side == "prepare":
                output = work / f"prepared-{round_}"
                seconds, tokens = time_prepare(jsonl, tokenizer, output, args.workers)
                if round_:
                    ours.append(tokens / seconds)
            else:
                seconds, tokens = time_batch_encoding(texts, tokenizer)
                if round_:
                    theirs.append(tokens / seconds)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"  python -m trainer.data prepare   {a:12,.0f} tokens/s (median of {len(ours)})")
    print(f"  Tokenizer.encode_batch_fast      {b:12,.0f} tokens/s (one process, in memory)")
    print(f"  ratio prepare / batch encoding   {a / b:12.2f}")
    return tokenizer, work / "prepared-1"


class BatchEnds(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def step_samples_per_s(overrides: list[str], steps: int, work: Path) -> float:
    """Samples a training step consumes per second: `fit()` timed at the end of each batch."""
    cfg = compose([f"trainer.max_steps={steps}", "checkpoint.every_n_steps=0", "tracking=none",
                   "trainer.progress_bar=false", *overrides])
    run = validate(cfg)
    clock = BatchEnds()
    trainer.fit.fit(run, run_dir=work, resolved=OmegaConf.to_container(cfg, resolve=True),
                    overrides=[], callbacks=[clock])
    seconds = (clock.ends[-2] - clock.ends[0]) / (len(clock.ends) - 2)
    return run.data.micro_batch_size / seconds


def loader_samples_per_s(overrides: list[str], batches: int) -> float:
    run = validate(compose(overrides))
    loader = TokenDataModule(run.data, seed=run.seed,
                             document_mask=run.uses_document_mask).train_dataloader()
    taken, start = 0, time.perf_counter()
    while taken < batches:
        for _ in loader:
            taken += 1
            if taken == batches:
                break
    return batches * run.data.micro_batch_size / (time.perf_counter() - start)


def bench_loader(work: Path, prepared: Path, args: argparse.Namespace) -> None:
    configs = {
        "default run (stdlib bytes, model=tiny)": [],
        "mixture of 2 sources (BPE ids, model=tiny)": [
            f"data.sources=[{{path:'{prepared}',weight:3,name:a}},"
            f"{{path:'{prepared}',weight:1,name:b}}]", f"model.vocab_size={args.vocab}"],
    }
    for number, (name, overrides) in enumerate(configs.items()):
        loads, steps = [], []
        for round_ in range(args.repeats + 1):
            load = loader_samples_per_s(overrides, args.batches)
            step = step_samples_per_s(overrides, args.steps, work / f"fit-{number}-{round_}")
            if round_:
                loads.append(load)
                steps.append(step)
        a, b = statistics.median(loads), statistics.median(steps)
        print(f"loader: {name}")
        print(f"  loader alone                     {a:12,.0f} samples/s")
        print(f"  training step consumes           {b:12,.1f} samples/s")
        print(f"  margin loader / step             {a / b:12,.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=16, help="corpus size in MB (default 16)")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (default 8192)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="training steps per fit")
    parser.add_argument("--batches", type=int, default=2000, help="loader batches per timing")
    parser.add_argument("--workers", type=int, default=None, help="prepare --workers")
    args = parser.parse_args()
    print(f"bench/data.py on {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ULTRAMESH_CACHE", str(Path(tmp) / "cache"))
        _, prepared = bench_prepare(Path(tmp), args)
        bench_loader(Path(tmp), prepared, args)


if __name__ == "__main__":
    main()
