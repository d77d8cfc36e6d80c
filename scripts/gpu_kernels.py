"""Every CUDA and Triton kernel of the three families, once each, forward and backward, through
the public functional API: the program compute-sanitizer runs in scripts/gpu_check.py.

    python scripts/gpu_kernels.py                       # on the GPU: backends cuda and triton
    python scripts/gpu_kernels.py --device cpu          # the same calls on cpu (and Triton's interpreter)

Inputs are made on the CPU and copied, and the reference runs on the CPU, so few kernels other
than fusedloss's run on the device. Each call's terms and gradients are checked against the
reference (loosely: this is a smoke test; tests/ holds the tolerances). Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """max |got - want| / max(|want|, tiny), on the CPU."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)) if want.numel() else 0.0


def run_pva(backend, device, dtype, g):
    from fusedloss.functional import pva_loss

    B, L, D = 3, 37, 100
    parts = {"all": (0, 0, 1.0), "head": (1, 40, 0.7), "tail": (95, 100, 2.0)}
    x = [torch.randn(B, L, D, generator=g).to(dtype) for _ in range(2)] + [torch.randn(B, D, generator=g).to(dtype)]
    dim_ws = torch.rand(D, generator=g, dtype=torch.float64) + 0.5

    def call(on, name):
        leaves = [t.to(on).requires_grad_() for t in x]
        total, terms = pva_loss(*leaves, part_w_dict=parts, use_last_frame_loss=True, use_reg_loss=True,
                                dim_ws=dim_ws.to(on), loss_type="l1" if dtype == torch.float64 else "l2", backend=name)
        (1.5 * total).backward()
        return torch.stack(list(terms.values())), [t.grad for t in leaves]

    return call(device, backend), call("cpu", "reference")


def run_blendshape(backend, device, dtype, g, *, groups=False):
    from fusedloss.functional import blendshape_loss

    shape = (64, 52) if groups else (300, 6, 52)  # 3-D: time tiles and several batch groups
    x = [torch.rand(shape, generator=g).to(dtype) for _ in range(4)]
    matrix = torch.randn(12, 52, generator=g).to(dtype) / 8
    kwargs = dict(perceptual_groups=[(range(12, 22), 1.0), (range(0, 10), 1.0)]) if groups else \
        dict(temporal_weight=0.3, landmark_weight=0.2, smoothing_weight=0.1, consistency_weight=0.2)

    def call(on, name):
        leaves = [t.to(on).requires_grad_() for t in x[:3]]
        total, terms = blendshape_loss(*leaves, x[3].to(on), landmark_matrix=matrix.to(on), backend=name,
                                       return_components=True, **kwargs)
        (0.7 * total).backward()
        return torch.stack([v for k, v in terms.items() if k != "total"]), [t.grad for t in leaves]

    return call(device, backend), call("cpu", "reference")


def run_score(backend, device, dtype, g, *, B):
    from fusedloss.functional import combined_loss

    scores = torch.rand(B, generator=g).to(dtype)
    logits = torch.randn(B, 2, generator=g).to(dtype)
    labels = (torch.rand(B, generator=g) < 0.5).float()  # float32 labels: the second label dtype too

    def call(on, name):
        leaves = [scores.to(on).requires_grad_(), logits.to(on).requires_grad_()]
        total, terms = combined_loss(*leaves, labels.to(on), backend=name)  # check_finite: the status too
        (0.9 * total).backward()
        return torch.stack([terms[k] for k in ("regression", "classification", "ranking")]), [t.grad for t in leaves]

    return call(device, backend), call("cpu", "reference")


def calls(device: str):
    """(name, function of (backend, device, dtype, generator)) for every kernel path."""
    out = [("pva", run_pva), ("blendshape", run_blendshape),
           ("blendshape groups", lambda *a: run_blendshape(*a, groups=True))]
    # All pairs in one launch, and the sorted path (CUDA beyond 2048 scores, Triton beyond 4096).
    out += [(f"score B={B}", lambda *a, B=B: run_score(*a, B=B)) for B in (300, 5000)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: cuda,triton on GPU; cpu,triton on CPU)")
    parser.add_argument("--dtypes", default="float32,float64,float16,bfloat16")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fusedloss import backends

    names = (args.backends or ("cuda,triton" if args.device == "cuda" else "cpu,triton")).split(",")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    failures = 0
    for backend in names:
        reason = backends.unavailable_reason(backend, args.device)
        if reason:
            print(f"{backend:7s} unavailable: {reason}")
            failures += args.device == "cuda"  # on a GPU machine every backend must run
            continue
        for dtype in dtypes:
            if backend == "triton" and args.device == "cpu" and dtype != torch.float32:
                continue  # the interpreter is slow: one dtype is enough to exercise the calls
            for name, run in calls(args.device):
                g = torch.Generator().manual_seed(0)
                (terms, grads), (ref_terms, ref_grads) = run(backend, args.device, dtype, g)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                errors = [close(terms, ref_terms, dtype)] + [close(a, b, dtype) for a, b in zip(grads, ref_grads)
                                                             if b is not None]
                limit = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
                ok = max(errors) < limit
                failures += not ok
                print(f"{backend:7s} {str(dtype):15s} {name:18s} max rel. error {max(errors):.1e}  "
                      f"{'ok' if ok else 'MISMATCH'}", flush=True)
    print("all kernels ran" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
