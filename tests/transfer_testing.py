"""Helpers shared by the transfer engine tests that pair a P and a D in one process over real UCX on loopback."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from transfer.base import EngineDescription

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

HOST = "127.0.0.1"
DESC = EngineDescription(
    model_id="LlamaForCausalLM:L3:H32:V128",
    architecture="LlamaForCausalLM",
    dtype="bfloat16",
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    page_size=4,
)
PAGE_BYTES = 3 * 2 * 4 * 2 * 8 * 2  # 768 B: layers x (K, V) x page x heads x dim x bf16


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 2 ms; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _proc_net_addr(hex_addr: str) -> tuple[str, int]:
    import ipaddress
    import socket
    import struct

    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        ip = socket.inet_ntoa(struct.pack("<I", struct.unpack(">I", raw)[0]))
    else:  # /proc/net/tcp6: four little-endian 32-bit words
        ip = str(ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))))
    return ip, int(port_hex, 16)


def listening_tcp(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of ``pids`` (from /proc, as ``ss -ltnp``)."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    out: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[9]) in inodes:  # 0A: TCP_LISTEN
                out.add(_proc_net_addr(cols[1]))
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out
