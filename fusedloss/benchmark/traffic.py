"""Global-memory traffic of the kernels, counted in 32-byte sectors, from the addresses they touch.

The addresses come from two places, both on the CPU:
  CUDA    the SIMT lane's trace build (tests/simt/trace.h, tests/simt/traffic.py): every load and
          store of the real .cu files, with its launch, block, thread, call site and occurrence;
  Triton  the Triton interpreter (``TritonTracer`` below): every ``tl.load``/``tl.store``/atomic,
          as the block of addresses and the mask the interpreter's builder receives.

``traffic_of`` turns accesses grouped into requests into the figures the model and the guard use:
  - unique sectors read and written: the DRAM traffic of the launch if the cache held its working
    set (each sector comes from DRAM once, each written sector goes back once);
  - sectors requested: for every request, the distinct sectors its active lanes touch; against the
    ideal, the fewest sectors that hold the distinct bytes it asks for (ceil(bytes / 32)).
A CUDA request is a warp's access at one call site (lanes of the warp at the same site and
occurrence). A Triton request is one program's ``tl.load``/``tl.store`` of a whole block: the
interpreter does not know how the compiler spreads the block over warps, so "sectors per request"
is per program there (a fully coalesced block gives 1.0x the ideal either way; a strided one shows
it either way).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SECTOR_BYTES = 32


def dense_ids(*keys: np.ndarray) -> np.ndarray:
    """A group number per row for equal tuples of ``keys`` (each a 1-D integer array)."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(keys[::-1])
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        ks = k[order]
        change[1:] |= ks[1:] != ks[:-1]
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.cumsum(change) - 1
    return ids


@dataclass
class Traffic:
    """Global-memory traffic of one launch (or of a sum of launches)."""

    read_bytes: int = 0             # bytes the active lanes load (every access counted)
    write_bytes: int = 0            # bytes they store
    read_sectors: int = 0           # distinct 32-byte sectors loaded
    write_sectors: int = 0          # distinct sectors stored
    load_requests: int = 0
    store_requests: int = 0
    load_sectors: int = 0           # sum over load requests of the distinct sectors each touches
    store_sectors: int = 0
    load_sectors_ideal: int = 0     # sum over load requests of ceil(distinct bytes / 32)
    store_sectors_ideal: int = 0
    masked_lanes: int = 0           # lanes a mask switched off (Triton)
    lanes: int = 0                  # lanes of every request, active or not (Triton)

    @property
    def dram_bytes(self) -> int:
        """Modelled DRAM bytes: each distinct sector read once and each written one written once."""
        return SECTOR_BYTES * (self.read_sectors + self.write_sectors)

    @property
    def requested_sectors(self) -> int:
        return self.load_sectors + self.store_sectors

    @property
    def ideal_sectors(self) -> int:
        return self.load_sectors_ideal + self.store_sectors_ideal

    @property
    def sectors_per_request(self) -> float:
        requests = self.load_requests + self.store_requests
        return self.requested_sectors / requests if requests else 0.0

    @property
    def ideal_per_request(self) -> float:
        requests = self.load_requests + self.store_requests
        return self.ideal_sectors / requests if requests else 0.0

    @property
    def excess(self) -> float:
        """Sectors requested over the ideal (1.0: every request fully coalesced)."""
        return self.requested_sectors / self.ideal_sectors if self.ideal_sectors else 1.0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def scaled(self, factor: float) -> Traffic:
        return Traffic(**{k: int(round(v * factor)) for k, v in asdict(self).items()})

    def summary(self) -> dict:
        return {**asdict(self), "dram_bytes": self.dram_bytes, "sectors_per_request": self.sectors_per_request,
                "ideal_per_request": self.ideal_per_request, "excess": self.excess}


def _sectors(address: np.ndarray, size: np.ndarray, request: np.ndarray):
    """(request, sector) of every sector an access touches (an access may straddle two)."""
    first = address // SECTOR_BYTES
    last = (address + size.astype(np.uint64) - 1) // SECTOR_BYTES
    straddles = last != first
    if np.any(last - first > 1):
        raise ValueError("an access spans more than two sectors")
    return np.concatenate([request, request[straddles]]), np.concatenate([first, last[straddles]])


