"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

Run as a script, without TRITON_INTERPRET (tests/test_build.py does). Each launcher is called with
CPU tensors while ``wrap_triton`` is replaced by a recorder, so the exact arguments a GPU launch
would get are captured; they are specialised as Triton's JIT does (an int equal to 1 becomes a
constexpr, others i32/i64) and compiled to a cubin with ``triton.compile``. Prints one line per
compiled kernel; exits non-zero on the first failure.

``--facts FILE`` also writes each variant's sm_90 facts (fusedloss.benchmark.sm90: registers,
spills, loads by width, occupancy) to FILE as JSON, for the H200 model's table.
"""

import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedloss.benchmark.traffic import as_on_gpu  # noqa: E402
from fusedloss.blendshape import config as blendshape_config  # noqa: E402
from fusedloss.blendshape import triton as triton_blendshape  # noqa: E402
from fusedloss.pva import config as pva_config  # noqa: E402
from fusedloss.pva import fake as pva_fake  # noqa: E402
from fusedloss.pva import triton as triton_pva  # noqa: E402
from fusedloss.score import config as score_config  # noqa: E402
from fusedloss.score import layout as score_layout  # noqa: E402
from fusedloss.score import triton as triton_score  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.int32: "*i32"}
compiled: dict = {}
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # keyword arguments of a launch that are not the kernel's
FACTS: list | None = None  # --facts: one entry per compiled variant


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compile_for_sm90(self.kernel, args, kwargs)
        return launch


def compile_for_sm90(kernel, args, kwargs):
    names = kernel.arg_names
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}  # the launch's compile options
    kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    # Specialised as Triton's JIT does: an int equal to 1 becomes a constexpr; a tensor whose data is
    # 16-byte aligned and an int divisible by 16 are marked so (tt.divisibility 16: what lets the
    # compiler emit 128-bit accesses).
    for index, (name, value) in enumerate(itertools.chain(zip(names, args), kwargs.items())):
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = POINTER[value.dtype] if isinstance(value, torch.Tensor) else kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(key, str) and key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())))
    if key in compiled:
        return
    binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options=options or None)
    compiled[key] = binary
    if FACTS is not None:
        from fusedloss.benchmark import sm90

        data = next((signature[n] for n in ("pred_ptr", "scores_ptr") if n in signature), "?")  # input dtype
        FACTS.append({**sm90.facts_of_binary(kernel.__name__, binary).summary(), "dtype": data.lstrip("*")})
    ones = sorted(k for k, v in constexprs.items() if signature[k] == "constexpr" and k not in kwargs)
    print(f"{kernel.__name__}: {len(binary.asm['cubin'])} bytes of sm_90 code, "
          f"{binary.metadata.num_warps} warps; constant 1s: {ones}")


def main():
    # The tensors are on the CPU: the launchers pick the tiles and grids of a GPU launch on an
    # H100/H200 (132 SMs), as the model's traffic measurement does.
    with as_on_gpu(sms=132):
        pva_kernels()
        blendshape_kernels()
        score_kernels()
    print(f"OK: {len(compiled)} kernel variants compiled for sm_90")


def blendshape_kernels():
    triton_blendshape.wrap_triton = Recorder
    forward = triton_blendshape.blendshape_forward._opoverload
    backward = triton_blendshape.blendshape_backward._opoverload
    matrix = torch.randn(7, 52, dtype=torch.float64)
    for shape, dtype, groups, everything in itertools.product(
        [(1, 52), (16, 52), (4096, 52), (16, 256, 52), (2, 1, 7), (3, 2, 1000)],
        [torch.float32, torch.float64, torch.float16, torch.bfloat16],
        [None, [([0, 1], 1.0)]],
        [False, True],
    ):
        weights = dict(temporal_weight=0.2, landmark_weight=0.1, smoothing_weight=0.1, consistency_weight=0.1) if everything else {}
        config = blendshape_config.BlendshapeConfig.build(perceptual_groups=groups, **weights)
        pred, target, raw, prev = (torch.rand(shape, dtype=dtype) for _ in range(4))
        computed, _ = blendshape_config.computed_terms(tuple(w != 0 for w in config.weights), pred.dim(), True, True)
        K = shape[-1]
        gram = blendshape_config.landmark_gram(matrix[:, :K]) if "landmark" in computed else None
        args = (pred, target, raw if "smoothing" in computed else None, prev if "consistency" in computed else None,
                config.settings(), config.group_coef() if groups else None, gram, 7 if gram is not None else 0,
                blendshape_config.term_mask(computed))
        terms, total, col_stats = forward(*args)
        grad_total = torch.ones((), dtype=total.dtype)
        backward(torch.zeros_like(grad_total).expand(terms.shape[0]), grad_total, col_stats, *args, [True, True, True])


def score_kernels():
    triton_score.wrap_triton = Recorder
    forward = triton_score.score_forward._opoverload
    backward = triton_score.score_backward._opoverload
    settings = score_config.ScoreConfig.build().settings()
    # B: one score (a constant 1), the all-pairs forward, the sorted one; float32 labels with bfloat16 scores,
    # float64 labels with float32 scores.
    for B, dtype, terms, flags in itertools.product(
        [1, 16, 100_000], [torch.float32, torch.float64, torch.float16, torch.bfloat16],
        [score_layout.ALL_TERMS, score_layout.RANKING_ONLY], [(False, False), (True, True)],
    ):
        scores = torch.rand(B, 2, dtype=dtype)[:, 0]
        logits = torch.randn(B, 2, dtype=dtype) if terms == score_layout.ALL_TERMS else None
        labels = torch.rand(B, dtype={torch.bfloat16: torch.float32, torch.float32: torch.float64}.get(dtype, dtype))
        args = (scores, logits, labels, settings, terms, *flags)
        out_terms, total, counts, rank_scale, _ = forward(*args)
        grad_total = torch.ones((), dtype=total.dtype)
        for mask in ([True, True], [True, False], [False, True]):
            backward(torch.zeros_like(grad_total).expand(3), grad_total, counts, rank_scale, *args, mask)


def pva_kernels():
    triton_pva.wrap_triton = Recorder
    forward = triton_pva.pva_forward._opoverload
    backward = triton_pva.pva_backward._opoverload
    shapes = [(1, 1, 1), (2, 80, 265), (3, 2, 7)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for (B, L, D), dtype, flags in itertools.product(shapes, dtypes, [(True, True, True, True), (False, False, False, False)]):
        l1, last, reg, weighted = flags
        parts = {"all": (0, D, 1.0)} if D < 5 else {"a": (0, 3, 1.0), "b": (2, 0, 2.0)}
        config = pva_config.PVAConfig.build(parts, last, reg, "l1" if l1 else "l2")
        pred = torch.randn(B, D, L, dtype=dtype).transpose(1, 2) if B == 3 else torch.randn(B, L, D, dtype=dtype)
        target = torch.randn(B, L, D, dtype=dtype)
        cond = torch.randn(B, D, dtype=dtype) if last else None
        table = config.part_table()
        dim_ws = torch.rand(D, dtype=torch.float64) if weighted else None
        args = (pred, target, cond, table, dim_ws, config.loss_type, last, reg)
        forward(*args)
        T = table.shape[0] * pva_fake.terms_per_part(last, reg)
        grad_total = torch.ones((), dtype=pva_fake.acc_dtype(dtype))
        for mask in ([True, True, True], [True, False, False], [False, True, False]):
            backward(torch.zeros_like(grad_total).expand(T), grad_total, *args, mask)


if __name__ == "__main__":
    facts_file = sys.argv[sys.argv.index("--facts") + 1] if "--facts" in sys.argv else None
    if facts_file:
        FACTS = []
    try:
        main()
        if facts_file:
            import json

            with open(facts_file, "w") as f:
                json.dump(FACTS, f)
    except Exception as exc:  # print the compiler's message in full
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
