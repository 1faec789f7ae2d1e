"""The progress bar of a run: tqdm when installed, else a counter line on stderr; nothing when disabled."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def tick(self) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    def __init__(self, total: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, file=stream)

    def tick(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class CounterProgress:
    """``done/total`` rewritten in place (``\\r``), at most every ``interval_s`` and at the end."""

    def __init__(self, total: int, stream: TextIO, interval_s: float = 1.0) -> None:
        self.total, self.done, self._stream, self._interval = total, 0, stream, interval_s
        self._start = self._last = time.monotonic()

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= self._interval or self.done == self.total:
            self._last = now
            self._stream.write(f"\r{self.done}/{self.total} requests done, {now - self._start:.0f} s")
            self._stream.flush()

    def close(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def make_progress(total: int, disabled: bool, stream: TextIO | None = None) -> Progress:
    out = stream if stream is not None else sys.stderr
    if disabled:
        return NoProgress()
    try:
        return TqdmProgress(total, out)
    except ImportError:
        return CounterProgress(total, out)
