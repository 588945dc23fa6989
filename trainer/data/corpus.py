"""The built-in corpus: Python's standard library as byte tokens, prepared on first use into the
local cache, so a run without `data.path` trains on something real and needs no download."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import uuid
from pathlib import Path

from trainer.data.format import INDEX_FILE, cache_root
from trainer.data.inputs import files_under
from trainer.data.writer import prepare

log = logging.getLogger(__name__)

DEFAULT_CORPUS_BYTES = 4 << 20  # enough for a demo run, prepared in about a second
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def default_corpus_dir() -> Path:
    return cache_root() / "data" / "stdlib-bytes"


def stdlib_sources(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The standard library's `*.py` files in sorted order, cut before the total passes `max_bytes`.

    Installed packages (site-packages) are left out, so the corpus depends only on the Python
    version, never on what else is installed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in files_under(root, (".py",), skip_dirs=_SKIPPED_STDLIB_DIRS):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def ensure_default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The built-in corpus's directory, preparing it on first use.

    It is prepared into a private staging directory and renamed into place; a rename onto a
    directory another process has already completed fails, and that process's copy is used.
    """
    target = default_corpus_dir()
    if (target / INDEX_FILE).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        log.info("preparing the built-in corpus (Python's standard library) in %s", target)
        prepare([str(path) for path in stdlib_sources(max_bytes)], str(staging))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / INDEX_FILE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