def traffic_of(address: np.ndarray, size: np.ndarray, store: np.ndarray, request: np.ndarray) -> Traffic:
    """Traffic of accesses (address, size in bytes, store?) grouped by ``request`` ids (a request
    is all loads or all stores)."""
    address = np.asarray(address, dtype=np.uint64)
    size = np.asarray(size, dtype=np.int64)
    store = np.asarray(store, dtype=bool)
    request = np.asarray(request, dtype=np.int64)
    t = Traffic()
    for is_store in (False, True):
        sel = store == is_store
        a, s, r = address[sel], size[sel], request[sel]
        if len(a) == 0:
            continue
        rs, sec = _sectors(a, s, r)
        unique_sectors = len(np.unique(sec))
        pair = dense_ids(rs, sec.astype(np.int64))
        pairs = len(np.unique(pair))
        # Distinct bytes per request: distinct (request, address) accesses times their size.
        first = np.unique(dense_ids(r, a.astype(np.int64)), return_index=True)[1]
        distinct_bytes = np.bincount(r[first], weights=s[first])
        distinct_bytes = distinct_bytes[distinct_bytes > 0]
        ideal = int(np.ceil(distinct_bytes / SECTOR_BYTES).sum())
        requests = len(np.unique(r))
        if is_store:
            t.write_bytes, t.write_sectors, t.store_requests = int(s.sum()), unique_sectors, requests
            t.store_sectors, t.store_sectors_ideal = pairs, ideal
        else:
            t.read_bytes, t.read_sectors, t.load_requests = int(s.sum()), unique_sectors, requests
            t.load_sectors, t.load_sectors_ideal = pairs, ideal
    return t


# ------------------------------------------------------------------------------------------------
# Triton: the interpreter's memory operations, recorded
# ------------------------------------------------------------------------------------------------


@dataclass
class Buffer:
    """A tensor argument of a launch: the bytes [lo, hi) its elements span."""

    name: str
    lo: int
    hi: int


@dataclass
class OutOfBounds:
    """Lanes of one access that fall outside every buffer of the launch."""

    kernel: str
    program: tuple
    access: int           # the program's how-many-th memory operation
    kind: str             # load | store | atomic
    lanes: int
    first_address: int
    nearest: str          # the nearest buffer and how far outside it the first lane is

    def __str__(self) -> str:
        return (f"{self.kernel} program {self.program} access #{self.access} ({self.kind}): {self.lanes} active "
                f"lane(s) outside every argument buffer, first at {self.first_address:#x} ({self.nearest})")


class OutOfBoundsError(AssertionError):
    """A Triton kernel accessed memory outside every tensor its launch was given."""


@dataclass
class TritonLaunch:
    """One interpreted launch: its grid, argument buffers, and its accesses (numpy arrays)."""

    kernel: str
    grid: tuple
    buffers: list[Buffer]
    chunks: list = field(default_factory=list)  # (program, access, store, addresses, size, lanes, site)
    out_of_bounds: list[OutOfBounds] = field(default_factory=list)
    spec: dict = field(default_factory=dict)    # how to compile this variant (sm90.triton_facts)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def traffic(self) -> Traffic:
        if not self.chunks:
            return Traffic()
        addresses, sizes, stores, requests = [], [], [], []
        masked = lanes = 0
        for i, (_, _, store, addr, size, n, _) in enumerate(self.chunks):
            addresses.append(addr)
            sizes.append(np.full(len(addr), size, dtype=np.int64))
            stores.append(np.full(len(addr), store, dtype=bool))
            requests.append(np.full(len(addr), i, dtype=np.int64))
            lanes += n
            masked += n - len(addr)
        t = traffic_of(np.concatenate(addresses), np.concatenate(sizes), np.concatenate(stores),
                       np.concatenate(requests))
        t.masked_lanes, t.lanes = masked, lanes
        return t

    def sites(self) -> dict:
        """Per source line and kind (``pva/triton.py:141 load 4B``): requests, sectors, ideal sectors."""
        groups: dict = {}
        for i, (_, _, store, addr, size, _, site) in enumerate(self.chunks):
            if len(addr):
                groups.setdefault(f"{site} {'store' if store else 'load'} {size}B", []).append((i, addr, size, store))
        out = {}
        for key, chunks in groups.items():
            addr = np.concatenate([c[1] for c in chunks])
            request = np.concatenate([np.full(len(c[1]), c[0]) for c in chunks])
            t = traffic_of(addr, np.full(len(addr), chunks[0][2]), np.full(len(addr), chunks[0][3]), request)
            out[key] = {"requests": len(chunks), "sectors": t.requested_sectors, "ideal": t.ideal_sectors}
        return out

    def program_bytes(self) -> dict:
        """Bytes loaded and stored by each program (active lanes)."""
        out: dict = {}
        for program, _, store, addr, size, _, _ in self.chunks:
            entry = out.setdefault(program, [0, 0])
            entry[1 if store else 0] += len(addr) * size
        return out


_POINTER = {"float32": "*fp32", "float64": "*fp64", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32",
            "int64": "*i64", "uint8": "*u8", "bool": "*i1"}


