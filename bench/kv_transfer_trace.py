"""Where a direct handoff's time goes: bench/kv_transfer.py with host-clock stamps (CLOCK_MONOTONIC, shared by both
processes) at each hop of P and D, written to $OUT/trace_{p,d}.jsonl (default /tmp), then a table of medians.

    python bench/kv_transfer_trace.py --tokens 256,2048,8192 --iters 10 --direct 1

The stamps wrap engine methods from outside (P: send, the copy's launch call and return, the Pushed post; D:
Pushed received, Success, Done posted); each costs a few microseconds. "succeed" is when D saw P's copy
event fire.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kv_transfer as kt

OUT = os.environ.get("OUT", "/tmp")
STAGES = [
    "launch_call",
    "upload_call",
    "copy_call",
    "copy_ret",
    "record_ret",
    "launch_ret",
    "post_Pushed",
    "recv_pushed",
    "succeed",
    "post_Done",
]
_room = [-1]  # P: the room whose copy is being launched (the kernel-level wrappers have no room)


def install(role: str) -> None:
    """Wrap the engine methods of this process (``role`` "p" or "d") to stamp each hop."""
    from transfer import ucx_channel, ucx_decode, ucx_prefill, ucx_push

    out = open(f"{OUT}/trace_{role}.jsonl", "w", buffering=1)  # noqa: SIM115 - open for the process's life

    def rec(room: int, ev: str, **kw: Any) -> None:
        out.write(json.dumps({"room": room, "ev": ev, "t": time.monotonic(), **kw}) + "\n")

    def wrap(cls: Any, name: str, stamp: Any, after: Any = None) -> None:
        orig = getattr(cls, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            stamp(*a)
            result = orig(*a, **k)
            if after is not None:
                after(*a)
            return result

        setattr(cls, name, wrapped)

    wrap(ucx_channel.Channel, "post", lambda self, msg: rec(getattr(msg, "room", -1), "post_" + type(msg).__name__))
    if role == "p":
        from pd_kernels import kv_copy
        from transfer import ipc_events

        def launch_call(self: Any, state: Any, *a: Any) -> None:
            _room[0] = state.room
            rec(state.room, "launch_call")

        wrap(ucx_prefill.UcxPrefillTransfer, "send", lambda self, room, ids, *a: rec(room, "send", pages=len(ids)))
        wrap(ucx_push.PushSender, "_launch_push", launch_call, lambda self, state, *a: rec(state.room, "launch_ret"))
        wrap(kv_copy.PageIdUploader, "upload", lambda *a: rec(_room[0], "upload_call"))
        wrap(
            kv_copy.PageCopier, "__call__", lambda *a: rec(_room[0], "copy_call"), lambda *a: rec(_room[0], "copy_ret")
        )
        wrap(ipc_events.EventRing, "record", lambda *a: None, lambda *a: rec(_room[0], "record_ret"))
        return
    wrap(ucx_decode.UcxDecodeTransfer, "_on_pushed", lambda self, link, msg: rec(msg.room, "recv_pushed"))
    wrap(ucx_decode.UcxDecodeTransfer, "_succeed", lambda self, state: rec(state.room, "succeed"))


_orig_decode_main = kt.decode_main


def traced_decode_main(*a: Any) -> None:
    install("d")
    _orig_decode_main(*a)


def report() -> None:
    first: dict[int, dict[str, float | int]] = {}
    for role in ("p", "d"):
        with open(f"{OUT}/trace_{role}.jsonl") as f:
            for line in f:
                r = json.loads(line)
                first.setdefault(r["room"], {}).setdefault(r["ev"], r["t"])
                if r["ev"] == "send":
                    first[r["room"]]["pages"] = r["pages"]
    by_tokens: dict[int, list[dict[str, float]]] = {}
    for e in first.values():
        if "send" in e:
            row = {k: (e[k] - e["send"]) * 1e3 for k in STAGES if k in e}
            by_tokens.setdefault(int(e["pages"]) * kt.parse_args([]).page_size, []).append(row)
    print("median ms after P's send() call, per stage (the first 3 rooms per length dropped as warm-up)")
    print(f"{'tokens':>6} " + " ".join(f"{k:>11}" for k in STAGES))
    for tokens, rows in sorted(by_tokens.items()):
        cells = [statistics.median([r[k] for r in rows[3:] if k in r] or [float("nan")]) for k in STAGES]
        print(f"{tokens:>6} " + " ".join(f"{c:>11.3f}" for c in cells))


if __name__ == "__main__":
    kt.decode_main = traced_decode_main  # the spawned D process imports this module and runs the traced main
    install("p")
    kt.main(sys.argv[1:])
    report()
