"""The progress line of `prepare`: documents, tokens, tokens/s, share of the input read and ETA.

On a terminal one line is rewritten in place a few times a second; anywhere else (a log file, a
SLURM job, CI) a log line is written every `every_s` seconds. The last line is always written.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Fed `update(documents, tokens, position)` after every document; prints at its own pace."""

    def __init__(self, total_bytes: int, *, stream: TextIO | None = None,
                 interactive: bool | None = None, every_s: float = 10.0):
        self.total_bytes = total_bytes
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s = 0.25 if self.interactive else every_s
        self._start = time.monotonic()
        self._shown = self._start
        self._first: tuple[int, int] | None = None  # (tokens, position) when this run began
        self._last = (0, 0, 0)
        self._closed = False

    def update(self, documents: int, tokens: int, position: int) -> None:
        if self._first is None:  # a resumed prepare counts from where it resumed
            self._first = (tokens, position)
            self._start = time.monotonic()
        self._last = (documents, tokens, position)
        now = time.monotonic()
        if now - self._shown >= self.every_s:
            self._shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        documents, tokens, position = self._last
        first_tokens, first_position = self._first or (tokens, position)
        elapsed = max(1e-9, (now or time.monotonic()) - self._start)
        rate = (tokens - first_tokens) / elapsed
        parts = [f"prepare: {documents:,} documents", f"{tokens:,} tokens",
                 f"{_count(rate)} tokens/s"]
        if self.total_bytes:
            parts.append(f"{min(1.0, position / self.total_bytes):.0%}")
            byte_rate = (position - first_position) / elapsed
            if byte_rate > 0:
                parts.append(f"ETA {_clock(max(0, self.total_bytes - position) / byte_rate)}")
        return "  ".join(parts)

    def _show(self, now: float) -> None:
        if self.interactive:
            self.stream.write("\r" + self.line(now).ljust(100))
            self.stream.flush()
        else:
            log.info(self.line(now))

    def close(self) -> None:
        if self._closed or self._first is None:
            return
        self._closed = True
        if self.interactive:
            self.stream.write("\r" + self.line().ljust(100) + "\n")
            self.stream.flush()
        else:
            log.info(self.line())
