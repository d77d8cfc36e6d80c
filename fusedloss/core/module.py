"""What every loss module shares: it is its configuration and its tables, nothing else.

  configuration  the constructor's arguments as Python values, read and assigned as attributes
                 and checked when assigned: the family's frozen config dataclass
                 (``module.config``) plus ``backend`` and ``process_group``
  tables         float64 tensors the kernels read: buffers, in the state dict. The numbers of the
                 configuration (``settings``: weights, threshold, margin; ``part_table``) and the
                 tables a user passes (``dim_ws``, ``landmark_matrix``). They follow ``.to(device)``
                 and stay float64 (exact) under ``.half()`` and ``.to(dtype)``.

Every way of changing a module lands in one of two places. An assignment goes through
``__setattr__``, which bumps the module's revision. A table that changes in place (an edit,
``.mul_()``) bumps its version counter, and one that is replaced (``.to()``, ``load_state_dict``)
has another identity. A call's plan (its validation and backend choice, ``functional.*_plan``) is
cached under the **state** ``(revision, identity and version of every table)`` and the inputs'
metadata, and the configuration is read back from a table whose identity or version is not the
one it was last read from. Nothing derived from a table or a setting can outlive a change: there
is no invalidation to remember. A changed value replaces its table with a new tensor (copy on
write), so a forward already made keeps the table it read, and its backward uses what it saw.

Under ``torch.compile`` nothing is cached: the plan is made while tracing, and the kernels read
the weights from the tables, so a changed weight recompiles nothing.
"""

from __future__ import annotations

import copy as copy_module
from typing import Literal

import torch
from torch import nn

from .. import backends
from . import checks, distributed

Backend = Literal["auto", "triton", "cuda", "cpu", "reference"]


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in backends.BACKENDS)}; got {backend!r}")
    return backend


class Plans(dict):
    """A module's cached plans ``{inputs' metadata: run}``, all made in one ``state`` of it. A copy
    of the module (deepcopy, pickle) starts with none."""

    state = None

    def __reduce__(self):
        return Plans, ()

    def __deepcopy__(self, memo):
        return Plans()


