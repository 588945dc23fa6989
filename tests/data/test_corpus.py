"""The built-in corpus from Python's standard library."""

from __future__ import annotations

import multiprocessing
import sysconfig
from pathlib import Path

from trainer.data import (
    TokenShards,
    default_corpus_dir,
    ensure_default_corpus,
)

from .helpers import (
    documents,
)


def test_default_corpus_is_prepared_once_from_the_stdlib(tmp_path):
    path = ensure_default_corpus(max_bytes=300_000)
    assert Path(path) == default_corpus_dir() == tmp_path / "cache" / "data" / "stdlib-bytes"
    index_file = Path(path) / "index.json"
    written = index_file.stat().st_mtime_ns

    assert ensure_default_corpus(max_bytes=300_000) == path
    assert index_file.stat().st_mtime_ns == written
    assert [p.name for p in default_corpus_dir().parent.iterdir()] == ["stdlib-bytes"]

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted((p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts),
                     key=lambda p: p.relative_to(stdlib).as_posix())
    docs = documents(TokenShards.open(path))
    assert docs[0] == sources[0].read_text(encoding="utf-8")
    assert 0 < len(TokenShards.open(path)) <= 300_000 + len(docs)


def _race_for_the_corpus(start, results):
    start.wait()
    results.put(ensure_default_corpus(max_bytes=1_000_000))


def test_default_corpus_survives_two_processes_racing(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    racers = [context.Process(target=_race_for_the_corpus, args=(start, results))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(timeout=60)
    assert [racer.exitcode for racer in racers] == [0, 0]
    assert {results.get(timeout=5), results.get(timeout=5)} == {str(default_corpus_dir())}
    assert [p.name for p in default_corpus_dir().parent.iterdir()] == ["stdlib-bytes"]
    assert documents(TokenShards.open(str(default_corpus_dir())))
