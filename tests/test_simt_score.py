"""The score CUDA kernels (csrc/score/score_cuda.cu), run on CPU threads under ASan + UBSan
(tests/simt), against the family's reference: the three terms, the total, the signed pair counts
(exactly, against the pair matrix), the ranking scale, the status bits and the gradients of
scores and logits. Both forward paths run: all pairs in shared-memory tiles (B <= 4096) and the
sorted one (keys kernel, CUB radix sort stood in for on the host, binary searches).

Each case launches the forward twice in two block orders (bitwise equal, arrival counter back to
0) and the backward once, through the host functions the torch dispatch calls, with every output
poisoned beforehand.
"""

import pytest
import torch
from conftest import assert_close
from simt.harness import (
    address,
    arrival_counter,
    assert_rounded_like,
    dtype_of,
    forward_twice,
    make,
    poisoned,
    use_device,
    workspace,
)

from fusedloss.score import layout as score_layout
from fusedloss.score.config import ScoreConfig
from fusedloss.score.layout import ALL_TERMS, RANKING_ONLY, TERM_BIT
from fusedloss.score.finite import status_of
from fusedloss.score.reference import (
    all_pairs_margin_ranking_reference,
    score_loss_reference,
)

pytestmark = pytest.mark.simt

ALL_PAIRS_MAX = score_layout.ALL_PAIRS_MAX["cuda"]  # beyond, the CUDA forward sorts


def shifted(t):
    """t as a view one row into a copy one row longer: the same values at an address
    one row past a 16-byte boundary (for 16-byte rows, aligned)."""
    return torch.cat([t[:1], t])[1:]


