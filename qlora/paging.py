"""The paging engine of the paged optimizers: optimizer state kept outside GPU memory, streamed in pages.

Each paged parameter's state is cut into chunks starting at multiples of 256 elements and packed into fixed-size
pages (:class:`PagePlan`); a step walks the pages holding a parameter with a gradient and hands their chunks to the
step kernels as device views. Pages stay cached on the device and leave it only when the budget (``num_pages``, or
``BUDGET_FRACTION`` of free device memory plus the cache) needs room, least recently used first. Back ends:
:class:`HostPager` (pinned host memory and device page buffers; with CPU tensors the same logic runs synchronously,
which is how it is tested without a GPU) and :class:`UnifiedPager` (CUDA managed memory through
:mod:`qlora.cuda_runtime`, prefetched page by page). A paged step equals a resident one bit for bit. Layout
decisions: ``docs/DESIGN.md`` ("Optimizers", Paging).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .cuda_runtime import ADVISE_ACCESSED_BY, ADVISE_PREFERRED_LOCATION, CPU_DEVICE_ID, CudaRuntime, ManagedAllocation

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


StepFn = Callable[[list[tuple[int, int, int, dict[str, torch.Tensor]]]], None]
"""``fn(chunks)``: run the step for every ``(key, start, stop, views)`` of ``chunks``: elements ``[start, stop)``
of parameter ``key``, ``views`` mapping each field name to a flat device tensor holding that chunk's entries.
One call per batch of pages on the device, so its chunks can share launches."""


BUDGET_FRACTION = 0.5  # of (free device memory + what the page cache holds), when no page count is given


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``cudaMemGetInfo`` on CUDA; on the CPU (the interpreter's "device") the
    kernel's MemAvailable, else free physical pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class Pager(ABC):
    """Common logic of the back ends: the plan, the device page cache, the page walk, the byte counters.

    Pages stay on the device between steps (bitsandbytes' semantics): a step prefetches the pages it needs that
    are not there yet, and a page leaves the device only when room is needed for another one (least recently used
    first). The device budget is ``num_pages`` pages when given, else it follows free device memory: at each step
    ``BUDGET_FRACTION`` of (free memory + what the cache holds), at least two pages. A step whose pages all fit
    moves 0 bytes once they are on the device.
    """

    backend = ""

    def __init__(self, device: torch.device, page_size: int, num_pages: int | None):
        self.device = device
        self.page_size = page_size
        self.num_pages = num_pages
        self.plan = PagePlan(page_size)
        self.states: dict[int, PagedState] = {}
        self.streams = _Streams(device)
        self.last_step = {"pages": 0, "bytes_to_device": 0, "bytes_to_host": 0}
        self.bytes_synchronized = 0  # written back to host by synchronize(), outside steps
        self._cached: OrderedDict[int, int] = OrderedDict()  # page -> slot, least recently used first
        self._dirty: set[int] = set()  # cached pages whose device copy is newer than the host one
        self._used_at: dict[int, object] = {}  # page -> event of the last compute that used it (CUDA)
        self._free_slots: list[int] = []
        self._num_slots = 0
        self._budget_pages = num_pages if num_pages is not None else 2

    # -- allocation ------------------------------------------------------------------------------
    def register(self, key: int, numel: int, fields: Sequence[FieldSpec]) -> PagedState:
        """Allocate the backing tensors of a parameter's state (zeroed) and append its chunks to the plan."""
        if key in self.states:
            raise ValueError(f"parameter {key} already has paged state")
        tensors = {f.name: self._allocate(f.count(numel), f.dtype) for f in fields}
        state = PagedState(key, numel, tuple(fields), tensors)
        state.chunks = self.plan.add(key, numel, fields)
        self.states[key] = state
        # A cached page the new chunks land in holds nothing of them: write it back and drop it.
        touched = {c.page for c in state.chunks} & set(self._cached)
        if touched:
            for page in touched:
                self._evict(page, count=False)
            self.streams.synchronize()
        return state

    @abstractmethod
    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed flat tensor of ``count`` entries in this back end's state memory."""

    # -- the device cache ------------------------------------------------------------------------
    def budget_pages(self) -> int:
        """Pages the device may hold now: ``num_pages``, or the share of free device memory (at least 2)."""
        if self.num_pages is not None:
            return self.num_pages
        held = len(self._cached) * self.page_size
        return max(2, int((free_device_bytes(self.device) + held) * BUDGET_FRACTION) // self.page_size)

    def _evict(self, page: int, count: bool = True) -> int:
        """Take ``page`` off the device (writing it back if needed); returns its slot."""
        s = self.streams
        slot = self._cached.pop(page)
        event = self._used_at.pop(page, None)
        if event is not None:
            s.wait(s.download, event)
        with s.on(s.download):
            moved = self._store(self.plan.pages[page], slot, page in self._dirty)
        self._dirty.discard(page)
        if count:
            self.last_step["bytes_to_host"] += moved
        else:
            self.bytes_synchronized += moved
        self._free_slots.append(slot)
        return slot

    def _ensure(self, page: int, pinned: set[int], budget: int) -> None:
        """Bring ``page`` to the device unless it is there, evicting the least recently used unpinned page when
        the budget is full."""
        if page in self._cached:
            self._cached.move_to_end(page)
            return
        s = self.streams
        if len(self._cached) >= budget:
            victim = next(p for p in self._cached if p not in pinned)
            self._evict(victim)
            s.wait(s.upload, s.record(s.download))
        if not self._free_slots:
            self._free_slots.append(self._new_slot(self._num_slots))
            self._num_slots += 1
        slot = self._free_slots.pop()
        with s.on(s.upload):
            self.last_step["bytes_to_device"] += self._load(self.plan.pages[page], slot)
        self._cached[page] = slot

    def _new_slot(self, index: int) -> int:
        """Make device slot ``index`` usable (a page buffer for the host back end); returns it."""
        return index

    def invalidate(self) -> None:
        """Write every cached page back and drop it (after the host state was rewritten, e.g. by a load)."""
        for page in list(self._cached):
            self._evict(page, count=False)
        self.streams.synchronize()

    # -- the step --------------------------------------------------------------------------------
    def run(self, active: Iterable[int], fn: StepFn, meanwhile: Callable[[], None] | None = None) -> None:
        """Run ``fn`` on the chunks of the ``active`` parameters, in plan order, a batch of pages at a time.

        When every page the step needs fits the budget they form one batch (one ``fn`` call); otherwise batches
        of half the budget, so one batch uploads while the previous computes. ``meanwhile`` runs on the compute
        stream once the first batch's uploads are queued (the resident parameters' steps), overlapping them.
        """
        active = set(active)
        pages = [k for k, chunks in enumerate(self.plan.pages) if any(c.key in active for c in chunks)]
        s = self.streams
        self.last_step = {"pages": len(pages), "bytes_to_device": 0, "bytes_to_host": 0}
        budget = self._budget_pages = self.budget_pages()
        while len(self._cached) > budget:  # the budget shrank: give the oldest pages back
            self._evict(next(iter(self._cached)))
        if s.cuda:
            # This step's uploads read host state that earlier write-backs wrote.
            s.upload.wait_stream(s.download)
        size = len(pages) if len(pages) <= budget else max(1, budget // 2)
        batches = [pages[i:i + size] for i in range(0, len(pages), size)]
        compute = s.compute()
        for b, batch in enumerate(batches):
            pinned = set(batch)
            for page in batch:
                self._ensure(page, pinned, budget)
            loaded = s.record(s.upload)
            if b == 0 and meanwhile is not None:
                meanwhile()
            s.wait(compute, loaded)
            fn([(c.key, c.start, c.stop, self._views(c, self._cached[page]))
                for page in batch for c in self.plan.pages[page] if c.key in active])
            done = s.record(compute)
            for page in batch:
                self._dirty.add(page)
                self._used_at[page] = done
        if not batches and meanwhile is not None:
            meanwhile()

    def synchronize(self) -> None:
        """Write every page the device changed back to its host state and wait until every copy has landed (call
        before reading or writing the host tensors; pages stay on the device)."""
        s = self.streams
        for page in list(self._dirty):
            event = self._used_at.get(page)
            if event is not None:
                s.wait(s.download, event)
            with s.on(s.download):
                self.bytes_synchronized += self._store(self.plan.pages[page], self._cached[page], True)
        self._dirty.clear()
        s.synchronize()

    @abstractmethod
    def _load(self, chunks: list[Chunk], slot: int) -> int:
        """Queue (on the current stream) what brings these chunks to the device in ``slot``; returns the bytes."""

    @abstractmethod
    def _store(self, chunks: list[Chunk], slot: int, dirty: bool) -> int:
        """Queue (on the current stream) what takes these chunks off the device from ``slot`` (back to the host
        when ``dirty``); returns the bytes moved."""

    @abstractmethod
    def _views(self, chunk: Chunk, slot: int) -> dict[str, torch.Tensor]:
        """Device views of the chunk's field slices, as loaded in ``slot``."""

    # -- report ----------------------------------------------------------------------------------
    def report(self) -> dict:
        return {
            "backend": self.backend,
            "page_size": self.page_size,
            "num_pages": self.num_pages,
            "device_budget_bytes": self.page_size * self._budget_pages,
            "paged_tensors": len(self.states),
            "paged_state_bytes": sum(st.nbytes for st in self.states.values()),
            "plan_pages": len(self.plan.pages),
            "cached_pages": len(self._cached),
            "last_step": dict(self.last_step),
            "bytes_synchronized_to_host": self.bytes_synchronized,
        }


class HostPager(Pager):
    """State in host memory (pinned when the device is CUDA), cached on the device in page buffers."""

    backend = "host"

    def __init__(self, device: torch.device, page_size: int, num_pages: int | None):
        super().__init__(device, page_size, num_pages)
        self._buffers: list[torch.Tensor] = []

    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(count, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _new_slot(self, index: int) -> int:
        buffer = torch.empty(self.page_size, dtype=torch.uint8, device=self.device)
        if self.streams.cuda:  # used on the side streams too: keep it alive until they are done
            buffer.record_stream(self.streams.upload)
            buffer.record_stream(self.streams.download)
        self._buffers.append(buffer)
        return index

    def _pairs(self, chunks: list[Chunk], slot: int):
        buffer = self._buffers[slot]
        for chunk in chunks:
            tensors = self.states[chunk.key].tensors
            for seg in chunk.segments:
                host = tensors[seg.name][seg.lo:seg.hi]
                yield host, buffer[seg.offset:seg.offset + seg.nbytes].view(host.dtype), seg.nbytes

    def _load(self, chunks: list[Chunk], slot: int) -> int:
        moved = 0
        for host, dev, nbytes in self._pairs(chunks, slot):
            dev.copy_(host, non_blocking=True)
            moved += nbytes
        return moved

    def _store(self, chunks: list[Chunk], slot: int, dirty: bool) -> int:
        if not dirty:  # the host copy is current: dropping the page moves nothing
            return 0
        moved = 0
        for host, dev, nbytes in self._pairs(chunks, slot):
            host.copy_(dev, non_blocking=True)
            moved += nbytes
        return moved

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


class UnifiedPager(Pager):
    """State in CUDA managed memory, prefetched to the GPU page by page and read in place by the kernels."""

    backend = "unified"

    def __init__(self, device: torch.device, page_size: int, num_pages: int | None):
        if device.type != "cuda":
            raise ValueError(f"paging='unified' needs CUDA parameters, got parameters on {device}")
        super().__init__(device, page_size, num_pages)
        self.runtime = CudaRuntime.get()
        self.ordinal = device.index if device.index is not None else torch.cuda.current_device()

    def _allocate(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        alloc = ManagedAllocation(self.runtime, count, dtype)
        # Home on the host; the GPU keeps a mapping so a page evicted early is still reachable.
        self.runtime.advise(alloc.ptr, alloc.nbytes, ADVISE_PREFERRED_LOCATION, CPU_DEVICE_ID)
        self.runtime.advise(alloc.ptr, alloc.nbytes, ADVISE_ACCESSED_BY, self.ordinal)
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

    def _load(self, chunks: list[Chunk], slot: int) -> int:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        moved = 0
        for ptr, nbytes in self._ranges(chunks):
            self.runtime.prefetch(ptr, nbytes, self.ordinal, stream)
            moved += nbytes
        return moved

    def _store(self, chunks: list[Chunk], slot: int, dirty: bool) -> int:
        # Only evictions come here (see synchronize): the page goes back to its host home.
        stream = torch.cuda.current_stream(self.device).cuda_stream
        moved = 0
        for ptr, nbytes in self._ranges(chunks):
            self.runtime.prefetch(ptr, nbytes, CPU_DEVICE_ID, stream)
            moved += nbytes
        return moved

    def synchronize(self) -> None:
        """Wait for every queued prefetch and kernel: managed memory is coherent, pages stay where they are."""
        self._dirty.clear()
        self.streams.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def _views(self, chunk: Chunk, slot: int) -> dict[str, torch.Tensor]:
        tensors = self.states[chunk.key].tensors
        return {seg.name: tensors[seg.name][seg.lo:seg.hi] for seg in chunk.segments}
