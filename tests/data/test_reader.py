"""Reading datasets: S3 through a real (moto) server (round trip, the local cache of remote
shards), and a held-out part split off by document."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    DataError,
    TokenDataModule,
    TokenShards,
    prepare,
    split_by_document,
)

from .helpers import (
    TEXTS,
    documents,
    write_texts,
)


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


def test_a_held_out_fraction_is_whole_documents_at_the_end(tmp_path):
    texts = [f"document number {i} " * (1 + i % 3) for i in range(20)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02d}.txt").write_text(text)
    prepare([str(tmp_path)], str(tmp_path / "ds"))
    shards = TokenShards.open(str(tmp_path / "ds"))
    train, held_out = split_by_document(shards, 0.2, "ds")

    def texts_of(region):
        stream = region.windows(np.array([0]), len(region))[0].astype(np.uint8).tobytes()
        return [doc.decode() for doc in stream.split(b"\xff")[:-1]]

    assert len(train) + len(held_out) == len(shards) and train.stop == held_out.start
    cut = len(texts_of(train))
    assert texts_of(train) + texts_of(held_out) == texts  # nothing cut through, nothing lost
    assert 0.15 < len(held_out) / len(shards) < 0.3 and 0 < cut < len(texts)


def test_ids_without_document_ends_cannot_be_split_by_document(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(100))
    prepare([str(tmp_path / "ids.npy")], str(tmp_path / "ds"), tokenizer="ids")
    with pytest.raises(DataError, match=r"no end token \(separator none\)"):
        split_by_document(TokenShards.open(str(tmp_path / "ds")), 0.1, "ds")