def make_inputs(B, dtype, labels, label_dtype, ties, strided, cls, g, offset=""):
    if ties:  # scores on a 1/4 grid, margin 0.5 or 1: many pairs exactly at the hinge
        base = torch.randint(-4, 5, (B,), generator=g).to(torch.float64) * 0.25
    else:
        base = torch.randn(B, generator=g, dtype=torch.float64)
    scores = torch.stack([base, base], 1).to(dtype)[:, 0] if strided else base.to(dtype)
    if labels == "binary":
        y = (torch.rand(B, generator=g) > 0.5).double()
    elif labels == "soft":  # soft targets; 0.5 exactly is fake
        y = torch.tensor([0.0, 0.3, 0.5, 0.51, 0.7, 1.0], dtype=torch.float64)[torch.randint(0, 6, (B,), generator=g)]
    elif labels == "near half":  # float64 labels that round to 0.5 in float32: the class test reads them as given
        y = torch.tensor([0.5 + 1e-12, 0.5, 0.5 - 1e-12, 0.0, 1.0], dtype=torch.float64)[torch.arange(B) % 5]
    elif labels == "one real":
        y = torch.zeros(B, dtype=torch.float64)
        y[B // 2] = 1
    elif labels == "one fake":
        y = torch.ones(B, dtype=torch.float64)
        y[B // 3] = 0
    else:
        y = torch.full((B,), 1.0 if labels == "real" else 0.0, dtype=torch.float64)
    lab = y.to(label_dtype or dtype)
    if strided:
        lab = torch.stack([lab, lab], 1)[:, 1]
    logits = None
    if cls:  # column-major when strided
        logits = (torch.randn(2, B, generator=g, dtype=torch.float64).to(dtype).t() if strided
                  else torch.randn(B, 2, generator=g, dtype=torch.float64).to(dtype))
    # offset: the input given as an unaligned contiguous view (the element-by-element path)
    if offset == "scores":
        scores = shifted(scores)
    elif offset == "labels":
        lab = shifted(lab)
    elif offset == "logits":
        logits = shifted(logits)
    return scores, lab, logits


def check(B, dtype, term_mask=ALL_TERMS, smooth=False, reduction="mean", margin=0.5, labels="binary", label_dtype=None,
          ties=False, strided=False, grad_stride=1, mask=(True, True), sms=2, bad=None, min_blocks=1,
          grid_stride=False, null="", offset=""):


    k = use_device(sms).score
    g = torch.Generator().manual_seed(B + 7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cls, rank = bool(term_mask & TERM_BIT["classification"]), bool(term_mask & RANKING_ONLY)
    scores, lab, logits = make_inputs(B, dtype, labels, label_dtype, ties, strided, cls, g, offset)
    if bad == "score_nan":
        scores[B // 3] = float("nan")
    elif bad == "logit_inf":
        logits[B // 2, 1] = float("inf")
    elif bad == "overflow":  # finite inputs, a non-finite total
        scores[0] = torch.finfo(dtype).max
    config = ScoreConfig.build(regression_type="smoothl1" if smooth else "mse", margin=margin, reduction=reduction)
    settings = config.settings()
    # As csrc/score/score.cpp's cuda_inputs fills it.
    inputs = make(k.CudaInputs, scores=address(scores), scores_stride=scores.stride(0), labels=address(lab),
                  labels_stride=lab.stride(0), labels_dtype=dtype_of(lab), logits=address(logits),
                  logits_strides=list(logits.stride()) if cls else [0, 0], settings=address(settings),
                  dtype=dtype_of(scores),
                  problem=make(k.Problem, B=B, term_mask=term_mask, smooth_l1=smooth, ranking_sum=reduction == "sum"))
    out = dict(terms=poisoned((3,), acc), total=poisoned((), acc), counts=poisoned((B if rank else 0,), torch.int32),
               rank_scale=poisoned((), torch.float64), status=poisoned((), torch.int32))
    outputs = make(k.CudaOutputs, **{name: address(t) for name, t in out.items()})
    ws = workspace(k.forward_workspace_bytes(inputs))
    launches = forward_twice(lambda: k.forward_cuda(inputs, outputs, address(ws), address(arrival_counter())),
                             list(out.values()))
    counting = launches[-1]["grid"][0]
    assert counting >= min_blocks, f"the counting launch ran {counting} blocks, the case needs {min_blocks}"
    assert len(launches) == (2 if rank and B > ALL_PAIRS_MAX else 1), f"launches {launches}"
    if grid_stride:
        assert B > counting * 256, f"{B} scores fit one pass of {counting} blocks"

    ref = score_loss_reference(scores, logits if cls else torch.zeros(B, 2, dtype=dtype), lab, config)
    want = [ref["regression"] if term_mask & TERM_BIT["regression"] else torch.zeros((), dtype=acc),
            ref["classification"] if cls else torch.zeros((), dtype=acc),
            all_pairs_margin_ranking_reference(scores, lab, margin, reduction) if rank else torch.zeros((), dtype=acc)]
    want_total = sum(w * want[i] for i, w in enumerate(config.weights) if term_mask >> i & 1)
    if bad:
        status = int(status_of(scores, logits, want_total))
        assert out["status"].item() == status, f"status {out['status'].item()}, the reference's {status}"
        return
    assert out["status"].item() == 0, f"status {out['status'].item()} for finite inputs"
    assert_close(out["terms"], torch.stack(want), dtype, msg="terms")
    assert_close(out["total"], torch.as_tensor(want_total, dtype=acc), dtype, msg="total")
    real = lab > 0.5
    pairs = int(real.sum()) * int((~real).sum())
    want_scale = 1.0 if reduction == "sum" else (1.0 / pairs if pairs else 0.0)
    assert out["rank_scale"].item() == want_scale, f"rank_scale {out['rank_scale'].item()}, want {want_scale}"
    if rank:  # signed active-pair counts, exactly those of the pair matrix
        s, m = scores.to(acc), torch.tensor(margin, dtype=acc)
        active = ((m - (s[:, None] - s[None, :])) >= 0) & real[:, None] & ~real[None, :]
        want_counts = torch.where(real, -active.sum(1), active.sum(0)).to(torch.int32)
        wrong = (out["counts"] != want_counts).nonzero().flatten()
        assert wrong.numel() == 0, (f"{wrong.numel()} counts differ, first at {wrong[:5].tolist()}: "
                                    f"{out['counts'][wrong[:5]].tolist()} != {want_counts[wrong[:5]].tolist()}")
    if B == 0:
        return

    # Backward: d(loss)/d(term t) = grad_terms[t] + weight_t grad_total.
    if grad_stride == 0:
        grad_terms = torch.tensor(0.4, dtype=acc).expand(3)
    else:
        grad_terms = torch.randn(3 * grad_stride, generator=g, dtype=acc)[::grad_stride]
    grad_total = torch.tensor(0.6, dtype=acc)
    # null="terms" | "total": no gradient reaches them, a null pointer the kernel reads as 0.
    if null == "terms":
        grad_terms = torch.zeros((), dtype=acc).expand(3)
    if null == "total":
        grad_total = torch.tensor(0.0, dtype=acc)
    grad_scores = poisoned((B,), dtype) if mask[0] else None
    grad_logits = poisoned((B, 2), dtype) if mask[1] and cls else None
    error = k.backward_cuda(inputs, make(k.CudaGradients, grad_terms=0 if null == "terms" else address(grad_terms),
                                         grad_terms_stride=grad_terms.stride(0),
                                         grad_total=0 if null == "total" else address(grad_total),
                                         counts=address(out["counts"]) if rank else 0,
                                         rank_scale=address(out["rank_scale"]), grad_scores=address(grad_scores),
                                         grad_logits=address(grad_logits)))
    assert error == 0, f"backward launch failed: cudaError {error}"
    # The reference on arithmetic-dtype copies, so each gradient is rounded to the input dtype once
    # (with 16-bit leaves, autograd would round the regression and ranking parts separately).
    s_leaf = scores.detach().to(acc).requires_grad_()
    l_leaf = logits.detach().to(acc).requires_grad_() if cls else None
    r = score_loss_reference(s_leaf, l_leaf if cls else torch.zeros(B, 2, dtype=acc), lab, config)
    parts = [r["regression"], r["classification"] if cls else None,
             all_pairs_margin_ranking_reference(s_leaf, lab, margin, reduction)]
    loss = sum(part * (grad_terms[i] + w * grad_total)
               for i, (w, part) in enumerate(zip(config.weights, parts)) if term_mask >> i & 1)
    loss.backward()
    if grad_scores is not None:
        assert_close(grad_scores, s_leaf.grad.to(dtype), dtype, grad=True, msg="d/dscores")
        assert_rounded_like(grad_scores, s_leaf.grad.to(dtype), "d/dscores")
    if grad_logits is not None:
        assert_close(grad_logits, l_leaf.grad.to(dtype).contiguous(), dtype, grad=True, msg="d/dlogits")
        assert_rounded_like(grad_logits, l_leaf.grad.to(dtype), "d/dlogits")


CASES = {
    "all pairs, 2 blocks": dict(B=300, dtype=torch.float32),
    "all pairs fp64, soft labels, smooth-L1, sum": dict(B=513, dtype=torch.float64, smooth=True, reduction="sum",
                                                        labels="soft"),
    "all pairs, ties at the hinge": dict(B=200, dtype=torch.float32, ties=True),
    "all pairs, all real": dict(B=100, dtype=torch.float32, labels="real"),
    "all pairs fp16, float32 labels, strided": dict(B=260, dtype=torch.float16, label_dtype=torch.float32,
                                                    strided=True, ties=True),
    "all pairs bf16, ranking only": dict(B=100, dtype=torch.bfloat16, term_mask=RANKING_ONLY, ties=True),
    "B=1 real": dict(B=1, dtype=torch.float32, labels="real"),
    "B=1 fake": dict(B=1, dtype=torch.float64, labels="fake"),
    "one real among fakes": dict(B=77, dtype=torch.float32, labels="one real", ties=True),
    "one fake among reals, sorted": dict(B=4222, dtype=torch.float32, labels="one fake", ties=True),
    "largest all-pairs, fp64 strided": dict(B=ALL_PAIRS_MAX, dtype=torch.float64, ties=True, strided=True,
                                            label_dtype=torch.float64, min_blocks=8),
    "negative margin, grad_terms stride 3": dict(B=150, dtype=torch.float64, margin=-0.25, ties=True, grad_stride=3),
    "no grad_terms (null)": dict(B=150, dtype=torch.float32, null="terms"),
    "no grad_total (null)": dict(B=150, dtype=torch.float64, null="total"),
    "only d/dscores": dict(B=90, dtype=torch.float32, mask=(True, False)),
    "only d/dlogits, strided": dict(B=90, dtype=torch.bfloat16, mask=(False, True), strided=True),
    "no ranking, a thread per score": dict(B=2200, dtype=torch.float32, term_mask=ALL_TERMS & ~RANKING_ONLY),
    "empty batch": dict(B=0, dtype=torch.float32),
    "sorted, ties": dict(B=4200, dtype=torch.float32, ties=True),
    "sorted fp64, all fake": dict(B=4500, dtype=torch.float64, labels="fake"),
    "sorted fp16, soft labels, smooth-L1, sum": dict(B=ALL_PAIRS_MAX + 1, dtype=torch.float16, reduction="sum", labels="soft",
                                                    smooth=True),
    "all pairs fp32, float64 labels next to 0.5": dict(B=300, dtype=torch.float32, labels="near half",
                                                       label_dtype=torch.float64),
    "sorted bf16, float64 labels next to 0.5": dict(B=4200, dtype=torch.bfloat16, labels="near half",
                                                    label_dtype=torch.float64),
    "sorted bf16, ranking only, float32 labels": dict(B=5000, dtype=torch.bfloat16, term_mask=RANKING_ONLY, ties=True,
                                                      label_dtype=torch.float32),
    "sorted, all real, margin 0, grad_terms broadcast": dict(B=4300, dtype=torch.float32, labels="real", margin=0.0,
                                                             ties=True, grad_stride=0),
    "sorted fp64, margin 1, sum, strided": dict(B=4200, dtype=torch.float64, margin=1.0, ties=True, reduction="sum",
                                                strided=True),
    # 1 SM: 4 counting blocks walk 5000 scores (grid-stride), the backward's 8 blocks too.
    "sorted, grid-stride, 1 SM": dict(B=5000, dtype=torch.float32, sms=1, ties=True, grid_stride=True),
    # Contiguous 16-byte aligned inputs (the cases above, but strided) take the kernels' vector path,
    # 16 / element size scores per thread, the tail past the last whole vector element by element.
    # Unaligned views (one element past a 16-byte boundary) take the element-by-element path:
    "offset scores (unaligned)": dict(B=301, dtype=torch.float32, offset="scores"),
    "offset logits (unaligned), smooth-L1": dict(B=301, dtype=torch.float32, offset="logits", smooth=True),
    "sorted fp16, offset float32 labels (unaligned)": dict(B=4201, dtype=torch.float16, label_dtype=torch.float32,
                                                          offset="labels", ties=True),
    # 1 SM, fp64 (2 per vector): the keys kernel's 4 blocks and the backward's 8 walk their vectors
    # more than once (grid-stride).
    "sorted fp64, vector grid-stride, 1 SM": dict(B=4500, dtype=torch.float64, sms=1, ties=True),
    # 4 SMs: 16 counting blocks race for the last-block ticket.
    "sorted, 16 blocks race": dict(B=4100, dtype=torch.float32, sms=4, min_blocks=16, labels="soft"),
}

STATUS_CASES = {
    "NaN score, all pairs": dict(B=300, dtype=torch.float32, bad="score_nan"),
    "Inf logit, all pairs": dict(B=300, dtype=torch.float32, bad="logit_inf"),
    "NaN score, sorted": dict(B=4200, dtype=torch.float32, bad="score_nan"),
    "Inf logit, sorted fp64": dict(B=4200, dtype=torch.float64, bad="logit_inf"),
    "overflowing total": dict(B=64, dtype=torch.float32, bad="overflow"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_score_cuda_kernels_match_reference(sanitized, case):
    sanitized(check, **case)


@pytest.mark.parametrize("case", STATUS_CASES.values(), ids=STATUS_CASES.keys())
def test_score_cuda_status_names_the_non_finite_input(sanitized, case):
    sanitized(check, **case)
