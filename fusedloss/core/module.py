"""What every loss module shares: its float64 tables (buffers) and its cache of call plans."""

from __future__ import annotations

import copy as copy_module

import torch
from torch import nn

from .. import backends
from . import checks, distributed


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in backends.BACKENDS)}; got {backend!r}")
    return backend


def meta(x):
    """What validating a call looks at in one input: its type, shape, dtype and device (an
    AttributeError for an object that is not a tensor)."""
    return None if x is None else (type(x), x.shape, x.dtype, x.device)


class FusedLoss(nn.Module):
    """What every loss module shares: its float64 tables (buffers) and its cache of call plans.

    A plan (``functional.*_plan``) is a call's validation and backend choice, done once per
    signature of the inputs (``meta`` of each) and kept, so that an eager training step runs
    little more Python than the operator call. Under torch.compile nothing is cached: the plan is
    made while tracing, once. A changed setting, ``.to()``/``.cuda()``/``.half()`` and the like
    drop the plans.
    """

    _TABLES: tuple[str, ...] = ()  # float64 buffers the kernels read
    _MAX_PLANS = 64  # e.g. one per sequence length; beyond that the cache starts afresh

    def __init__(self, process_group=None) -> None:
        super().__init__()
        self._plans: dict = {}
        self.process_group = process_group

    def __setattr__(self, name, value):
        setting = getattr(type(self), name, None)
        if isinstance(setting, Setting):  # (before nn.Module looks at the value: a Parameter is no setting)
            setting.__set__(self, value)
            return
        if name == "process_group":  # None (the local batch) or a torch.distributed group (docs/losses.md §5)
            value = distributed.check_group(value)
        # A new backend, configuration, group or table (buffer) invalidates the plans made with the old.
        plans = self.__dict__.get("_plans")
        if plans and (name in ("backend", "config", "process_group") or name in self._TABLES):
            plans.clear()
        super().__setattr__(name, value)

    def __getstate__(self):
        # Plans hold closures over this module's tables: a copy (pickle, deepcopy) makes its own.
        state = super().__getstate__()
        return {**state, "_plans": {}}

    def __deepcopy__(self, memo):
        # A process group is a handle on the processes, not data: a deep copy shares it.
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        cls = type(self)
        copy = cls.__new__(cls)
        memo[id(self)] = copy
        copy.__setstate__(copy_module.deepcopy(self.__getstate__(), memo))
        return copy

    def _cached(self, *inputs):
        """(key, cached plan or None) of a call on ``inputs``; no key while torch.compile traces or
        for an input that is not a tensor (the plan made then says what is wrong)."""
        if torch.compiler.is_compiling():
            return None, None
        try:
            key = tuple(map(meta, inputs))
        except AttributeError:
            return None, None
        return key, self._plans.get(key)

    def _remember(self, key, run):
        if key is not None and not torch.compiler.is_compiling():
            plans = self._plans
            if len(plans) >= self._MAX_PLANS:
                plans.clear()
            plans[key] = run
        return run

    def _apply(self, fn, recurse=True):
        tables = {name: getattr(self, name) for name in self._TABLES}
        out = super()._apply(fn, recurse)
        # The tables follow the device but stay float64 (and exact) whatever a module's .half() or
        # .to(dtype) does to its buffers.
        for name, table in tables.items():
            moved = getattr(self, name)
            if table is not None and moved is not None and moved.dtype != torch.float64:
                setattr(self, name, table.to(moved.device))
        self._plans.clear()
        return out


def buffers_on(module: nn.Module, names: tuple[str, ...], device: torch.device) -> list[torch.Tensor | None]:
    """The module's buffers on ``device``. A module left on another device moves them there for
    good on its first (eager) call, with asynchronous copies."""
    out = [getattr(module, name) for name in names]
    for i, (name, buffer) in enumerate(zip(names, out)):
        if buffer is not None and buffer.device != device:
            out[i] = buffer.to(device, non_blocking=True)
            if not torch.compiler.is_compiling():  # (not setattr: the plans made before keep their tables)
                module.register_buffer(name, out[i], persistent=False)
    return out


class Setting:
    """A runtime setting of a loss module (a term weight, the threshold, the margin): the one way
    to read and change one (``loss_fn.temporal_weight = 0.3``). Reading gives the module's
    configuration value; assigning checks the value (a finite real number) and passes it to the
    module's ``_set_setting(name, value)``, which writes the slot of its float64 settings buffer in
    place, so nothing is rebuilt or recompiled."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return module._get_setting(self.name)

    def __set__(self, module, value) -> None:
        module._set_setting(self.name, checks.real(self.name, value))
