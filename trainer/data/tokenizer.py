"""Tokenizers `prepare` runs: `bytes`, `ids`, `hf:<tokenizer.json or its directory>` (Hugging Face
`tokenizers`) and `tiktoken:<.tiktoken BPE file>` (Llama 3-style vocabularies).

A `TokenizerSpec` is what the index records and what worker processes receive: the name the user
gave, the tokenizer file's bytes and SHA-256, the vocabulary size and the end-of-document id, and a
digest of the vocabulary itself (`vocabulary_digest`: the same for a Llama 3 `tokenizer.json` and
its `.tiktoken` file, which differ as files). Each process builds its own encoder from it
(`encoder()`), so nothing unpicklable crosses processes.
`tokenizers` and `tiktoken` are imported only by the kind that needs them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np

from trainer.data.format import BYTES_SEPARATOR, BYTES_VOCAB_SIZE, DataError

KINDS = ("bytes", "ids", "hf", "tiktoken")
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"  # where a Hugging Face directory names its eos_token
# End-of-document tokens of common vocabularies, tried in order when the directory does not say.
HF_EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")

# The Llama 3 layout of a tiktoken vocabulary: 256 special tokens after the BPE ranks, in this
# order, and the pre-tokenizer pattern. Source: meta-llama/llama-models, models/llama3/tokenizer.py
# (special_tokens, num_reserved_special_tokens = 256, pat_str); the same names as Llama 3.1's
# tokenizer_config.json.
TIKTOKEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>", "<|image|>")
TIKTOKEN_SPECIAL = _LLAMA3_NAMED + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(_LLAMA3_NAMED)))
TIKTOKEN_EOD = "<|end_of_text|>"

Encoder = Callable[[Sequence[str | bytes]], list[np.ndarray]]


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer as the index records it. `source` holds the tokenizer file's bytes for the
    kinds that have one; it travels to worker processes and is never written to the index."""

    kind: str
    name: str  # as given on the command line: "bytes", "hf:tok/", "tiktoken:llama3.tiktoken"
    vocab_size: int | None  # None for ids: only the ids themselves say
    eod_id: int | None  # ends every document; None: documents are not separated
    eod_token: str | None = None
    sha256: str | None = None
    source: bytes = field(default=b"", repr=False, compare=False)

    def record(self) -> dict:
        """What the index keeps: everything but the file itself."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "sha256": self.sha256, "eod_id": self.eod_id, "eod_token": self.eod_token,
                "vocab_sha256": self.vocabulary_digest()}

    def vocabulary_digest(self) -> str | None:
        """`vocabulary_digest` of this tokenizer's vocabulary (None for ids: unknown)."""
        if self.kind == "bytes":
            return BYTES_DIGEST
        if self.kind == "hf":
            return vocabulary_digest(hf_vocabulary(self.source, self.name))
        if self.kind == "tiktoken":
            ranks = tiktoken_ranks(self.source, self.name)
            first_special = max(ranks.values()) + 1
            return vocabulary_digest({**ranks, **{t.encode(): first_special + i
                                                  for i, t in enumerate(TIKTOKEN_SPECIAL)}})
        return None

    @property
    def encodes_text(self) -> bool:
        return self.kind != "ids"

    def encoder(self) -> Encoder:
        """A function from a batch of documents to their ids (uint32 arrays, no end token)."""
        if self.kind == "bytes":
            return _encode_bytes
        if self.kind == "hf":
            return _hf_encoder(self.source)
        if self.kind == "tiktoken":
            return _tiktoken_encoder(self.source)
        raise DataError(f"tokenizer {self.name!r} reads ids from .npy files; it encodes no text")


