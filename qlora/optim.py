"""AdamW optimizers on the Triton step kernels: 8-bit states, and states paged out of GPU memory.

:class:`AdamW8bit` (moments blockwise-quantized to 8 bits; tensors under ``min_8bit_size`` elements keep float32),
:class:`PagedAdamW` (float32 moments, paged by :mod:`qlora.paging`) and :class:`PagedAdamW8bit` (both) are
``torch.optim.Optimizer`` subclasses computing PyTorch's AdamW (decoupled decay) in float32 for float32, float16 or
bfloat16 parameters. The update, the 8-bit format and the NaN policy: ``docs/SPEC.md`` section 7; state names and
paging: ``docs/DESIGN.md`` ("Optimizers"). One launch per (step scalars, parameter dtype, gradient dtype, state
kind) covers every tensor under ``qlora.kernels.optim.MULTI_TENSOR_MAX_NUMEL`` elements. Paged states live in host
or managed memory: call :meth:`synchronize` before reading ``optimizer.state`` directly on a GPU (``state_dict()``
does it). Sharded (DTensor) parameters step their local shard; their saved state: :mod:`qlora.distributed_optim`.
"""

from __future__ import annotations

import math
import sys
from itertools import chain
from typing import Any, Iterable

import torch

from ._dtensor import is_dtensor
from ._dtensor import local as _local
from .distributed_optim import local_saved_field, sharded_state
from .kernels import optim as _kernels
from .kernels._checks import FLOAT_DTYPES, check_backend_device
from .cuda_runtime import managed_supported
from .paging import MIN_PAGE_SIZE, PAGE_ALIGN, FieldSpec, HostPager, Pager, UnifiedPager

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

PAGING_MODES = ("auto", "unified", "host", "none")
DEFAULT_PAGE_SIZE = 8 << 20  # bytes
DEFAULT_NUM_PAGES = None  # the device budget follows free device memory (qlora.paging.BUDGET_FRACTION)
DEFAULT_MIN_PAGED_SIZE = 100_000  # elements, as bitsandbytes: smaller states are not worth a transfer
DEFAULT_MIN_8BIT_SIZE = 4096  # elements (SPEC 7)

FIELDS_32BIT = (FieldSpec("exp_avg", torch.float32), FieldSpec("exp_avg_sq", torch.float32))
FIELDS_8BIT = (
    FieldSpec("exp_avg_codes", torch.uint8),
    FieldSpec("exp_avg_absmax", torch.float32, _kernels.QBLOCK),
    FieldSpec("exp_avg_sq_codes", torch.uint8),
    FieldSpec("exp_avg_sq_absmax", torch.float32, _kernels.QBLOCK),
)
_FORMAT_NAMES = {
    FIELDS_32BIT: "32-bit (exp_avg, exp_avg_sq)",
    FIELDS_8BIT: "8-bit (exp_avg_codes/absmax, exp_avg_sq_codes/absmax)",
}


