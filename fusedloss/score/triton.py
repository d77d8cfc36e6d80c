"""Score loss (TIGAS) in Triton: the forward counts every score's active pairs without the pair
matrix, one backward launch.

Math (csrc/score/score_math.h): per score s with label y (real: y > 0.5) and logits (l0, l1), the
regression (s - y)^2 or smooth-L1, the cross-entropy softplus(l[other] - l[class]), and the number
n of active partners of the opposite class (pair (i real, j fake) active where
fl(m - fl(s_i - s_j)) >= 0). The ranking sum is sum_real n (m - s) + sum_fake n s, its gradient
-n (real) or +n (fake) per score; the forward stores those signed counts for the backward.

forward, B <= ALL_PAIRS_MAX: one launch; a program takes BLOCK scores and compares them with every
          score, BLOCK_J at a time.
forward, beyond: a keys kernel writes the rows [2, B] (reals: the score or +inf; fakes: the score or
          -inf), torch.sort orders them, and one launch finds each score's active partners by a
          binary search in the opposite row (the infinities are never active).
          Each program writes its partial sums; the last program to arrive (atomic ticket) reduces
          them in a fixed order into the terms, the total, the ranking's gradient scale and the status.
backward: one elementwise launch.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..core.autograd import register_terms_autograd
from ..core.numerics import acc_dtype
from ..core.triton import (
    on_device,
    pick,
    program_budget,
    sum_partials,
    triton_operator,
    zeroed_counter,
)
from . import fake, layout

# Up to this many scores the forward compares every pair; beyond, it sorts (layout.py says why).
ALL_PAIRS_MAX = layout.ALL_PAIRS_MAX["triton"]
# Terms (layout.TERMS order): the positions of the terms, of their weights in the settings table,
# and of grad_terms; then the margin's slot.
T_REG = tl.constexpr(layout.TERMS.index("regression"))
T_CLS = tl.constexpr(layout.TERMS.index("classification"))
T_RANK = tl.constexpr(layout.TERMS.index("ranking"))
MARGIN = tl.constexpr(layout.MARGIN)
# The status bits (layout.STATUS).
BAD_SCORES = tl.constexpr(layout.STATUS["scores"])
BAD_LOGITS = tl.constexpr(layout.STATUS["logits"])
BAD_TOTAL = tl.constexpr(layout.STATUS["total"])
# Partial sums per program: regression, classification, ranking, reals, bad scores, bad logits.
P_REG = tl.constexpr(0)
P_CLS = tl.constexpr(1)
P_RANK = tl.constexpr(2)
P_REALS = tl.constexpr(3)
P_BAD_SCORES = tl.constexpr(4)
P_BAD_LOGITS = tl.constexpr(5)
PARTIALS = tl.constexpr(8)  # (6 used)


@triton.jit
def _active(margin, real_score, fake_score):
    """The hinge max(0, m - (s_i - s_j)) of a real and a fake score is active (counts, passes gradient)."""
    return margin - (real_score - fake_score) >= 0.0


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _logit_gap(l0, l1, real):
    """l[other] - l[class], NaN where a logit is +inf (torch's log_softmax: inf - inf)."""
    inf = float("inf")
    return tl.where((l0 == inf) | (l1 == inf), float("nan"), tl.where(real, l0 - l1, l1 - l0))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def score_keys_kernel(scores_ptr, ss, labels_ptr, ys, keys_ptr, B, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = k < B
    s = tl.load(scores_ptr + k * ss, mask=ok, other=0.0).to(ACC)
    real = tl.load(labels_ptr + k * ys, mask=ok, other=0.0) > 0.5  # in the labels' own dtype
    tl.store(keys_ptr + k, tl.where(real, s, float("inf")), mask=ok)
    tl.store(keys_ptr + B + k, tl.where(real, float("-inf"), s), mask=ok)


@triton.jit
def score_forward_kernel(
    scores_ptr, ss, labels_ptr, ys, logits_ptr, ls0, ls1, settings_ptr, rows_ptr,
    partials_ptr, counter_ptr, terms_ptr, total_ptr, counts_ptr, rank_scale_ptr, status_ptr,
    B, search_steps,
    REG: tl.constexpr, CLS: tl.constexpr, RANK: tl.constexpr, SMOOTH_L1: tl.constexpr, RANK_SUM: tl.constexpr,
    SORTED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_PROGS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    margin = tl.load(settings_ptr + MARGIN).to(ACC)
    reg = tl.zeros([BLOCK], ACC)
    ce = tl.zeros([BLOCK], ACC)
    rank = tl.zeros([BLOCK], tl.float64)
    reals = tl.zeros([BLOCK], tl.int32)
    bad_s = tl.zeros([BLOCK], tl.int32)
    bad_l = tl.zeros([BLOCK], tl.int32)
    for tile in range(pid, tl.cdiv(B, BLOCK), n_progs):
        k = tl.cast(tile, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = k < B
        s = tl.load(scores_ptr + k * ss, mask=ok, other=0.0).to(ACC)
        label = tl.load(labels_ptr + k * ys, mask=ok, other=0.0)
        real = label > 0.5  # in the labels' own dtype (a float64 label may round to 0.5 in ACC)
        y = label.to(ACC)
        reals += (real & ok).to(tl.int32)
        bad_s += (ok & ~_finite(s)).to(tl.int32)
        d = s - y
        if SMOOTH_L1:
            r = tl.where(tl.abs(d) < 1.0, 0.5 * d * d, tl.abs(d) - 0.5)
        else:
            r = d * d
        reg += tl.where(ok, r, 0.0)
        if CLS:
            l0 = tl.load(logits_ptr + k * ls0, mask=ok, other=0.0).to(ACC)
            l1 = tl.load(logits_ptr + k * ls0 + ls1, mask=ok, other=0.0).to(ACC)
            bad_l += (ok & ~(_finite(l0) & _finite(l1))).to(tl.int32)
            ce += tl.where(ok, _softplus(_logit_gap(l0, l1, real)), 0.0)
        if RANK:
            if SORTED:
                # Real scores search the fake row (active is false, then true: count = B - first
                # active); fake scores search the real row (true, then false: count = first inactive).
                row = rows_ptr + tl.where(real, B, 0)
                lo = tl.zeros([BLOCK], tl.int64)
                hi = tl.zeros([BLOCK], tl.int64) + B
                for _ in range(search_steps):
                    open_ = lo < hi
                    mid = (lo + hi) // 2
                    v = tl.load(row + mid, mask=ok & open_, other=0.0)
                    right = tl.where(real, ~_active(margin, s, v), _active(margin, v, s))
                    lo = tl.where(open_ & right, mid + 1, lo)
                    hi = tl.where(open_ & ~right, mid, hi)
                n = tl.where(real, B - lo, lo)
            else:
                n = tl.zeros([BLOCK], tl.int64)
                for j0 in range(0, B, BLOCK_J):
                    j = j0 + tl.arange(0, BLOCK_J)
                    j_ok = j < B
                    sj = tl.load(scores_ptr + j.to(tl.int64) * ss, mask=j_ok, other=0.0).to(ACC)
                    real_j = tl.load(labels_ptr + j.to(tl.int64) * ys, mask=j_ok, other=0.0) > 0.5
                    pair = tl.where(real[:, None],
                                    _active(margin, s[:, None], sj[None, :]) & ~real_j[None, :],
                                    _active(margin, sj[None, :], s[:, None]) & real_j[None, :])
                    n += tl.sum((pair & j_ok[None, :]).to(tl.int64), axis=1)
            n = tl.where(ok, n, 0)
            signed = tl.where(real, -n, n)
            tl.store(counts_ptr + k, signed.to(tl.int32), mask=ok)
            # count (m - s) for a real score, count s for a fake one; in float64 (they cancel).
            share = tl.where(real, margin.to(tl.float64) - s.to(tl.float64), s.to(tl.float64))
            rank += n.to(tl.float64) * share
    out = partials_ptr + pid * PARTIALS
    tl.store(out + P_REG, tl.sum(reg.to(tl.float64)))
    tl.store(out + P_CLS, tl.sum(ce.to(tl.float64)))
    tl.store(out + P_RANK, tl.sum(rank))
    tl.store(out + P_REALS, tl.sum(reals).to(tl.float64))
    tl.store(out + P_BAD_SCORES, tl.sum(bad_s).to(tl.float64))
    tl.store(out + P_BAD_LOGITS, tl.sum(bad_l).to(tl.float64))

    # The last program to arrive reduces every program's partials, in program order.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1)
    if ticket == n_progs - 1:
        sums = sum_partials(partials_ptr, n_progs, PARTIALS, BLOCK_PROGS, tl.float64)
        s_reg, s_cls, s_rank = pick(sums, P_REG), pick(sums, P_CLS), pick(sums, P_RANK)
        n_real, n_bad_s, n_bad_l = pick(sums, P_REALS), pick(sums, P_BAD_SCORES), pick(sums, P_BAD_LOGITS)
        pairs = n_real * (tl.cast(B, tl.float64) - n_real)
        if RANK_SUM:
            scale = tl.full([], 1.0, tl.float64)
        else:
            scale = tl.where(pairs > 0, 1.0 / tl.maximum(pairs, 1.0), 0.0)
        inv_b = 1.0 / tl.maximum(tl.cast(B, tl.float64), 1.0)  # (tl.cast: B may be a constexpr 1)
        v_reg = tl.full([], 0.0, ACC)
        v_cls = tl.full([], 0.0, ACC)
        v_rank = tl.full([], 0.0, ACC)
        total = tl.full([], 0.0, ACC)
        if REG:
            v_reg = (s_reg * inv_b).to(ACC)
            total += tl.load(settings_ptr + T_REG).to(ACC) * v_reg
        if CLS:
            v_cls = (s_cls * inv_b).to(ACC)
            total += tl.load(settings_ptr + T_CLS).to(ACC) * v_cls
        if RANK:
            v_rank = (s_rank * scale).to(ACC)
            total += tl.load(settings_ptr + T_RANK).to(ACC) * v_rank
        tl.store(terms_ptr + T_REG, v_reg)
        tl.store(terms_ptr + T_CLS, v_cls)
        tl.store(terms_ptr + T_RANK, v_rank)
        tl.store(total_ptr, total)
        tl.store(rank_scale_ptr, scale)
        status = ((n_bad_s > 0).to(tl.int32) * BAD_SCORES | (n_bad_l > 0).to(tl.int32) * BAD_LOGITS
                  | (~_finite(total)).to(tl.int32) * BAD_TOTAL)
        tl.store(status_ptr, status)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def score_backward_kernel(
    grad_terms_ptr, g_stride, grad_total_ptr, counts_ptr, rank_scale_ptr, settings_ptr,
    scores_ptr, ss, labels_ptr, ys, logits_ptr, ls0, ls1, grad_scores_ptr, grad_logits_ptr, B,
    REG: tl.constexpr, CLS: tl.constexpr, RANK: tl.constexpr, SMOOTH_L1: tl.constexpr,
    NEED_SCORES: tl.constexpr, NEED_LOGITS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = k < B
    # d(loss)/d(term t) = grad_terms[t] + weight_t grad_total, divided by the term's count.
    g_total = tl.load(grad_total_ptr).to(ACC)
    inv_b = 1.0 / tl.cast(B, ACC)  # (tl.cast: B may be specialised to a constexpr 1)
    label = tl.load(labels_ptr + k * ys, mask=ok, other=0.0)
    real = label > 0.5  # in the labels' own dtype
    y = label.to(ACC)
    if NEED_SCORES:
        s = tl.load(scores_ptr + k * ss, mask=ok, other=0.0).to(ACC)
        g = tl.zeros([BLOCK], ACC)
        if REG:
            c_reg = (tl.load(grad_terms_ptr + T_REG * g_stride).to(ACC)
                     + tl.load(settings_ptr + T_REG).to(ACC) * g_total) * inv_b
            d = s - y
            if SMOOTH_L1:
                g += c_reg * tl.minimum(tl.maximum(d, -1.0), 1.0)
            else:
                g += c_reg * 2.0 * d
        if RANK:
            c_rank = (tl.load(grad_terms_ptr + T_RANK * g_stride).to(ACC)
                      + tl.load(settings_ptr + T_RANK).to(ACC) * g_total).to(tl.float64) * tl.load(rank_scale_ptr)
            g += c_rank.to(ACC) * tl.load(counts_ptr + k, mask=ok, other=0).to(ACC)
        tl.store(grad_scores_ptr + k, g.to(grad_scores_ptr.dtype.element_ty), mask=ok)
    if NEED_LOGITS:
        c_cls = ((tl.load(grad_terms_ptr + T_CLS * g_stride).to(ACC) + tl.load(settings_ptr + T_CLS).to(ACC) * g_total)
                 * inv_b)
        l0 = tl.load(logits_ptr + k * ls0, mask=ok, other=0.0).to(ACC)
        l1 = tl.load(logits_ptr + k * ls0 + ls1, mask=ok, other=0.0).to(ACC)
        # d CE / d l[other] = sigmoid(l[other] - l[class]) = -d CE / d l[class].
        g_other = c_cls / (1.0 + tl.exp(-_logit_gap(l0, l1, real)))
        ty = grad_logits_ptr.dtype.element_ty
        tl.store(grad_logits_ptr + 2 * k, tl.where(real, g_other, -g_other).to(ty), mask=ok)
        tl.store(grad_logits_ptr + 2 * k + 1, tl.where(real, -g_other, g_other).to(ty), mask=ok)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _logit_strides(logits: Optional[torch.Tensor]):
    return (0, 0) if logits is None else (logits.stride(0), logits.stride(1))


def _all_pairs_tile(device: torch.device) -> tuple[int, int]:
    """(scores per program, scores compared per step) of the all-pairs forward; small when interpreted."""
    return (64, 32) if device.type == "cuda" else (32, 64)


def _term_flags(term_mask: int) -> dict:
    bits = layout.TERM_BIT
    return dict(REG=bool(term_mask & bits["regression"]), CLS=bool(term_mask & bits["classification"]),
                RANK=bool(term_mask & bits["ranking"]))


@triton_operator("fusedloss_triton::score_forward", fake.forward_fake)
def score_forward(
    scores: torch.Tensor,
    logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    settings: torch.Tensor,
    term_mask: int,
    smooth_l1: bool,
    ranking_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B = int(scores.shape[0])  # (sizes traced as symbols are specialised here)
    acc = acc_dtype(scores.dtype)
    out_terms, total, counts, rank_scale, status = fake.forward_fake(
        scores, logits, labels, settings, term_mask, smooth_l1, ranking_sum)
    flags = _term_flags(term_mask)
    sorted_ = flags["RANK"] and B > ALL_PAIRS_MAX
    block, block_j = _all_pairs_tile(scores.device)
    if sorted_ or not flags["RANK"]:
        block = 256
    tiles = triton.cdiv(B, block)
    programs = max(1, min(tiles, program_budget(scores.device, per_sm=8)))
    partials = torch.empty((programs, PARTIALS.value), dtype=torch.float64, device=scores.device)
    with on_device(scores):
        rows = settings  # a placeholder pointer without the sort, never read
        if sorted_:
            keys = torch.empty((2, B), dtype=acc, device=scores.device)
            wrap_triton(score_keys_kernel)[(triton.cdiv(B, 1024),)](
                scores, scores.stride(0), labels, labels.stride(0), keys, B, ACC=_tl_acc(scores.dtype), BLOCK=1024)
            rows = torch.sort(keys, dim=1).values
        wrap_triton(score_forward_kernel)[(programs,)](
            scores, scores.stride(0), labels, labels.stride(0), scores if logits is None else logits,
            *_logit_strides(logits), settings, rows,
            partials, zeroed_counter(scores), out_terms, total, counts if flags["RANK"] else partials, rank_scale,
            status, B, max(B, 1).bit_length(),
            **flags, SMOOTH_L1=smooth_l1, RANK_SUM=ranking_sum, SORTED=sorted_, ACC=_tl_acc(scores.dtype),
            BLOCK=block, BLOCK_J=block_j, BLOCK_PROGS=64,
        )
    return out_terms, total, counts, rank_scale, status


@triton_operator("fusedloss_triton::score_backward", fake.backward_fake)
def score_backward(
    grad_terms: torch.Tensor,
    grad_total: torch.Tensor,
    counts: torch.Tensor,
    rank_scale: torch.Tensor,
    scores: torch.Tensor,
    logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    settings: torch.Tensor,
    term_mask: int,
    smooth_l1: bool,
    ranking_sum: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_scores, grad_logits = fake.backward_fake(grad_terms, grad_total, counts, rank_scale, scores, logits, labels,
                                                  settings, term_mask, smooth_l1, ranking_sum, output_mask)
    need = (grad_scores.numel() > 0, grad_logits.numel() > 0)
    B = int(scores.shape[0])
    if not any(need) or B == 0:
        return grad_scores, grad_logits
    flags = _term_flags(term_mask)
    block = 1024
    with on_device(scores):
        wrap_triton(score_backward_kernel)[(triton.cdiv(B, block),)](
            grad_terms, grad_terms.stride(0), grad_total, counts if flags["RANK"] else rank_scale, rank_scale,
            settings, scores, scores.stride(0), labels, labels.stride(0), scores if logits is None else logits,
            *_logit_strides(logits),
            # outputs that are not wanted get scores as a placeholder pointer, never written
            grad_scores if need[0] else scores, grad_logits if need[1] else scores, B,
            **flags, SMOOTH_L1=smooth_l1, NEED_SCORES=need[0], NEED_LOGITS=need[1], ACC=_tl_acc(scores.dtype),
            BLOCK=block,
        )
    return grad_scores, grad_logits


# The autograd of the operators (core/autograd.py), and its eager form: scores and logits (0, 1)
# get gradients; counts and rank_scale are the aux outputs; labels (2) are a constant of the loss.
score_forward_eager = register_terms_autograd(score_forward, score_backward, grad_inputs=(0, 1), num_aux=2,
                                              constants=(2,))
