"""A checkpoint's model weights as the tests read them: with torch's own DCP reader (not the
trainer's), from a path or any fsspec URL, so a test of our writer does not go through our
reader."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def weights(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The full (gathered) model tensors of the DCP checkpoint at `url`, whatever mesh wrote it."""
    reader = FsspecReader(url, **(storage_options or {}))
    metadata = reader.read_metadata()
    state = {key: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in metadata.state_dict_metadata.items()
             if key.startswith("state_dict.") and isinstance(md, TensorStorageMetadata)}
    dcp.load(state, storage_reader=FsspecReader(url, **(storage_options or {})), no_dist=True)
    return state


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        # float32 reductions in another order: ~1e-5 relative after a few AdamW steps
        assert (ours[key] - expected).norm() <= 1e-3 * expected.norm(), key
