"""EventWatcher: one thread that watches CUDA events (P's interprocess copy events, on D) and reports each once fired.

Why a thread that polls: the engine loop's timers have ~1 ms resolution (epoll), which would add up to a
millisecond to every direct handoff; and a blocking ``synchronize`` on an event of another process could
wait forever if that process died with the copy queued. So this thread sweeps the watched events every
``period_s`` while any is pending (and sleeps on a condition otherwise), dropping an entry as soon as it
fired (then ``done(None)`` runs, on this thread), failed to query (``done(error)``) or its owner no longer
wants it (``alive`` returns False).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

PERIOD_S = 5e-5


class EventWatcher:
    def __init__(self, name: str, period_s: float = PERIOD_S) -> None:
        self._name = name
        self._period = period_s
        self._cond = threading.Condition()
        self._items: list[tuple[Any, Callable[[BaseException | None], None], Callable[[], bool]]] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, event: Any, done: Callable[[BaseException | None], None], alive: Callable[[], bool]) -> None:
        """Call ``done(None)`` once ``event.query()`` is true, unless ``alive()`` turned false first. Any thread."""
        with self._cond:
            if self._closed:
                return
            self._items.append((event, done, alive))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                items = list(self._items)
            finished = []
            for item in items:
                event, done, alive = item
                try:
                    if alive() and not event.query():
                        continue
                    error = None
                except Exception as e:  # noqa: BLE001 - a CUDA error fails that room, not the watcher
                    error = e
                finished.append(item)
                if alive():
                    try:
                        done(error)
                    except Exception:  # a bug in one callback must not stop the watching
                        logger.exception("%s: a callback failed", self._name)
            if finished:
                with self._cond:
                    self._items = [item for item in self._items if item not in finished]
            time.sleep(self._period)
