"""Copy whole pages from one KV pool into another, one launch: the direct KV handoff on one host.

Both pools have the layout ``[L, 2, P, page_size, H, D]`` (contiguous, same dtype and page shape; the page
counts ``P`` may differ). Page ``src_idx[i]`` of every layer, K and V, of ``src`` goes to page ``dst_idx[i]``
of ``dst``. One of the pools may be another GPU's memory mapped into this context (CUDA IPC): the kernel
runs on the other pool's device and reads (pull) or writes (push) the mapped one over NVLink, so no
staging buffer, pack or unpack is needed. Such a pool has no torch tensor here (torch would put it on its
home device); it is passed as a ``RawPages`` (a pointer with a dtype, which is all Triton needs).

``copy_pages``: one call, everything checked. ``PageCopier``: one pool pair checked once,
then a launch per call with little host work (the engine's path); ``PageIdUploader``: page ids to the GPU
through a pinned ring, without building a tensor per call.

Grid: (n * blocks_per_page, L * 2); each program copies BLOCK contiguous elements of one page of one plane.
The copy is bitwise (same-width integers). int64 offsets.
Invariants (not checked: a host sync): every ``src_idx`` lies in ``[0, P_src)``, every ``dst_idx`` in
``[0, P_dst)``, and no ``dst_idx`` repeats. Callers range-check ids on the host before they get here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class RawPages:
    """A contiguous ``[L, 2, num_pages, page_size, H, D]`` pool known only by its device address."""

    ptr: int
    dtype: torch.dtype
    num_pages: int

    def data_ptr(self) -> int:  # what Triton reads from a pointer argument
        return self.ptr


@triton.jit
def _pages_to_pages_kernel(
    src_ptr,
    dst_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    src_pages,
    dst_pages,
    page_elems,
    blocks_per_page,
    EVEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid // blocks_per_page
    e = (pid % blocks_per_page) * BLOCK + tl.arange(0, BLOCK)
    plane = tl.program_id(1).to(tl.int64)
    src_page = tl.load(src_idx_ptr + i).to(tl.int64)
    dst_page = tl.load(dst_idx_ptr + i).to(tl.int64)
    src = src_ptr + (plane * src_pages + src_page) * page_elems + e
    dst = dst_ptr + (plane * dst_pages + dst_page) * page_elems + e
    if EVEN:
        tl.store(dst, tl.load(src))
    else:
        mask = e < page_elems
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


def copy_pages(
    src: torch.Tensor | RawPages,
    src_idx: torch.Tensor,
    dst: torch.Tensor | RawPages,
    dst_idx: torch.Tensor,
    block: int = 4096,
) -> None:
    """``dst[:, :, dst_idx] = src[:, :, src_idx]`` on the tensor pool's device and current stream.

    One of ``src``, ``dst`` may be a ``RawPages``. ``src_idx`` and ``dst_idx``: 1-D contiguous int64/int32
    tensors of equal length on the tensor pool's device.
    """
    plan = _Plan(src, dst, block)
    _check_ids(src_idx, dst_idx, plan.device)
    plan.launch(src_idx, dst_idx, dst_idx.shape[0])


class PageCopier:
    """``copy_pages`` for one pool pair, checked once, with little host work per call: the engine's path.

    ``copier(src_idx, dst_idx, stream)`` = ``copy_pages(src, src_idx, dst, dst_idx)`` on the tensor pool's
    device (made current for the launch if it is not), on ``stream`` (a stream of that device; None: its
    current stream). Pass the stream rather than entering ``torch.cuda.stream(...)``: the context costs more
    than the launch. A call checks only the ids' length, layout, device and dtype, then launches Triton's
    compiled kernel directly: no argument binding or specialization in Python, pointers passed as ints. It
    does so where this Triton's JIT launches a compiled kernel the way this module knows
    (``_direct_launch_known``); under the interpreter, another Triton, or a launch hook (a profiler), it
    launches through ``kernel[grid](...)``: same kernel, same result.
    """

    def __init__(self, src: torch.Tensor | RawPages, dst: torch.Tensor | RawPages, block: int = 4096) -> None:
        self._plan = _Plan(src, dst, block)
        self.device = self._plan.device
        self._dev = self.device.index if self.device.type == "cuda" else -1  # what Tensor.get_device() returns
        # (src dtype, dst dtype, both 16-byte aligned) -> (launcher, function, metadata, current stream's handle
        # by device index: what Triton's own launch uses), or None: launch through kernel[grid]
        self._direct: dict[tuple[torch.dtype, torch.dtype, bool], tuple | None] = {}

    def __call__(self, src_idx: torch.Tensor, dst_idx: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        if (
            src_idx.dim() != 1
            or dst_idx.dim() != 1
            or src_idx.shape[0] != dst_idx.shape[0]
            or src_idx.get_device() != self._dev
            or dst_idx.get_device() != self._dev
            or not src_idx.is_contiguous()
            or not dst_idx.is_contiguous()
        ):
            _check_ids(src_idx, dst_idx, self.device)  # raises: says what is wrong
        if stream is not None and stream.device_index != self._dev:
            raise ValueError(f"stream is on cuda:{stream.device_index}; the pool is on {self.device}")
        n = src_idx.shape[0]
        if n == 0 or self._plan.empty:
            return
        if self._dev >= 0 and torch.cuda.current_device() != self._dev:
            with torch.cuda.device(self._dev):
                return self(src_idx, dst_idx, stream)
        sp, dp = src_idx.data_ptr(), dst_idx.data_ptr()
        key = (src_idx.dtype, dst_idx.dtype, (sp | dp) & 15 == 0)
        direct = self._direct[key] if key in self._direct else self._compile(key, src_idx, dst_idx)
        if direct is None or _launch_hooked():
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._plan.launch(src_idx, dst_idx, n)
            return
        run, function, metadata, current_stream = direct
        p = self._plan
        raw = stream.cuda_stream if stream is not None else current_stream(self._dev)
        run(
            n * p.blocks_per_page,
            p.planes,
            1,
            raw,
            function,
            metadata,
            None,
            None,
            None,
            p.src_ptr,
            p.dst_ptr,
            sp,
            dp,
            *p.scalars,
        )

    def _compile(self, key: tuple, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> tuple | None:
        """Triton's compiled kernel for these ids' dtypes and alignment, loaded on our device (None: launch
        through ``kernel[grid]``). Specialized on the actual arguments, which are fixed but for the ids."""
        _check_ids(src_idx, dst_idx, self.device)
        direct = None
        if self._dev >= 0 and _direct_launch_known():
            p = self._plan
            kernel = _pages_to_pages_kernel.warmup(
                p.src, p.dst, src_idx, dst_idx, *p.scalars[:4], grid=(1,), **p.options
            )
            kernel = kernel.result() if hasattr(kernel, "result") else kernel  # an async compile's future
            run = kernel.run  # loads the module into the current (our) device's context
            direct = (run, kernel.function, kernel.packed_metadata, triton.runtime.driver.active.get_current_stream)
        self._direct[key] = direct
        return direct


class PageIdUploader:
    """Page ids (host ints) to ``device`` with no tensor built per call, through a ring of ``slots`` rows.

    ``upload(ids, stream)`` writes the ids into the next pinned host row and queues one copy of them into the
    matching device row on ``stream`` (a stream of ``device``; None: its current stream), with no host wait,
    and returns that device row's view (16-byte aligned). The copy is one driver call (cuMemcpyHtoDAsync)
    rather than ``Tensor.copy_``: a third of the host time.
    Invariants: the view stays valid for work queued after it on the same stream until its row is
    uploaded into again, ``slots`` uploads later: use one stream for the uploads and their readers (work on
    another stream must be ordered after the upload and finish within that window). A host row is
    rewritten only after its previous copy ran (an event per row; the wait is over unless ``slots``
    uploads are queued behind a busy stream). On CPU the host row itself is returned (no copy).
    """

    def __init__(
        self, device: torch.device | str, capacity: int, slots: int = 8, dtype: torch.dtype = torch.int64
    ) -> None:
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda and device.index is None else device
        self.capacity = capacity
        self._itemsize = dtype.itemsize
        row = -(-capacity * dtype.itemsize // 16) * 16 // dtype.itemsize  # rows start 16-byte aligned
        host = torch.empty(slots, row, dtype=dtype, pin_memory=cuda)
        self._host_np = host.numpy()  # numpy fills a row from a list ~10x faster than torch.tensor(ids)
        self._host = list(host)
        self._dev = list(torch.empty(slots, row, dtype=dtype, device=self.device)) if cuda else self._host
        self._ptrs = [(d.data_ptr(), h.data_ptr()) for d, h in zip(self._dev, self._host)]
        self._events = [torch.cuda.Event() for _ in range(slots)] if cuda else None
        self._memcpy = _cu_memcpy_htod_async() if cuda else None
        self._next = 0

    def upload(self, ids: Sequence[int], stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        n = len(ids)
        if n > self.capacity:
            raise ValueError(f"{n} page ids; this uploader holds at most {self.capacity} per upload")
        k = self._next
        if self._events is None:
            self._next = (k + 1) % len(self._host)
            self._host_np[k, :n] = ids
            return self._host[k][:n]
        if torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self.upload(ids, stream)
        if stream is None:
            stream = torch.cuda.current_stream(self.device)
        elif stream.device_index != self.device.index:
            raise ValueError(f"stream is on cuda:{stream.device_index}; the uploader is on {self.device}")
        self._next = (k + 1) % len(self._host)
        event = self._events[k]
        event.synchronize()  # this row's previous copy ran (returns at once if never recorded)
        self._host_np[k, :n] = ids
        if self._memcpy is None:
            raise RuntimeError("the page-id uploader needs a CUDA device")
        rc = self._memcpy(*self._ptrs[k], n * self._itemsize, stream.cuda_stream)
        if rc:
            raise RuntimeError(f"cuMemcpyHtoDAsync failed: CUresult {rc}")
        event.record(stream)
        return self._dev[k][:n]


class _Plan:
    """A checked pool pair and the kernel's arguments for it but the ids."""

    def __init__(self, src: torch.Tensor | RawPages, dst: torch.Tensor | RawPages, block: int) -> None:
        pool = _check_pools(src, dst)
        self.device = pool.device
        bits = _BITS[pool.element_size()]
        num_layers, two, _, page_size, heads, head_dim = pool.shape
        page_elems = page_size * heads * head_dim
        self.planes = num_layers * two
        self.empty = page_elems == 0 or self.planes == 0
        block = min(block, triton.next_power_of_2(page_elems))
        self.blocks_per_page = triton.cdiv(page_elems, block)
        self.src, self.dst = (
            p.view(bits) if isinstance(p, torch.Tensor) else RawPages(p.ptr, bits, p.num_pages) for p in (src, dst)
        )
        self.src_ptr, self.dst_ptr = self.src.data_ptr(), self.dst.data_ptr()
        pages = [p.shape[2] if isinstance(p, torch.Tensor) else p.num_pages for p in (src, dst)]
        even = page_elems % block == 0
        # the kernel's arguments after the four pointers, in order (the two constexprs last)
        self.scalars = (*pages, page_elems, self.blocks_per_page, even, block)
        self.options = {"EVEN": even, "BLOCK": block, "num_warps": max(1, min(8, block // 256))}

    def launch(self, src_idx: torch.Tensor, dst_idx: torch.Tensor, n: int) -> None:
        """The ordinary launch: ``kernel[grid](...)`` (Triton binds and specializes the arguments)."""
        if n and not self.empty:
            _pages_to_pages_kernel[(n * self.blocks_per_page, self.planes)](
                self.src, self.dst, src_idx, dst_idx, *self.scalars[:4], **self.options
            )


_KNOWN_LAUNCH = (
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())"
)


@functools.lru_cache(maxsize=1)
def _direct_launch_known() -> bool:
    """Whether this Triton's JIT launches a compiled kernel as ``PageCopier`` does: read from its source
    (``JITFunction.run``; Triton 3.4 to 3.9 at least). False under the interpreter (no compiled kernel)."""
    try:
        from triton.runtime.jit import JITFunction

        run_src = "".join(inspect.getsource(JITFunction.run).split())
        return (
            isinstance(_pages_to_pages_kernel, JITFunction)
            and _KNOWN_LAUNCH in run_src
            and hasattr(_pages_to_pages_kernel, "warmup")
            and hasattr(triton.knobs.runtime, "launch_exit_hook")
        )
    except (ImportError, OSError, TypeError, AttributeError):
        return False


@functools.lru_cache(maxsize=1)
def _cu_memcpy_htod_async() -> Any:
    """libcuda's cuMemcpyHtoDAsync_v2(dst device ptr, src host ptr, bytes, stream) -> CUresult."""
    fn = ctypes.CDLL("libcuda.so.1").cuMemcpyHtoDAsync_v2
    fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _launch_hooked() -> bool:
    """A launch hook is set (a profiler): the launch must go through Triton, which calls it."""
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook  # None, or a HookChain (.calls) or a callable
    return bool(enter is not None and getattr(enter, "calls", True)) or bool(
        leave is not None and getattr(leave, "calls", True)
    )


def _check_pools(src: torch.Tensor | RawPages, dst: torch.Tensor | RawPages) -> torch.Tensor:
    """The pair's tensor pool (the kernel runs on its device: ``dst``'s when both are tensors), once the pools match."""
    pool = dst if isinstance(dst, torch.Tensor) else src
    name = "dst" if pool is dst else "src"
    if not isinstance(pool, torch.Tensor):
        raise TypeError("src and dst are both RawPages; one must be a tensor (the kernel runs on its device)")
    if pool.dim() != 6 or pool.shape[1] != 2 or not pool.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim], "
            f"got shape {tuple(pool.shape)} strides {pool.stride()}"
        )
    if pool.element_size() not in _BITS:
        raise TypeError(f"unsupported KV dtype {pool.dtype}")
    other: torch.Tensor | RawPages = src if pool is dst else dst
    if isinstance(other, torch.Tensor):  # both are tensors: ``pool`` is dst, ``other`` is src
        if (
            other.dim() != 6
            or other.shape[:2] != pool.shape[:2]
            or other.shape[3:] != pool.shape[3:]
            or not other.is_contiguous()
        ):
            raise ValueError(
                f"src shape {tuple(other.shape)} does not match dst {tuple(pool.shape)} "
                "(all but the page count), or src is not contiguous"
            )
        if other.device != pool.device:
            raise ValueError(
                f"src ({other.device}) and dst ({pool.device}) are on different devices; pass another "
                "GPU's pool as RawPages"
            )
    if src.dtype != dst.dtype:
        raise TypeError(f"src is {src.dtype}; dst is {dst.dtype}")
    return pool


def _check_ids(src_idx: torch.Tensor, dst_idx: torch.Tensor, device: torch.device) -> None:
    for name, idx in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1 or not idx.is_contiguous():
            raise TypeError(
                f"{name} must be a contiguous 1-D int64 (or int32) tensor, got {idx.dtype} "
                f"{tuple(idx.shape)} strides {idx.stride()}"
            )
        if idx.device != device:
            raise ValueError(f"{name} is on {idx.device}; the pool is on {device}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"src_idx has {src_idx.shape[0]} ids, dst_idx {dst_idx.shape[0]}")


def copy_pages_ref(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """torch: ``dst[:, :, dst_idx] = src[:, :, src_idx]`` (a gather, then a scatter)."""
    dst.index_copy_(2, dst_idx.long(), src.index_select(2, src_idx.long()))
