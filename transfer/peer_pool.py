"""The direct handoff on one host: P offers its KV pool, D maps it and copies the room's pages itself.

P describes its pool in a ``PoolOffer`` (in HelloOk): on CUDA an IPC handle of the pool's allocation, on
CPU the pool's shared-memory file (P moves its pool into shared memory when the engine starts; views of
the pool follow, since they share its storage). D maps the offer (``open_pool``) once per link; a room's
pages then move with one copy on D: ``PeerPool.copy_into`` (CUDA: one kernel on D's device reading P's
GPU over NVLink, kernels/kv_copy.py; CPU: a gather and a scatter). No staging buffer, no pack or unpack,
no data message. Anything that does not fit (another host, a GPU pair without peer access, a foreign
allocator) raises ``PeerPoolError`` and the link falls back to UCX data messages.

Invariants: P's page ids are range-checked here against P's page count before any copy (an id out of
range would read past P's pool and kill D's CUDA context). The mapping is closed only after every copy
queued through it finished (the engine fails or finishes every room of the link first).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from transfer import cuda_ipc


class PeerPoolError(RuntimeError):
    pass


def boot_id() -> str:
    """This host's identity for the one-host check (the kernel's boot id; the hostname where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True)
class PoolOffer:
    kind: str  # "cuda_ipc" | "shm"
    boot_id: str
    num_pages: int
    nbytes: int  # the pool's bytes from its first element
    offset: int = 0  # bytes from the start of the allocation (cuda_ipc) / shared file (shm) to the pool
    handle: bytes = b""  # cuda_ipc: the allocation's IPC handle
    pid: int = 0  # shm: P's pid and its descriptor of the pool's file, with the file's (st_dev, st_ino)
    fd: int = -1
    file_id: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolOffer:
        try:
            return cls(**d)
        except TypeError as e:
            raise PeerPoolError(f"unreadable pool offer: {e}") from e


def export_pool(kv: torch.Tensor) -> PoolOffer:
    """P: describe ``kv`` so that a D on this host can map it (CPU: moves it into shared memory first)."""
    if not kv.is_contiguous():
        raise PeerPoolError("the KV pool is not contiguous")
    nbytes = kv.numel() * kv.element_size()
    if kv.is_cuda:
        try:
            cuda_ipc.ensure_context(kv.device.index or 0)
            handle, offset = cuda_ipc.export(kv.data_ptr())
        except cuda_ipc.CudaIpcError as e:  # e.g. expandable segments (not IPC-exportable)
            raise PeerPoolError(str(e)) from e
        return PoolOffer("cuda_ipc", boot_id(), kv.shape[2], nbytes, offset, handle=handle)
    if kv.device.type != "cpu":
        raise PeerPoolError(f"no direct handoff for {kv.device.type} pools")
    try:
        kv.share_memory_()
        fd, _ = kv.untyped_storage()._share_fd_cpu_()
        st = os.fstat(fd)
    except (RuntimeError, OSError) as e:
        raise PeerPoolError(f"cannot move the KV pool into shared memory: {e}") from e
    return PoolOffer("shm", boot_id(), kv.shape[2], nbytes, int(kv.storage_offset()) * kv.element_size(),
                     pid=os.getpid(), fd=fd, file_id=[st.st_dev, st.st_ino])


class PeerPool:
    """D's mapping of one P's pool: ``copy_into`` pulls pages, ``close`` unmaps (after the last copy finished)."""

    def __init__(self, source: Any, num_pages: int, ipc_base: int | None) -> None:
        self.source = source  # CPU: a tensor over P's shared file; CUDA: kernels.kv_copy.RawPages
        self.num_pages = num_pages
        self._ipc_base = ipc_base

    def copy_into(self, kv: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
        """``kv[:, :, dst_ids] = P's pool[:, :, src_ids]`` on the current stream (CUDA: no host wait)."""
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"{len(src_ids)} source pages for {len(dst_ids)} destination pages")
        if not src_ids:
            return
        for ids, limit, whose in ((src_ids, self.num_pages, "prefill"), (dst_ids, kv.shape[2], "decode")):
            if min(ids) < 0 or max(ids) >= limit:
                raise IndexError(f"{whose} page id out of range [0, {limit}): min {min(ids)}, max {max(ids)}")
        both = torch.tensor([*src_ids, *dst_ids], dtype=torch.int64)
        if kv.is_cuda:
            from kernels.kv_copy import copy_pages  # imports triton only when used

            both = both.pin_memory().to(kv.device, non_blocking=True)  # measured: cheaper than a reused pinned ring
            copy_pages(self.source, both[:len(src_ids)], kv, both[len(src_ids):])
        else:
            kv.index_copy_(2, both[len(src_ids):], self.source.index_select(2, both[:len(src_ids)]))

    def close(self) -> None:
        base, self._ipc_base = self._ipc_base, None
        self.source = None
        if base is not None:
            cuda_ipc.close_handle(base)


def open_pool(offer: PoolOffer, kv: torch.Tensor) -> PeerPool:
    """D: map P's offered pool for copies into ``kv`` (same layout, dtype and page shape: the handshake checked)."""
    if offer.boot_id != boot_id():
        raise PeerPoolError("prefill runs on another host")
    want = kv[:, :, :1].numel() * kv.element_size() * offer.num_pages
    if offer.nbytes != want or offer.num_pages <= 0:
        raise PeerPoolError(f"offered pool has {offer.nbytes} bytes; {offer.num_pages} pages need {want}")
    shape = (*kv.shape[:2], offer.num_pages, *kv.shape[3:])
    if offer.kind == "cuda_ipc" and kv.is_cuda:
        from kernels.kv_copy import RawPages

        try:
            cuda_ipc.ensure_context(kv.device.index or 0)
            base = cuda_ipc.open_handle(offer.handle)
        except cuda_ipc.CudaIpcError as e:
            raise PeerPoolError(str(e)) from e
        return PeerPool(RawPages(base + offer.offset, kv.dtype, offer.num_pages), offer.num_pages, base)
    if offer.kind == "shm" and kv.device.type == "cpu":
        path = f"/proc/{offer.pid}/fd/{offer.fd}"
        try:
            st = os.stat(path)
            if [st.st_dev, st.st_ino] != list(offer.file_id):
                raise PeerPoolError(f"{path} is not prefill's pool (another pid namespace?)")
            raw = torch.from_file(path, shared=True, size=offer.offset + offer.nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as e:
            raise PeerPoolError(f"cannot map prefill's pool: {e}") from e
        source = raw[offer.offset:].view(kv.dtype).view(shape)
        return PeerPool(source, offer.num_pages, None)
    raise PeerPoolError(f"a {offer.kind} pool cannot be read from a {kv.device.type} pool")
