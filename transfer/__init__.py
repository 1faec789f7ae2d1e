"""transfer: prefill (P) -> decode (D) KV movement. May import pd_kernels; imports nothing from sglang_pd.

Modules
  base.py          the contract: KVPoll, EngineDescription, AuxRecord, TransferStats, PrefillTransfer, DecodeTransfer
  config.py        TransferConfig from the SGLANG_DISAGGREGATION_* env vars (lenient, logged)
  pack.py          pack_pages / unpack_pages: one gather / one scatter of a chunk's pages, all layers, K and V
  room.py          per-room state machine (forward-only KVPoll, failure text, stats) and the room table
  protocol.py      wire messages (typed dataclasses, msgpack) and tags between D and P
  bootstrap.py     P's aiohttp bootstrap server (PUT/GET /route, GET /health) and D's client
  hosts.py         bind/advertise addresses, and the network device(s) UCX may use for a data host
  staging.py       persistent staging slots (QUEUE_SIZE of them) on the KV device
  peer_pool.py     direct copies on one host: D's pool offer, P's mapping of it, the copy into it
  cuda_ipc.py      CUDA IPC through the driver API (export an allocation, map a peer's into this context)
  ipc_events.py    a direct link's interprocess CUDA events (P records one after each copy, D polls it)
  event_watch.py   EventWatcher: D's thread that polls P's copy events and reports each once fired
  ucx_runtime.py   the process's one UCX thread: event-driven worker progress + the engines' asyncio loop
  ucx_channel.py   one D<->P link: control frames and tagged data messages on one UCX endpoint
  ucx_engine.py    what both UCX engines share: runtime, event waits, timeouts sweeper, gather/scatter launch
  ucx_pieces.py    PieceSender: P's per-room piece pipeline (split, gather on the caller's thread, post in order)
  ucx_push.py      PushSender: P writes D's pages itself on a direct link (copy launched inside ``send``)
  ucx_prefill.py   UcxPrefillTransfer: bootstrap server, Hellos on its accept tag, rooms, D links
  ucx_decode.py    UcxDecodeTransfer: one cached link per P, heartbeats, Fail/Abort handling
  ucx_decode_state.py  D's per-room and per-P state of the UCX engine
  ucx_receive.py   PageReceiver: D's receive side (data pieces: receive + scatter; direct: P's copies) up to Success
  fake_engine.py   FakeTransferHub + in-process engines with the same semantics (scheduler unit tests)

Data flow of one room (``bootstrap_room``)
  D.register(room, P's bootstrap host:port, D's page ids) -> GET /route (P's UCX worker address) -> UCX
  endpoint + Hello (link id, D's worker address, engine description, pool offer; with a cluster secret
  signed, and P checks the signature before it creates its endpoint back to D; P refuses a mismatch)
  -> Register(room, num_pages) -> P: WaitingForInput (a room already registered is refused).
  P.send(chunk pages) -> pieces of <= MAX_MESSAGE_MB, each gathered into a staging slot right in ``send``
  (CUDA: one kernel on P's transfer stream, ordered after ``ready_event``) -> per piece, as soon as its
  gather is done: Data header + one tagged data message, posted back to back (the last header carries the
  aux record) -> D posts the receive into its staging slot on the header -> scatter into D's pages (CUDA:
  one kernel on D's transfer stream) as soon as the piece lands ... last piece scattered -> D: Success,
  Done -> P: Success. Fail/Abort travel both ways; see protocol.py.
  On one host (SGLANG_DISAGGREGATION_DIRECT_COPY, default on) Hello carries D's pool offer; if P maps it,
  rooms register with D's page ids and P.send itself launches one kernel writing D's pages over NVLink
  (ordered after the forward on the GPU, no host wait), records an interprocess event and posts Pushed
  naming it; D is Success once the event fired. No staging, data message or scatter; a room D fails
  itself drains until P confirms its copies are done (ucx_decode.py).
Security (README "Security"): no listening socket of our own (P's bootstrap server binds the host given;
UCX's transports use only the network device(s) of ``data_host``); with a ``cluster_key`` (pd_common.cluster_auth)
links and PUT /route are signed, without one PUT /route is accepted from loopback only; a pool offer is mapped
only if it is what it claims (peer_pool.open_pool); rooms are bound to their first registration (``holds``).
Both sides are polled by the scheduler (never called back); ``wakeup_fd`` turns readable on every room change,
so a scheduler with nothing else to do sleeps on it instead of a timer. UCX and the protocol run on one background
thread per process; P's gathers start on the caller's thread inside ``send`` (no host wait on the GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from transfer.base import DecodeTransfer, EngineDescription, PrefillTransfer

if TYPE_CHECKING:
    import torch

    from pd_common.cluster_auth import ClusterKey
    from transfer.config import TransferConfig
    from transfer.fake_engine import FakeTransferHub

__all__ = ["create_transfer"]


def create_transfer(
    role: Literal["prefill", "decode"],
    backend: Literal["ucx", "fake"],
    kv_buffer: torch.Tensor,
    desc: EngineDescription,
    config: TransferConfig,
    bootstrap_host: str,
    bootstrap_port: int,
    hub: FakeTransferHub | None = None,
    *,
    data_host: str | None = None,
    cluster_key: ClusterKey | None = None,
) -> PrefillTransfer | DecodeTransfer:
    """A transfer engine, not yet started (call ``start()``; P's ``bootstrap_port`` is real afterwards).

    ``bootstrap_host``/``bootstrap_port`` are used by P only: the address its bootstrap server binds;
    port 0 picks a free port. ``data_host``: the address of this machine the KV data path uses (UCX's
    network devices are restricted to the one(s) holding it; a wildcard: all, and P advertises this
    machine's outward address); None: P uses ``bootstrap_host``, D every device. ``cluster_key``: sign
    (D) / require signed (P) links and PUT /route (None: unsigned, private network only).
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

            engine = UcxPrefillTransfer(kv_buffer, desc, config, bootstrap_host, bootstrap_port, data_host, cluster_key)
        else:
            from transfer.ucx_decode import UcxDecodeTransfer

            engine = UcxDecodeTransfer(kv_buffer, desc, config, data_host, cluster_key)
    elif backend == "fake":
        from transfer.fake_engine import FakeDecodeTransfer, FakePrefillTransfer

        if role == "prefill":
            engine = FakePrefillTransfer(kv_buffer, desc, config, bootstrap_host, bootstrap_port, hub)
        else:
            engine = FakeDecodeTransfer(kv_buffer, desc, config, hub)
    else:
        raise ValueError(f"unknown transfer backend {backend!r} (expected 'ucx' or 'fake')")
    return engine  # type: ignore[no-any-return]
