"""What a run resumes from, decided before the Trainer, any process group or MLflow run exists.

`checkpoint.resume`:
- null (or "none"): step 0;
- "fresh": step 0 on purpose, wherever `checkpoint.dir` already holds checkpoints; those stay
  (retention never deletes them);
- "last": the newest committed checkpoint under `checkpoint.dir` whose files match their
  checksums, older ones tried in turn; none committed yet is step 0 (a first start). Committed
  ones that all fail verification stop the run (exit 2, one line naming each and what failed):
  starting over silently would throw their work away and write new checkpoints beside them;
- a URL: that committed checkpoint, verified.

Rank 0 verifies (reading every byte of the checkpoint it picks); other ranks take the newest
committed one unverified and load whatever rank 0 chose (`CheckpointIO.load` broadcasts it).
Checkpoints found damaged are returned in `Resume.keep`, which retention leaves alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trainer.checkpoint.manifest as mf
from trainer.config import KEY, ConfigError
from trainer.urls import check_url, one_line

log = logging.getLogger(__name__)

NO_RESUME = (None, "", "none")
FRESH = "fresh"
LAST = "last"

Verify = Callable[[mf.Found], list[str]]  # what is wrong with a committed checkpoint ([]: sound)


@dataclass(frozen=True)
class Resume:
    url: str | None  # the checkpoint to load; None: start at step 0
    keep: tuple[str, ...] = ()  # checkpoints retention must not delete


def choose(found: Sequence[mf.Found], verify: Verify, directory: str) -> Resume:
    """The newest of `found` (a directory's step directories, oldest first) that is committed and
    passes `verify`; damaged ones newer than it are kept. Raises a ConfigError naming every
    committed one when none passes."""
    damaged: list[tuple[str, list[str]]] = []
    for candidate in reversed([f for f in found if f.committed]):
        problems = verify(candidate)
        if not problems:
            for url, found_wrong in damaged:
                log.error("checkpoint %s is damaged: %s; resuming from the one before, %s (the "
                          "damaged one is kept)", url, "; ".join(found_wrong), candidate.url)
            return Resume(candidate.url, keep=tuple(url for url, _ in damaged))
        damaged.append((candidate.url, problems))
    if damaged:
        what = "; ".join(f"{url.rstrip('/').rsplit('/', 1)[-1]}: {problems[0]}"
                         + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                         for url, problems in damaged)
        raise ConfigError(KEY.checkpoint.resume, LAST,
                          f"no usable checkpoint under {directory}: every committed one failed "
                          f"verification ({what}); they are left as they are. Restore or remove "
                          f"them, or start over on purpose with {KEY.checkpoint.resume}={FRESH}")
    return Resume(None)


def decide(resume: str | None, directory: str, storage_options: dict | None, *,
           verify: bool) -> Resume:
    """`checkpoint.resume` against what `directory` (checkpoint.dir as a URL) holds. `verify`:
    check checksums (rank 0); without, trust the manifests."""
    options = dict(storage_options or {})
    check: Verify = ((lambda f: mf.verify(f.url, f.manifest, options)) if verify  # type: ignore
                     else (lambda f: []))
    if resume in NO_RESUME:
        return Resume(None)
    if resume == FRESH:
        return Resume(None, keep=tuple(f.url for f in _scan(directory, options) if f.committed))
    if resume == LAST:
        return choose(_scan(directory, options), check, directory)
    assert resume is not None
    check_url(KEY.checkpoint.resume, resume, options,
              options_key=str(KEY.checkpoint.storage_options))
    try:
        manifest = mf.read_manifest(resume, options)
    except Exception as exc:
        raise ConfigError(KEY.checkpoint.resume, resume,
                          f"cannot be read ({one_line(exc)})") from None
    if manifest is None:
        raise ConfigError(KEY.checkpoint.resume, resume,
                          f"has no {mf.MANIFEST}: not a committed checkpoint (a save that did not "
                          "finish, or not a checkpoint); `python -m trainer.checkpoint list DIR` "
                          "shows the committed ones")
    problems = check(mf.Found(resume, manifest.step, manifest))
    if problems:
        raise ConfigError(KEY.checkpoint.resume, resume,
                          f"is damaged ({'; '.join(problems)}); give another committed "
                          "checkpoint (`python -m trainer.checkpoint list DIR` checks them all)")
    return Resume(resume)


def _scan(directory: str, options: dict) -> list[mf.Found]:
    try:
        return mf.scan(directory, options)
    except Exception as exc:
        raise ConfigError(KEY.checkpoint.dir, directory,
                          f"cannot be listed ({one_line(exc)})") from None
