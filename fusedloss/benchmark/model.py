"""A model of the losses' time on an H200, built from what this machine can measure without a GPU.

    python bench/run.py --section model      # bench/results/model-h200.md and .json

It is a model, not a measurement: every figure below is predicted. For each case (the seed
systems' shapes and the large benchmark shapes) and each GPU backend:

1. The loss runs once, forward and backward, on the "cpu" backend under an ``OpRecorder`` (a
   ``TorchDispatchMode``): it sees every aten op the route runs around the fused operator, and the
   fused operator's own arguments.
2. Those arguments go to the backend's kernels, run on the CPU:
     cuda    the real .cu files in the SIMT lane's trace build (tests/simt/traffic.py): every load
             and store, grouped into warp requests;
     triton  the real Triton kernels in the interpreter (traffic.TritonTracer), with the tiles and
             grid a GPU launch picks (traffic.as_on_gpu).
   From the addresses: the DRAM bytes (distinct 32-byte sectors read and written) and the sectors
   per request against the ideal. Large shapes are traced at two smaller batch sizes and the
   traffic extrapolated linearly in the batch size; their grids come from launches recorded, not
   run, at the full size.
3. sm90.py compiles every kernel instance for sm_90: registers, spills, 128-bit loads, occupancy.
4. Predicted time of a launch = ``launch_s`` + the larger of (DRAM bytes / copy bandwidth) and the
   busiest SM's bytes over its share of the bandwidth (``ceil(blocks / SMs) * bytes / blocks``
   at ``bandwidth / SMs``: the machine idling around a short last wave or a small grid). An aten op
   (the eager reference, ``F.mse_loss``, and the ops around a fused operator) is one launch moving
   its inputs and outputs once (a sort: its radix passes).

Not modelled: arithmetic and issue limits (the score kernels' pair counting is arithmetic-bound at
large B), L2 reuse between launches, latency-bound bandwidth at low occupancy (occupancy is
reported, not used), host-side costs beyond one launch latency per launch, and copies a GPU run
makes that a CPU run does not (tensors moved to the device). ``scripts/gpu_check.sh`` times the
same cases on a GPU and writes measured and predicted side by side (the calibration).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.registry import FAMILIES
from . import sm90
from .traffic import Traffic

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# The GPU: every constant of the model, with its source
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    copy_bandwidth: float     # bytes/s, read + write
    launch_s: float           # seconds per launch (host dispatch + launch gap), eager PyTorch
    memory_bytes: float
    sources: dict


H200 = GPU(
    name="NVIDIA H200 (SXM, 141 GB HBM3e)",
    sms=132,
    copy_bandwidth=4.3e12,
    launch_s=5e-6,
    memory_bytes=141e9,
    sources={
        "sms": "132 multiprocessors, as PyTorch reports them on an H200 (NVIDIA's H100/H200 SXM datasheet: 132 SMs)",
        "copy_bandwidth": "4.3 TB/s (bytes read + written) measured by a large device-to-device torch copy on an "
                          "H200 (the issue's figure; the datasheet's 4.8 TB/s is the peak)",
        "launch_s": "5 us per launch: an assumption of the order of PyTorch's eager per-op host cost on a current "
                    "CPU (a few us of dispatch plus ~2 us of cudaLaunchKernel); calibrated by scripts/gpu_check.sh",
        "memory_bytes": "141 GB of HBM3e (datasheet): a case whose tensors exceed it is marked",
        "arch": sm90.SM90.source,
    },
)

# Radix sorts (CUB's onesweep, used by the CUDA sorted path and by torch.sort on CUDA): one
# histogram pass over the keys, then one pass per 8-bit digit reading and writing keys (and values).
RADIX_DIGIT_BITS = 8


def radix_sort_cost(n: int, key_bytes: int, value_bytes: int = 0) -> tuple[int, int]:
    """(launches, DRAM bytes) of a radix sort of n keys (with values)."""
    passes = math.ceil(8 * key_bytes / RADIX_DIGIT_BITS)
    bytes_ = n * key_bytes + passes * 2 * n * (key_bytes + value_bytes) + n * value_bytes
    return 2 + passes, bytes_


def kernel_time(dram_bytes: float, blocks: int, gpu: GPU = H200) -> tuple[float, float]:
    """(seconds, tail factor) of one launch: latency + max(bytes / BW, busiest SM's bytes / (BW / SMs))."""
    t_mem = dram_bytes / gpu.copy_bandwidth
    blocks = max(1, blocks)
    tail = math.ceil(blocks / gpu.sms) * gpu.sms / blocks
    return gpu.launch_s + t_mem * max(1.0, tail), max(1.0, tail)


def op_time(launches: int, dram_bytes: float, gpu: GPU = H200) -> float:
    return launches * gpu.launch_s + dram_bytes / gpu.copy_bandwidth


# ------------------------------------------------------------------------------------------------
# The op recorder
# ------------------------------------------------------------------------------------------------


@dataclass
class Op:
    """One aten op (or fused operator call) of a step, with its modelled cost."""

    phase: str                  # forward | backward
    name: str
    launches: int = 1
    bytes: int = 0              # inputs read + outputs written
    fused: bool = False         # a fusedloss operator: replaced by the backend's kernels
    args: list = field(default_factory=list, repr=False)
    outputs: list = field(default_factory=list, repr=False)
    largest: int = 0            # the largest tensor it touches (for the memory check)


# Ops that launch nothing on a GPU (allocation, aliasing, metadata).
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
             "aten.new_empty_strided.default", "aten.empty_like.default", "aten.lift_fresh.default",
             "aten.detach.default", "aten.alias.default", "aten.set_.source_Storage_storage_offset"}
