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

What P maps (``open_pool``), since anyone who reaches P's UCX worker can send a Hello (with a cluster
secret the Hello, offer included, is signed, but the checks hold either way): the offer's fields must have
their types; ``boot_id`` must be this host's; the size must be exactly ``num_pages`` pages of P's own
page geometry. "shm": the descriptor ``pid``/``fd`` is opened once and every check runs on what was
opened (no race with the peer): a regular file on the shared-memory file system (/dev/shm, or a memfd),
owned by our uid, the ``file_id`` (st_dev, st_ino) offered, at least ``offset + nbytes`` long, offset
aligned to the element size. Never a file elsewhere: a forged offer naming a file on disk is refused and
the link falls back to UCX data messages (one warning). "cuda_ipc": a 64-byte handle, an aligned
offset, and the mapped allocation must hold ``offset + nbytes``.

Invariants: D's page ids are range-checked (``check``) when D registers them, and P's against P's pool in
``write``, before any copy (an id out of range would write past D's pool and kill P's CUDA context). The
mapping is closed only after every copy queued through it finished (the engine fails or finishes every
room of the link first).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from transfer import cuda_ipc


class PeerPoolError(RuntimeError):
    """The offer cannot be used: the link sends the KV as UCX data messages instead.

    ``benign``: an expected mismatch (another host, a device pair without the means), logged at INFO; the
    rest (an offer that is not what it claims) are logged as warnings."""

    def __init__(self, message: str, benign: bool = False) -> None:
        super().__init__(message)
        self.benign = benign


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
    def from_dict(cls, d: Any) -> PoolOffer:
        """The offer in a Hello; PeerPoolError unless every field has its type (ints are ints, not bools)."""
        if not isinstance(d, dict):
            raise PeerPoolError(f"unreadable pool offer: {type(d).__name__}")
        try:
            offer = cls(**d)
        except TypeError as e:
            raise PeerPoolError(f"unreadable pool offer: {e}") from e
        ints = ("num_pages", "nbytes", "offset", "pid", "fd")
        if (
            not isinstance(offer.kind, str)
            or not isinstance(offer.boot_id, str)
            or any(isinstance(getattr(offer, n), bool) or not isinstance(getattr(offer, n), int) for n in ints)
            or not isinstance(offer.handle, bytes)
            or not isinstance(offer.file_id, list)
            or any(isinstance(v, bool) or not isinstance(v, int) for v in offer.file_id)
        ):
            raise PeerPoolError("unreadable pool offer: a field has the wrong type")
        if offer.offset < 0 or offer.nbytes <= 0 or offer.num_pages <= 0:
            raise PeerPoolError(
                f"pool offer out of range (offset {offer.offset}, nbytes {offer.nbytes}, num_pages {offer.num_pages})"
            )
        return offer


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
    return PoolOffer(
        "shm",
        boot_id(),
        kv.shape[2],
        nbytes,
        int(kv.storage_offset()) * kv.element_size(),
        pid=os.getpid(),
        fd=fd,
        file_id=[st.st_dev, st.st_ino],
    )


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
            raise IndexError(
                f"decode page id out of range [0, {self.num_pages}): min {min(dst_ids)}, max {max(dst_ids)}"
            )

    def write(
        self,
        kv: torch.Tensor,
        src_ids: Sequence[int],
        dst_ids: Sequence[int] | torch.Tensor,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
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
    """P: map D's offered pool for copies out of ``kv`` (same layout, dtype and page shape: the handshake checked).

    PeerPoolError unless the offer is what it claims (module doc)."""
    if offer.boot_id != boot_id():
        raise PeerPoolError("decode runs on another host", benign=True)
    want = kv[:, :, :1].numel() * kv.element_size() * offer.num_pages
    if offer.nbytes != want or offer.num_pages <= 0:
        raise PeerPoolError(f"offered pool has {offer.nbytes} bytes; {offer.num_pages} pages need {want}")
    if offer.offset < 0 or offer.offset % kv.element_size():
        raise PeerPoolError(f"offered pool offset {offer.offset} is not aligned to {kv.element_size()} bytes")
    shape = (*kv.shape[:2], offer.num_pages, *kv.shape[3:])
    if offer.kind == "cuda_ipc" and kv.is_cuda:
        from pd_kernels.kv_copy import RawPages

        if len(offer.handle) != cuda_ipc.HANDLE_BYTES:
            raise PeerPoolError(f"a CUDA IPC handle has {cuda_ipc.HANDLE_BYTES} bytes, got {len(offer.handle)}")
        try:
            cuda_ipc.ensure_context(kv.device.index or 0)
            base = cuda_ipc.open_handle(offer.handle)
        except cuda_ipc.CudaIpcError as e:
            raise PeerPoolError(str(e)) from e
        try:
            size = cuda_ipc.allocation_size(base)
        except cuda_ipc.CudaIpcError as e:
            cuda_ipc.close_handle(base)
            raise PeerPoolError(str(e)) from e
        if offer.offset + offer.nbytes > size:
            cuda_ipc.close_handle(base)
            raise PeerPoolError(
                f"offered pool ({offer.offset} + {offer.nbytes} bytes) exceeds the mapped allocation of {size} bytes"
            )
        return PeerPool(RawPages(base + offer.offset, kv.dtype, offer.num_pages), offer.num_pages, base)
    if offer.kind == "shm" and kv.device.type == "cpu":
        target = _map_shm(offer, kv.dtype, shape)
        return PeerPool(target, offer.num_pages, None)
    if offer.kind not in ("shm", "cuda_ipc"):
        raise PeerPoolError(f"unknown pool kind {offer.kind[:32]!r}")
    raise PeerPoolError(f"a {offer.kind} pool cannot be written from a {kv.device.type} pool", benign=True)


SHM_DIR = "/dev/shm"


def _map_shm(offer: PoolOffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Open D's pool file through /proc/<pid>/fd/<fd> once, check what was opened, map it (module doc)."""
    if offer.pid <= 0 or offer.fd < 0 or len(offer.file_id) != 2:
        raise PeerPoolError(f"shm pool offer names no descriptor (pid {offer.pid}, fd {offer.fd})")
    path = f"/proc/{offer.pid}/fd/{offer.fd}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # never open a device, FIFO or socket (opening may act)
            raise PeerPoolError(f"{path} is not a regular file: refusing to map it")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise PeerPoolError(f"cannot open decode's pool {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        where = _shm_kind(fd, st)
        if where is None:
            raise PeerPoolError(f"{path} is not a shared-memory object (it is {_describe(fd)}): refusing to map it")
        if st.st_uid != os.getuid():
            raise PeerPoolError(f"{path} belongs to uid {st.st_uid}, not ours ({os.getuid()})")
        if [st.st_dev, st.st_ino] != list(offer.file_id):
            raise PeerPoolError(f"{path} is not decode's pool (file id differs; another pid namespace?)")
        end = offer.offset + offer.nbytes
        if st.st_size < end:
            raise PeerPoolError(f"{path} has {st.st_size} bytes; the offered pool needs {end}")
        try:
            raw = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=end, dtype=torch.uint8)
        except RuntimeError as e:
            raise PeerPoolError(f"cannot map decode's pool: {e}") from e
    finally:
        os.close(fd)  # the mapping keeps the object alive
    return raw[offer.offset :].view(dtype).view(shape)


def _shm_kind(fd: int, st: os.stat_result) -> str | None:
    """ "shm" (a file on /dev/shm's file system) or "memfd", else None (anything else, e.g. a file on disk)."""
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        if st.st_dev == os.stat(SHM_DIR).st_dev:
            return "shm"
    except OSError:
        pass
    try:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
            return "memfd"
    except OSError:
        pass
    return None


def _describe(fd: int) -> str:
    try:
        return repr(os.readlink(f"/proc/self/fd/{fd}")[:200])
    except OSError:
        return "unknown"
