"""Which checkpoints to keep: the newest `keep_last` committed ones, every `keep_every`-th step,
and always the one the run resumed from. Runs on rank 0 right after a commit, while no other save
can be in flight (at most one is), so nothing being written is ever touched. Step directories
without a manifest older than the newest commit are failed saves and go too."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trainer.checkpoint.manifest as mf
from trainer.checkpoint.storage import filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """What a run keeps under `directory` (checkpoint.keep_last / keep_every)."""

    directory: str
    keep_last: int
    keep_every: int = 0

    def prune(self, storage_options: dict | None, protected: set[str]) -> list[str]:
        return prune(self.directory, storage_options, keep_last=self.keep_last,
                     keep_every=self.keep_every, protected=protected)


def keep_set(found: list[mf.Found], *, keep_last: int, keep_every: int,
             protected: set[str]) -> set[str]:
    """The URLs retention keeps among `found` (oldest first)."""
    committed = [f for f in found if f.committed]
    keep = {f.url for f in committed[-keep_last:]} if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {f.url for f in committed if f.step % keep_every == 0}
    keep |= {f.url for f in found if f.url.rstrip("/") in protected}
    if committed:  # a save newer than the last commit may still be writing: not ours to judge
        newest = committed[-1].step
        keep |= {f.url for f in found if f.step > newest}
    return keep


def prune(directory: str, storage_options: dict | None, *, keep_last: int, keep_every: int,
          protected: set[str]) -> list[str]:
    """Delete what `keep_set` does not keep; the URLs deleted."""
    found = mf.scan(directory, storage_options)
    keep = keep_set(found, keep_last=keep_last, keep_every=keep_every,
                    protected={p.rstrip("/") for p in protected})
    removed = []
    for f in found:
        if f.url in keep:
            continue
        fs, path = filesystem(f.url, storage_options)
        # the manifest first: a half-deleted checkpoint must never look committed
        manifest = f"{path.rstrip('/')}/{mf.MANIFEST}"
        if f.committed and fs.exists(manifest):
            fs.rm(manifest)
        fs.rm(path, recursive=True)
        removed.append(f.url)
        log.debug("retention removed %s", f.url)
    return removed