def load_tokenizer(name: str, *, eod_token: str | None = None, separator: int | None = None,
                   storage_options: dict | None = None) -> TokenizerSpec:
    """The tokenizer `name` names (`bytes`, `ids`, `hf:<path or URL>`, `tiktoken:<path or URL>`),
    its file read through fsspec and checked: a file that does not load is refused here, once,
    not in every worker. `eod_token` names the end-of-document token of hf and tiktoken;
    `separator` is an id that ends documents for bytes and ids."""
    kind, _, where = name.partition(":")
    if kind not in KINDS or (kind in ("hf", "tiktoken")) != bool(where):
        raise DataError(f"tokenizer {name!r}: allowed: bytes, ids, hf:<tokenizer.json or its "
                        f"directory>, tiktoken:<.tiktoken file> (paths or fsspec URLs)")
    if kind in ("bytes", "ids"):
        if eod_token is not None:
            raise DataError(f"--eod-token is for hf: and tiktoken: tokenizers; {kind} takes an "
                            f"id (--separator)")
        if kind == "bytes":
            return TokenizerSpec("bytes", "bytes", BYTES_VOCAB_SIZE,
                                 BYTES_SEPARATOR if separator is None else separator)
        return TokenizerSpec("ids", "ids", None, separator)
    if separator is not None:
        raise DataError(f"--separator is for bytes and ids; {kind}: takes a token (--eod-token)")
    if kind == "hf":
        return _load_hf(name, where, eod_token, storage_options or {})
    return _load_tiktoken(name, where, eod_token or TIKTOKEN_EOD, storage_options or {})


def _read(url: str, storage_options: dict, what: str) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as file:
            return file.read()
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{url}: no such {what}") from None


def _load_hf(name: str, where: str, eod_token: str | None, options: dict) -> TokenizerSpec:
    fs, path = fsspec.core.url_to_fs(where, **options)
    directory = None
    if fs.isdir(path):
        directory, where = where.rstrip("/"), f"{where.rstrip('/')}/{HF_FILE}"
    source = _read(where, options, f"{HF_FILE} (hf: takes a tokenizer.json or its directory)")
    tokenizer = _hf_tokenizer(source, where)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if eod_token is None:
        eod_token = _hf_configured_eos(directory, options) if directory else None
    if eod_token is None:
        eod_token = next((t for t in HF_EOD_CANDIDATES if t in vocab), None)
    if eod_token is None:
        raise DataError(f"{where}: no end-of-document token found (none of "
                        f"{', '.join(HF_EOD_CANDIDATES)}); name one with --eod-token")
    if eod_token not in vocab:
        raise DataError(f"--eod-token {eod_token!r}: not in the vocabulary of {where}")
    return TokenizerSpec("hf", name, max(vocab.values()) + 1, vocab[eod_token], eod_token,
                         hashlib.sha256(source).hexdigest(), source)


