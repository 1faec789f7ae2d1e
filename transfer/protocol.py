"""Wire messages between D and P on one UCX endpoint: typed dataclasses, msgpack-encoded, dispatched by type.

Endpoint life (D connects to P's data listener, found through P's bootstrap server):
  D->P Hello(engine, decode_id)          P->D HelloOk(prefill_id) | HelloRefused(reason)
Room life (any number of rooms interleave on one endpoint):
  D->P Register(room, num_pages)         P->D Registered(room)
  P->D Data(room, seq, first_page, num_pages, nbytes), then the packed chunk as ONE tagged message
       with tag ``data_tag(seq)`` (``seq`` counts data messages on this endpoint, so tags never repeat
       and cannot be confused across rooms or chunks)
  P->D Aux(room, record, total_pages)    D->P Done(room)
  either way: Fail(room, reason) (engine failure: timeout, injection, bad request) and
              Abort(room, reason) (the scheduler aborted); the receiver fails the room with the reason.
Control messages travel on ``CTRL_TAG`` as frames: u32 length + msgpack payload, the payload inline when
it fits in ``CTRL_FRAME_BYTES`` and otherwise as a second message on the same tag (UCX keeps order).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any

import msgpack  # type: ignore[import-untyped]

CTRL_TAG = 1
_DATA_TAG_BASE = 1 << 20
CTRL_FRAME_BYTES = 4096
FRAME_HEADER = struct.Struct("<I")


def data_tag(seq: int) -> int:
    """Tag of the ``seq``-th data message on an endpoint (UCXX scopes tags to the endpoint pair)."""
    return _DATA_TAG_BASE + seq


@dataclass(frozen=True)
class Hello:
    engine: dict[str, Any]
    decode_id: str


@dataclass(frozen=True)
class HelloOk:
    prefill_id: str


@dataclass(frozen=True)
class HelloRefused:
    reason: str


@dataclass(frozen=True)
class Register:
    room: int
    num_pages: int


@dataclass(frozen=True)
class Registered:
    room: int


@dataclass(frozen=True)
class Data:
    room: int
    seq: int
    first_page: int
    num_pages: int
    nbytes: int


@dataclass(frozen=True)
class Aux:
    room: int
    record: dict[str, Any]
    total_pages: int


@dataclass(frozen=True)
class Done:
    room: int


@dataclass(frozen=True)
class Fail:
    room: int
    reason: str


@dataclass(frozen=True)
class Abort:
    room: int
    reason: str


Message = Hello | HelloOk | HelloRefused | Register | Registered | Data | Aux | Done | Fail | Abort
MESSAGE_TYPES: tuple[type, ...] = (Hello, HelloOk, HelloRefused, Register, Registered, Data, Aux, Done, Fail, Abort)
_TYPE_ID = {t: i for i, t in enumerate(MESSAGE_TYPES)}


def encode(msg: Message) -> bytes:
    return msgpack.packb([_TYPE_ID[type(msg)], *(getattr(msg, f.name) for f in fields(msg))], use_bin_type=True)


def decode(payload: bytes | memoryview) -> Message:
    items = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(items, list) or not items or not isinstance(items[0], int) or not 0 <= items[0] < len(MESSAGE_TYPES):
        raise ValueError(f"malformed transfer message: {items!r:.200}")
    return MESSAGE_TYPES[items[0]](*items[1:])  # type: ignore[no-any-return]


def frame(payload: bytes) -> tuple[bytes, bytes | None]:
    """(first message, optional second message) carrying ``payload`` on CTRL_TAG."""
    header = FRAME_HEADER.pack(len(payload))
    if FRAME_HEADER.size + len(payload) <= CTRL_FRAME_BYTES:
        return header + payload, None
    return header, payload