def _compile_spec(fn, names, args, kwargs) -> dict:
    """The launch's kernel variant, as sm90.triton_facts compiles it: tensors become pointers of
    their dtype, keyword arguments constexprs, other values are specialised as Triton's JIT does."""
    out = []
    for name, value in zip(names, args):
        if hasattr(value, "data_ptr"):
            # "pointer16": 16-byte aligned, which Triton's JIT tells the compiler (tt.divisibility 16)
            kind = "pointer16" if value.data_ptr() % 16 == 0 else "pointer"
            out.append((name, kind, _POINTER[str(value.dtype).removeprefix("torch.")]))
        else:
            out.append((name, "value", value))
    for name in names[len(args):]:
        if name in kwargs:
            value = kwargs[name]
            if hasattr(value, "primitive_bitwidth"):  # a tl.dtype
                value = f"tl.{value.name}"
            out.append((name, "constexpr", value))
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}  # launch options
    return {"module": fn.__globals__.get("__name__", ""), "kernel": fn.__name__, "args": out, "options": options}


def _buffers(arg_names, args) -> list[Buffer]:
    out = []
    for name, arg in zip(arg_names, args):
        if not hasattr(arg, "data_ptr") or not hasattr(arg, "stride"):
            continue
        if arg.numel() == 0:
            out.append(Buffer(name, arg.data_ptr(), arg.data_ptr()))
            continue
        low = sum(min(0, (n - 1) * s) for n, s in zip(arg.shape, arg.stride()))
        high = sum(max(0, (n - 1) * s) for n, s in zip(arg.shape, arg.stride()))
        size = arg.element_size()
        out.append(Buffer(name, arg.data_ptr() + low * size, arg.data_ptr() + (high + 1) * size))
    return out


_TRITON_DIR = None


def _site() -> str:
    """``family/triton.py:LINE`` of the kernel source line making the current access (the
    interpreter runs the kernels' own source, with its file names and line numbers)."""
    global _TRITON_DIR
    if _TRITON_DIR is None:
        import triton

        _TRITON_DIR = str(Path(triton.__file__).parent)
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TRITON_DIR) and name != __file__:
            parts = Path(name).parts
            return f"{'/'.join(parts[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class TritonTracer:
    """Records every global-memory access of the Triton kernels the interpreter runs, and checks
    each active lane against the tensors the launch was given (the out-of-bounds check).

        with TritonTracer() as tracer:
            launcher(...)          # kernels under TRITON_INTERPRET=1
        tracer.launches            # TritonLaunch per launch
        tracer.out_of_bounds()     # every access outside the launch's argument buffers

    It wraps the four memory operations of the interpreter's builder (``create_load`` and
    ``create_store`` go through ``create_masked_load``/``create_masked_store``, which receive the
    numpy addresses and masks) and its atomics, and the grid executor (which names the launch and
    its arguments). ``dry_run=True`` records the launches without running them (a launch's grid
    at any size).
    """

    def __init__(self, dry_run: bool = False, keep: bool = True, raise_on_oob: bool = True):
        self.dry_run = dry_run
        self.keep = keep                  # keep every access (for traffic); False: check bounds only
        self.raise_on_oob = raise_on_oob  # raise OutOfBoundsError before the access runs
        self.in_launch = False  # inside the interpreter's launch (its own host copies included)
        self._depth = 0
        self._patched: set = set()
        self.launches: list[TritonLaunch] = []
        self._current: TritonLaunch | None = None
        self._counters: dict = {}

    def out_of_bounds(self) -> list[OutOfBounds]:
        return [o for launch in self.launches for o in launch.out_of_bounds]

    # -- the builder's memory operations -----------------------------------------------------------
    def _record(self, builder, kind: str, ptrs, mask):
        launch = self._current
        if launch is None:
            return
        address = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        program = tuple(builder.grid_idx)
        access = self._counters.get(program, 0)
        self._counters[program] = access + 1
        hit = address[active]
        if self.keep:
            site = _site()
            for is_store in ((False, True) if kind == "atomic" else (kind == "store",)):
                launch.chunks.append((program, access, is_store, hit, size, len(address), site))
        if len(hit) == 0:
            return
        inside = np.zeros(len(hit), dtype=bool)
        for b in launch.buffers:
            inside |= (hit >= b.lo) & (hit + size <= b.hi)
        if not inside.all():
            bad = int(hit[~inside][0])
            nearest = min(launch.buffers, key=lambda b: min(abs(bad - b.lo), abs(bad - b.hi)), default=None)
            where = "no buffers" if nearest is None else (
                f"{max(0, bad - nearest.hi)} bytes past the end of {nearest.name}" if bad + size > nearest.hi
                else f"{nearest.lo - bad} bytes before {nearest.name}")
            oob = OutOfBounds(launch.kernel, program, access, kind, int((~inside).sum()), bad, where)
            launch.out_of_bounds.append(oob)
            if self.raise_on_oob:  # before the interpreter reads or writes there
                raise OutOfBoundsError(f"{oob} at {_site()}")

    def __enter__(self):
        from triton.runtime import interpreter

        self._patches = contextlib.ExitStack()
        builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
        function_cls = interpreter.InterpretedFunction
        tracer = self
        masked_load, masked_store = builder_cls.create_masked_load, builder_cls.create_masked_store
        atomic_rmw, atomic_cas = builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas
        run = executor_cls.__call__

        def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
            tracer._record(self, "load", ptrs, mask)
            return masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

        def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
            tracer._record(self, "store", ptrs, mask)
            return masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

        def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            tracer._record(self, "atomic", ptr, mask)
            return atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope)

        def create_atomic_cas(self, ptr, cmp, val, sem, scope):
            tracer._record(self, "atomic", ptr, _AllLanes(ptr))
            return atomic_cas(self, ptr, cmp, val, sem, scope)

        def call(self, *args, **kwargs):
            tracer.in_launch = True
            try:
                return launch_grid(self, *args, **kwargs)
            finally:
                tracer.in_launch = False

        def launch_grid(self, *args, **kwargs):
            grid = self.grid
            if callable(grid):
                import inspect

                grid = grid(inspect.getcallargs(self.fn, *args, **kwargs))
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            names = list(self.arg_names)
            values = list(args) + [kwargs.get(n) for n in names[len(args):]]
            launch = TritonLaunch(self.fn.__name__, grid, _buffers(names, values),
                                  spec=_compile_spec(self.fn, names, args, kwargs))
            tracer.launches.append(launch)
            if tracer.dry_run:
                return None
            tracer._current, tracer._counters, tracer._patched = launch, {}, set()
            tracer._depth += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                tracer._current = None
                tracer._depth -= 1

        nested_call = function_cls.__call__

        def call_nested(self, *args, **kwargs):
            # A @triton.jit function called from a kernel. The interpreter patches the language
            # modules its module sees on every such call (~3 ms each: most of an interpreted launch)
            # and leaves them patched; here that is done once per launch and module.
            if tracer._depth == 0:
                return nested_call(self, *args, **kwargs)
            if id(self.fn.__globals__) not in tracer._patched:
                interpreter._patch_lang(self.fn)
                tracer._patched.add(id(self.fn.__globals__))
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise interpreter.InterpreterError(repr(e)) from e

        for cls, name, fn in ((builder_cls, "create_masked_load", create_masked_load),
                              (builder_cls, "create_masked_store", create_masked_store),
                              (builder_cls, "create_atomic_rmw", create_atomic_rmw),
                              (builder_cls, "create_atomic_cas", create_atomic_cas),
                              (executor_cls, "__call__", call),
                              (function_cls, "__call__", call_nested)):
            original = getattr(cls, name)
            setattr(cls, name, fn)
            self._patches.callback(setattr, cls, name, original)
        return self

    def __exit__(self, *exc):
        self._patches.close()
        return False


