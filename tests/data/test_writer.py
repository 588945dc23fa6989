"""Writing shards and reading them back: tokenizers, dtypes, refusals."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from trainer.data import (
    DataError,
    TokenShards,
    prepare,
)
from trainer.data.__main__ import _info, main
from trainer.data.progress import Progress

from .helpers import (
    TEXTS,
    documents,
    write_texts,
)


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


class _StopAfter(Progress):
    """A progress line that interrupts the prepare (as Ctrl-C would) once `tokens` are written."""

    def __init__(self, total_bytes: int, tokens: int):
        super().__init__(total_bytes)
        self.stop_at = tokens

    def update(self, documents: int, tokens: int, position: int) -> None:
        super().update(documents, tokens, position)
        if tokens >= self.stop_at:
            raise KeyboardInterrupt


def test_an_interrupted_prepare_resumes_to_the_same_dataset(tmp_path):
    texts = [f"document {i}: " + "words " * (i % 4) for i in range(30)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ([str(tmp_path / "corpus.jsonl")],)
    straight = prepare(*args, str(tmp_path / "straight"), shard_tokens=50)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, str(out), shard_tokens=50, progress=_StopAfter(0, tokens=230))
    # Finished shards and the journal stay; nothing looks like a dataset.
    assert not (out / "index.json").exists() and (out / "prepare.json").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{i}.bin" for i in range(4)]
    with pytest.raises(DataError, match=r"an interrupted prepare \(4 finished shard"):
        _info(str(out))
    # A process killed while writing leaves a partial shard behind: the resume writes it again.
    (out / "shard-00004.bin").write_bytes(b"partial")
    with pytest.raises(DataError, match=r"holds an interrupted prepare of another command \(its "
                                        r"shard_tokens differ\)"):
        prepare(*args, str(out), shard_tokens=60)

    resumed = prepare(*args, str(out), shard_tokens=50)
    assert resumed == straight
    assert not (out / "prepare.json").exists()
    assert documents(TokenShards.open(str(out))) == texts


def test_the_progress_line_counts_documents_and_tokens(tmp_path, caplog):
    write_texts(tmp_path / "text")
    with caplog.at_level(logging.INFO):
        assert main(["prepare", "--output", str(tmp_path / "ds"), str(tmp_path / "text")]) == 0
    tokens = sum(len(text.encode()) + 1 for text in TEXTS.values())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare:")]
    assert lines[-1].startswith(f"prepare: 3 documents  {tokens:,} tokens  ")
    assert lines[-1].endswith("tokens/s  100%  ETA 0:00:00")