def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> tuple[float, float, float, float, float]:
    """Validated ``(lr, beta1, beta2, eps, weight_decay)``; ``where`` names the parameter group in messages."""
    lr = _number(f"lr{where}", lr)
    if lr < 0:
        raise ValueError(f"lr{where} must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = _number(f"betas[0]{where}", betas[0]), _number(f"betas[1]{where}", betas[1])
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}]{where} must be in [0, 1), got {b}")
    eps = _number(f"eps{where}", eps)
    if eps < 0:
        raise ValueError(f"eps{where} must be >= 0, got {eps}")
    weight_decay = _number(f"weight_decay{where}", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay{where} must be >= 0, got {weight_decay}")
    return lr, beta1, beta2, eps, weight_decay


# torch.optim.AdamW options these optimizers do not implement; a group (or a loaded state dict) asking for one is
# refused instead of stepping plain AdamW silently.
_UNSUPPORTED_OPTIONS = ("maximize", "amsgrad")


def _refuse_unsupported(options: dict, where: str = "") -> None:
    for name in _UNSUPPORTED_OPTIONS:
        value = options.get(name, False)
        if value is not False and value is not None:
            raise ValueError(f"{name}={value!r}{where} is not supported by these optimizers (plain AdamW only); "
                             f"use torch.optim.AdamW for {name}")


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _TritonAdamW(torch.optim.Optimizer):
    """Shared machinery: state layout per parameter, resident or paged storage, the step walk."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        optim_bits: int,
        paging: str,
        page_size: int,
        num_pages: int | None,
        min_paged_size: int,
        min_8bit_size: int,
        maximize: bool = False,
        amsgrad: bool = False,
    ):
        _refuse_unsupported({"maximize": maximize, "amsgrad": amsgrad})
        lr, beta1, beta2, eps, weight_decay = _hyperparameters(lr, betas, eps, weight_decay)
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {PAGING_MODES}, got {paging!r}")
        self._optim_bits = optim_bits
        self._paging = paging
        self._page_size = _count("page_size", page_size, MIN_PAGE_SIZE)
        if page_size % PAGE_ALIGN:
            raise ValueError(f"page_size must be a multiple of {PAGE_ALIGN} bytes, got {page_size}")
        # two at least: one computes while one moves; None: the budget follows free device memory
        self._num_pages = None if num_pages is None else _count("num_pages", num_pages, 2)
        self._min_paged_size = _count("min_paged_size", min_paged_size, 0)
        self._min_8bit_size = _count("min_8bit_size", min_8bit_size, 0)
        self._pagers: dict[torch.device, Pager] = {}
        self._resident: dict[int, dict[str, torch.Tensor]] = {}  # id(param) -> flat state tensors
        defaults = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- parameter groups ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (parameter group {len(self.param_groups) - 1})"
        try:
            _refuse_unsupported(group, where)
            _hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point() and not p.requires_grad:
                    # A frozen integer parameter (the NF4 weight of a QLoRALinear in uint8 storage) never has a
                    # gradient, so it is never stepped: accepted, so that model.parameters() can be passed as is.
                    continue
                if not p.is_floating_point() or p.dtype not in FLOAT_DTYPES:
                    raise TypeError(
                        f"params must be float32, float16 or bfloat16 tensors; parameter {i} of group "
                        f"{len(self.param_groups) - 1} has dtype {str(p.dtype).replace('torch.', '')}"
                    )
                if self._paging == "unified" and p.device.type != "cuda":
                    raise ValueError(
                        f"paging='unified' needs CUDA parameters; parameter {i} of group "
                        f"{len(self.param_groups) - 1} is on {p.device}"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # -- layout ----------------------------------------------------------------------------------
    def _fields(self, p: torch.Tensor) -> tuple[FieldSpec, ...]:
        if self._optim_bits == 8 and p.numel() >= self._min_8bit_size:
            return FIELDS_8BIT
        return FIELDS_32BIT

    def _pager(self, device: torch.device) -> Pager | None:
        """The pager of ``device`` (created on first use), or None where ``paging="none"``."""
        if self._paging == "none":
            return None
        if device not in self._pagers:
            backend = self._paging
            if backend == "auto":
                backend = "unified" if managed_supported(device) else "host"
            cls = UnifiedPager if backend == "unified" else HostPager
            self._pagers[device] = cls(device, self._page_size, self._num_pages)
        return self._pagers[device]

    def _storage(self, p: torch.Tensor, create: bool) -> dict[str, torch.Tensor] | None:
        """Flat state tensors of ``p`` (paged or resident), sized for its local shard when it is a DTensor; zeroed
        fresh ones when ``create``."""
        key = id(p)
        for pager in self._pagers.values():
            if key in pager.states:
                return pager.states[key].tensors
        if key in self._resident:
            return self._resident[key]
        if not create:
            return None
        fields = self._fields(p)
        n = _local(p).numel()
        pager = self._pager(p.device) if n and n >= self._min_paged_size else None
        if pager is not None:
            return pager.register(key, n, fields).tensors
        tensors = {f.name: torch.zeros(f.count(n), dtype=f.dtype, device=p.device) for f in fields}
        self._resident[key] = tensors
        return tensors

    def _attach(self, p: torch.Tensor, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Expose the flat storage in ``self.state[p]``: element fields in the shape of ``p`` (of its local shard
        when it is a DTensor), absmax flat."""
        state = {"step": step}
        shape = _local(p).shape
        for f in self._fields(p):
            t = tensors[f.name]
            state[f.name] = t.view(shape) if f.unit == 1 else t
        self.state[p] = state

    def _init_state(self, p: torch.Tensor) -> None:
        tensors = self._storage(p, create=True)
        for f in self._fields(p):
            tensors[f.name].fill_(_kernels.zero_code(f.name == "exp_avg_codes") if f.dtype == torch.uint8 else 0)
        self._attach(p, tensors, 0)

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient; returns ``closure()``'s loss if given.

        Tensors are stepped in few launches: one per (step scalars, parameter dtype, gradient dtype, state kind)
        over all small tensors (pointer tables, :func:`qlora.kernels.optim._adamw_multi`), one per tensor of at
        least ``MULTI_TENSOR_MAX_NUMEL`` elements; paged state one such launch per batch of pages on the device.
        The step scalars are computed once per (hyperparameters, step count).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_hps, scalars = self._check_step()
        dtensor_module = sys.modules.get("torch.distributed.tensor")
        dtensor = dtensor_module.DTensor if dtensor_module is not None else None
        work = []  # (param, local grad, hyperparameters), all validated before any state changes
        for gi, (group, hp) in enumerate(zip(self.param_groups, group_hps, strict=True)):
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                    f"(parameter {pi} of group {gi})")
                if grad.shape != p.shape or grad.dtype not in FLOAT_DTYPES or grad.device != p.device:
                    raise ValueError(
                        f"grad of parameter {pi} of group {gi} must be a float tensor of the parameter's shape "
                        f"{tuple(p.shape)} on {p.device}, got {str(grad.dtype).replace('torch.', '')} "
                        f"{tuple(grad.shape)} on {grad.device}"
                    )
                if dtensor is not None and (isinstance(p, dtensor) or isinstance(grad, dtensor)):
                    if isinstance(p, dtensor) != isinstance(grad, dtensor) or (
                            tuple(grad.placements) != tuple(p.placements)):
                        want, got = (getattr(t, "placements", "a plain tensor") for t in (p, grad))
                        raise ValueError(f"grad of parameter {pi} of group {gi} must be sharded like the parameter "
                                         f"({want}), got {got}")
                    grad = grad.to_local()
                check_backend_device(f"parameter {pi} of group {gi}", p)
                work.append((p, grad, hp))
        state = self.state
        resident, paged = [], {}
        for item in work:
            p = item[0]
            st = state[p]
            if not st:
                self._init_state(p)
                st = state[p]
            st["step"] += 1
            if id(p) in self._resident:
                resident.append(item)
            else:
                paged[id(p)] = item
        flats: list[_FlatParam] = []

        def step_resident():
            batch = _LaunchBatch(scalars)
            for p, grad, hp in resident:
                local = _local(p)
                if not local.is_contiguous():
                    flat = _FlatParam(local)
                    flats.append(flat)
                    local = flat.flat
                batch.add(local, grad, self._resident[id(p)], 0, local.numel(), state[p]["step"], hp)
            batch.launch()

        by_device: dict[torch.device, dict] = {}
        for key, item in paged.items():
            by_device.setdefault(item[0].device, {})[key] = item
        if not by_device:
            step_resident()
        for i, (device, items) in enumerate(by_device.items()):
            locals_ = {}
            for key, (p, grad, _) in items.items():
                local = _local(p)
                if not local.is_contiguous():
                    flat = _FlatParam(local)
                    flats.append(flat)
                    local = flat.flat
                locals_[key] = (local, grad.contiguous())

            def step_pages(chunks, items=items, locals_=locals_):
                batch = _LaunchBatch(scalars)
                for key, start, stop, views in chunks:
                    p, _, hp = items[key]
                    local, grad = locals_[key]
                    batch.add(local, grad, views, start, stop, state[p]["step"], hp)
                batch.launch()

            self._pagers[device].run(items.keys(), step_pages, meanwhile=step_resident if i == 0 else None)
        for flat in flats:
            flat.write_back()
        return loss

    def _check_step(self) -> tuple[list[tuple], dict[tuple, _kernels.StepScalars]]:
        """Refuse, before a step changes anything, what would make it fail part-way: every group's hyperparameters,
        the float32 step scalars each group's parameters would use at their next step count (an ``lr`` or ``eps``
        that overflows float32 only shows there), and each stepped parameter's ``step`` counter. So a step that
        raises leaves every parameter and every state as it was. (Gradients are checked by ``step`` itself, also
        before any change.) Returns what the step uses, so it validates nothing twice: each group's validated
        ``(lr, beta1, beta2, eps, weight_decay)`` and the step scalars keyed by ``(hyperparameters, step)``."""
        group_hps, scalars = [], {}
        for gi, group in enumerate(self.param_groups):
            where = f" (parameter group {gi})"
            _refuse_unsupported(group, where)
            hp = _hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where)
            group_hps.append(hp)
            next_steps = set()
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if not state:
                    next_steps.add(1)
                    continue
                step = state.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise ValueError(f"state of parameter {pi} of group {gi}: step must be an int >= 0, got "
                                     f"{step!r}")
                next_steps.add(step + 1)
            for step in sorted(next_steps):
                try:
                    scalars[(hp, step)] = _kernels.step_scalars(step, *hp)
                except ValueError as err:
                    raise ValueError(f"{err}{where} at step {step}") from None
        return group_hps, scalars

    # -- paging ----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every queued page copy, so host-backed state tensors hold the latest values."""
        for pager in self._pagers.values():
            pager.synchronize()

    def memory_report(self) -> dict[str, Any]:
        """Where the optimizer state lives and what paging moved in the last step.

        Keys: ``paging`` (as requested), ``page_size``, ``num_pages``, ``device_budget_bytes`` (page count
        times page size: the most device memory paged state occupies, per device), ``resident_tensors``,
        ``resident_state_bytes`` (state kept in device memory), ``paged_tensors``, ``paged_state_bytes``
        (state kept in host or managed memory), and ``devices``: per device, its back end (``"host"`` or
        ``"unified"``), its plan's page count, and ``last_step`` (pages walked, bytes moved each way).
        """
        devices = {str(device): pager.report() for device, pager in self._pagers.items()}
        return {
            "paging": self._paging,
            "page_size": self._page_size,
            "num_pages": self._num_pages,
            "device_budget_bytes": 0 if self._paging == "none" else (
                self._page_size * self._num_pages if self._num_pages is not None
                else sum(r["device_budget_bytes"] for r in devices.values())),
            "resident_tensors": len(self._resident),
            "resident_state_bytes": sum(t.numel() * t.element_size() for ts in self._resident.values()
                                        for t in ts.values()),
            "paged_tensors": sum(r["paged_tensors"] for r in devices.values()),
            "paged_state_bytes": sum(r["paged_state_bytes"] for r in devices.values()),
            "devices": devices,
        }

    # -- state dict ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``; the state of a sharded (DTensor) parameter as DTensors (see the
        module docstring), so that ``torch.distributed.checkpoint`` saves every rank's shard."""
        self.synchronize()
        out = super().state_dict()
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, p in enumerate(params):  # super() numbers parameters in this order
            if is_dtensor(p) and index in out["state"]:
                out["state"][index] = sharded_state(p, out["state"][index], self._fields(p))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by an optimizer with the same parameter layout (groups, parameter counts
        per group, shapes, and 8-bit/32-bit state per parameter); continues bit for bit. A state dict of
        ``torch.optim.AdamW`` loads into a 32-bit optimizer (its moments are widened to float32), unless it was
        saved with ``maximize`` or ``amsgrad``. Values are checked too: 8-bit block scales must be finite and
        >= 0, float32 second moments >= 0. Anything else is refused with ValueError/TypeError naming the group,
        parameter and field, before this optimizer changes."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has a different parameter layout: {len(saved_groups)} parameter group(s), this "
                f"optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict has a different parameter layout: group {gi} holds {len(saved['params'])} "
                    f"parameter(s), this optimizer's holds {len(group['params'])}"
                )
            if not isinstance(saved, dict):
                raise TypeError(f"saved parameter group {gi} must be a dict, got {type(saved).__name__}")
            _refuse_unsupported(saved, f" (saved parameter group {gi})")
            _hyperparameters(saved.get("lr"), saved.get("betas"), saved.get("eps"), saved.get("weight_decay"),
                             f" (saved parameter group {gi})")
        params = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        index = {pid: i for i, pid in enumerate(params)}
        loaded = {}
        for pid, saved in state_dict["state"].items():
            if pid not in params:
                raise ValueError(f"state_dict has state for parameter id {pid!r}, which no saved group lists")
            loaded[pid] = self._check_saved_state(params[pid], saved, index[pid])
        self.synchronize()
        for pager in self._pagers.values():  # the host state is rewritten below: drop the device copies
            pager.invalidate()
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for pid, (step, values) in loaded.items():
            p = params[pid]
            tensors = self._storage(p, create=True)
            for name, value in values.items():
                tensors[name].copy_(value.reshape(-1))
            self._attach(p, tensors, step)

    def _check_saved_state(self, p: torch.Tensor, saved, index: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Validate one parameter's saved state against ``p``; return ``(step, {field: tensor})``."""
        where = f"state of parameter {index}"
        if not isinstance(saved, dict):
            raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
        fields = self._fields(p)
        expected = {"step"} | {f.name for f in fields}
        if set(saved) != expected:
            got = "8-bit" if "exp_avg_codes" in saved else "32-bit" if "exp_avg" in saved else "unknown"
            raise ValueError(
                f"state_dict has a different parameter layout: {where} (shape {tuple(p.shape)}) holds {got} "
                f"state with keys {sorted(saved)}, this optimizer keeps {_FORMAT_NAMES[fields]} state for it"
            )
        step = saved["step"]
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an int >= 0, got {saved['step']!r}")
        values = {}
        local = _local(p)
        for f in fields:
            t = saved[f.name]
            name = f"{where}: {f.name}"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            shape = tuple(local.shape) if f.unit == 1 else (f.count(local.numel()),)
            t = local_saved_field(p, t, f, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"state_dict has a different parameter layout: {name} has shape "
                                 f"{tuple(t.shape)}, expected {shape}")
            if f.dtype == torch.float32 and f.unit == 1:
                if t.dtype not in FLOAT_DTYPES:  # float16/bfloat16 moments (torch AdamW) widen exactly
                    raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
            elif t.dtype != f.dtype:
                raise TypeError(f"{name} must have dtype {f.dtype}, got {t.dtype}")
            _check_saved_values(name, f.name, t)
            values[f.name] = t
        return step, values


def _check_saved_values(name: str, field: str, t: torch.Tensor) -> None:
    """Values a saved state field can never hold (one reduction per field, at load only): an 8-bit block scale
    that is negative, infinite or NaN (the step would decode every moment of its block from it), or a negative
    float32 second moment (its square root is taken). NaN float32 moments are left alone, as torch.optim.AdamW's
    state may hold them after NaN gradients."""
    if t.numel() == 0:
        return
    if field.endswith("_absmax"):
        local = _local(t)
        bad = ~(torch.isfinite(local) & (local >= 0))
        if bool(bad.any()):
            value = local[bad][0].item()
            raise ValueError(f"{name} must hold finite scales >= 0, got {value} at index "
                             f"{int(bad.nonzero()[0][0])}")
    elif field == "exp_avg_sq":
        local = _local(t)
        negative = local < 0
        if bool(negative.any()):
            raise ValueError(f"{name} must be >= 0 (a second moment), got {local[negative][0].item()}")


class _FlatParam:
    """A flat, contiguous view of a parameter for the kernels; a non-contiguous one is stepped on a copy
    that :meth:`write_back` copies into it."""

    def __init__(self, p: torch.Tensor):
        self.p = p
        self.copy = not p.is_contiguous()
        self.flat = (p.contiguous() if self.copy else p).detach().view(-1)

    def write_back(self) -> None:
        if self.copy:
            self.p.copy_(self.flat.view(self.p.shape))

    def __enter__(self) -> torch.Tensor:
        return self.flat

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            self.write_back()
        return False


class _LaunchBatch:
    """Collects (parameter slice, gradient slice, state views) and launches them grouped: one multi-tensor launch
    per (step scalars, parameter dtype, gradient dtype, state kind); a slice of at least
    ``MULTI_TENSOR_MAX_NUMEL`` elements gets its own single-tensor launch. ``scalars`` caches the step scalars
    per (hyperparameters, step count) across batches of one optimizer step."""

    def __init__(self, scalars: dict):
        self.scalars = scalars
        self.groups: dict[tuple, tuple[list[int], list[int]]] = {}
        self.keep: list[torch.Tensor] = []  # gradient copies the launches read

    def add(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], start: int, stop: int,
            step: int, hp: tuple) -> None:
        """Elements ``[start, stop)`` of the contiguous ``param`` and of ``grad`` (same shape), with ``state``
        the flat state tensors of exactly those elements."""
        n = stop - start
        if n <= 0:
            return
        if not grad.is_contiguous():
            grad = grad.contiguous()
            self.keep.append(grad)
        key_s = (hp, step)
        s = self.scalars.get(key_s)
        if s is None:
            lr, beta1, beta2, eps, weight_decay = hp
            s = self.scalars[key_s] = _kernels.step_scalars(step, lr, beta1, beta2, eps, weight_decay)
        eight_bit = "exp_avg" not in state
        if n >= _kernels.MULTI_TENSOR_MAX_NUMEL:
            flat_p, flat_g = param.view(-1)[start:stop], grad.view(-1)[start:stop]
            lr, beta1, beta2, eps, weight_decay = hp
            kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
            if eight_bit:
                _kernels.adamw8bit_step_(flat_p, flat_g, state["exp_avg_codes"], state["exp_avg_absmax"],
                                         state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], **kw)
            else:
                _kernels.adamw_step_(flat_p, flat_g, state["exp_avg"], state["exp_avg_sq"], **kw)
            return
        key = (s, param.dtype, grad.dtype, eight_bit, param.device)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = ([], [])
        rows, numels = group
        p_ptr = param.data_ptr() + start * param.element_size()
        g_ptr = grad.data_ptr() + start * grad.element_size()
        if eight_bit:
            rows += (p_ptr, g_ptr, state["exp_avg_codes"].data_ptr(), state["exp_avg_absmax"].data_ptr(),
                     state["exp_avg_sq_codes"].data_ptr(), state["exp_avg_sq_absmax"].data_ptr(), n)
        else:
            rows += (p_ptr, g_ptr, state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(), n)
        numels.append(n)

    def launch(self) -> None:
        for (s, p_dtype, g_dtype, eight_bit, device), (rows, numels) in self.groups.items():
            launch = _kernels._adamw8bit_multi if eight_bit else _kernels._adamw_multi
            launch(rows, tuple(numels), p_dtype, g_dtype, device, s)
        self.groups.clear()


