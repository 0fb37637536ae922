"""The paging engine of the paged optimizers: optimizer state kept outside GPU memory, streamed in pages.

The state of every paged parameter is cut into *chunks* (element ranges whose starts are multiples of 256,
so an 8-bit state's 256-element quantization blocks never straddle two chunks) and the chunks are packed,
in the order parameters first get state, into fixed-size *pages*: a large tensor spans several pages, many
small tensors share one. A chunk holds the slices of each of its parameter's state fields (``exp_avg``,
``exp_avg_sq`` or their 8-bit codes and absmax); inside a page each slice starts on a 128-byte boundary.

One optimizer step walks the pages holding a parameter with a gradient, in plan order, and hands every chunk
to the step kernel as views on the device. Two back ends move the bytes:

- :class:`HostPager` (``paging="host"``): each field lives in (pinned, on CUDA) host memory. The device holds
  ``num_pages`` page buffers; page *k* is copied into buffer ``k % num_pages`` on an upload stream, the
  kernels run on the compute stream, and the page is copied back on a download stream. Up to ``num_pages``
  pages are in flight, so uploads and downloads overlap the kernels (double buffering with ``num_pages=2``).
  With CPU tensors (the Triton interpreter) the same plan runs with synchronous copies, which is how its
  logic (page boundaries, partial last page, many tensors in one page, ordering) is tested without a GPU.
- :class:`UnifiedPager` (``paging="unified"``): each field lives in CUDA managed memory (``cudaMallocManaged``
  through the CUDA runtime torch ships, via ctypes); the kernels read it in place. A page is prefetched to
  the GPU on the upload stream before its kernels, and when the paged state is larger than the device budget
  it is prefetched back to the host afterwards, so at most ``num_pages`` pages of state sit on the GPU.

Either way the device memory used by paged state is at most ``num_pages * page_size`` bytes, and the kernel
sees the same values it would see with resident state: a paged step equals an unpaged one bit for bit.
"""

from __future__ import annotations

import ctypes
import glob
import os
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

PAGE_ALIGN = 128  # bytes: every slice in a page starts on this boundary (coalesced, vectorizable loads)
CHUNK_GRANULE = 256  # elements: chunk starts are multiples of the 8-bit quantization blocksize
MIN_PAGE_SIZE = 4096  # bytes: room for at least one 256-element chunk of any state format


