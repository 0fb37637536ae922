"""The few CUDA runtime calls CUDA managed memory needs, through ctypes on the libcudart that torch ships.

Used by :class:`qlora.paging.UnifiedPager` (``paging="unified"``): :class:`CudaRuntime` (``cudaMallocManaged``,
``cudaFree``, ``cudaMemPrefetchAsync``, ``cudaMemAdvise``, ``cudaDeviceGetAttribute``; the CUDA 12 and CUDA 13 ABIs),
:class:`ManagedAllocation` (one managed block seen by torch through ``__cuda_array_interface__``) and
:func:`managed_supported`. Nothing here runs without a CUDA device; tested on GPU only (tests/test_optim.py).
"""

from __future__ import annotations

import ctypes
import glob
import os
import weakref

import torch

CPU_DEVICE_ID = -1
_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
ADVISE_PREFERRED_LOCATION = 3  # cudaMemAdviseSetPreferredLocation
ADVISE_ACCESSED_BY = 5  # cudaMemAdviseSetAccessedBy
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2  # cudaMemLocationType


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaRuntime:
    """The few CUDA runtime calls managed memory needs, through ctypes on the libcudart torch loaded.

    CUDA 13 changed ``cudaMemPrefetchAsync`` and ``cudaMemAdvise`` to take a ``cudaMemLocation``; both ABIs
    are handled from ``cudaRuntimeGetVersion``.
    """

    _instance: "CudaRuntime | None" = None

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        version = ctypes.c_int(0)
        self._check(lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
        self.version = version.value
        lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        if self.version >= 13000:
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint,
                                                 ctypes.c_void_p]
            lib.cudaMemAdvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, _MemLocation]
        else:
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            lib.cudaMemAdvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]

    @classmethod
    def get(cls) -> "CudaRuntime":
        """The runtime, loaded once; raises RuntimeError where no CUDA runtime library can be loaded."""
        if cls._instance is None:
            cls._instance = cls(_load_cudart())
        return cls._instance

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed with CUDA error {code}")

    def _location(self, device: int) -> _MemLocation:
        if device == CPU_DEVICE_ID:
            return _MemLocation(_LOCATION_HOST, 0)
        return _MemLocation(_LOCATION_DEVICE, device)

    def _where(self, device: int):
        return self._location(device) if self.version >= 13000 else device

    def concurrent_managed_access(self, device: int) -> bool:
        value = ctypes.c_int(0)
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), _ATTR_CONCURRENT_MANAGED_ACCESS, device),
                    "cudaDeviceGetAttribute")
        return bool(value.value)

    def malloc_managed(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMallocManaged(ctypes.byref(ptr), nbytes, 1), f"cudaMallocManaged({nbytes})")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def prefetch(self, ptr: int, nbytes: int, device: int, stream: int) -> None:
        if self.version >= 13000:
            code = self.lib.cudaMemPrefetchAsync(ptr, nbytes, self._location(device), 0, stream)
        else:
            code = self.lib.cudaMemPrefetchAsync(ptr, nbytes, device, stream)
        self._check(code, "cudaMemPrefetchAsync")

    def advise(self, ptr: int, nbytes: int, advice: int, device: int) -> None:
        self._check(self.lib.cudaMemAdvise(ptr, nbytes, advice, self._where(device)), "cudaMemAdvise")


def _load_cudart() -> ctypes.CDLL:
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    roots = [os.path.dirname(torch.__file__)]
    roots += [os.path.join(p, "nvidia") for p in __import__("site").getsitepackages()]
    for root in roots:
        names += sorted(glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True), reverse=True)
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise RuntimeError("no CUDA runtime library (libcudart) could be loaded: " + "; ".join(errors[:3]))


class ManagedAllocation:
    """Owns one ``cudaMallocManaged`` block; exposes it through ``__cuda_array_interface__`` (torch keeps a
    reference to this object for the tensor's lifetime, and the block is freed when both are gone)."""

    _TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}

    def __init__(self, runtime: CudaRuntime, count: int, dtype: torch.dtype):
        self.nbytes = max(count * dtype.itemsize, 1)
        self.ptr = runtime.malloc_managed(self.nbytes)
        self._finalizer = weakref.finalize(self, runtime.free, self.ptr)
        self.__cuda_array_interface__ = {
            "shape": (count,), "typestr": self._TYPESTR[dtype], "data": (self.ptr, False), "version": 3,
        }


def managed_supported(device: torch.device) -> bool:
    """True where ``device`` is CUDA, the runtime loads, and the GPU supports concurrent managed access."""
    if device.type != "cuda":
        return False
    try:
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        return CudaRuntime.get().concurrent_managed_access(ordinal)
    except RuntimeError:
        return False
