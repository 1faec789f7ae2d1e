"""Helpers shared by the transfer engine tests that pair a P and a D in one process over real UCX on loopback."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from transfer.base import EngineDescription

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

HOST = "127.0.0.1"
DESC = EngineDescription(model_id="LlamaForCausalLM:L3:H32:V128", architecture="LlamaForCausalLM",
                         dtype="bfloat16", num_layers=3, num_kv_heads=2, head_dim=8, page_size=4)
PAGE_BYTES = 3 * 2 * 4 * 2 * 8 * 2  # 768 B: layers x (K, V) x page x heads x dim x bf16


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 2 ms; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)
