"""Real tokenizers in `prepare`: Hugging Face `tokenizers` and tiktoken, built here from local text;
the index records which tokenizer made the dataset."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest
from tokenizer_files import EOD, corpus_texts, hf_tokenizer_dir, tiktoken_file

from trainer.data import DataError, TokenShards, load_tokenizer, prepare


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_tokenizer_dir(tmp_path_factory.mktemp("hf") / "tok")


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    return tiktoken_file(tmp_path_factory.mktemp("tt") / "small.tiktoken")


def split_documents(shards: TokenShards, eod: int) -> list[list[int]]:
    stream = shards.read(0, len(shards)).tolist()
    assert stream[-1] == eod
    documents, current = [], []
    for token in stream:
        if token == eod:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return documents


def test_hf_tokenizer_dataset_holds_the_libraries_own_ids(tmp_path, hf_dir):
    from tokenizers import Tokenizer

    texts = corpus_texts(12)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", texts)
    index = prepare([str(jsonl)], str(tmp_path / "ds"), tokenizer=f"hf:{hf_dir}", workers=1)

    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eod = reference.token_to_id(EOD)
    shards = TokenShards.open(str(tmp_path / "ds"))
    assert split_documents(shards, eod) == [
        reference.encode(t, add_special_tokens=False).ids for t in texts]
    file_bytes = (hf_dir / "tokenizer.json").read_bytes()
    # the vocabulary's digest: test_a_tiktoken_file_and_the_tokenizer_json_made_from_it_...
    assert len(index["tokenizer"].pop("vocab_sha256")) == 64
    assert index["tokenizer"] == {
        "kind": "hf", "name": f"hf:{hf_dir}", "vocab_size": reference.get_vocab_size(),
        "sha256": hashlib.sha256(file_bytes).hexdigest(), "eod_id": eod, "eod_token": EOD}
    assert index["vocab_size"] == reference.get_vocab_size() and index["separator"] == eod
    assert index["num_documents"] == len(texts) and index["dtype"] == "uint16"


def test_tiktoken_dataset_decodes_back_to_the_text(tmp_path, tiktoken_path):
    ranks = {int(rank): base64.b64decode(token) for token, rank in
             (line.split() for line in tiktoken_path.read_text().splitlines())}
    texts = corpus_texts(8)
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    index = prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "ds"),
                    tokenizer=f"tiktoken:{tiktoken_path}", workers=1)

    # Llama 3's layout: 256 special tokens after the ranks, <|end_of_text|> the second of them.
    assert index["tokenizer"]["eod_id"] == len(ranks) + 1
    assert index["vocab_size"] == len(ranks) + 256
    documents = split_documents(TokenShards.open(str(tmp_path / "ds")), len(ranks) + 1)
    assert [b"".join(ranks[i] for i in ids).decode() for ids in documents] == texts
    # Merges were applied: fewer tokens than bytes.
    assert sum(map(len, documents)) < sum(len(t.encode()) for t in texts)


def test_worker_processes_write_the_same_dataset(tmp_path, hf_dir, monkeypatch):
    import trainer.data.writer as writer

    monkeypatch.setattr(writer, "CHUNK_DOCUMENTS", 3)  # several chunks in flight at once
    write_jsonl(tmp_path / "corpus.jsonl", corpus_texts(40))
    one = prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "one"),
                  tokenizer=f"hf:{hf_dir}", workers=1, shard_tokens=97)
    two = prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "two"),
                  tokenizer=f"hf:{hf_dir}", workers=2, shard_tokens=97)
    assert one["shards"] == two["shards"] and len(one["shards"]) > 3


def test_end_of_document_token_can_be_named(tmp_path, hf_dir, tiktoken_path):
    assert load_tokenizer(f"tiktoken:{tiktoken_path}", eod_token="<|eot_id|>").eod_id == \
        load_tokenizer(f"tiktoken:{tiktoken_path}").eod_id + 8
    with pytest.raises(DataError, match=r"--eod-token '<nope>': not in the vocabulary of"):
        load_tokenizer(f"hf:{hf_dir}", eod_token="<nope>")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(f"hf:{bare}").eod_token == EOD  # found among the known names


@pytest.mark.parametrize(("name", "message"), [
    ("sentencepiece:x.model", "tokenizer 'sentencepiece:x.model': allowed: bytes, ids, hf:"),
    ("hf:", "tokenizer 'hf:': allowed"),
    ("hf:{tmp}/missing", "{tmp}/missing: no such tokenizer.json"),
    ("hf:{tmp}/empty", "{tmp}/empty/tokenizer.json: no such tokenizer.json"),
    ("hf:{tmp}/bad.json", "{tmp}/bad.json: not a Hugging Face tokenizer.json"),
    ("tiktoken:{tmp}/bad.json", "{tmp}/bad.json:1: not a tiktoken BPE line"),
])
def test_a_bad_tokenizer_is_refused_in_one_line_before_anything_is_written(tmp_path, name,
                                                                          message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}\n')
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError) as caught:
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "ds"),
                tokenizer=name.format(tmp=tmp_path))
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "ds").exists()


def test_version_1_indexes_still_open(tmp_path):
    (tmp_path / "ds").mkdir()
    np.arange(10, dtype="<u2").tofile(tmp_path / "ds" / "shard-00000.bin")
    (tmp_path / "ds" / "index.json").write_text(json.dumps({
        "format": "ultramesh-tokens", "version": 1, "dtype": "uint16", "byteorder": "little",
        "tokenizer": "bytes", "separator": 255, "vocab_size": 256, "num_tokens": 10,
        "shards": [{"file": "shard-00000.bin", "tokens": 10, "sha256": "unused locally"}]}))
    shards = TokenShards.open(str(tmp_path / "ds"))
    assert shards.read(0, 10).tolist() == list(range(10))
    assert shards.index["tokenizer"]["kind"] == "bytes"
    assert shards.index["tokenizer"]["eod_id"] == 255


def test_a_tiktoken_file_and_the_tokenizer_json_made_from_it_share_a_vocabulary(tmp_path,
                                                                              tiktoken_path,
                                                                              hf_dir):
    # transformers' own converter (as Llama 3's tokenizer.json was made) is the independent side
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from trainer.data.tokenizer import TIKTOKEN_PATTERN, TIKTOKEN_SPECIAL

    converted = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=TIKTOKEN_PATTERN,
                                  extra_special_tokens=list(TIKTOKEN_SPECIAL)).converted()
    (tmp_path / "converted").mkdir()
    converted.save(str(tmp_path / "converted" / "tokenizer.json"))
    tiktoken = load_tokenizer(f"tiktoken:{tiktoken_path}")
    hf = load_tokenizer(f"hf:{tmp_path / 'converted'}", eod_token="<|end_of_text|>")
    assert tiktoken.sha256 != hf.sha256  # different files ...
    assert tiktoken.record()["vocab_sha256"] == hf.record()["vocab_sha256"]  # ... one vocabulary
    text = corpus_texts(6)
    assert ([a.tolist() for a in tiktoken.encoder()(text)]
            == [b.tolist() for b in hf.encoder()(text)])
    # the same tokenizer.json written out again differs as a file, not as a vocabulary
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "tokenizer.json").write_text(
        json.dumps(json.loads((hf_dir / "tokenizer.json").read_text()), indent=4))
    again, original = load_tokenizer(f"hf:{tmp_path / 'again'}"), load_tokenizer(f"hf:{hf_dir}")
    assert again.sha256 != original.sha256
    assert again.record()["vocab_sha256"] == original.record()["vocab_sha256"]
    assert original.record()["vocab_sha256"] != hf.record()["vocab_sha256"]
