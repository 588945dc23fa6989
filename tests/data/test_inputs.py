"""The formats corpora ship in: text, JSONL, Parquet, Hugging Face datasets (saved to disk, or data
files read by `datasets`), from local paths or fsspec URLs. Byte tokens, so the documents read
back are the texts themselves."""

from __future__ import annotations

import gzip
import json

import fsspec
import pytest

from trainer.data import DataError, ReadOptions, TokenShards, prepare

from .helpers import documents

TEXTS = ["first document", "zweites Dokument: Über", "", "四番目", "last one\nwith two lines"]
WRITTEN = [t for t in TEXTS if t]  # an empty document is not written


def jsonl(path, texts=TEXTS, field="text"):
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def parquet(path, texts=TEXTS, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": list(range(len(texts))), column: texts}), path,
                   row_group_size=2)
    return path


def read_back(tmp_path, inputs, **kwargs) -> list[str]:
    prepare([str(i) for i in inputs], str(tmp_path / "ds"), **kwargs)
    return documents(TokenShards.open(str(tmp_path / "ds")))


def test_jsonl_with_a_text_field_and_compressed(tmp_path):
    jsonl(tmp_path / "a.jsonl", field="content")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write((tmp_path / "a.jsonl").read_text())
    assert read_back(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"],
                     read=ReadOptions(text_field="content")) == WRITTEN * 2


def test_parquet_column(tmp_path):
    parquet(tmp_path / "a.parquet", column="body")
    assert read_back(tmp_path, [tmp_path / "a.parquet"],
                     read=ReadOptions(column="body")) == WRITTEN


def test_hugging_face_dataset_saved_to_disk_and_csv_through_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
                          "validation": datasets.Dataset.from_dict({"text": TEXTS[3:]})}
                         ).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "rows.csv").write_text('text,n\n"a, quoted one",1\nplain,2\n')
    got = read_back(tmp_path, [tmp_path / "saved", tmp_path / "dict", tmp_path / "rows.csv"],
                    read=ReadOptions(split="validation"))
    assert got == WRITTEN + WRITTEN[2:] + ["a, quoted one", "plain"]


def test_directories_and_globs_in_sorted_order_of_every_format(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    jsonl(tmp_path / "in" / "b.jsonl", ["from jsonl"])
    (tmp_path / "in" / "a.txt").write_text("from text")
    parquet(tmp_path / "in" / "sub" / "c.parquet", ["from parquet"])
    (tmp_path / "in" / "ignored.bin").write_bytes(b"\x00")
    assert read_back(tmp_path, [tmp_path / "in", tmp_path / "in" / "*.txt"]) == [
        "from text", "from jsonl", "from parquet", "from text"]


def test_inputs_from_an_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/part-1.jsonl", jsonl(tmp_path / "x.jsonl").read_bytes())
    fs.pipe("/corpus/part-2.parquet", parquet(tmp_path / "x.parquet", ["remote"]).read_bytes())
    assert read_back(tmp_path, ["memory://corpus/part-*"]) == [*WRITTEN, "remote"]
    fs.rm("/corpus", recursive=True)


@pytest.mark.parametrize(("make", "read", "message"), [
    (lambda p: jsonl(p / "a.jsonl"), ReadOptions(text_field="body"),
     "{p}/a.jsonl:1: no field 'body' (found: text, n); name the text's field with --text-field"),
    (lambda p: (p / "a.jsonl").write_text('{"text": "ok"}\n{broken\n') and p / "a.jsonl",
     ReadOptions(), "{p}/a.jsonl:2: not a JSON line"),
    (lambda p: (p / "a.jsonl").write_text('{"text": 7}\n') and p / "a.jsonl", ReadOptions(),
     "{p}/a.jsonl:1: field 'text': holds int, not text"),
    (lambda p: parquet(p / "a.parquet"), ReadOptions(column="body"),
     "{p}/a.parquet: no column 'body' (found: n, text); name the text's column with --column"),
    (lambda p: (p / "a.txt").write_bytes(b"ok \xff") and p / "a.txt", ReadOptions(),
     "{p}/a.txt: not UTF-8 text (byte 3)"),
    (lambda p: p / "nothing.jsonl", ReadOptions(), "{p}/nothing.jsonl: no such file or directory"),
])
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(tmp_path, make, read,
                                                                     message):
    made = make(tmp_path)
    with pytest.raises(DataError) as caught:
        prepare([str(made)], str(tmp_path / "ds"), read=read, tokenizer="tiktoken:"
                + str(tiktoken_path(tmp_path)), shard_tokens=1)
    assert str(caught.value).startswith(message.format(p=tmp_path)), str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "ds").exists()


def tiktoken_path(tmp_path):
    from tokenizer_files import tiktoken_file

    return tiktoken_file(tmp_path / "tok" / "small.tiktoken", merges=5)


def test_a_missing_split_names_the_ones_there(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: no split 'test' \(found: train\); choose one "
                                        r"with --split"):
        prepare([str(tmp_path / "dict")], str(tmp_path / "ds"), read=ReadOptions(split="test"))
