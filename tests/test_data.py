"""Token shards, the resumable sampler, the built-in corpus, the CLI and S3 (a real moto server)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    DataError,
    TokenDataModule,
    TokenLoader,
    TokenShards,
    WindowSampler,
    default_corpus_dir,
    ensure_default_corpus,
    main,
    prepare,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = {
    "a.txt": "Call me Ishmael.\n",
    "b.md": "# Über\nnaïve café, 東京\n",
    "sub/c.py": "print('hi')\n",
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own ULTRAMESH_CACHE, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("ULTRAMESH_CACHE", str(tmp_path / "cache"))


def write_texts(root: Path) -> Path:
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def arange_dataset(root: Path, n: int) -> str:
    """Ids 0..n-1 in one file: the token at stream position p is p, so windows check themselves."""
    np.save(root / "ids.npy", np.arange(n, dtype=np.int64))
    prepare([str(root / "ids.npy")], str(root / "ds"), tokenizer="ids")
    return str(root / "ds")


def documents(shards: TokenShards) -> list[str]:
    stream = shards.read(0, len(shards)).astype(np.uint8).tobytes()
    return [doc.decode("utf-8") for doc in stream.split(b"\xff")[:-1]]


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The next n batches, starting new epochs the way Lightning does: a fresh iter() per epoch."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def make_loader(url: str, *, seq_len=4, batch_size=2, seed=0, replicas=1, rank=0, workers=0):
    shards = TokenShards.open(url)
    sampler = WindowSampler(num_windows=(len(shards) - 1) // seq_len, batch_size=batch_size,
                            seed=seed, num_replicas=replicas, rank=rank)
    return TokenLoader(shards, sampler, seq_len, num_workers=workers)


def window_ids(batches, seq_len=4) -> list[list[int]]:
    """With the arange dataset a row's first input token is its window's start position."""
    return [(inputs[:, 0] // seq_len).tolist() for inputs, _ in batches]


def flat(lists) -> list[int]:
    return [item for items in lists for item in items]


# ------------------------------------------------------------------------------------------------
# Format


def test_bytes_round_trip_across_shards(tmp_path):
    write_texts(tmp_path / "text")
    index = prepare([str(tmp_path / "text")], str(tmp_path / "ds"), shard_tokens=7)

    shards = TokenShards.open(str(tmp_path / "ds"))
    # Directories are read in sorted path order; every document ends with the 0xFF separator.
    assert documents(shards) == [TEXTS[name] for name in sorted(TEXTS)]
    total = sum(len(text.encode()) + 1 for text in TEXTS.values())
    assert len(shards) == total == index["num_tokens"]
    assert shards.num_shards == len(index["shards"]) == -(-total // 7)
    assert shards.vocab_size == 256 and index["dtype"] == "uint16"
    first = (tmp_path / "ds" / "shard-00000.bin").read_bytes()
    assert first == b"".join(b.to_bytes(2, "little") for b in b"Call me")


def test_ids_round_trip_and_uint16(tmp_path):
    a, b = np.array([5, 0, 65535], dtype=np.int32), np.array([7, 7], dtype=np.uint64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    index = prepare([str(tmp_path / "*.npy")], str(tmp_path / "ds"), tokenizer="ids")

    shards = TokenShards.open(str(tmp_path / "ds"))
    assert shards.read(0, len(shards)).tolist() == [5, 0, 65535, 7, 7]
    assert index["dtype"] == "uint16" and shards.vocab_size == 65536
    assert os.path.getsize(tmp_path / "ds" / "shard-00000.bin") == 5 * 2


def test_ids_above_uint16_switch_to_uint32(tmp_path):
    ids = np.array([1, 65536, 4_000_000_000], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    index = prepare([str(tmp_path / "ids.npy")], str(tmp_path / "ds"), tokenizer="ids",
                    separator=3)

    shards = TokenShards.open(str(tmp_path / "ds"))
    assert index["dtype"] == "uint32" and shards.vocab_size == 4_000_000_001
    assert shards.read(0, len(shards)).tolist() == [1, 65536, 4_000_000_000, 3]
    assert os.path.getsize(tmp_path / "ds" / "shard-00000.bin") == 4 * 4


def test_ids_beyond_uint32_are_refused_and_nothing_is_written(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(10))
    np.save(tmp_path / "big.npy", np.array([2**32], dtype=np.int64))
    with pytest.raises(DataError, match=r"big\.npy.*4294967296"):
        prepare([str(tmp_path / "ok.npy"), str(tmp_path / "big.npy")], str(tmp_path / "ds"),
                tokenizer="ids")
    assert not (tmp_path / "ds").exists()


def test_prepare_refuses_to_overwrite_a_dataset(tmp_path):
    write_texts(tmp_path / "text")
    prepare([str(tmp_path / "text")], str(tmp_path / "ds"))
    with pytest.raises(DataError, match="already holds"):
        prepare([str(tmp_path / "text")], str(tmp_path / "ds"))


def test_open_without_index_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"python -m trainer\.data prepare"):
        TokenShards.open(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------
# Sampling


def test_windows_are_aligned_and_targets_are_shifted(tmp_path):
    url = arange_dataset(tmp_path, 203)  # 50 windows of 4 (+1) tokens; the last 2 tokens spare
    batches = take(make_loader(url), 25)
    for inputs, targets in batches:
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape == (2, 4)
        assert torch.equal(targets, inputs + 1)
        assert torch.equal(inputs, inputs[:, :1] + torch.arange(4))
        assert (inputs[:, 0] % 4 == 0).all()
    # One epoch visits every window exactly once.
    assert sorted(flat(window_ids(batches))) == list(range(50))


def test_same_seed_same_batches_and_epochs_differ(tmp_path):
    url = arange_dataset(tmp_path, 201)
    first, second = take(make_loader(url, seed=7), 50), take(make_loader(url, seed=7), 50)
    assert window_ids(first) == window_ids(second)
    epoch0, epoch1 = window_ids(first[:25]), window_ids(first[25:])
    assert epoch0 != epoch1 and sorted(flat(epoch1)) == list(range(50))


def test_different_seeds_differ(tmp_path):
    url = arange_dataset(tmp_path, 201)
    assert window_ids(take(make_loader(url, seed=1), 5)) != window_ids(
        take(make_loader(url, seed=2), 5))


def test_sampler_leaves_the_global_rng_alone(tmp_path):
    url = arange_dataset(tmp_path, 201)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(make_loader(url), 30)
    assert torch.equal(torch.rand(3), expected)


def test_data_parallel_ranks_are_disjoint_and_equal_in_length(tmp_path):
    url = arange_dataset(tmp_path, 4 * 50 + 1)  # 50 windows; 3 ranks x 2 per batch -> 8 batches
    loaders = [make_loader(url, replicas=3, rank=rank) for rank in range(3)]
    assert [len(loader) for loader in loaders] == [8, 8, 8]
    per_rank = [flat(window_ids(take(loader, 8))) for loader in loaders]
    seen = flat(per_rank)
    assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(50))
    # The ranks together read what one rank would read with a batch three times as large.
    single = make_loader(url, batch_size=6)
    for b, ids in enumerate(window_ids(take(single, 8))):
        assert sorted(ids) == sorted(flat(r[2 * b: 2 * b + 2] for r in per_rank))


@pytest.mark.parametrize("saved_after", [0, 3, 8, 11])
def test_state_dict_resumes_exactly_across_epoch_boundaries(tmp_path, saved_after):
    url = arange_dataset(tmp_path, 4 * 17 + 1)  # 17 windows, batches of 2 -> 8 batches per epoch
    reference = take(make_loader(url, seed=3), 30)

    interrupted = make_loader(url, seed=3)
    take(interrupted, saved_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain values only
    resumed = make_loader(url, seed=3)
    resumed.load_state_dict(state)
    following = take(resumed, 30 - saved_after)

    for (inputs, targets), (ref_inputs, ref_targets) in zip(following, reference[saved_after:],
                                                            strict=True):
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)


def test_state_resumes_on_another_data_parallel_split(tmp_path):
    url = arange_dataset(tmp_path, 4 * 40 + 1)
    two_ranks = [make_loader(url, batch_size=2, replicas=2, rank=rank) for rank in range(2)]
    for loader in two_ranks:
        take(loader, 3)
    state = two_ranks[0].state_dict()
    single = make_loader(url, batch_size=4)
    single.load_state_dict(state)
    after_single = window_ids(take(single, 4))
    after_pair = [window_ids(take(loader, 4)) for loader in two_ranks]
    for b in range(4):
        assert sorted(after_single[b]) == sorted(after_pair[0][b] + after_pair[1][b])


def test_state_from_another_global_batch_is_refused(tmp_path):
    url = arange_dataset(tmp_path, 201)
    with pytest.raises(DataError, match="global_batch=2 but this run has 4"):
        make_loader(url, batch_size=4).load_state_dict(make_loader(url).state_dict())


def test_worker_processes_yield_the_same_batches(tmp_path):
    url = arange_dataset(tmp_path, 4 * 17 + 1)
    in_process = take(make_loader(url), 12)
    with_workers = make_loader(url, workers=1)
    batches = take(with_workers, 12)
    assert window_ids(batches) == window_ids(in_process)
    assert with_workers.state_dict()["batches_consumed"] == 4 and with_workers.epoch == 1


def test_too_little_data_for_one_batch(tmp_path):
    url = arange_dataset(tmp_path, 9)
    with pytest.raises(DataError, match="no global batch"):
        make_loader(url, batch_size=2, replicas=2)


# ------------------------------------------------------------------------------------------------
# The data module and Lightning


def test_data_module_reads_the_data_parallel_rank_from_the_strategy(tmp_path):
    import pytorch_lightning as pl

    url = arange_dataset(tmp_path, 4 * 40 + 1)
    module = TokenDataModule(DataConfig(path=url, seq_len=4, micro_batch_size=2), seed=0)
    assert module.data_parallel() == (0, 1) and module.batches_per_epoch == 20
    module.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert module.data_parallel() == (0, 2) and module.batches_per_epoch == 10


class _Recorder:
    """A LightningModule that trains one scalar and remembers every batch it was given."""

    @staticmethod
    def build():
        import pytorch_lightning as pl

        class Recorder(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))
                self.seen: list[torch.Tensor] = []

            def training_step(self, batch, batch_idx):
                inputs, targets = batch
                self.seen.append(inputs.clone())
                return (self.weight - targets.float().mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Recorder()


def _fit(url: str, ckpt_dir: Path, max_steps: int, every: int, ckpt_path: str | None = None):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = _Recorder.build()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                   filename="{step}")])
    data = TokenDataModule(DataConfig(path=url, seq_len=4, micro_batch_size=2), seed=5)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("resume_step", [3, 5])  # mid-epoch, and exactly at the epoch's end
def test_lightning_checkpoint_resumes_the_data_position(tmp_path, resume_step):
    url = arange_dataset(tmp_path, 4 * 10 + 1)  # 5 batches per epoch
    full = _fit(url, tmp_path / "ckpt", max_steps=12, every=resume_step)
    resumed = _fit(url, tmp_path / "ckpt2", max_steps=12, every=100,
                   ckpt_path=str(tmp_path / "ckpt" / f"step={resume_step}.ckpt"))
    assert len(resumed) == 12 - resume_step
    for got, expected in zip(resumed, full[resume_step:], strict=True):
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------
# The built-in corpus


def test_default_corpus_is_prepared_once_from_the_stdlib(tmp_path):
    path = ensure_default_corpus(max_bytes=300_000)
    assert Path(path) == default_corpus_dir() == tmp_path / "cache" / "data" / "stdlib-bytes"
    index_file = Path(path) / "index.json"
    written = index_file.stat().st_mtime_ns

    assert ensure_default_corpus(max_bytes=300_000) == path
    assert index_file.stat().st_mtime_ns == written
    assert [p.name for p in default_corpus_dir().parent.iterdir()] == ["stdlib-bytes"]

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted((p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts),
                     key=lambda p: p.relative_to(stdlib).as_posix())
    docs = documents(TokenShards.open(path))
    assert docs[0] == sources[0].read_text(encoding="utf-8")
    assert 0 < len(TokenShards.open(path)) <= 300_000 + len(docs)


def _race_for_the_corpus(start, results):
    start.wait()
    results.put(ensure_default_corpus(max_bytes=1_000_000))


def test_default_corpus_survives_two_processes_racing(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    racers = [context.Process(target=_race_for_the_corpus, args=(start, results))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(timeout=60)
    assert [racer.exitcode for racer in racers] == [0, 0]
    assert {results.get(timeout=5), results.get(timeout=5)} == {str(default_corpus_dir())}
    assert [p.name for p in default_corpus_dir().parent.iterdir()] == ["stdlib-bytes"]
    assert documents(TokenShards.open(str(default_corpus_dir())))


# ------------------------------------------------------------------------------------------------
# Command line


def test_cli_missing_input_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", "--output", str(tmp_path / "ds"),
         str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file or directory"]
    assert not (tmp_path / "ds").exists()


def test_cli_prepare_then_info(tmp_path, capsys):
    write_texts(tmp_path / "text")
    assert main(["prepare", "--output", str(tmp_path / "ds"), "--shard-tokens", "10",
                 str(tmp_path / "text" / "*.txt"), str(tmp_path / "text" / "sub")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    tokens = len(TEXTS["a.txt"].encode()) + 1 + len(TEXTS["sub/c.py"].encode()) + 1
    assert f"tokens:     {tokens}\n" in out and f"shards:     {-(-tokens // 10)}\n" in out
    assert "vocab_size: 256\n" in out


def test_cli_empty_directory_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--output", str(tmp_path / "ds"), str(tmp_path / "empty")]) == 2
    assert "no .txt/.md/.py files found" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------------
# S3 through a real (moto) server


@pytest.fixture(scope="module")
def s3_options():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    fsspec.filesystem("s3", **options).mkdir("tokens")
    yield options
    server.stop()


@pytest.mark.slow
def test_s3_round_trip_and_local_cache(tmp_path, s3_options):
    write_texts(tmp_path / "text")
    url = "s3://tokens/run1"
    prepare([str(tmp_path / "text")], url, shard_tokens=16, storage_options=s3_options)

    shards = TokenShards.open(url, s3_options)
    assert documents(shards) == [TEXTS[name] for name in sorted(TEXTS)]
    cached = sorted((tmp_path / "cache" / "data" / "remote").iterdir())
    assert len(cached) == shards.num_shards > 1

    # Shards are cached by checksum: with the objects gone the dataset still opens from the cache.
    fs = fsspec.filesystem("s3", **s3_options)
    fs.rm([f"tokens/run1/{shard['file']}" for shard in shards.index["shards"]])
    assert documents(TokenShards.open(url, s3_options)) == documents(shards)

    module = TokenDataModule(DataConfig(path=url, seq_len=8, micro_batch_size=2,
                                        storage_options=s3_options), seed=0)
    inputs, targets = next(iter(module.train_dataloader()))
    assert inputs.shape == (2, 8) and torch.equal(inputs[:, 1:], targets[:, :-1])
