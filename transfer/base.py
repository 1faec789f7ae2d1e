"""The transfer interface both engines (ucx, fake) implement, and the values that cross it.

Roles: the prefill worker (P) owns a ``PrefillTransfer``; the decode worker (D) owns a
``DecodeTransfer``. A *room* (``bootstrap_room``, an int in [0, 2^63)) names one request's handoff.
The scheduler never receives callbacks: it polls ``poll(room)`` once per step.

Room life on D: ``register`` -> Bootstrapping (finding P, handshake) -> WaitingForInput (P knows the
room) -> Transferring (first bytes arrived) -> Success (all pages scattered into D's pages and the
aux record arrived) | Failed.
Room life on P: Bootstrapping (D has not registered yet) -> WaitingForInput (D registered; the
scheduler may prefill) -> Transferring (``send`` called) -> Success (D confirmed it holds every page
and the aux record) | Failed.
Memory rule: D's pages are written by D (its scatter of P's data messages) or, on a direct link, by P
(its copy into D's mapped pool). Once ``DecodeTransfer.poll`` shows Failed (or Success), nothing writes
that room's pages any more, so D may free them then. After ``DecodeTransfer.abort`` that may take a
moment on a direct link (the room drains until P confirms its copies are done): keep the pages until
``poll`` shows Failed. P's pages are read by P's own gather or copy; P may free them once the room is
Success/Failed, also right after ``PrefillTransfer.abort``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any


class KVPoll(enum.IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


@dataclass(frozen=True)
class EngineDescription:
    """What P and D must agree on for pages to mean the same thing on both sides."""

    model_id: str  # architecture + layer/head shape summary (not the path: paths differ per host)
    architecture: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    tp_size: int = 1
    layout_version: int = 1  # bump when the [L, 2, P, page, H, D] layout changes

    def mismatch(self, other: EngineDescription) -> str | None:
        """None if compatible; else a message naming every field that differs."""
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        return None if not diffs else "prefill/decode engine mismatch (" + "; ".join(diffs) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class AuxRecord:
    """What D needs besides the KV: P's first sampled token and its logprobs, plus cache facts.

    Logprob entries are lists [logprob, token_id, None] as in SGLang's meta_info.
    """

    first_token_id: int
    cached_tokens: int = 0
    output_token_logprobs: list[list[Any]] = field(default_factory=list)  # 0 or 1 entry
    output_top_logprobs: list[list[list[Any]]] = field(default_factory=list)
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TransferStats:
    num_bytes: int = 0
    ms: float = 0.0  # first byte sent/received -> Success
    path: str = ""  # how the KV moved: "direct" (P wrote D's mapped pool), "ucx" (data messages), "" (none yet)

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / (self.ms * 1e6) if self.ms > 0 else 0.0


class PrefillTransfer(ABC):
    """P side. Thread-safe; the scheduler thread calls every method; work runs in background threads."""

    def wakeup_fd(self) -> int | None:
        """As ``DecodeTransfer.wakeup_fd``: readable after any room's ``poll`` result changed; None: no such fd."""
        return None

    @abstractmethod
    def start(self) -> None:
        """Start the bootstrap server and the data listener; returns once both accept connections."""

    @abstractmethod
    def poll(self, room: int) -> KVPoll: ...

    @abstractmethod
    def send(
        self,
        room: int,
        page_ids: Sequence[int],
        first_page: int,
        last: bool,
        aux: AuxRecord | None = None,
        ready_event: Any = None,
    ) -> None:
        """Queue pages ``[first_page, first_page + len(page_ids))`` of the room's prompt (P's page ids).

        Calls for one room come in page order; the one with ``last=True`` carries ``aux`` and
        covers the final (possibly partial) page. ``ready_event`` (a torch.cuda.Event) is recorded
        after the forward that wrote these pages; the engine reads them only after it (None: after the
        work queued so far on the caller's current CUDA stream). The engine may start reading inside
        this call (the UCX engine launches its gather on its own stream there: no host wait on the GPU,
        on CPU a copy); it never waits for the network.
        """

    @abstractmethod
    def abort(self, room: int, message: str) -> None:
        """Fail the room here and tell D (if it registered)."""

    @abstractmethod
    def failure(self, room: int) -> str | None:
        """Why the room failed (None unless Failed)."""

    @abstractmethod
    def stats(self, room: int) -> TransferStats: ...

    def holds(self, room: int) -> bool:
        """True while the engine knows the room (from the first ``poll``/``send``/``abort`` until ``release``):
        a second request with the same room must be refused, never share it."""
        return False

    @abstractmethod
    def release(self, room: int) -> None:
        """Forget the room (the scheduler has released its pages)."""

    @abstractmethod
    def shutdown(self) -> None: ...


class DecodeTransfer(ABC):
    """D side. Thread-safe; the scheduler thread calls every method; work runs in background threads."""

    def wakeup_fd(self) -> int | None:
        """A file descriptor that turns readable after any room's ``poll`` result changed (the reader drains it
        with ``os.eventfd_read``), for the scheduler to sleep on; None: poll on a timer."""
        return None

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def register(self, room: int, bootstrap_host: str, bootstrap_port: int, page_ids: Sequence[int]) -> None:
        """Ask P (found through its bootstrap server) for the room's KV, to land in ``page_ids`` (D's pages
        for the whole prompt, in order). Never blocks; progress shows in ``poll``. Raises
        ``transfer.room.RoomInUse`` if the engine still holds ``room`` (``holds``): check first."""

    def holds(self, room: int) -> bool:
        """True from ``register`` until ``release``: the room belongs to that request."""
        return False

    @abstractmethod
    def poll(self, room: int) -> KVPoll: ...

    @abstractmethod
    def aux(self, room: int) -> AuxRecord | None:
        """The aux record once the room is Success."""

    @abstractmethod
    def abort(self, room: int, message: str) -> None:
        """Fail the room and tell P. Its pages stay in use until ``poll`` shows Failed (a direct link drains first)."""

    @abstractmethod
    def failure(self, room: int) -> str | None: ...

    @abstractmethod
    def stats(self, room: int) -> TransferStats: ...

    @abstractmethod
    def release(self, room: int) -> None:
        """Forget the room (call it once ``poll`` showed Success or Failed)."""

    @abstractmethod
    def shutdown(self) -> None: ...