SORTS = {"aten.sort.default", "aten.sort.stable", "aten.sort.values", "aten.sort.values_stable"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


class OpRecorder(TorchDispatchMode):
    """Records every op dispatched while active (``phase`` names the part of the step)."""

    def __init__(self, paused: Callable[[], bool] = lambda: False):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "forward"
        self.paused = paused  # ops run while it returns True are not recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused():
            return out
        name = str(func)
        inputs = {(t.data_ptr(), t.shape, t.stride()): t for t in _tensors((args, kwargs))}
        outputs = list(_tensors(out))
        largest = max([tensor_bytes(t) for t in (*inputs.values(), *outputs)], default=0)
        op_name = func._schema.name.split("::")[-1]
        family, _, phase = op_name.rpartition("_")
        if func.namespace.startswith("fusedloss") and family in FAMILIES and phase in ("forward", "backward"):
            # a family's fused operator: its kernels are traced (other fusedloss operators, e.g. the
            # finiteness check, are timed as one launch like an aten op)
            self.ops.append(Op(self.phase, op_name, 0, 0, True, list(args),
                               list(out) if isinstance(out, (tuple, list)) else [out], largest))
        elif func.is_view or name in NO_LAUNCH:
            pass
        elif name in SORTS:
            t = args[0]
            launches, bytes_ = radix_sort_cost(t.numel(), t.element_size(), 8)
            self.ops.append(Op(self.phase, name, launches, bytes_, largest=largest))
        else:
            moved = sum(tensor_bytes(t) for t in inputs.values()) + sum(tensor_bytes(t) for t in outputs)
            self.ops.append(Op(self.phase, name, 1, moved, largest=largest))
        return out


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A loss at one shape. ``make(B, device="cpu") -> (leaves, run(backend) -> loss, mse())``: the
    inputs that require grad, the loss on a backend, and one F.mse_loss on the same predictions. ``min_bytes``:
    the bytes a fused forward / backward must move (fusedloss.benchmark's Case.elements, float32).
    ``traced_at``: batch sizes the kernels are traced at (None: at B itself); ``recorded_at``:
    those the eager reference is recorded at (None: at B), extrapolated to B."""

    family: str
    name: str
    B: int
    make: Callable
    min_bytes: dict
    traced_at: tuple | None = None
    recorded_at: tuple | None = None
    seed: bool = False


def _from_bench(bench_case_of, B, mse_target_index):
    def make(b, device=torch.device("cpu")):
        case = bench_case_of(b)
        inputs, loss = case.make(torch.device(device), torch.float32)
        leaf = inputs[0].detach().requires_grad_()
        rest = tuple(inputs[1:])
        return (leaf,), (lambda backend: loss((leaf,) + rest, backend)), \
            (lambda: torch.nn.functional.mse_loss(leaf, rest[mse_target_index - 1].reshape(leaf.shape)))

    case = bench_case_of(B)
    return make, {p: n * 4 for p, n in case.elements.items()}


def _from_seed(seed_case_of, B, bench_case):
    def make(b, device=torch.device("cpu")):
        seed_case = seed_case_of(b)
        predictions, constants = seed_case.make(torch.device(device))
        leaves = tuple(p.detach().requires_grad_() for p in predictions)
        modules = {}

        def run(backend):
            if backend not in modules:
                modules[backend] = seed_case.module(backend).to(device)
            return seed_case.loss(modules[backend], *leaves, *constants)

        return leaves, run, (lambda: torch.nn.functional.mse_loss(leaves[0], constants[0]))

    return make, {p: n * 4 for p, n in bench_case.elements.items()}


def cases(names: tuple[str, ...] | None = None) -> list[Case]:
    """The seed systems' shapes (seed_shapes.CASES) and the large benchmark shapes."""
    from . import blendshape as bb
    from . import pva as bp
    from . import score as bs
    from . import seed_shapes as ss
    from ..blendshape.config import DUAL_STREAM_GROUPS

    out = []

    def seed(seed_case_of, B, family, bench_case, **kw):
        make, minimum = _from_seed(seed_case_of, B, bench_case)
        out.append(Case(family, seed_case_of(B).name, B, make, minimum, seed=True, **kw))

    groups = {"perceptual_groups": DUAL_STREAM_GROUPS}
    seed(lambda b: ss._blendshape((b, 52), {}), 16, "blendshape", bb.make_case("seed", (16, 52), {}))
    seed(lambda b: ss._blendshape((b, 52), groups), 4, "blendshape", bb.make_case("seed", (4, 52), groups))
    seed(ss._score, 64, "score", bs.make_case(64))
    seed(ss._pva, 8, "pva", bp.make_case(8))
    seed(ss._pva, 64, "pva", bp.make_case(64), traced_at=(8, 16))

    def large(family, name, B, bench_of, mse_index, traced_at=None, recorded_at=None):
        make, minimum = _from_bench(bench_of, B, mse_index)
        out.append(Case(family, name, B, make, minimum, traced_at, recorded_at))

    for B in (512, 4096):
        large("pva", f"pva [{B}, 80, 265] all terms", B, bp.make_case, 1, (8, 16), (8, 16, 32))
    large("blendshape", "blendshape [16, 256, 52] temporal", 16,
          lambda b: bb.make_case("temporal", (b, 256, 52), {"temporal_weight": 0.2}), 1)
    large("blendshape", "blendshape [65536, 52]", 65536, lambda b: bb.make_case("large", (b, 52), {}), 1,
          (16384, 32768), (1024, 2048, 4096))
    large("score", "score B=4096", 4096, bs.make_case, 2, None, (256, 512, 1024))
    for B in (65536, 1_000_000):
        large("score", f"score B={B}", B, bs.make_case, 2, (8192, 16384), (256, 512, 1024))
    return [c for c in out if names is None or c.name in names]


# ------------------------------------------------------------------------------------------------
# Recording a step
# ------------------------------------------------------------------------------------------------


def record(make: Callable, B: int, backend: str) -> list[Op]:
    """The ops of one forward + backward (torch.autograd.grad w.r.t. the leaves) on ``backend``, in
    the steady state of a training loop: after one step that builds what a module caches."""
    leaves, run, _ = make(B)
    torch.autograd.grad(run(backend), leaves)
    rec = OpRecorder()
    with rec:
        loss = run(backend)
        rec.phase = "backward"
        torch.autograd.grad(loss, leaves)
    return rec.ops


def record_mse(make: Callable, B: int) -> list[Op]:
    leaves, _, mse = make(B)
    rec = OpRecorder()
    with rec:
        loss = mse()
        rec.phase = "backward"
        torch.autograd.grad(loss, leaves[:1])
    return rec.ops


def extrapolate_ops(samples: list[tuple[int, list[Op]]], B: int) -> list[Op]:
    """The ops at batch size B from recordings at smaller ones: the same op sequence, each op's
    bytes fitted as a polynomial in B through the samples (degree = samples - 1: a quadratic
    from three catches the score reference's [B, B] pair matrix exactly)."""
    import numpy as np

    first = samples[0][1]
    for b, ops in samples[1:]:
        if [o.name for o in ops] != [o.name for o in first]:
            raise ValueError(f"the op sequence changes between B={samples[0][0]} and B={b}: cannot extrapolate")
    xs = np.array([b for b, _ in samples], dtype=float)
    out = []
    for i, op in enumerate(first):
        coef = np.polyfit(xs, [ops[i].bytes for _, ops in samples], len(samples) - 1)
        big = np.polyfit(xs, [ops[i].largest for _, ops in samples], len(samples) - 1)
        out.append(Op(op.phase, op.name, op.launches, max(0, int(round(np.polyval(coef, B)))), op.fused,
                      largest=max(0, int(round(np.polyval(big, B))))))
    return out


# ------------------------------------------------------------------------------------------------
# The backends' launches
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One device launch of a fused step: a kernel of ours, a library call or an aten op."""

    phase: str
    kind: str                        # kernel | library | op
    name: str
    launches: int = 1
    grid: tuple | None = None
    threads: int | None = None
    traffic: dict | None = None      # Traffic.summary() (kernels; extrapolated for large shapes)
    bytes: int = 0                   # modelled DRAM bytes
    seconds: float = 0.0
    tail: float = 1.0
    facts: dict | None = None        # sm90 KernelFacts.summary()
    waves: float | None = None
    sites: dict | None = None        # per call site (CUDA) or source line (Triton): requests, sectors, ideal
    buffers: dict | None = None      # per argument buffer (CUDA)
    block_bytes: dict | None = None  # bytes one block (program) accesses, max and mean, at the traced size


def _extrapolate_traffic(samples: list[tuple[int, Traffic]], B: int) -> Traffic:
    if len(samples) == 1:
        return samples[0][1]
    (b1, t1), (b2, t2) = samples[0], samples[-1]
    d1, d2 = asdict(t1), asdict(t2)
    return Traffic(**{k: max(0, int(round(d1[k] + (d2[k] - d1[k]) * (B - b1) / (b2 - b1)))) for k in d1})


class CudaLane:
    """The CUDA kernels in the SIMT lane's trace build (a worker process; tests/simt)."""

    def __init__(self):
        sys.path.insert(0, str(ROOT / "tests"))
        from simt import build, worker

        reason = build.unavailable_reason()
        if reason:
            raise RuntimeError(f"the SIMT lane cannot build here: {reason}")
        self.worker = worker.Worker(build.kernels_module("trace"), dict(os.environ))

    def close(self):
        self.worker.close()

    def run(self, op: Op, trace: bool, sites: bool = True) -> list[dict]:
        from simt import traffic

        return self.worker.call(traffic.run_op, op=op.name, args=traffic.specs(op.args, with_data=trace),
                                outputs=traffic.specs(op.outputs, with_data=False), trace=trace,
                                sms=H200.sms, sites=sites)["launches"]


def _triton_launcher(op_name: str):
    family = op_name.split("_")[0]
    launcher = getattr(importlib.import_module(f"fusedloss.{family}.triton"), op_name)
    return getattr(launcher, "_init_fn", launcher)


def _triton_args(op: Op, terms: torch.Tensor | None) -> list:
    """The operator's arguments as the Triton autograd passes them (core/autograd.py): a gradient
    that reaches no output is a zero scalar (expanded to the terms' shape for grad_terms)."""
    args = list(op.args)
    if op.name.endswith("_backward") and terms is not None:
        if args[0] is None:
            args[0] = torch.zeros((), dtype=terms.dtype).expand(terms.shape)
        if args[1] is None:
            args[1] = torch.zeros((), dtype=terms.dtype)
    return args


def triton_run(op: Op, trace: bool, terms: torch.Tensor | None = None) -> tuple[list, list[Op]]:
    """(TritonLaunch per kernel launch, the aten ops the launcher runs) of one operator call;
    ``terms``: the forward's terms, for a backward's missing gradients."""
    from .traffic import TritonTracer, as_on_gpu

    args = _triton_args(op, terms)
    with as_on_gpu(H200.sms), TritonTracer(dry_run=not trace) as tracer:
        rec = OpRecorder(paused=lambda: tracer.in_launch)  # not the interpreter's own copies
        rec.phase = op.phase
        with rec:
            _triton_launcher(op.name)(*args)
    bad = tracer.out_of_bounds()
    if bad:
        raise AssertionError("out-of-bounds accesses in a Triton kernel:\n" + "\n".join(map(str, bad[:10])))
    return tracer.launches, rec.ops


def triton_specs(ops: list[Op]) -> list[dict]:
    """The Triton kernel variants (sm90.triton_facts specs) the fused operators of ``ops`` launch,
    recorded without running them."""
    out, terms = [], None
    for op in ops:
        if op.fused:
            launches, _ = triton_run(op, trace=False, terms=terms)
            out += [la.spec for la in launches]
            terms = op.outputs[0]
    return out


def _fused_ops(ops: list[Op]) -> list[Op]:
    return [o for o in ops if o.fused]


def fused_launches(case: Case, backend: str, full: list[Op], traced: list[tuple[int, list[Op]]],
                   lane: CudaLane | None) -> list[Launch]:
    """Every launch of the fused step on ``backend`` at the case's size: the aten ops around the
    operators (``full``, recorded at B) and each operator's kernels (traced at ``traced`` sizes)."""
    out: list[Launch] = []
    traced_calls = [_fused_ops(ops) for _, ops in traced]
    call_index = 0
    for op in full:
        if not op.fused:
            out.append(Launch(op.phase, "op", op.name, op.launches, bytes=op.bytes))
            continue
        samples = [(b, calls[call_index]) for (b, _), calls in zip(traced, traced_calls)]
        # A backward's missing gradients take the shape of its forward's terms.
        terms = {b: (calls[call_index - 1].outputs[0] if call_index else None) for (b, _), calls in
                 zip(traced, traced_calls)}
        full_terms = next((o.outputs[0] for o in reversed(full[:full.index(op)]) if o.fused), None)
        call_index += 1
        if backend == "cuda":
            at_size = lane.run(op, trace=False) if traced[0][0] != case.B else None
            per_sample = [(b, lane.run(c, trace=True)) for b, c in samples]
            shape = at_size or per_sample[0][1]
            for i, launch in enumerate(shape):
                if launch["library"]:
                    launches, bytes_ = radix_sort_cost(launch["keys"], launch["key_bytes"])
                    out.append(Launch(op.phase, "library", launch["library"], launches, bytes=bytes_))
                    continue
                names = {s[i]["kernel"] for _, s in per_sample}
                if names != {launch["kernel"]}:
                    raise ValueError(f"{case.name}: launch {i} is {names} when traced, {launch['kernel']} at B")
                traffic = _extrapolate_traffic([(b, Traffic(**_fields(s[i]["traffic"]))) for b, s in per_sample],
                                               case.B)
                threads = math.prod(launch["block"])
                out.append(Launch(op.phase, "kernel", launch["kernel"], 1, tuple(launch["grid"]), threads,
                                  traffic.summary(), traffic.dram_bytes, sites=per_sample[-1][1][i].get("sites"),
                                  buffers=per_sample[-1][1][i].get("buffers"),
                                  block_bytes=per_sample[-1][1][i].get("block_bytes")))
        else:
            at_size = triton_run(op, trace=False, terms=full_terms) if traced[0][0] != case.B else None
            per_sample = [(b, triton_run(c, trace=True, terms=terms[b])) for b, c in samples]
            kernels, inner = at_size or per_sample[0][1]
            for o in inner:
                if o.launches:
                    out.append(Launch(o.phase, "library" if o.name in SORTS else "op", o.name, o.launches,
                                      bytes=o.bytes))
            for i, launch in enumerate(kernels):
                names = {s[0][i].kernel for _, s in per_sample}
                if names != {launch.kernel}:
                    raise ValueError(f"{case.name}: launch {i} is {names} when traced, {launch.kernel} at B")
                traffic = _extrapolate_traffic([(b, s[0][i].traffic()) for b, s in per_sample], case.B)
                last = per_sample[-1][1][0][i]
                per_program = [ld + st for ld, st in last.program_bytes().values()] or [0]
                out.append(Launch(op.phase, "kernel", launch.kernel, 1, launch.grid, None, traffic.summary(),
                                  traffic.dram_bytes, facts={"spec": launch.spec}, sites=last.sites(),
                                  block_bytes={"max": max(per_program),
                                               "mean": sum(per_program) / max(last.programs, 1)}))
    return out


def _fields(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k in Traffic.__dataclass_fields__}


def attach_facts(launches: list[Launch], backend: str, cuda_facts: dict | None) -> None:
    """Machine-code facts, waves and predicted times of the launches."""
    kernels = [la for la in launches if la.kind == "kernel"]
    if backend == "triton":
        facts = sm90.triton_facts([la.facts["spec"] for la in kernels]) if kernels else []
        for la, f in zip(kernels, facts):
            la.facts, la.threads = f, f.threads
    else:
        for la in kernels:
            la.facts = cuda_facts.get(la.name) if cuda_facts else None
    for la in launches:
        if la.kind == "kernel":
            blocks = math.prod(la.grid)
            la.seconds, la.tail = kernel_time(la.bytes, blocks)
            if la.facts is not None:
                per_sm, _, _ = la.facts.occupancy(la.threads)
                la.waves = blocks / (H200.sms * max(per_sm, 1))
                la.facts = la.facts.summary() | {"threads": la.threads}
        else:
            la.seconds = op_time(la.launches, la.bytes)


# ------------------------------------------------------------------------------------------------
# The model of one case
# ------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """A variant of a case: predicted figures per phase."""

    case: str
    variant: str                      # fused cuda | fused triton | reference eager | mse_loss
    launches: dict                    # phase -> launches
    bytes: dict                       # phase -> modelled DRAM bytes
    seconds: dict                     # phase -> predicted seconds
    min_bytes: dict
    detail: list = field(default_factory=list)   # Launch records (fused) or ops
    note: str = ""
    seed: bool = False                # a seed system's shape (launch-bound) rather than a large one

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _per_phase(items, value) -> dict:
    out = {"forward": 0, "backward": 0}
    for it in items:
        out[it.phase] += value(it)
    return out


def predict_ops(case: Case, variant: str, ops: list[Op]) -> Prediction:
    note = ""
    largest = max([o.largest for o in ops], default=0)
    if largest > H200.memory_bytes:
        note = f"one tensor alone takes {largest / 1e9:.0f} GB: would not fit on the GPU"
    return Prediction(case.name, variant, _per_phase(ops, lambda o: o.launches), _per_phase(ops, lambda o: o.bytes),
                      _per_phase(ops, lambda o: op_time(o.launches, o.bytes)), case.min_bytes,
                      [{"phase": o.phase, "op": o.name, "launches": o.launches, "bytes": o.bytes} for o in ops
                       if o.launches], note)


def predict_fused(case: Case, backend: str, launches: list[Launch]) -> Prediction:
    return Prediction(case.name, f"fused {backend}", _per_phase(launches, lambda la: la.launches),
                      _per_phase(launches, lambda la: la.bytes), _per_phase(launches, lambda la: la.seconds),
                      case.min_bytes, [asdict(la) for la in launches])


def model_case(case: Case, backends: tuple[str, ...], lane: CudaLane | None, cuda_facts: dict | None,
               log: Callable[[str], None] = print) -> list[Prediction]:
    out = []
    full = record(case.make, case.B, "cpu")
    traced_sizes = case.traced_at or (case.B,)
    traced = [(b, full if b == case.B else record(case.make, b, "cpu")) for b in traced_sizes]
    for backend in backends:
        if backend == "cuda" and lane is None:
            continue
        launches = fused_launches(case, backend, full, traced, lane)
        attach_facts(launches, backend, cuda_facts)
        out.append(predict_fused(case, backend, launches))
        out[-1].seed = case.seed
        log(f"  {case.name:34s} fused {backend:7s} {1e6 * out[-1].total:9.1f} us")
    if case.recorded_at:
        ref = extrapolate_ops([(b, record(case.make, b, "reference")) for b in case.recorded_at], case.B)
    else:
        ref = record(case.make, case.B, "reference")
    out.append(predict_ops(case, "reference eager", ref))
    out.append(predict_ops(case, "mse_loss", record_mse(case.make, case.B)))
    for p in out[-2:]:
        p.seed = case.seed
    for p in out[-2:]:
        log(f"  {case.name:34s} {p.variant:13s} {1e6 * p.total:9.1f} us")
    return out


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def _ratio(a, b):
    return a / b if b else float("nan")


def _kernel_rows(predictions: list[Prediction]):
    for p in predictions:
        if not p.variant.startswith("fused"):
            continue
        for la in p.detail:
            if la["kind"] == "kernel":
                yield p, la


def ranking(predictions: list[Prediction]) -> list[dict]:
    """What to fix first: per (backend, kernel or library call), the predicted time above the floor
    of its phase (a kernel: its share of the bytes a fused pass must move, at full bandwidth, and
    one launch; a library call: all of its time), summed over the large shapes and over the seed
    shapes; with what the model sees at the case where it costs most, and what the machine code
    shows that the model does not time (occupancy, load width, spills, local memory)."""
    by_key: dict = {}
    for p in predictions:
        if not p.variant.startswith("fused"):
            continue
        for la in p.detail:
            if la["kind"] == "op":
                continue
            phase_kernels = [x for x in p.detail if x["kind"] == "kernel" and x["phase"] == la["phase"]]
            share = p.min_bytes[la["phase"]] / max(len(phase_kernels), 1)
            if la["kind"] == "kernel":
                floor = (H200.launch_s + p.min_bytes[la["phase"]] / H200.copy_bandwidth) / len(phase_kernels)
                excess = max(0.0, la["seconds"] - floor) * 1e6
            else:
                excess = la["seconds"] * 1e6
            key = (p.variant.split()[1], la["name"])
            entry = by_key.setdefault(key, {"backend": key[0], "kernel": key[1], "excess_us_large": 0.0,
                                            "excess_us_seed": 0.0, "worst_case": None, "worst_us": -1.0,
                                            "reasons": [], "facts": la["facts"]})
            entry["excess_us_seed" if p.seed else "excess_us_large"] += excess
            if excess > entry["worst_us"]:
                entry.update(worst_us=excess, worst_case=p.case, reasons=_reasons(la, share))
    out = sorted(by_key.values(), key=lambda e: (-e["excess_us_large"], -e["excess_us_seed"]))
    for e in out:
        e["unmodelled"] = _unmodelled(e.pop("facts"))
    return out


def _reasons(la: dict, share: float) -> list[str]:
    """What the model sees in one launch."""
    if la["kind"] == "library":
        return [f"{la['launches']} launches, {la['bytes'] / 1e6:.3g} MB (radix passes)"]
    out = []
    t = la["traffic"]
    if share and la["bytes"] > 1.1 * share:
        out.append(f"DRAM bytes {la['bytes'] / share:.2f}x the minimum")
    if t["excess"] > 1.05:
        out.append(f"sectors per request {t['excess']:.2f}x the ideal")
    if t["read_bytes"] > 1.5 * 32 * max(t["read_sectors"], 1):
        out.append(f"loads {t['read_bytes'] / (32 * max(t['read_sectors'], 1)):.1f}x the bytes it reads from DRAM "
                   f"(re-reads served by L1/L2)")
    idle = (la["tail"] - 1) * la["bytes"] / H200.copy_bandwidth
    if idle > 0.5e-6:
        out.append(f"grid of {math.prod(la['grid'])} blocks leaves SMs idle (+{1e6 * idle:.1f} us)")
    if la.get("waves") and la["waves"] > 1.05:
        out.append(f"{la['waves']:.2f} waves (more blocks than fit at once)")
    return out


def _unmodelled(f: dict | None) -> list[str]:
    if not f:
        return []
    out = []
    if f["occupancy"] < 0.25:
        out.append(f"occupancy {100 * f['occupancy']:.0f}% ({f['registers']} registers)")
    if f["spill_stores"] or f["spill_loads"]:
        out.append(f"spills {f['spill_stores']}/{f['spill_loads']} B")
    if f["local_accesses"]:
        out.append(f"{f['local_accesses']} local-memory instructions")
    if f["loads_128"] == 0:
        out.append(f"no 128-bit loads ({f['loads_narrow']} narrower)")
    return out


def markdown(predictions: list[Prediction], cuda_facts: dict | None, command: str, notes: list[str],
             triton_variants: list[dict] | None = None) -> str:
    def us(x):
        return f"{1e6 * x:.1f}"

    lines = [
        "# fusedloss on an H200: a model (predicted, not measured)",
        "",
        "Every time here is **predicted by a model** from what runs without a GPU: the kernels' memory traffic "
        "(the CUDA kernels in the SIMT lane's trace build, the Triton kernels in the Triton interpreter), their "
        "sm_90 machine code, and the aten ops of the eager reference. fusedloss/benchmark/model.py says how; "
        "`scripts/gpu_check.sh` measures the same cases on a GPU next to these figures.",
        "",
        f"- GPU: {H200.name}: {H200.sms} SMs, copy bandwidth {H200.copy_bandwidth / 1e12:.1f} TB/s, "
        f"{1e6 * H200.launch_s:.0f} us per launch",
        *[f"- {k}: {v}" for k, v in H200.sources.items()],
        "- predicted launch time = launch + max(DRAM bytes / bandwidth, busiest SM's bytes / (bandwidth / SMs)); "
        "an aten op: launch + (inputs + outputs) / bandwidth",
        "- bytes: modelled DRAM bytes (distinct 32-byte sectors read + written) against the minimum a fused pass "
        "moves (each input read once, d/dpred written once; fusedloss.benchmark's cases), float32",
        "- sectors/request: measured per warp request (CUDA) or per program's block access (Triton), against the "
        "ideal (ceil(distinct bytes / 32))",
        f"- command: `{command}`",
        *[f"- {n}" for n in notes],
        "",
        "## Per case: fused against the eager reference and one F.mse_loss (forward + backward)",
        "",
        "| case | variant | launches fwd/bwd | bytes fwd/bwd | x min bytes | sectors/req (ideal) | waves fwd/bwd "
        "| predicted us | x eager | x mse_loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_case: dict = {}
    for p in predictions:
        by_case.setdefault(p.case, {})[p.variant] = p
    for name, variants in by_case.items():
        eager, mse = variants.get("reference eager"), variants.get("mse_loss")
        for variant, p in variants.items():
            minimum = p.min_bytes["forward"] + p.min_bytes["backward"]
            moved = p.bytes["forward"] + p.bytes["backward"]
            req = waves = "-"
            if p.variant.startswith("fused"):
                ks = [la for la in p.detail if la["kind"] == "kernel"]
                sectors = sum(la["traffic"]["load_sectors"] + la["traffic"]["store_sectors"] for la in ks)
                ideal = sum(la["traffic"]["load_sectors_ideal"] + la["traffic"]["store_sectors_ideal"] for la in ks)
                requests = sum(la["traffic"]["load_requests"] + la["traffic"]["store_requests"] for la in ks)
                req = f"{sectors / max(requests, 1):.2f} ({ideal / max(requests, 1):.2f})"
                w = {ph: max([la["waves"] or 0 for la in ks if la["phase"] == ph], default=0)
                     for ph in ("forward", "backward")}
                waves = f"{w['forward']:.2f}/{w['backward']:.2f}"
            note = f" ({p.note})" if p.note else ""
            lines.append(
                f"| {name} | {variant}{note} | {p.launches['forward']}/{p.launches['backward']} | "
                f"{p.bytes['forward'] / 1e6:.3g}/{p.bytes['backward'] / 1e6:.3g} MB | {_ratio(moved, minimum):.2f} | "
                f"{req} | {waves} | {us(p.total)} | {_ratio(eager.total, p.total) if eager else float('nan'):.2f} | "
                f"{_ratio(p.total, mse.total) if mse else float('nan'):.2f} |")
    lines += [
        "",
        "x eager: the eager reference's predicted time over this variant's (higher is faster); x mse_loss: this "
        "variant's predicted time over one F.mse_loss forward+backward (lower is better, 1.0 = as fast).",
        "",
        "## Per kernel launch",
        "",
        "| case | backend | phase | kernel | grid | threads | DRAM bytes (x min) | requested / DRAM | sectors/req "
        "(ideal) | masked lanes | registers | spills B | loads 128-bit/narrower | occupancy | waves | tail | "
        "predicted us |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, la in _kernel_rows(predictions):
        t, f = la["traffic"], la["facts"] or {}
        share = p.min_bytes[la["phase"]]
        req = (t["read_bytes"] + t["write_bytes"]) / max(la["bytes"], 1)
        masked = f"{100 * t['masked_lanes'] / t['lanes']:.0f}%" if t.get("lanes") else "-"
        lines.append(
            f"| {p.case} | {p.variant.split()[1]} | {la['phase']} | {la['name']} | {'x'.join(map(str, la['grid']))} | "
            f"{la['threads']} | {la['bytes'] / 1e6:.3g} MB ({_ratio(la['bytes'], share):.2f}) | {req:.2f} | "
            f"{t['sectors_per_request']:.2f} ({t['ideal_per_request']:.2f}) | {masked} | {f.get('registers', '-')} | "
            f"{f.get('spill_stores', '-')} | {f.get('loads_128', '-')}/{f.get('loads_narrow', '-')} | "
            f"{100 * f['occupancy']:.0f}% ({f['occupancy_limiter']}) | {la['waves']:.2f} | {la['tail']:.2f} | "
            f"{us(la['seconds'])} |" if f else
            f"| {p.case} | {p.variant.split()[1]} | {la['phase']} | {la['name']} | {la['grid']} | {la['threads']} | "
            f"{la['bytes'] / 1e6:.3g} MB | {req:.2f} | {t['sectors_per_request']:.2f} ({t['ideal_per_request']:.2f}) "
            f"| {masked} | - | - | - | - | - | {la['tail']:.2f} | {us(la['seconds'])} |")
    lines += [
        "",
        "requested / DRAM: bytes the lanes ask for over the modelled DRAM bytes (above 1: re-reads served by L1/L2). "
        "masked lanes: lanes of the Triton kernels' block accesses a mask switched off. "
        "tail: the busiest SM's share of the bytes over an even spread (1.0: the grid fills the machine evenly).",
        "",
        "## What to fix first (the model's ranking)",
        "",
        "Predicted time above the floor (a kernel: its share of the minimum bytes at full bandwidth and of one "
        "launch; a library call, e.g. CUB's radix sort: all of its time), summed over the large shapes, then over "
        "the seed shapes; with what the model sees at the case where it costs most, and what the machine code "
        "shows that the model does not time (a low occupancy or narrow loads cost bandwidth when too few bytes "
        "are in flight; the calibration on a GPU will tell how much).",
        "",
        "| rank | backend | kernel | us above floor, large shapes | us above floor, seed shapes | costs most at | "
        "what the model sees there | what the sm_90 code shows (not timed by the model) |",
        "|---:|---|---|---:|---:|---|---|---|",
    ]
    for i, e in enumerate(ranking(predictions), 1):
        lines.append(f"| {i} | {e['backend']} | {e['kernel']} | {e['excess_us_large']:.1f} | "
                     f"{e['excess_us_seed']:.1f} | {e['worst_case']} | {'; '.join(e['reasons']) or '-'} | "
                     f"{'; '.join(e['unmodelled']) or '-'} |")
    if cuda_facts:
        lines += [
            "",
            "## Every CUDA kernel instance (sm_90)",
            "",
            "| kernel | registers | spill stores/loads B | stack B | shared B | global loads by width (bits) | "
            "local-memory instructions | occupancy at 256 threads |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for name, f in sorted(cuda_facts.items()):
            blocks, occ, limiter = f.occupancy(256)
            loads = ", ".join(f"{k}: {v}" for k, v in sorted(f.global_loads.items(), key=lambda kv: -int(kv[0])))
            lines.append(f"| {name} | {f.registers} | {f.spill_stores}/{f.spill_loads} | {f.stack_frame} | {f.shared} "
                         f"| {loads} | {f.local_accesses} | {100 * occ:.0f}% ({limiter}) |")
    if triton_variants:
        lines += [
            "",
            "## Every Triton kernel variant (sm_90; the variants tests/triton_sm90_compile.py compiles)",
            "",
            "| kernel | input dtype | variants | registers median / max | spill B max | variants with a 128-bit "
            "load | narrower loads (median) | occupancy min / median |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for v in triton_variants:
            lines.append(f"| {v['kernel']} | {v['dtype']} | {v['variants']} | {v['registers_median']:.0f} / "
                         f"{v['registers_max']} | {v['spill_bytes_max']} | {v['with_128bit_loads']} | "
                         f"{v['narrow_loads_median']:.0f} | {100 * v['occupancy_min']:.0f}% / "
                         f"{100 * v['occupancy_median']:.0f}% |")
    return "\n".join(lines) + "\n"


def to_json(predictions: list[Prediction], cuda_facts: dict | None, command: str, notes: list[str],
            triton_variants: list[dict] | None = None) -> dict:
    return {
        "model": "predicted, not measured (fusedloss/benchmark/model.py)",
        "gpu": asdict(H200),
        "command": command,
        "notes": notes,
        "predictions": [asdict(p) | {"total_s": p.total} for p in predictions],
        "ranking": ranking(predictions),
        "cuda_kernels": {n: f.summary() for n, f in (cuda_facts or {}).items()},
        "triton_variants": triton_variants or [],
    }


def run(names: tuple[str, ...] | None = None, backends: tuple[str, ...] = ("cuda", "triton"),
        out_dir: Path | None = None, command: str = "python bench/run.py --section model",
        log: Callable[[str], None] = print, with_variants: bool = True) -> list[Prediction]:
    """Model every case (or those named); write model-h200.md/.json to ``out_dir`` if given."""
    notes = []
    lane = cuda_facts = None
    if "cuda" in backends:
        reason = sm90.unavailable_reason("cuda")
        try:
            lane = CudaLane()
        except RuntimeError as e:
            notes.append(f"CUDA kernels not modelled: {e}")
        if reason is None:
            cuda_facts = sm90.cuda_facts()
        else:
            notes.append(f"CUDA machine code not read: {reason}")
    if "triton" in backends and sm90.unavailable_reason("triton"):
        notes.append(f"Triton machine code not read: {sm90.unavailable_reason('triton')}")
    predictions = []
    chosen = cases(names)
    try:
        for case in chosen:
            predictions += model_case(case, backends, lane, cuda_facts, log)
    finally:
        if lane is not None:
            lane.close()
    variants = None
    if "triton" in backends and with_variants and sm90.unavailable_reason("triton") is None:
        log("compiling every Triton kernel variant for sm_90 (tests/triton_sm90_compile.py --facts)")
        try:
            variants = sm90.summarize_variants(sm90.triton_variants())
        except RuntimeError as e:
            notes.append(f"Triton variants not read: {e}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model-h200.md").write_text(markdown(predictions, cuda_facts, command, notes, variants))
        (out_dir / "model-h200.json").write_text(json.dumps(to_json(predictions, cuda_facts, command, notes,
                                                                    variants), indent=1, default=str))
        log(f"wrote {out_dir / 'model-h200.md'} and {out_dir / 'model-h200.json'}")
    return predictions


def rerender(json_path: Path) -> None:
    """Write the markdown table again from its JSON (no tracing): model-h200.md next to it."""
    data = json.loads(json_path.read_text())
    fields = set(Prediction.__dataclass_fields__)
    predictions = [Prediction(**{k: v for k, v in p.items() if k in fields}) for p in data["predictions"]]
    kernel_fields = set(sm90.KernelFacts.__dataclass_fields__)
    cuda_facts = {n: sm90.KernelFacts(**{k: v for k, v in f.items() if k in kernel_fields})
                  for n, f in data.get("cuda_kernels", {}).items()}
    variants = data.get("triton_variants") or None
    json_path.with_suffix(".md").write_text(markdown(predictions, cuda_facts, data["command"], data["notes"],
                                                     variants))
    data["ranking"] = ranking(predictions)
    json_path.write_text(json.dumps(data, indent=1, default=str))


def main(argv=None) -> int:
    """``python -m fusedloss.benchmark.model [--out DIR] [--case NAME ...]``; re-runs itself under
    TRITON_INTERPRET=1 when Triton was imported without it (the Triton kernels run interpreted)."""
    import argparse

    from ..backends import triton_interpreter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="folder for model-h200.md/.json ('' to skip)")
    parser.add_argument("--case", action="append", help="model only this case (repeatable)")
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rerender", metavar="JSON", help="only write the markdown again from this JSON")
    args = parser.parse_args(argv)
    if args.rerender:
        rerender(Path(args.rerender))
        return 0
    command = args.command or "python bench/run.py --section model"
    if not (ROOT / "tests" / "simt" / "trace.h").is_file():
        parser.error(f"the model needs a source checkout of fusedloss (the SIMT lane's trace build in tests/simt, "
                     f"tests/triton_sm90_compile.py); {ROOT} has none. Run it from a git clone.")
    if not triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "fusedloss.benchmark.model", "--out", args.out, "--backends", args.backends,
               "--command", command, *[a for c in (args.case or []) for a in ("--case", c)]]
        return subprocess.run(cmd, env=env).returncode
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(tuple(args.case) if args.case else None, tuple(args.backends.split(",")),
        Path(args.out) if args.out else None, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
