"""Shared helpers of the data tests: small datasets whose tokens check themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.data import TokenLoader, TokenShards, WindowSampler, prepare

REPO = Path(__file__).resolve().parents[2]
TEXTS = {
    "a.txt": "Call me Ishmael.\n",
    "b.md": "# Über\nnaïve café, 東京\n",
    "sub/c.py": "print('hi')\n",
}


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
