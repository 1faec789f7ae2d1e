"""CUDA IPC through the driver API (libcuda via ctypes): export a device allocation, map a peer's into this context.

Why not torch: torch opens an IPC handle on the memory's home device (a second CUDA context on the peer's
GPU) and refcounts it with files; the direct KV handoff wants the peer's pool mapped into *this* device's
context, read by a kernel on this device over NVLink, and closed when the link to the peer ends.
Every call runs with a current context (the primary context of the KV's device, made current if the
thread has none). Errors raise ``CudaIpcError`` with the driver's name for them.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

_HANDLE_BYTES = 64
HANDLE_BYTES = _HANDLE_BYTES
_LAZY_ENABLE_PEER_ACCESS = 0x1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class CudaIpcError(RuntimeError):
    pass


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _HANDLE_BYTES)]  # raw bytes (c_char would stop at a NUL)


@functools.lru_cache(maxsize=1)
def _lib() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaIpcError(f"libcuda.so.1 not loadable: {e}") from e


def _fn(*names: str) -> Any:
    lib = _lib()
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    raise CudaIpcError(f"libcuda has none of {names}")


def _check(rc: int, what: str) -> None:
    if rc == 0:
        return
    text = ctypes.c_char_p()
    _fn("cuGetErrorName")(rc, ctypes.byref(text))
    raise CudaIpcError(f"{what} failed: {text.value.decode() if text.value else rc} ({rc})")


def ensure_context(device_index: int) -> None:
    """Make ``device_index``'s primary context current in this thread unless a context is current."""
    ctx = ctypes.c_void_p()
    _check(_fn("cuCtxGetCurrent")(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if ctx.value:
        return
    _check(_fn("cuInit")(0), "cuInit")
    dev = ctypes.c_int()
    _check(_fn("cuDeviceGet")(ctypes.byref(dev), device_index), "cuDeviceGet")
    _check(_fn("cuDevicePrimaryCtxRetain")(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(_fn("cuCtxSetCurrent")(ctx), "cuCtxSetCurrent")


def export(ptr: int) -> tuple[bytes, int]:
    """(IPC handle of the allocation holding ``ptr``, ``ptr``'s offset in it)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(
        _fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
        ),
        "cuMemGetAddressRange",
    )
    handle = _Handle()
    _check(_fn("cuIpcGetMemHandle")(ctypes.byref(handle), base), "cuIpcGetMemHandle")
    return bytes(handle.reserved), ptr - base.value


def open_handle(handle: bytes) -> int:
    """Map a peer's allocation into the current context (peer access enabled as needed); its base address."""
    if len(handle) != _HANDLE_BYTES:
        raise CudaIpcError(f"an IPC handle has {_HANDLE_BYTES} bytes, got {len(handle)}")
    ptr = ctypes.c_uint64()
    fn = _fn("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
    raw = _Handle()
    ctypes.memmove(ctypes.byref(raw), handle, _HANDLE_BYTES)
    _check(fn(ctypes.byref(ptr), raw, _LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
    return ptr.value


def allocation_size(ptr: int) -> int:
    """Bytes of the allocation (here: the mapped peer allocation) that starts at ``ptr``, from ``ptr`` on."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(
        _fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
        ),
        "cuMemGetAddressRange",
    )
    return int(size.value) - (ptr - int(base.value))


def close_handle(ptr: int) -> None:
    _check(_fn("cuIpcCloseMemHandle")(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")