class _AllLanes:
    """A mask of every lane, for the atomics that take none."""

    def __init__(self, ptr):
        self.data = np.ones(np.shape(ptr.data), dtype=bool)


# ------------------------------------------------------------------------------------------------
# The Triton launchers as a GPU launch configures them
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def as_on_gpu(sms: int = 132):
    """Make the Triton launchers pick, for CPU tensors, the tiles and grids they pick for CUDA tensors
    on a GPU of ``sms`` SMs (an H100/H200 has 132), and reuse one arrival counter as on a GPU (no
    fill launch per call). tests/triton_sm90_compile.py relies on the same names."""
    import importlib

    # The families' Triton modules, imported by name as core/registry.py imports them.
    pva, blendshape, score = (importlib.import_module(f"fusedloss.{f}.triton") for f in ("pva", "blendshape", "score"))

    import torch

    counter = torch.zeros(1, dtype=torch.int32)
    gpu = torch.device("cuda")  # (only compared with: no GPU needed)
    pva_tile, all_pairs_tile, blendshape_layout = pva._tile, score._all_pairs_tile, blendshape._layout

    def zeroed_counter(like):  # one counter, which the kernels leave at 0, as on a GPU
        return counter

    def budget(device, per_sm=4):
        return per_sm * sms

    patches = {
        pva: {"_tile": lambda device: pva_tile(gpu), "program_budget": budget, "zeroed_counter": zeroed_counter},
        blendshape: {"program_budget": budget, "zeroed_counter": zeroed_counter,
                     "_layout": lambda pred: blendshape_layout(pred, gpu=True, sms=sms)},
        score: {"program_budget": budget, "zeroed_counter": zeroed_counter,
                "_all_pairs_tile": lambda device: all_pairs_tile(gpu)},
    }
    saved = []
    try:
        for module, names in patches.items():
            for name, value in names.items():
                saved.append((module, name, getattr(module, name)))  # AttributeError: the launcher changed
                setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
