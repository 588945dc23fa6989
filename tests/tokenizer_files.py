"""Small real tokenizer files, made here from local text (nothing is downloaded): a byte-level BPE
`tokenizer.json` trained by Hugging Face `tokenizers`, and a `.tiktoken` BPE file whose merges a
few lines of BPE training choose. Used by the data tests, the docs test and bench/data.py."""

from __future__ import annotations

import base64
import collections
import itertools
import json
import re
from pathlib import Path

# Public-domain English (the opening of Moby-Dick), repeated with variations: enough for merges.
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world. It is a way I have of driving off the spleen "
    "and regulating the circulation. Whenever I find myself growing grim about the mouth; "
    "whenever it is a damp, drizzly November in my soul; then, I account it high time to get to "
    "sea as soon as I can. This is my substitute for pistol and ball. "
)
EOD = "<|endoftext|>"


def corpus_texts(n: int = 40) -> list[str]:
    """`n` documents of varied lengths and a few non-ASCII words."""
    words = TEXT.split()
    return [" ".join(words[i % 17: i % 17 + 5 + (i * 7) % 60])
            + (" café 東京" if i % 5 == 0 else "") for i in range(n)]


def hf_tokenizer_dir(directory: Path, vocab_size: int = 400,
                     texts: list[str] | None = None) -> Path:
    """A byte-level BPE tokenizer.json (special token `<|endoftext|>`) trained on `texts` (default:
    TEXT and corpus_texts()), and a tokenizer_config.json naming that token as eos_token, like a
    Hugging Face model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts or [TEXT, *corpus_texts()], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD}))
    return directory


def tiktoken_file(path: Path, merges: int = 100) -> Path:
    """A .tiktoken file: the 256 bytes, then `merges` BPE merges learnt from TEXT (the most
    frequent adjacent pair inside words, each merge a new rank)."""
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", TEXT))
    pieces = {word: [bytes([b]) for b in word.encode()] for word in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: collections.Counter = collections.Counter()
        for word, parts in pieces.items():
            for pair in itertools.pairwise(parts):
                pairs[pair] += words[word]
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        ranks.setdefault(left + right, len(ranks))
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (left, right):
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path