class FusedLoss(nn.Module):
    """The base of the loss modules: see the module docstring.

    A family's module declares its tables (``_TABLES``; ``_CONFIG_TABLES`` are those holding
    numbers of its configuration), how a configuration writes them (``_table_values``) and reads
    them back (``_config_with``), how an assigned table is checked (``_check_table``), and makes a
    call's plan from its current configuration and tables (``_make_plan``).
    """

    _version = 2  # state dicts of version 2 hold the tables; older ones (version 1) held none
    _TABLES: tuple[str, ...] = ()
    _CONFIG_TABLES: tuple[str, ...] = ()
    _MAX_PLANS = 64  # e.g. one per sequence length; beyond that the cache starts afresh

    def __init__(self, config, tables: dict, backend: str, process_group) -> None:
        super().__init__()
        self.__dict__.update(_revision=0, _plans=Plans(), _read={}, _config=config,
                             _backend=check_backend(backend), _process_group=distributed.check_group(process_group))
        for name in self._CONFIG_TABLES:
            table = torch.tensor(self._table_values(name, config), dtype=torch.float64)
            self.register_buffer(name, table)
            self._read[name] = (table, table._version)
        for name, value in tables.items():
            self.register_buffer(name, self._check_table(name, value))

    # -- what every module can change ---------------------------------------------------------

    @property
    def backend(self) -> str:
        """Which implementation runs the loss (``fusedloss.backends``); assignable."""
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value) -> None:
        self.__dict__["_backend"] = check_backend(value)

    @property
    def process_group(self):
        """None (the local batch) or a ``torch.distributed`` group (docs/losses.md §5); assignable."""
        return self.__dict__["_process_group"]

    @process_group.setter
    def process_group(self, value) -> None:
        self.__dict__["_process_group"] = distributed.check_group(value)

    @property
    def config(self):
        """The configuration (the family's frozen dataclass) as the tables hold it now. Assigning
        one sets every value of it."""
        return self._config_now()

    @config.setter
    def config(self, value) -> None:
        if not isinstance(value, type(self._config)):
            raise TypeError(f"config must be a {type(self._config).__name__}, got {type(value).__name__}")
        self._set_config(value)

    def __setattr__(self, name, value) -> None:
        if name in self._TABLES:
            value = self._check_table(name, value)
            if name in self._CONFIG_TABLES:
                config = self._config_with(name, value.tolist(), self._config_now())
                super().__setattr__(name, value)
                self.__dict__["_config"] = config
                self._read[name] = (value, value._version)
                self.__dict__["_revision"] += 1
                return
        super().__setattr__(name, value)
        self.__dict__["_revision"] += 1

    def _set_config(self, config) -> None:
        """Make ``config`` the configuration: the tables holding its numbers are replaced by new
        ones where a number changed (copy on write, on the tables' device)."""
        self._check_config(config)
        old = self._config_now()
        for name in self._CONFIG_TABLES:
            values = self._table_values(name, config)
            if values != self._table_values(name, old):
                table = torch.tensor(values, dtype=torch.float64).to(self._device(), non_blocking=True)
                self._buffers[name] = table
                self._read[name] = (table, table._version)
        self.__dict__["_config"] = config
        self.__dict__["_revision"] += 1

    def _config_now(self):
        """The configuration, read back first from any table that changed since it was read (an
        in-place edit, ``load_state_dict``, ``.to()``: one host read of a small table). Under
        torch.compile it is taken as it is, so that no weight becomes a constant of the graph."""
        if not torch.compiler.is_compiling():
            read = self._read
            for name in self._CONFIG_TABLES:
                table = self._buffers[name]
                seen = read.get(name)
                if seen is None or seen[0] is not table or seen[1] != table._version:
                    self.__dict__["_config"] = self._config_with(name, table.tolist(), self.__dict__["_config"])
                    read[name] = (table, table._version)
        return self.__dict__["_config"]

    def _device(self) -> torch.device:
        """The device of the tables (``.to()`` moves them)."""
        return self._buffers[self._CONFIG_TABLES[0]].device

    def _table_on(self, name: str, device: torch.device | None) -> torch.Tensor | None:
        """The table ``name`` on ``device``: for a module left on another device, an asynchronous
        copy, which the call's plan keeps."""
        value = self._buffers[name]
        if value is None or device is None or value.device == device:
            return value
        return value.to(device, non_blocking=True)

    # -- the cache of call plans --------------------------------------------------------------

    def _plan(self, *inputs):
        """The plan of a call on ``inputs`` (``_make_plan``), cached per state and per what validating
        the call looks at in each input: its type, shape, dtype and device (an AttributeError for
        an object that is not a tensor). Written out, as the state, since this runs at every call.
        A cached plan keeps the tables it was made with alive, so no identity in a cached state
        is reused by another tensor."""
        if torch.compiler.is_compiling():
            return self._make_plan(*inputs)
        plans = self.__dict__["_plans"]
        state = [self.__dict__["_revision"]]
        for table in self._buffers.values():
            if table is not None:
                state += (id(table), table._version)
        if plans.state != state:
            plans.clear()
            plans.state = state
        try:
            key = tuple([None if x is None else (type(x), x.shape, x.dtype, x.device) for x in inputs])
        except AttributeError:  # (not a tensor: the plan says what is wrong)
            return self._make_plan(*inputs)
        run = plans.get(key)
        if run is None:
            if len(plans) >= self._MAX_PLANS:
                plans.clear()
            run = plans[key] = self._make_plan(*inputs)
        return run

    # -- moves, copies, state dicts ------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        tables = dict(self._buffers)
        out = super()._apply(fn, recurse)
        # The tables follow the device but stay float64 (and exact) whatever .half() or .to(dtype)
        # does to the buffers.
        for name, table in tables.items():
            moved = self._buffers[name]
            if table is not None and moved is not None and moved.dtype != torch.float64:
                self._buffers[name] = table.to(moved.device)
        self.__dict__["_revision"] += 1
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state dict saved before the tables were in it (version 1) has none of them: the module
        # keeps its own. Tables are assigned (checked, converted, copy on write), not copied into.
        if (local_metadata.get("version") or 1) < 2:
            for name in self._TABLES:
                if self._buffers.get(name) is not None:
                    state_dict.setdefault(prefix + name, self._buffers[name])
        super()._load_from_state_dict(state_dict, prefix, {**local_metadata, "assign_to_params_buffers": True},
                                      strict, missing_keys, unexpected_keys, error_msgs)

    def __deepcopy__(self, memo):
        # A process group is a handle on the processes, not data: a deep copy shares it.
        group = self.__dict__.get("_process_group")
        if group is not None:
            memo[id(group)] = group
        cls = type(self)
        copy = cls.__new__(cls)
        memo[id(self)] = copy
        copy.__dict__.update(copy_module.deepcopy(self.__dict__, memo))
        return copy

    # -- what a family defines -----------------------------------------------------------------

    def _table_values(self, name: str, config):
        """The values (nested tuples) of the configuration table ``name`` for ``config``."""
        raise NotImplementedError

    def _config_with(self, name: str, values: list, config):
        """``config`` with the numbers the table ``name`` holds (``values``, its ``tolist()``)."""
        raise NotImplementedError

    def _check_table(self, name: str, value) -> torch.Tensor | None:
        """An assigned table, checked and made a float64 tensor on the tables' device."""
        raise NotImplementedError

    def _check_config(self, config) -> None:
        """Raise if ``config`` cannot go with the module's tables (e.g. a weight needing a table)."""

    def _make_plan(self, *inputs):
        raise NotImplementedError


def table(name: str, value, rank: int, shape_doc: str, device: torch.device) -> torch.Tensor:
    """A table a user passes: a float tensor (or array-like) of the given rank, as the module's own
    float64 copy on ``device``, with no autograd history."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor {shape_doc} (or an array-like), got {type(value).__name__}") from None
    checks.tensor(name, value, rank=rank, shape_doc=shape_doc)
    return value.detach().to(device=device, dtype=torch.float64, copy=True)


class ConfigValue:
    """An attribute that is a value of the configuration (a weight, the threshold, ``loss_type``):
    reading it reads ``module.config``; assigning it checks the value (``check(name, value)``)
    and sets a configuration with it (``module._set_config``). ``get(config, name)`` and
    ``replace(config, name, value)`` say where in the configuration it lives."""

    def __init__(self, check, get, replace) -> None:
        self.check, self.get, self.replace = check, get, replace

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return self.get(module._config_now(), self.name)

    def __set__(self, module, value) -> None:
        value = self.check(self.name, value)
        config = module._config_now()
        if value != self.get(config, self.name):
            module._set_config(self.replace(config, self.name, value))
