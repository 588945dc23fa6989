"""Writing shards and reading them back: tokenizers, dtypes, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from trainer.data import (
    DataError,
    TokenShards,
    prepare,
)

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