def _align(nbytes: int) -> int:
    return -(-nbytes // PAGE_ALIGN) * PAGE_ALIGN


@dataclass(frozen=True)
class FieldSpec:
    """One state tensor of a parameter: ``unit`` parameter elements per entry (1, or 256 for an absmax)."""

    name: str
    dtype: torch.dtype
    unit: int = 1

    def count(self, numel: int) -> int:
        return -(-numel // self.unit)

    def entries(self, start: int, stop: int) -> tuple[int, int]:
        """The entries covering parameter elements ``[start, stop)`` (``start`` a multiple of ``unit``)."""
        return start // self.unit, -(-stop // self.unit)


def chunk_bytes(fields: Sequence[FieldSpec], start: int, stop: int) -> int:
    """Bytes a chunk of elements ``[start, stop)`` occupies in a page, each field slice aligned."""
    total = 0
    for f in fields:
        lo, hi = f.entries(start, stop)
        total += _align((hi - lo) * f.dtype.itemsize)
    return total


@dataclass
class Segment:
    """Entries ``[lo, hi)`` of one field, at byte ``offset`` of its page."""

    name: str
    lo: int
    hi: int
    offset: int
    nbytes: int


@dataclass
class Chunk:
    """Elements ``[start, stop)`` of one paged parameter's state, stored in page ``page``."""

    key: int
    start: int
    stop: int
    page: int
    segments: list[Segment]


@dataclass
class PagedState:
    """The backing tensors of one paged parameter's state (flat, one per field) and its chunks."""

    key: int
    numel: int
    fields: tuple[FieldSpec, ...]
    tensors: dict[str, torch.Tensor]
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class PagePlan:
    """Append-only packing of chunks into pages of ``page_size`` bytes ("next fit", in arrival order)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.pages: list[list[Chunk]] = []
        self._used = 0  # bytes used in the last page

    def add(self, key: int, numel: int, fields: Sequence[FieldSpec]) -> list[Chunk]:
        chunks = []
        start = 0
        while start < numel:
            free = self.page_size - self._used if self.pages else 0
            stop = self._largest_fit(fields, start, numel, free)
            if stop == start:  # not even one granule fits: open a new page
                self.pages.append([])
                self._used = 0
                continue
            offset = self._used
            segments = []
            for f in fields:
                lo, hi = f.entries(start, stop)
                nbytes = (hi - lo) * f.dtype.itemsize
                segments.append(Segment(f.name, lo, hi, offset, nbytes))
                offset += _align(nbytes)
            chunk = Chunk(key, start, stop, len(self.pages) - 1, segments)
            self.pages[-1].append(chunk)
            self._used = offset
            chunks.append(chunk)
            start = stop
        return chunks

    @staticmethod
    def _largest_fit(fields: Sequence[FieldSpec], start: int, numel: int, free: int) -> int:
        """Largest ``stop`` (a granule multiple, or ``numel``) whose chunk fits in ``free`` bytes."""
        if chunk_bytes(fields, start, numel) <= free:
            return numel
        lo, hi = 0, -(-(numel - start) // CHUNK_GRANULE)  # granules: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if chunk_bytes(fields, start, start + mid * CHUNK_GRANULE) <= free:
                lo = mid
            else:
                hi = mid
        return start + lo * CHUNK_GRANULE


class _Streams:
    """Upload / download side streams on CUDA; on CPU every call runs synchronously and events are None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.upload = torch.cuda.Stream(device) if self.cuda else None
        self.download = torch.cuda.Stream(device) if self.cuda else None

    def compute(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def record(self, stream):
        return stream.record_event() if self.cuda else None

    def wait(self, stream, event) -> None:
        if self.cuda:
            stream.wait_event(event)

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else _NullContext()

    def synchronize(self) -> None:
        if self.cuda:
            self.download.synchronize()
            self.upload.synchronize()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


StepFn = Callable[[int, int, int, dict[str, torch.Tensor]], None]
"""``fn(key, start, stop, views)``: run the step for elements ``[start, stop)`` of parameter ``key``;
``views`` maps each field name to a flat device tensor holding that chunk's entries."""


class Pager(ABC):
    """Common logic of the back ends: the plan, the page walk, the byte counters."""

    backend = ""

    def __init__(self, device: torch.device, page_size: int, num_pages: int):
        self.device = device
        self.page_size = page_size
        self.num_pages = num_pages
        self.plan = PagePlan(page_size)
        self.states: dict[int, PagedState] = {}
        self.streams = _Streams(device)
        self.last_step = {"pages": 0, "bytes_to_device": 0, "bytes_to_host": 0}

    # -- allocation ------------------------------------------------------------------------------
    def register(self, key: int, numel: int, fields: Sequence[FieldSpec]) -> PagedState:
        """Allocate the backing tensors of a parameter's state (zeroed) and append its chunks to the plan."""
        if key in self.states:
            raise ValueError(f"parameter {key} already has paged state")
        tensors = {f.name: self._allocate(f.count(numel), f.dtype) for f in fields}
        state = PagedState(key, numel, tuple(fields), tensors)
        state.chunks = self.plan.add(key, numel, fields)
        self.states[key] = state
        return state

    @abstractmethod
    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed flat tensor of ``count`` entries in this back end's state memory."""

    # -- the step --------------------------------------------------------------------------------
    def run(self, active: Iterable[int], fn: StepFn, meanwhile: Callable[[], None] | None = None) -> None:
        """Run ``fn`` on every chunk of the ``active`` parameters, page by page, in plan order.

        ``meanwhile`` runs on the compute stream right after the first uploads are queued (the resident
        parameters' steps), so it overlaps them.
        """
        active = set(active)
        pages = [
            [c for c in chunks if c.key in active] for chunks in self.plan.pages
        ]
        pages = [chunks for chunks in pages if chunks]
        s = self.streams
        self.last_step = {"pages": len(pages), "bytes_to_device": 0, "bytes_to_host": 0}
        if s.cuda:
            # This step's uploads read host state that the previous step's downloads wrote.
            s.upload.wait_stream(s.download)
        loaded, stored = {}, {}
        depth = self.num_pages

        def upload(k: int) -> None:
            if k >= len(pages):
                return
            if k - depth in stored:  # the buffer page k reuses must be written back first
                s.wait(s.upload, stored[k - depth])
            with s.on(s.upload):
                self._load(pages[k], k % depth)
            loaded[k] = s.record(s.upload)

        for k in range(depth):
            upload(k)
        if meanwhile is not None:
            meanwhile()
        compute = s.compute()
        for k, chunks in enumerate(pages):
            s.wait(compute, loaded[k])
            for chunk in chunks:
                fn(chunk.key, chunk.start, chunk.stop, self._views(chunk, k % depth))
            computed = s.record(compute)
            s.wait(s.download, computed)
            with s.on(s.download):
                self._store(chunks, k % depth)
            stored[k] = s.record(s.download)
            upload(k + depth)

    def synchronize(self) -> None:
        """Wait until every queued copy has landed (call before reading or writing the host tensors)."""
        self.streams.synchronize()

    @abstractmethod
    def _load(self, chunks: list[Chunk], slot: int) -> None:
        """Queue (on the current stream) whatever brings these chunks to the device in buffer ``slot``."""

    @abstractmethod
    def _store(self, chunks: list[Chunk], slot: int) -> None:
        """Queue (on the current stream) whatever takes these chunks back to the host from ``slot``."""

    @abstractmethod
    def _views(self, chunk: Chunk, slot: int) -> dict[str, torch.Tensor]:
        """Device views of the chunk's field slices, as loaded in buffer ``slot``."""

    # -- report ----------------------------------------------------------------------------------
    def report(self) -> dict:
        return {
            "backend": self.backend,
            "page_size": self.page_size,
            "num_pages": self.num_pages,
            "device_budget_bytes": self.page_size * self.num_pages,
            "paged_tensors": len(self.states),
            "paged_state_bytes": sum(st.nbytes for st in self.states.values()),
            "plan_pages": len(self.plan.pages),
            "last_step": dict(self.last_step),
        }


class HostPager(Pager):
    """State in host memory (pinned when the device is CUDA), streamed through ``num_pages`` device buffers."""

    backend = "host"

    def __init__(self, device: torch.device, page_size: int, num_pages: int):
        super().__init__(device, page_size, num_pages)
        self._buffers: list[torch.Tensor] = []

    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(count, dtype=dtype, pin_memory=self.device.type == "cuda")

    def run(self, active, fn, meanwhile=None) -> None:
        if not self._buffers and self.states:  # no device memory until some state is paged
            for _ in range(self.num_pages):
                buffer = torch.empty(self.page_size, dtype=torch.uint8, device=self.device)
                if self.streams.cuda:  # used on the side streams too: keep it alive until they are done
                    buffer.record_stream(self.streams.upload)
                    buffer.record_stream(self.streams.download)
                self._buffers.append(buffer)
        super().run(active, fn, meanwhile)

    def _pairs(self, chunks: list[Chunk], slot: int):
        buffer = self._buffers[slot]
        for chunk in chunks:
            tensors = self.states[chunk.key].tensors
            for seg in chunk.segments:
                host = tensors[seg.name][seg.lo:seg.hi]
                yield host, buffer[seg.offset:seg.offset + seg.nbytes].view(host.dtype), seg.nbytes

    def _load(self, chunks: list[Chunk], slot: int) -> None:
        for host, dev, nbytes in self._pairs(chunks, slot):
            dev.copy_(host, non_blocking=True)
            self.last_step["bytes_to_device"] += nbytes

    def _store(self, chunks: list[Chunk], slot: int) -> None:
        for host, dev, nbytes in self._pairs(chunks, slot):
            host.copy_(dev, non_blocking=True)
            self.last_step["bytes_to_host"] += nbytes

    def _views(self, chunk: Chunk, slot: int) -> dict[str, torch.Tensor]:
        buffer = self._buffers[slot]
        dtypes = {f.name: f.dtype for f in self.states[chunk.key].fields}
        return {
            seg.name: buffer[seg.offset:seg.offset + seg.nbytes].view(dtypes[seg.name]) for seg in chunk.segments
        }

    def report(self) -> dict:
        out = super().report()
        out["device_bytes_allocated"] = sum(b.numel() for b in self._buffers)
        return out


# --- CUDA managed memory ------------------------------------------------------------------------------

_CUDA_CPU_DEVICE_ID = -1
_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
_ADVISE_PREFERRED_LOCATION = 3  # cudaMemAdviseSetPreferredLocation
_ADVISE_ACCESSED_BY = 5  # cudaMemAdviseSetAccessedBy
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
        if device == _CUDA_CPU_DEVICE_ID:
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


class _ManagedAllocation:
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


class UnifiedPager(Pager):
    """State in CUDA managed memory, prefetched to the GPU page by page and read in place by the kernels."""

    backend = "unified"

    def __init__(self, device: torch.device, page_size: int, num_pages: int):
        if device.type != "cuda":
            raise ValueError(f"paging='unified' needs CUDA parameters, got parameters on {device}")
        super().__init__(device, page_size, num_pages)
        self.runtime = CudaRuntime.get()
        self.ordinal = device.index if device.index is not None else torch.cuda.current_device()

    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        alloc = _ManagedAllocation(self.runtime, count, dtype)
        # Home on the host; the GPU keeps a mapping so a page evicted early is still reachable.
        self.runtime.advise(alloc.ptr, alloc.nbytes, _ADVISE_PREFERRED_LOCATION, _CUDA_CPU_DEVICE_ID)
        self.runtime.advise(alloc.ptr, alloc.nbytes, _ADVISE_ACCESSED_BY, self.ordinal)
        tensor = torch.as_tensor(alloc, device=self.device)
        tensor.zero_()
        torch.cuda.synchronize(self.device)
        return tensor

    def _ranges(self, chunks: list[Chunk]):
        for chunk in chunks:
            tensors = self.states[chunk.key].tensors
            for seg in chunk.segments:
                t = tensors[seg.name]
                yield t.data_ptr() + seg.lo * t.element_size(), seg.nbytes

    def _evicting(self) -> bool:
        """Under pressure: the paged state does not fit the device budget, so pages go back after use."""
        return sum(st.nbytes for st in self.states.values()) > self.page_size * self.num_pages

    def _load(self, chunks: list[Chunk], slot: int) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for ptr, nbytes in self._ranges(chunks):
            self.runtime.prefetch(ptr, nbytes, self.ordinal, stream)
            self.last_step["bytes_to_device"] += nbytes

    def _store(self, chunks: list[Chunk], slot: int) -> None:
        if not self._evicting():
            return
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for ptr, nbytes in self._ranges(chunks):
            self.runtime.prefetch(ptr, nbytes, _CUDA_CPU_DEVICE_ID, stream)
            self.last_step["bytes_to_host"] += nbytes

    def _views(self, chunk: Chunk, slot: int) -> dict[str, torch.Tensor]:
        tensors = self.states[chunk.key].tensors
        return {seg.name: tensors[seg.name][seg.lo:seg.hi] for seg in chunk.segments}
