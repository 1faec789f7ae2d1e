"""Wire messages between D and P on one UCX link: typed dataclasses, msgpack-encoded, dispatched by type.

Link life (D connects to P's data listener, found through P's bootstrap server):
  D->P the link id (8 bytes on the UCX stream API: the only untagged message; it names the link's tags)
  D->P Hello(engine, decode_id, pool)    P->D HelloOk(prefill_id, push, events) | HelloRefused(reason)
  (``pool``: D's pool offer, peer_pool.py, or None. ``push``: P mapped it, a *direct* link; ``events``: the
  link's interprocess CUDA events (IPC handles; empty on CPU), which D opens.)
Room life (any number of rooms interleave on one link):
  D->P Register(room, num_pages, page_ids) P->D Registered(room)
  Direct link (``page_ids``: D's pages, sent only on one): P sends no data. P writes D's pages itself, one
  copy per ``send`` (CUDA: one kernel on P's transfer stream, ordered after the forward, then P records one
  of the link's events), and posts Pushed(room, first_page, num_pages, total_pages, aux, event) right after
  launching it; D's pages hold the KV once ``event`` fired (-1: the copy was complete when posted). Otherwise:
  P->D Data(room, seq, first_page, num_pages, nbytes, total_pages, aux), then, when ``nbytes > 0``, the
       packed pages as ONE tagged message with tag ``data_tag(link, seq)`` (``seq`` counts data messages on
       the link, so tags never repeat and cannot be confused across rooms or pieces). The room's last
       Data carries the aux record and ``total_pages`` (pages P sent in all); earlier ones carry
       ``aux=None, total_pages=-1``. A last Data without pages (``nbytes == 0``) has ``seq == -1``.
       P posts a Data header and its data back to back without waiting for either to complete.
  D->P Done(room) once D holds every page and the aux record
  either way: Fail(room, reason) (engine failure: timeout, injection, bad request) and
              Abort(room, reason) (the scheduler aborted); the receiver fails the room with the reason.
  Direct links: P posts its Fail/Abort only after every copy of the room into D's pages finished, and
  answers D's Fail/Abort with AbortAck(room) once they have; until one of the three comes, D keeps a room
  it failed itself from being terminal (so its scheduler keeps the pages P may still write).
Control messages travel on the link's control tag of their direction as frames: u32 length + msgpack
payload, the payload inline when it fits in ``CTRL_FRAME_BYTES`` and otherwise as a second message on
the same tag, posted right after the first (UCX matches one sender's messages of one tag in order).

Tags are 64-bit and matched per UCX worker (not per endpoint), so every tag names its link:
``link_id << 24 | kind << 22 | seq`` with a 40-bit random link id drawn by D, ``kind`` the direction /
purpose and a 22-bit sequence number (data only; wraps, far beyond the messages ever in flight).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack  # type: ignore[import-untyped]

CTRL_FRAME_BYTES = 4096
FRAME_HEADER = struct.Struct("<I")
LINK_ID = struct.Struct("<Q")
LINK_ID_BITS = 40
_SEQ_BITS = 22
_KIND_CTRL_TO_PREFILL, _KIND_CTRL_TO_DECODE, _KIND_DATA = 0, 1, 2


def ctrl_tag(link_id: int, to_prefill: bool) -> int:
    """Tag of the control frames of one direction of link ``link_id``."""
    return _tag(link_id, _KIND_CTRL_TO_PREFILL if to_prefill else _KIND_CTRL_TO_DECODE, 0)


def data_tag(link_id: int, seq: int) -> int:
    """Tag of the ``seq``-th data message (P->D) of link ``link_id``."""
    return _tag(link_id, _KIND_DATA, seq & ((1 << _SEQ_BITS) - 1))


def _tag(link_id: int, kind: int, seq: int) -> int:
    if not 0 <= link_id < 1 << LINK_ID_BITS:
        raise ValueError(f"link id {link_id} out of range [0, 2^{LINK_ID_BITS})")
    return link_id << (_SEQ_BITS + 2) | kind << _SEQ_BITS | seq


@dataclass(frozen=True)
class Hello:
    engine: dict[str, Any]
    decode_id: str
    pool: dict[str, Any] | None = None  # D's peer_pool.PoolOffer.to_dict(), or None


@dataclass(frozen=True)
class HelloOk:
    prefill_id: str
    push: bool = False  # P mapped D's pool: a direct link
    events: list[bytes] = field(default_factory=list)  # direct CUDA links: the interprocess events' IPC handles


@dataclass(frozen=True)
class HelloRefused:
    reason: str


@dataclass(frozen=True)
class Register:
    room: int
    num_pages: int
    page_ids: list[int] | None = None  # direct links only: D's pages, which P writes


@dataclass(frozen=True)
class Registered:
    room: int


@dataclass(frozen=True)
class Data:
    room: int
    seq: int  # -1: no data message follows (nbytes == 0)
    first_page: int
    num_pages: int
    nbytes: int
    total_pages: int = -1  # >= 0 on the room's last Data only: pages sent in all
    aux: dict[str, Any] | None = None  # the aux record, on the room's last Data only

    @property
    def last(self) -> bool:
        return self.total_pages >= 0


@dataclass(frozen=True)
class Pushed:
    """Direct links: P launched the copy of prompt pages ``[first_page, first_page + num_pages)`` into D's pages."""

    room: int
    first_page: int
    num_pages: int
    total_pages: int = -1  # as in Data: >= 0 on the room's last message only
    aux: dict[str, Any] | None = None
    event: int = -1  # index into the link's events: the copy is complete once it fired (-1: already complete)
    started: float = 0.0  # P's time.monotonic() when it launched the copy (a direct link is on one host)

    @property
    def last(self) -> bool:
        return self.total_pages >= 0


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


@dataclass(frozen=True)
class AbortAck:
    room: int


Message = Hello | HelloOk | HelloRefused | Register | Registered | Data | Done | Fail | Abort | Pushed | AbortAck
MESSAGE_TYPES: tuple[type, ...] = (Hello, HelloOk, HelloRefused, Register, Registered, Data, Done, Fail, Abort,
                                   Pushed, AbortAck)
_TYPE_ID = {t: i for i, t in enumerate(MESSAGE_TYPES)}


def encode(msg: Message) -> bytes:
    return msgpack.packb([_TYPE_ID[type(msg)], *(getattr(msg, f.name) for f in fields(msg))], use_bin_type=True)


def decode(payload: bytes | memoryview) -> Message:
    items = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(items, list) or not items or not isinstance(items[0], int) or not 0 <= items[0] < len(MESSAGE_TYPES):
        raise ValueError(f"malformed transfer message: {items!r:.200}")
    return MESSAGE_TYPES[items[0]](*items[1:])  # type: ignore[no-any-return]


def frame(payload: bytes) -> tuple[bytes, bytes | None]:
    """(first message, optional second message) carrying ``payload`` on a control tag."""
    header = FRAME_HEADER.pack(len(payload))
    if FRAME_HEADER.size + len(payload) <= CTRL_FRAME_BYTES:
        return header + payload, None
    return header, payload
