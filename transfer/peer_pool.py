"""The direct handoff on one host: D offers its KV pool, P maps it and writes each room's pages itself (push).

D describes its pool in a ``PoolOffer`` (in Hello): on CUDA an IPC handle of the pool's allocation, on CPU
the pool's shared-memory file (D moves its pool into shared memory when the engine starts; views of the
pool follow, since they share its storage). P maps the offer (``open_pool``) once per link; a ``send``'s
pages then move with one copy launched by P: ``PeerPool.write`` (CUDA: one kernel on P's device writing
D's GPU over NVLink, pd_kernels/kv_copy.py; CPU: a gather and a scatter). No staging buffer, no pack or
unpack, no data message, and no host step between the forward and the copy. Anything that does not fit
(another host, a GPU pair without peer access, a foreign allocator) raises ``PeerPoolError`` and the link
falls back to UCX data messages.

Why push (P writes) rather than pull (D reads): the copy can be launched inside P's ``send``, ordered
after the forward on the GPU, with no message, wakeup or host wait before it (measured on 2x H200,
bench/RESULTS.md); and the copy's SM time lands on P (throughput-bound) rather than on D (latency-bound).

Invariants: D's page ids are range-checked (``check``) when D registers them, and P's against P's pool in
``write``, before any copy (an id out of range would write past D's pool and kill P's CUDA context). The
mapping is closed only after every copy queued through it finished (the engine fails or finishes every
room of the link first).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
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
    pid: int = 0  # shm: D's pid and its descriptor of the pool's file, with the file's (st_dev, st_ino)
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
    """D: describe ``kv`` so that a P on this host can map it (CPU: moves it into shared memory first)."""
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
    """P's mapping of one D's pool: ``write`` copies P's pages into it; ``close`` unmaps (after the last write)."""

    def __init__(self, target: Any, num_pages: int, ipc_base: int | None) -> None:
        self.target = target  # CPU: a tensor over D's shared file; CUDA: pd_kernels.kv_copy.RawPages
        self.num_pages = num_pages
        self._ipc_base = ipc_base
        self._lock = threading.Lock()  # CUDA: one upload + launch at a time (the uploader's ring is not shared)
        self._copier: Any = None  # CUDA: pd_kernels.kv_copy.PageCopier from our pool into ``target`` (first write)
        self._uploader: Any = None  # CUDA: pd_kernels.kv_copy.PageIdUploader for our page ids (first write)

    def check(self, dst_ids: Sequence[int]) -> None:
        """Raise unless every id names a page of D's pool (an id out of range would write past it)."""
        if dst_ids and (min(dst_ids) < 0 or max(dst_ids) >= self.num_pages):
            raise IndexError(f"decode page id out of range [0, {self.num_pages}): min {min(dst_ids)}, max {max(dst_ids)}")

    def write(self, kv: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int] | torch.Tensor,
              stream: torch.cuda.Stream | None = None) -> None:
        """D's pool[:, :, dst_ids] = ``kv``[:, :, src_ids] (CUDA: on ``stream``, None: the current one; no host wait).

        ``dst_ids`` were range-checked (``check``) when D registered them; on CUDA they are a device tensor
        (uploaded then, off the critical path, on ``stream``). Any thread."""
        n = len(src_ids)
        if n != len(dst_ids):
            raise ValueError(f"{n} source pages for {len(dst_ids)} destination pages")
        if not n:
            return
        if min(src_ids) < 0 or max(src_ids) >= kv.shape[2]:
            raise IndexError(f"prefill page id out of range [0, {kv.shape[2]}): min {min(src_ids)}, max {max(src_ids)}")
        if not kv.is_cuda:
            dst = dst_ids if isinstance(dst_ids, torch.Tensor) else torch.tensor(list(dst_ids), dtype=torch.int64)
            self.target.index_copy_(2, dst, kv.index_select(2, torch.tensor(list(src_ids), dtype=torch.int64)))
            return
        with self._lock:
            if self._copier is None:
                from pd_kernels import kv_copy  # imports triton only when used

                self._copier = kv_copy.PageCopier(kv, self.target)
                self._uploader = kv_copy.PageIdUploader(kv.device, min(kv.shape[2], UPLOAD_CAPACITY))
            if n <= self._uploader.capacity:
                src = self._uploader.upload(src_ids, stream)
            else:
                src = upload_ids(src_ids, kv.device, stream)
            dst = dst_ids if isinstance(dst_ids, torch.Tensor) else upload_ids(dst_ids, kv.device, stream)
            self._copier(src, dst, stream)  # same stream as the uploads: the ids are in place when it runs

    def close(self) -> None:
        base, self._ipc_base = self._ipc_base, None
        self.target = self._copier = self._uploader = None
        if base is not None:
            cuda_ipc.close_handle(base)


UPLOAD_CAPACITY = 16384  # page ids one write uploads through the pinned ring; longer sends build a tensor


def upload_ids(ids: Sequence[int], device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Page ids as an int64 tensor on ``device``, copied on ``stream`` (None: the current one; no host wait)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return torch.tensor(list(ids), dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def open_pool(offer: PoolOffer, kv: torch.Tensor) -> PeerPool:
    """P: map D's offered pool for copies out of ``kv`` (same layout, dtype and page shape: the handshake checked)."""
    if offer.boot_id != boot_id():
        raise PeerPoolError("decode runs on another host")
    want = kv[:, :, :1].numel() * kv.element_size() * offer.num_pages
    if offer.nbytes != want or offer.num_pages <= 0:
        raise PeerPoolError(f"offered pool has {offer.nbytes} bytes; {offer.num_pages} pages need {want}")
    shape = (*kv.shape[:2], offer.num_pages, *kv.shape[3:])
    if offer.kind == "cuda_ipc" and kv.is_cuda:
        from pd_kernels.kv_copy import RawPages

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
                raise PeerPoolError(f"{path} is not decode's pool (another pid namespace?)")
            raw = torch.from_file(path, shared=True, size=offer.offset + offer.nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as e:
            raise PeerPoolError(f"cannot map decode's pool: {e}") from e
        target = raw[offer.offset:].view(kv.dtype).view(shape)
        return PeerPool(target, offer.num_pages, None)
    raise PeerPoolError(f"a {offer.kind} pool cannot be written from a {kv.device.type} pool")
