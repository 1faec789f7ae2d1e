"""A ``Job``: one body the router sends to one worker (regular mode) or to one P/D pair (PD mode).

Request ids: the router always sets ``rid`` so it can abort what it started. The client's rid is
kept; otherwise a fresh hex id is drawn. A retry (attempt k > 0) sends ``{rid}-retry{k}`` so it can
never collide with the attempt it replaces, which may still be winding down on the same worker.
``worker_rids`` names every request the body creates on a worker, the way the worker names them
(DESIGN §5 / the worker's ``normalize_generate`` and ``choice_rid``): a /generate item with n > 1
makes ``{rid}-{c}``; an OpenAI body with several choices makes ``{rid}-{k}``.

PD fields (DESIGN §4.1): ``bootstrap_host`` = P's host, ``bootstrap_port`` = P's bootstrap port,
``bootstrap_room`` uniform in [0, 2^63), fresh per attempt. A PD job always holds exactly one choice
(``fanout`` splits the rest), so the three fields are always scalars. With a cluster secret the router
adds ``bootstrap_token`` = ``key.sign("bootstrap", [host, port, room])`` over exactly the values in
the body (``pd_common.cluster_auth``), so workers accept bootstrap fields only from the router. Fields
of these names that a client sent (``CLIENT_FORBIDDEN``) never reach a worker: ``strip_client_fields``
removes them from every body, in both modes, before anything else. P gets the same body except
that it is never asked to stream (``stream: false``, no ``stream_options``): its answer is the one
token the router reads whole, for errors and prompt logprobs; D gets the client's body as is.

Bytes: when a Job carries the client's own JSON text (``raw``: the client's whole body, which held
no ``rid``), the router's fields are appended to that text instead of serialising the body again
(the body is parsed once, for validation, and never re-encoded: O(fields), not O(prompt)). The
worker parses the same object either way; P's body, which changes ``stream``, is always re-encoded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from router.worker import Worker

if TYPE_CHECKING:
    from pd_common.cluster_auth import ClusterKey

ROOM_BOUND = 1 << 63
CLIENT_FORBIDDEN = ("bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_token")
_JSON = json.JSONEncoder(ensure_ascii=False)  # stateless; json.dumps(ensure_ascii=False) builds one per call
Merge = Literal["generate", "completions"] | None


@dataclass(frozen=True)
class Job:
    route: str  # the client's path, also the worker path and the metrics label
    body: Mapping[str, Any]  # the client's body (or one fan-out share of it), rid excluded
    rid: str | tuple[str, ...]  # base rid(s): a tuple for a /generate batch (one per item)
    choices: tuple[int, ...]  # choices per item (n), to name the worker's requests
    stream: bool
    key: str  # routing key for cache_aware
    merge: Merge  # PD: put P's prompt logprobs into D's answer
    request_id: str
    raw: bytes | None = None  # the client's JSON text of ``body`` (see the module doc), else None

    @property
    def openai(self) -> bool:
        return self.route != "/generate"

    def rid_for(self, attempt: int) -> str | tuple[str, ...]:
        if attempt == 0:
            return self.rid
        if isinstance(self.rid, tuple):
            return tuple(f"{r}-retry{attempt}" for r in self.rid)
        return f"{self.rid}-retry{attempt}"

    def encode(
        self, attempt: int, prefill: Worker | None, rng: random.Random, key: ClusterKey | None = None
    ) -> Encoded:
        rid = self.rid_for(attempt)
        fields: dict[str, Any] = {"rid": list(rid) if isinstance(rid, tuple) else rid}
        rids = worker_rids(rid, self.choices, self.openai)
        if prefill is None:
            return Encoded(self._with(fields), None, rids)
        fields.update(bootstrap_fields(prefill.host, prefill.spec.bootstrap_port, rng.randrange(ROOM_BOUND), key))
        data = self._with(fields)
        if not self.body.get("stream"):
            return Encoded(data, data, rids)
        p_body = {k: v for k, v in self.body.items() if k != "stream_options"}
        p_body.update(fields)
        p_body["stream"] = False
        return Encoded(data, _dumps(p_body), rids)

    def _with(self, fields: dict[str, Any]) -> bytes:
        """The body with ``fields`` set (added last, in order), as JSON bytes."""
        if self.raw is not None and not any(k in self.body for k in fields):
            spliced = append_fields(self.raw, fields)
            if spliced is not None:
                return spliced
        return _dumps({**self.body, **fields})


@dataclass(frozen=True)
class Encoded:
    """One attempt's bytes: D's (or the regular worker's) body, P's body (PD only), the rids they create."""

    data: bytes
    prefill_data: bytes | None
    rids: tuple[str, ...]


def bootstrap_fields(host: str, port: int | None, room: int | list[int], key: ClusterKey | None) -> dict[str, Any]:
    """The PD fields a worker pair gets; signed over exactly these values when there is a cluster key."""
    fields: dict[str, Any] = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
    if key is not None:
        fields["bootstrap_token"] = key.sign("bootstrap", [host, port, room])
    return fields


def strip_client_fields(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """``body`` without the fields only the router may set (the same object when it has none)."""
    if not any(k in body for k in CLIENT_FORBIDDEN):
        return body
    return {k: v for k, v in body.items() if k not in CLIENT_FORBIDDEN}


def _dumps(body: Mapping[str, Any]) -> bytes:
    return _JSON.encode(body).encode()


def append_fields(raw: bytes, fields: Mapping[str, Any]) -> bytes | None:
    """``raw`` (a non-empty JSON object in UTF-8 text) with ``fields`` added at its end; None when
    ``raw`` is not such plain text (another encoding, a BOM, an empty object): re-encode instead."""
    end = len(raw.rstrip(b" \t\r\n"))
    start = len(raw) - len(raw.lstrip(b" \t\r\n"))
    if end - start < 2 or raw[start] != 0x7B or raw[end - 1] != 0x7D:  # "{" ... "}"
        return None
    if not raw[start + 1 : end - 1].strip(b" \t\r\n"):  # {} has no member to follow
        return None
    return b"%s, %s" % (raw[: end - 1], _dumps(fields)[1:])


def worker_rids(rid: str | tuple[str, ...], choices: tuple[int, ...], openai: bool) -> tuple[str, ...]:
    if openai:
        assert isinstance(rid, str)
        total = sum(choices)
        return (rid,) if total == 1 else tuple(f"{rid}-{k}" for k in range(total))
    bases = rid if isinstance(rid, tuple) else (rid,) * len(choices)
    out: list[str] = []
    for base, n in zip(bases, choices):
        out.extend([base] if n == 1 else [f"{base}-{c}" for c in range(n)])
    return tuple(out)


def client_rid(
    body: Mapping[str, Any], items: int, is_batch: bool, new_rid: Callable[[], str]
) -> str | tuple[str, ...]:
    """The client's rid(s), or fresh ones from ``new_rid``: a tuple (one per item) for a /generate batch."""
    given = body.get("rid")
    if is_batch:
        if isinstance(given, list):
            return tuple(given)
        if isinstance(given, str):  # one rid for many items: the worker would clash; number them
            return tuple(f"{given}-{i}" for i in range(items))
        return tuple(new_rid() for _ in range(items))
    return given if isinstance(given, str) else new_rid()


def strip_rid(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "rid"}
