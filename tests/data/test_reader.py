"""S3 through a real (moto) server: round trip and the local cache of remote shards."""

from __future__ import annotations

import fsspec
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    TokenDataModule,
    TokenShards,
    prepare,
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
