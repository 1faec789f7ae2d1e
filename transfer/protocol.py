"""Wire messages between D and P on one UCX link: typed dataclasses, msgpack-encoded, dispatched by type.

Link life (no listening socket of our own: P's bootstrap route names P's UCX *worker address* and its
accept id; UCX's transports reach it over the network devices the worker was opened on, ucx_runtime.py):
  D creates an endpoint to P's worker address and draws a fresh link id (it names the link's tags)
  D->P Hello(engine, decode_id, pool, link_id, address, token) as ONE message (frame header + payload, at
       most ``MAX_HELLO_BYTES``) on ``accept_tag(accept_id)``: the only message not on a link's tags.
       ``address`` is D's worker address; P creates its endpoint back to D from it, and only after the
       handshake checks passed (with a cluster secret: ``token`` = key.sign("link", hello_payload(hello)),
       so P never dials an address a stranger sent it).
  P->D HelloOk(prefill_id, push, events) | HelloRefused(reason)     (on the link's control tag)
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
  either way: Close(reason) right before a side closes the link on purpose (shutdown, a dropped link): the
              other side ends the link at once (endpoints reached by worker address are independent, so a
              close is not seen otherwise until the process is gone).
  Direct links: P posts its Fail/Abort only after every copy of the room into D's pages finished, and
  answers D's Fail/Abort with AbortAck(room) once they have; until one of the three comes, D keeps a room
  it failed itself from being terminal (so its scheduler keeps the pages P may still write).
Control messages travel on the link's control tag of their direction as frames: u32 length + msgpack
payload, the payload inline when it fits in ``CTRL_FRAME_BYTES`` and otherwise as a second message on
the same tag, posted right after the first (UCX matches one sender's messages of one tag in order).

Tags are 64-bit and matched per UCX worker (not per endpoint), so every tag names its link:
``link_id << 24 | kind << 22 | seq`` with a 40-bit random link id drawn by D, ``kind`` the direction /
purpose and a 22-bit sequence number (data only; wraps, far beyond the messages ever in flight). A P
engine's accept tag is ``accept_id << 24 | 3 << 22`` with its own random 40-bit accept id (several engines
may share one UCX worker in one process).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack  # type: ignore[import-untyped]

CTRL_FRAME_BYTES = 4096
MAX_HELLO_BYTES = 65536  # P's receive buffer for Hellos (engine, pool offer, D's worker address, token)
FRAME_HEADER = struct.Struct("<I")
LINK_ID_BITS = 40
_SEQ_BITS = 22
_KIND_CTRL_TO_PREFILL, _KIND_CTRL_TO_DECODE, _KIND_DATA, _KIND_ACCEPT = 0, 1, 2, 3


def ctrl_tag(link_id: int, to_prefill: bool) -> int:
    """Tag of the control frames of one direction of link ``link_id``."""
    return _tag(link_id, _KIND_CTRL_TO_PREFILL if to_prefill else _KIND_CTRL_TO_DECODE, 0)


def data_tag(link_id: int, seq: int) -> int:
    """Tag of the ``seq``-th data message (P->D) of link ``link_id``."""
    return _tag(link_id, _KIND_DATA, seq & ((1 << _SEQ_BITS) - 1))


def accept_tag(accept_id: int) -> int:
    """Tag of the Hellos a P engine accepts (its accept id is in its bootstrap route)."""
    return _tag(accept_id, _KIND_ACCEPT, 0)


def _tag(link_id: int, kind: int, seq: int) -> int:
    if not 0 <= link_id < 1 << LINK_ID_BITS:
        raise ValueError(f"link id {link_id} out of range [0, 2^{LINK_ID_BITS})")
    return link_id << (_SEQ_BITS + 2) | kind << _SEQ_BITS | seq


@dataclass(frozen=True)
class Hello:
    engine: dict[str, Any]
    decode_id: str
    pool: dict[str, Any] | None = None  # D's peer_pool.PoolOffer.to_dict(), or None
    link_id: int = 0  # drawn by D: names the link's tags
    address: bytes = b""  # D's UCX worker address: P's endpoint back to D
    token: str = ""  # with a cluster secret: key.sign("link", hello_payload(self))


def hello_payload(hello: Hello) -> list[Any]:
    """What a Hello's token signs: every field but the token, as canonical JSON values (bytes as hex)."""
    return [_jsonable(getattr(hello, f.name)) for f in fields(hello) if f.name != "token"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "hex:" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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


@dataclass(frozen=True)
class Close:
    reason: str


Message = (
    Hello | HelloOk | HelloRefused | Register | Registered | Data | Done | Fail | Abort | Pushed | AbortAck | Close
)
MESSAGE_TYPES: tuple[type, ...] = (
    Hello,
    HelloOk,
    HelloRefused,
    Register,
    Registered,
    Data,
    Done,
    Fail,
    Abort,
    Pushed,
    AbortAck,
    Close,
)
_TYPE_ID = {t: i for i, t in enumerate(MESSAGE_TYPES)}


def encode(msg: Message) -> bytes:
    return msgpack.packb([_TYPE_ID[type(msg)], *(getattr(msg, f.name) for f in fields(msg))], use_bin_type=True)


def decode(payload: bytes | memoryview) -> Message:
    items = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if (
        not isinstance(items, list)
        or not items
        or not isinstance(items[0], int)
        or not 0 <= items[0] < len(MESSAGE_TYPES)
    ):
        raise ValueError(f"malformed transfer message: {items!r:.200}")
    try:
        return MESSAGE_TYPES[items[0]](*items[1:])  # type: ignore[no-any-return]
    except TypeError as e:  # a peer's wrong field count is its error, not ours
        raise ValueError(f"malformed {MESSAGE_TYPES[items[0]].__name__} message: {e}") from e


def encode_hello(hello: Hello) -> bytes:
    """A Hello as the one message on an accept tag: frame header + payload (ValueError beyond MAX_HELLO_BYTES)."""
    payload = encode(hello)
    if FRAME_HEADER.size + len(payload) > MAX_HELLO_BYTES:
        raise ValueError(f"Hello of {len(payload)} bytes exceeds {MAX_HELLO_BYTES}")
    return FRAME_HEADER.pack(len(payload)) + payload


def decode_hello(buf: bytes | memoryview) -> Hello:
    """The Hello in a received accept-tag message; ValueError on anything else."""
    (length,) = FRAME_HEADER.unpack_from(buf)
    if FRAME_HEADER.size + length > len(buf):
        raise ValueError(f"Hello frame claims {length} bytes")
    msg = decode(bytes(buf[FRAME_HEADER.size : FRAME_HEADER.size + length]))
    if not isinstance(msg, Hello):
        raise ValueError(f"expected Hello, got {type(msg).__name__}")  # noqa: TRY004 - a peer's bad input
    if not isinstance(msg.link_id, int) or not 0 <= msg.link_id < 1 << LINK_ID_BITS:
        raise ValueError(f"bad link id {msg.link_id!r}")
    if not isinstance(msg.address, bytes) or not msg.address:
        raise ValueError("Hello carries no worker address")
    if (
        not isinstance(msg.engine, dict)
        or not isinstance(msg.decode_id, str)
        or not isinstance(msg.token, str)
        or not (msg.pool is None or isinstance(msg.pool, dict))
    ):
        raise ValueError("malformed Hello fields")
    return msg


def frame(payload: bytes) -> tuple[bytes, bytes | None]:
    """(first message, optional second message) carrying ``payload`` on a control tag."""
    header = FRAME_HEADER.pack(len(payload))
    if FRAME_HEADER.size + len(payload) <= CTRL_FRAME_BYTES:
        return header + payload, None
    return header, payload
