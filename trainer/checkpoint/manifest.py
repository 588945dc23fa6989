"""The commit record of a checkpoint, and finding checkpoints by it.

Object stores cannot rename a prefix, so a checkpoint cannot appear atomically. Instead its
`manifest.json` is written last, after every shard, DCP's `.metadata` and the trainer state: a
directory without one is a save that did not finish and is never loaded. The manifest lists each
file with its size and SHA-256, so a damaged or truncated file is found before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.checkpoint.storage import filesystem, join

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})\.ckpt$")
_READ_CHUNK = 8 << 20


def step_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def step_of(url: str) -> int | None:
    match = _STEP_DIR.match(posixpath.basename(url.rstrip("/")))
    return int(match[1]) if match else None


@dataclass
class Manifest:
    step: int
    world_size: int
    mesh: dict[str, int]
    config_hash: str
    files: dict[str, dict[str, Any]]  # name relative to the checkpoint: {"bytes", "sha256"}
    model: dict[str, Any] | None = None  # the model's family and shape, for export
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()))
    format: int = FORMAT

    @property
    def nbytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r}, expected {FORMAT}")
        return cls(**data)


def write_manifest(url: str, manifest: Manifest, storage_options: dict | None = None) -> None:
    fs, root = filesystem(url, storage_options)
    fs.pipe_file(posixpath.join(root, MANIFEST), manifest.to_json().encode())


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest | None:
    """The manifest of the checkpoint at `url`, or None where it has none (not committed)."""
    fs, root = filesystem(url, storage_options)
    try:
        text = fs.cat_file(posixpath.join(root, MANIFEST))
    except FileNotFoundError:
        return None
    return Manifest.from_json(text)


def remove_manifest(url: str, storage_options: dict | None = None) -> None:
    """Un-commit `url` before it is written again."""
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, MANIFEST)
    if fs.exists(path):
        fs.rm(path)


def verify(url: str, manifest: Manifest, storage_options: dict | None = None) -> list[str]:
    """What is wrong with the files of a committed checkpoint: [] when each has its size and
    checksum."""
    fs, root = filesystem(url, storage_options)
    problems = []
    for name, expected in sorted(manifest.files.items()):
        path = posixpath.join(root, name)
        digest, nbytes = hashlib.sha256(), 0
        try:
            with fs.open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
                    nbytes += len(chunk)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if nbytes != expected["bytes"]:
            problems.append(f"{name} has {nbytes} bytes, the manifest says {expected['bytes']}")
        elif digest.hexdigest() != expected["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


@dataclass
class Found:
    """One step directory under a checkpoint root."""

    url: str
    step: int
    manifest: Manifest | None  # None: not committed
    problems: list[str] | None = None  # None: not verified

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def scan(directory: str, storage_options: dict | None = None) -> list[Found]:
    """Every step directory under `directory`, oldest first, with its manifest if committed."""
    fs, root = filesystem(directory, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for path in entries:
        step = step_of(path)
        if step is None:
            continue
        url = join(directory, posixpath.basename(path.rstrip("/")))
        try:
            manifest = read_manifest(url, storage_options)
        except (ValueError, TypeError) as exc:
            log.warning("checkpoint %s: unreadable manifest (%s); not counted", url, exc)
            manifest = None
        found.append(Found(url, step, manifest))
    return sorted(found, key=lambda f: f.step)


def newest_committed(directory: str, storage_options: dict | None = None) -> Found | None:
    committed = [f for f in scan(directory, storage_options) if f.committed]
    return committed[-1] if committed else None


def newest_sound(directory: str, storage_options: dict | None = None, *,
                 starting_at: int | None = None) -> Found | None:
    """The newest committed checkpoint (at or below step `starting_at`) whose files match their
    checksums. Damaged ones are reported and skipped for the one before."""
    for found in reversed([f for f in scan(directory, storage_options) if f.committed]):
        if starting_at is not None and found.step > starting_at:
            continue
        assert found.manifest is not None
        found.problems = verify(found.url, found.manifest, storage_options)
        if not found.problems:
            return found
        log.error("checkpoint %s is damaged (%s); trying the one before",
                  found.url, "; ".join(found.problems))
    return None


