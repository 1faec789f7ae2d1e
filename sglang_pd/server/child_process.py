"""Child-process hygiene: die with the parent, ignore the signals the parent handles, log like the parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def setup_child(name: str, log_level: str) -> None:
    """Call first thing in a child: kill it when the parent dies; SIGINT/SIGTERM belong to the parent."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the watchdog below still applies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_parent_watchdog, args=(parent,), daemon=True, name="parent-watchdog").start()
    configure_logging(log_level, name)


def _parent_watchdog(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def configure_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"[%(asctime)s {name}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