class AdamW8bit(_TritonAdamW):
    """AdamW with 8-bit blockwise-quantized moments, all state resident on the parameters' device.

    ``params``: iterable of float32/float16/bfloat16 tensors or of parameter-group dicts (frozen integer tensors,
    such as the NF4 weight held as uint8 parameters, are accepted and never stepped). ``lr >= 0``, ``betas`` each
    in [0, 1), ``eps >= 0``, ``weight_decay >= 0`` (decoupled, as ``torch.optim.AdamW``; default 1e-2 as there).
    Tensors with fewer than ``min_8bit_size`` elements keep float32 moments. ``maximize`` and ``amsgrad`` are
    ``torch.optim.AdamW``'s options; only False is supported (True is refused, here or in a parameter group).
    A step that raises (hyperparameters that overflow float32, a bad gradient) changes no parameter and no state.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
                 maximize: bool = False, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paging="none",
                         page_size=DEFAULT_PAGE_SIZE, num_pages=DEFAULT_NUM_PAGES,
                         min_paged_size=DEFAULT_MIN_PAGED_SIZE, min_8bit_size=min_8bit_size, maximize=maximize,
                         amsgrad=amsgrad)


class PagedAdamW(_TritonAdamW):
    """AdamW with float32 moments paged out of device memory (``paging="none"``: all resident).

    ``paging``: ``"auto"``, ``"unified"``, ``"host"`` or ``"none"``. ``page_size``: bytes per page (>= 4096,
    a multiple of 128); ``num_pages``: device pages (>= 2); the device memory of paged state is at most
    ``page_size * num_pages``. Tensors with fewer than ``min_paged_size`` elements stay resident.
    Hyperparameters as :class:`AdamW8bit`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, paging: str = "auto", *,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = DEFAULT_NUM_PAGES,
                 min_paged_size: int = DEFAULT_MIN_PAGED_SIZE, maximize: bool = False, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=32, paging=paging, page_size=page_size,
                         num_pages=num_pages, min_paged_size=min_paged_size, min_8bit_size=0, maximize=maximize,
                         amsgrad=amsgrad)


class PagedAdamW8bit(_TritonAdamW):
    """AdamW with 8-bit moments (as :class:`AdamW8bit`) paged out of device memory (as :class:`PagedAdamW`)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, paging: str = "auto", *,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = DEFAULT_NUM_PAGES,
                 min_paged_size: int = DEFAULT_MIN_PAGED_SIZE, min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
                 maximize: bool = False, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paging=paging, page_size=page_size,
                         num_pages=num_pages, min_paged_size=min_paged_size, min_8bit_size=min_8bit_size,
                         maximize=maximize, amsgrad=amsgrad)
