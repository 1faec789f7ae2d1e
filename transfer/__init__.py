"""transfer: prefill (P) -> decode (D) KV movement. May import kernels; imports nothing from sglang_pd.

Modules
  base.py          the contract: KVPoll, EngineDescription, AuxRecord, TransferStats, PrefillTransfer, DecodeTransfer
  config.py        TransferConfig from the SGLANG_DISAGGREGATION_* env vars (lenient, logged)
  pack.py          pack_pages / unpack_pages: one gather / one scatter of a chunk's pages, all layers, K and V
  room.py          per-room state machine (forward-only KVPoll, failure text, stats) and the room table
  protocol.py      wire messages (typed dataclasses, msgpack) and tags between D and P
  bootstrap.py     P's aiohttp bootstrap server (PUT/GET /route, GET /health) and D's client
  staging.py       persistent staging slots (QUEUE_SIZE of them) on the KV device
  ucx_runtime.py   the process's one UCXX event-loop thread (shared by all UCX engines of a process)
  ucx_channel.py   control frames and tagged data messages on one UCXX endpoint
  ucx_engine.py    what both UCX engines share: runtime, executor, timeouts sweeper, locked pack/unpack
  ucx_prefill.py   UcxPrefillTransfer: bootstrap server + data listener; per-room send pipeline
  ucx_decode.py    UcxDecodeTransfer: one cached link per P, heartbeats, receive + scatter
  fake_engine.py   FakeTransferHub + in-process engines with the same semantics (scheduler unit tests)

Data flow of one room (``bootstrap_room``)
  D.register(room, P's bootstrap host:port, D's page ids) -> GET /route -> UCX endpoint + Hello
  (engine description; P refuses a mismatch) -> Register(room, num_pages) -> P: WaitingForInput.
  P.send(chunk pages) -> per message of <= MAX_MESSAGE_MB: pack into a staging slot (executor) -> Data
  header + one tagged message (the next message's pack overlaps this send) -> D receives into its
  staging slot -> unpack into its pages (executor, under the room lock) ... last message ->
  Aux(record) -> D: Success, Done -> P: Success. Fail/Abort travel both ways; see protocol.py.
Both sides are polled by the scheduler (never called back); network and copies run in background threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from transfer.base import DecodeTransfer, EngineDescription, PrefillTransfer

if TYPE_CHECKING:
    import torch

    from transfer.config import TransferConfig
    from transfer.fake_engine import FakeTransferHub

__all__ = ["create_transfer"]


def create_transfer(role: Literal["prefill", "decode"], backend: Literal["ucx", "fake"], kv_buffer: torch.Tensor,
                    desc: EngineDescription, config: TransferConfig, bootstrap_host: str, bootstrap_port: int,
                    hub: FakeTransferHub | None = None) -> PrefillTransfer | DecodeTransfer:
    """A transfer engine, not yet started (call ``start()``; P's ``bootstrap_port`` is real afterwards).

    ``bootstrap_host``/``bootstrap_port`` are used by P only: the address its bootstrap server binds
    and advertises (a wildcard host advertises this machine's address); port 0 picks a free port.
    ``hub`` (fake backend only): the FakeTransferHub joining P and D; default: the process-wide one.
    """
    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
    engine: Any
    if backend == "ucx":
        if hub is not None:
            raise ValueError("hub is for the fake backend only")
        if role == "prefill":
            from transfer.ucx_prefill import UcxPrefillTransfer

            engine = UcxPrefillTransfer(kv_buffer, desc, config, bootstrap_host, bootstrap_port)
        else:
            from transfer.ucx_decode import UcxDecodeTransfer

            engine = UcxDecodeTransfer(kv_buffer, desc, config)
    elif backend == "fake":
        from transfer.fake_engine import FakeDecodeTransfer, FakePrefillTransfer

        if role == "prefill":
            engine = FakePrefillTransfer(kv_buffer, desc, config, bootstrap_host, bootstrap_port, hub)
        else:
            engine = FakeDecodeTransfer(kv_buffer, desc, config, hub)
    else:
        raise ValueError(f"unknown transfer backend {backend!r} (expected 'ucx' or 'fake')")
    return engine  # type: ignore[no-any-return]
