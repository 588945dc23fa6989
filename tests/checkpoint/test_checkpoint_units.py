"""The pieces of trainer.checkpoint that need no training run: commit records, retention's
choice, the safe loader, and the config keys."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint import latest_checkpoint
from trainer.checkpoint.io import SafeLoadPlanner
from trainer.checkpoint.manifest import Found, Manifest, read_manifest, verify, write_manifest
from trainer.checkpoint.retention import keep_set
from trainer.config import compose, validate


def _manifest(step: int) -> Manifest:
    return Manifest(step=step, world_size=1, mesh={}, config_hash="", files={})


def _found(*steps: int, uncommitted: tuple[int, ...] = ()) -> list[Found]:
    found = [Found(f"s3://b/step-{s:08d}.ckpt", s, _manifest(s)) for s in steps]
    found += [Found(f"s3://b/step-{s:08d}.ckpt", s, None) for s in uncommitted]
    return sorted(found, key=lambda f: f.step)


def _steps(urls: set[str]) -> list[int]:
    return sorted(int(u[-13:-5]) for u in urls)


def test_retention_keeps_the_newest_the_multiples_and_the_resumed_one():
    found = _found(1, 2, 3, 4, 5, 6, 7, 8)
    assert _steps(keep_set(found, keep_last=2, keep_every=0, protected=set())) == [7, 8]
    assert _steps(keep_set(found, keep_last=2, keep_every=3, protected=set())) == [3, 6, 7, 8]
    resumed = {"s3://b/step-00000002.ckpt"}
    assert _steps(keep_set(found, keep_last=1, keep_every=0, protected=resumed)) == [2, 8]


def test_retention_removes_failed_saves_but_not_one_newer_than_the_last_commit():
    found = _found(2, 6, uncommitted=(4, 8))
    # 4 is a save that failed before 6 committed; 8 may still be being written
    assert _steps(keep_set(found, keep_last=1, keep_every=0, protected=set())) == [6, 8]


def test_the_newest_commit_wins_over_a_newer_directory_without_manifest(tmp_path: Path):
    for step in (2, 4):
        (tmp_path / f"step-{step:08d}.ckpt").mkdir()
    write_manifest(str(tmp_path / "step-00000002.ckpt"), _manifest(2))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step-00000002.ckpt")
    assert read_manifest(str(tmp_path / "step-00000004.ckpt")) is None


def test_verify_names_a_truncated_and_a_changed_file(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"0123456789")
    (tmp_path / "b").write_bytes(b"abcdef")
    import hashlib

    files = {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
             for n, d in (("a", b"0123456789"), ("b", b"abcdef"))}
    manifest = Manifest(step=1, world_size=1, mesh={}, config_hash="", files=files)
    assert verify(str(tmp_path), manifest) == []
    (tmp_path / "a").write_bytes(b"01234")
    (tmp_path / "b").write_bytes(b"abcdeX")
    assert verify(str(tmp_path), manifest) == [
        "a has 5 bytes, the manifest says 10", "b does not match its checksum"]


class Payload:
    """Unpickling this would run code of the checkpoint's choosing."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_the_loader_refuses_pickled_objects_in_a_checkpoint(tmp_path: Path, capfd):
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "extra": Payload()}, checkpoint_id=str(tmp_path),
                 no_dist=True)
        target = {"w": torch.zeros(2), "extra": None}
        with pytest.raises(CheckpointException, match="Unsupported global: GLOBAL print"):
            dcp.load(target, checkpoint_id=str(tmp_path), planner=SafeLoadPlanner(),
                     no_dist=True)
    assert "unpickled!" not in capfd.readouterr().out


def test_storage_options_are_set_without_a_plus():
    run = validate(compose(["checkpoint.storage_options.endpoint_url=http://127.0.0.1:9000",
                            "checkpoint.storage_options.client_kwargs.region_name=eu-west-1"]))
    assert run.checkpoint.storage_options == {
        "endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