def _hf_tokenizer(source: bytes, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(source.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{where}: not a Hugging Face tokenizer.json ({exc})") from None


def _hf_configured_eos(directory: str, options: dict) -> str | None:
    try:
        config = json.loads(_read(f"{directory}/{HF_CONFIG_FILE}", options, HF_CONFIG_FILE))
    except (DataError, ValueError):
        return None
    eos = config.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _hf_encoder(source: bytes) -> Encoder:
    tokenizer = _hf_tokenizer(source, HF_FILE)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def encode_batch(documents: Sequence[str | bytes]) -> list[np.ndarray]:
        texts = [_text(d) for d in documents]
        # No special tokens added: each document gets exactly one end token, from the writer.
        return [np.asarray(e.ids, dtype=np.uint32)
                for e in encode(texts, add_special_tokens=False)]

    return encode_batch


def tiktoken_ranks(source: bytes, where: str) -> dict[bytes, int]:
    """A .tiktoken file's BPE ranks: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(source.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise DataError(f"{where}:{number}: not a tiktoken BPE line "
                            "(base64 token, space, rank)") from None
    if not ranks:
        raise DataError(f"{where}: no BPE ranks (an empty .tiktoken file)")
    return ranks


def _tiktoken_encoding(source: bytes, where: str):
    import tiktoken

    ranks = tiktoken_ranks(source, where)
    first_special = max(ranks.values()) + 1
    special = {token: first_special + i for i, token in enumerate(TIKTOKEN_SPECIAL)}
    try:
        return tiktoken.Encoding(where, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=special)
    except ValueError as exc:
        raise DataError(f"{where}: tiktoken refuses its ranks ({exc})") from None


def _load_tiktoken(name: str, where: str, eod_token: str, options: dict) -> TokenizerSpec:
    source = _read(where, options, "tiktoken BPE file")
    encoding = _tiktoken_encoding(source, where)
    if eod_token not in encoding.special_tokens_set:
        raise DataError(f"--eod-token {eod_token!r}: not one of the Llama 3 special tokens "
                        f"({TIKTOKEN_SPECIAL[0]}, {TIKTOKEN_EOD}, ...)")
    return TokenizerSpec("tiktoken", name, encoding.n_vocab,
                         encoding.encode_single_token(eod_token), eod_token,
                         hashlib.sha256(source).hexdigest(), source)


def _tiktoken_encoder(source: bytes) -> Encoder:
    encoding = _tiktoken_encoding(source, "tiktoken")

    def encode_batch(documents: Sequence[str | bytes]) -> list[np.ndarray]:
        # encode_ordinary: text that spells a special token stays text, so the only end tokens
        # in the dataset are the writer's. One thread: prepare runs one encoder per core.
        ids = encoding.encode_ordinary_batch([_text(d) for d in documents], num_threads=1)
        return [np.asarray(one, dtype=np.uint32) for one in ids]

    return encode_batch


def _encode_bytes(documents: Sequence[str | bytes]) -> list[np.ndarray]:
    return [np.frombuffer(d.encode("utf-8") if isinstance(d, str) else d, dtype=np.uint8)
            for d in documents]


def _text(document: str | bytes) -> str:
    # The input readers decode text for hf and tiktoken (naming the file on bad UTF-8).
    return document if isinstance(document, str) else document.decode("utf-8")


# ---- comparing vocabularies -------------------------------------------------------------------

def vocabulary_digest(tokens: dict[bytes, int]) -> str:
    """SHA-256 of a vocabulary as (id, token bytes) pairs in id order: equal for two tokenizers
    that map the same byte strings to the same ids, whatever their file formats."""
    digest = hashlib.sha256()
    for token, number in sorted(tokens.items(), key=lambda item: item[1]):
        digest.update(number.to_bytes(8, "little") + len(token).to_bytes(8, "little") + token)
    return digest.hexdigest()


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-ins byte-level BPE writes bytes as (GPT-2's `bytes_to_unicode`,
    openai/gpt-2 src/encoder.py, which Hugging Face's ByteLevel pre-tokenizer follows): printable
    Latin-1 bytes stand for themselves, the other 68 are written as chr(256 + n) in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + n): b for n, b in enumerate(moved)})
    return alphabet


def hf_vocabulary(source: bytes, where: str) -> dict[bytes, int]:
    """A tokenizer.json's vocabulary as byte strings: a byte-level BPE's tokens turned back into
    the bytes they stand for, added (special) tokens and other models' tokens as UTF-8."""
    tokenizer = _hf_tokenizer(source, where)
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    byte_level = '"ByteLevel"' in source.decode("utf-8", errors="replace")
    alphabet = _byte_level_alphabet() if byte_level else {}
    vocabulary = {}
    for token, number in tokenizer.get_vocab(with_added_tokens=True).items():
        if byte_level and token not in added and all(c in alphabet for c in token):
            vocabulary[bytes(alphabet[c] for c in token)] = number
        else:
            vocabulary[token.encode()] = number
    return vocabulary


BYTES_DIGEST = vocabulary_digest({bytes([b]): b for b in range(BYTES_VOCAB_SIZE)})
