"""PVA loss in Triton: one forward launch for every term of every part, one backward launch.

Math (the same as csrc/pva/pva_math.h; e = pred - target along time t, per column d):
  P = err(e[t]),  V = err(e[t+1] - e[t]),  A = err(e[t+2] - 2 e[t+1] + e[t]),
  L = err(pred[:, 0] - cond_frame),  R = |pred[t]|,   err = x^2 ("l2") or |x| ("l1");
  term(part, X) = scale / count_X * sum_{d in part} colw_X[d] * S_X[d]
with S_X the column sums, scale = weight (reg_weight for R), colw = dim_ws (1 for R, or without
dim_ws), count_X = rows_X * width, and 0 for an empty set.

forward:  programs (column block, row group) read [BLOCK_T, BLOCK_D] tiles of pred and target
          (rows t, t+1, t+2 for the differences; the shifted rows come from cache), accumulate
          the column sums, fold them into partial terms per program, and the last program to
          finish reduces the partials of all programs in a fixed order: terms [T], total [].
backward: programs (column block, row group) build the per-column coefficients c_X[d] once (sum
          over the parts holding d of grad_term * scale / count_X * colw_X[d]), then write
          d/dpred, d/dtarget (and d/dcond_frame) of their tiles (rows t-2 .. t+2 from cache).
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
    program_budget,
    sum_partial_columns,
    triton_operator,
    zeroed_counter,
)
from . import fake, layout

# Statistics, in the order of a part's terms, and the part table's columns (layout.py).
STAT_P = tl.constexpr(layout.STAT_P)
STAT_V = tl.constexpr(layout.STAT_V)
STAT_A = tl.constexpr(layout.STAT_A)
STAT_L = tl.constexpr(layout.STAT_L)
STAT_R = tl.constexpr(layout.STAT_R)
TABLE_COLUMNS = tl.constexpr(len(layout.TABLE_COLUMNS))
START = tl.constexpr(layout.START)
END = tl.constexpr(layout.END)
WEIGHT = tl.constexpr(layout.WEIGHT)
REG_WEIGHT = tl.constexpr(layout.REG_WEIGHT)


@triton.jit
def _err(x, L1: tl.constexpr):
    if L1:
        return tl.abs(x)
    else:
        return x * x


@triton.jit
def _err_grad(x, L1: tl.constexpr):
    """d err / dx; that of |x| is 0 at 0, as in torch.abs."""
    if L1:
        return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)
    else:
        return 2.0 * x


@triton.jit
def _part(table_ptr, p, D):
    """Row p of the part table: (start, end, weight, reg_weight), Ditto's span convention applied."""
    row = table_ptr + p * TABLE_COLUMNS
    start = tl.load(row + START).to(tl.int64)
    end = tl.load(row + END).to(tl.int64)
    start = tl.where(start > 0, start, 0)
    end = tl.where(end > 0, end, D)
    return start, end, tl.load(row + WEIGHT), tl.load(row + REG_WEIGHT)


@triton.jit
def _term_stat(k, LAST: tl.constexpr):
    """Statistic of the k-th term of a part: P V A, then L (with LAST) and R."""
    if LAST:
        return tl.where(k <= STAT_L, k, STAT_R)
    else:
        return tl.where(k <= STAT_A, k, STAT_R)


@triton.jit
def _term_factor(stat, start, end, weight, reg_weight, B, L, ACC: tl.constexpr):
    """scale / count of a term (0 when it averages over an empty set)."""
    rows = tl.where(
        stat == STAT_V, B * (L - 1), tl.where(stat == STAT_A, B * (L - 2), tl.where(stat == STAT_L, B, B * L))
    )
    count = rows * (end - start)
    scale = tl.where(stat == STAT_R, reg_weight, weight).to(ACC)
    return tl.where(count > 0, scale / tl.maximum(count, 1).to(ACC), 0.0)


@triton.jit
def pva_forward_kernel(
    pred_ptr, target_ptr,     # [B, L, D], strides (sp_*, sq_*)
    cond_ptr,                 # [B, D], strides (sc_*); read only with LAST
    table_ptr,                # [P, 4] float64 part table
    dimw_ptr,                 # [D] float64; read only with HAS_DIMW
    partials_ptr,             # [num_programs, T] ACC scratch
    counter_ptr,              # [1] int32, 0 on entry and on exit
    terms_ptr,                # [T] ACC out
    total_ptr,                # [] ACC out
    B, L, D, num_parts,
    sp_b, sp_t, sp_d, sq_b, sq_t, sq_d, sc_b, sc_d,
    K: tl.constexpr,          # terms per part
    L1: tl.constexpr, LAST: tl.constexpr, REG: tl.constexpr, HAS_DIMW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TERMS: tl.constexpr, BLOCK_PROGS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    n_r = tl.num_programs(1)
    num_programs = tl.num_programs(0) * n_r
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)  # column offsets times a (possibly huge) stride
    rows = tl.arange(0, BLOCK_T)
    chunks = tl.cdiv(L, BLOCK_T)
    B64 = tl.cast(B, tl.int64)  # (tl.cast: B may be specialised to a constexpr 1)
    L64 = tl.cast(L, tl.int64)

    acc_p = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    acc_v = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    acc_a = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    acc_r = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    acc_l = tl.zeros([BLOCK_D], ACC)
    for item in range(pid_r, B * chunks, n_r):
        b = (item // chunks).to(tl.int64)
        t0 = (item % chunks) * BLOCK_T
        t = (t0 + rows).to(tl.int64)
        p_base = pred_ptr + b * sp_b + cols64[None, :] * sp_d
        q_base = target_ptr + b * sq_b + cols64[None, :] * sq_d
        m0 = (t < L64)[:, None] & col_ok[None, :]
        m1 = (t + 1 < L64)[:, None] & col_ok[None, :]
        m2 = (t + 2 < L64)[:, None] & col_ok[None, :]
        p0 = tl.load(p_base + t[:, None] * sp_t, mask=m0, other=0.0).to(ACC)
        e0 = p0 - tl.load(q_base + t[:, None] * sq_t, mask=m0, other=0.0).to(ACC)
        e1 = (tl.load(p_base + (t + 1)[:, None] * sp_t, mask=m1, other=0.0).to(ACC)
              - tl.load(q_base + (t + 1)[:, None] * sq_t, mask=m1, other=0.0).to(ACC))
        e2 = (tl.load(p_base + (t + 2)[:, None] * sp_t, mask=m2, other=0.0).to(ACC)
              - tl.load(q_base + (t + 2)[:, None] * sq_t, mask=m2, other=0.0).to(ACC))
        acc_p += _err(e0, L1)
        acc_v += tl.where(m1, _err(e1 - e0, L1), 0.0)
        acc_a += tl.where(m2, _err(e2 - 2.0 * e1 + e0, L1), 0.0)
        if REG:
            acc_r += tl.abs(p0)
        if LAST:
            if t0 == 0:
                first = tl.load(pred_ptr + b * sp_b + cols64 * sp_d, mask=col_ok, other=0.0).to(ACC)
                cond = tl.load(cond_ptr + b * sc_b + cols64 * sc_d, mask=col_ok, other=0.0).to(ACC)
                acc_l += _err(first - cond, L1)

    # Column sums of this program, weighted per column, folded into its partial terms.
    col_p = tl.sum(acc_p, axis=0)
    col_v = tl.sum(acc_v, axis=0)
    col_a = tl.sum(acc_a, axis=0)
    col_r = tl.sum(acc_r, axis=0)
    if HAS_DIMW:
        colw = tl.load(dimw_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        col_p = col_p * colw
        col_v = col_v * colw
        col_a = col_a * colw
        acc_l = acc_l * colw
    program = pid_r * tl.num_programs(0) + pid_d
    T = num_parts * K
    out = partials_ptr + program.to(tl.int64) * T
    for p in range(num_parts):
        start, end, weight, reg_weight = _part(table_ptr, p, D)
        inside = (cols >= start) & (cols < end) & col_ok
        tl.store(out + p * K + STAT_P, tl.sum(tl.where(inside, col_p, 0.0)))
        tl.store(out + p * K + STAT_V, tl.sum(tl.where(inside, col_v, 0.0)))
        tl.store(out + p * K + STAT_A, tl.sum(tl.where(inside, col_a, 0.0)))
        if LAST:
            tl.store(out + p * K + STAT_L, tl.sum(tl.where(inside, acc_l, 0.0)))
        if REG:
            tl.store(out + p * K + K - 1, tl.sum(tl.where(inside, col_r, 0.0)))

    # The last program to arrive sums the partials of all programs, in program order.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1)
    if ticket == num_programs - 1:
        total = tl.zeros([BLOCK_TERMS], ACC)
        for j0 in range(0, T, BLOCK_TERMS):
            j = j0 + tl.arange(0, BLOCK_TERMS)
            j_ok = j < T
            acc = sum_partial_columns(partials_ptr, num_programs, T, j, j_ok, BLOCK_PROGS, ACC)
            part = tl.where(j_ok, j // K, 0)
            start, end, weight, reg_weight = _part(table_ptr, part, D)
            stat = _term_stat(j % K, LAST)
            term = acc * _term_factor(stat, start, end, weight, reg_weight, B64, L64, ACC)
            tl.store(terms_ptr + j, term, mask=j_ok)
            total += tl.where(j_ok, term, 0.0)
        tl.store(total_ptr, tl.sum(total, axis=0))
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def pva_backward_kernel(
    grad_terms_ptr, g_stride,  # [T] ACC, any stride (0: a broadcast scalar)
    grad_total_ptr,            # [] ACC; d(loss)/d(term) = grad_terms + grad_total
    pred_ptr, target_ptr,      # [B, L, D], strides (sp_*, sq_*)
    cond_ptr,                  # [B, D], strides (sc_*); read only with LAST
    table_ptr,                 # [P, 4] float64 part table
    dimw_ptr,                  # [D] float64; read only with HAS_DIMW
    grad_pred_ptr, grad_target_ptr,  # [B, L, D] contiguous; written with NEED_PRED / NEED_TARGET
    grad_cond_ptr,             # [B, D] contiguous; written with NEED_COND
    B, L, D, num_parts,
    sp_b, sp_t, sp_d, sq_b, sq_t, sq_d, sc_b, sc_d,
    K: tl.constexpr,
    L1: tl.constexpr, LAST: tl.constexpr, REG: tl.constexpr, HAS_DIMW: tl.constexpr,
    NEED_PRED: tl.constexpr, NEED_TARGET: tl.constexpr, NEED_COND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    n_r = tl.num_programs(1)
    chunks = tl.cdiv(L, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols.to(tl.int64)
    B64 = tl.cast(B, tl.int64)  # (tl.cast: B may be specialised to a constexpr 1)
    L64 = tl.cast(L, tl.int64)

    # Per-column coefficients, once per program: d(loss)/d(statistic of one element of column d).
    c_p = tl.zeros([BLOCK_D], ACC)
    c_v = tl.zeros([BLOCK_D], ACC)
    c_a = tl.zeros([BLOCK_D], ACC)
    c_l = tl.zeros([BLOCK_D], ACC)
    c_r = tl.zeros([BLOCK_D], ACC)
    g_total = tl.load(grad_total_ptr).to(ACC)  # total = sum of the terms
    for p in range(num_parts):
        start, end, weight, reg_weight = _part(table_ptr, p, D)
        inside = (cols >= start) & (cols < end)
        g = grad_terms_ptr + (p * K) * g_stride
        c_p += tl.where(inside, (tl.load(g).to(ACC) + g_total) * _term_factor(STAT_P, start, end, weight, reg_weight, B64, L64, ACC), 0.0)
        c_v += tl.where(inside, (tl.load(g + STAT_V * g_stride).to(ACC) + g_total) * _term_factor(STAT_V, start, end, weight, reg_weight, B64, L64, ACC), 0.0)
        c_a += tl.where(inside, (tl.load(g + STAT_A * g_stride).to(ACC) + g_total) * _term_factor(STAT_A, start, end, weight, reg_weight, B64, L64, ACC), 0.0)
        if LAST:
            c_l += tl.where(inside, (tl.load(g + STAT_L * g_stride).to(ACC) + g_total) * _term_factor(STAT_L, start, end, weight, reg_weight, B64, L64, ACC), 0.0)
        if REG:
            c_r += tl.where(inside, (tl.load(g + (K - 1) * g_stride).to(ACC) + g_total) * _term_factor(STAT_R, start, end, weight, reg_weight, B64, L64, ACC), 0.0)
    if HAS_DIMW:
        colw = tl.load(dimw_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        c_p = c_p * colw
        c_v = c_v * colw
        c_a = c_a * colw
        c_l = c_l * colw

    # Tiles (batch element, BLOCK_T rows) of this program's column block.
    for item in range(pid_r, B * chunks, n_r):
        b = (item // chunks).to(tl.int64)
        t0 = (item % chunks) * BLOCK_T
        # e at rows t-2 .. t+2 (0 outside [0, L)); the shifted tiles come from cache.
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        p_base = pred_ptr + b * sp_b + cols64[None, :] * sp_d
        q_base = target_ptr + b * sq_b + cols64[None, :] * sq_d
        ok = (t < L64)[:, None] & col_ok[None, :]
        okm1 = (t >= 1)[:, None] & ok
        okm2 = (t >= 2)[:, None] & ok
        okp1 = (t + 1 < L64)[:, None] & col_ok[None, :]
        okp2 = (t + 2 < L64)[:, None] & col_ok[None, :]
        p0 = tl.load(p_base + t[:, None] * sp_t, mask=ok, other=0.0).to(ACC)
        e0 = p0 - tl.load(q_base + t[:, None] * sq_t, mask=ok, other=0.0).to(ACC)
        em1 = (tl.load(p_base + (t - 1)[:, None] * sp_t, mask=okm1, other=0.0).to(ACC)
               - tl.load(q_base + (t - 1)[:, None] * sq_t, mask=okm1, other=0.0).to(ACC))
        em2 = (tl.load(p_base + (t - 2)[:, None] * sp_t, mask=okm2, other=0.0).to(ACC)
               - tl.load(q_base + (t - 2)[:, None] * sq_t, mask=okm2, other=0.0).to(ACC))
        ep1 = (tl.load(p_base + (t + 1)[:, None] * sp_t, mask=okp1, other=0.0).to(ACC)
               - tl.load(q_base + (t + 1)[:, None] * sq_t, mask=okp1, other=0.0).to(ACC))
        ep2 = (tl.load(p_base + (t + 2)[:, None] * sp_t, mask=okp2, other=0.0).to(ACC)
               - tl.load(q_base + (t + 2)[:, None] * sq_t, mask=okp2, other=0.0).to(ACC))
        # gv[s] = err'(e[s+1] - e[s]) for s in [0, L-1); ga[s] = err'(e[s+2] - 2 e[s+1] + e[s]) for s in [0, L-2).
        gv_0 = tl.where(okp1 & ok, _err_grad(ep1 - e0, L1), 0.0)
        gv_m1 = tl.where(okm1, _err_grad(e0 - em1, L1), 0.0)
        ga_0 = tl.where(okp2 & ok, _err_grad(ep2 - 2.0 * ep1 + e0, L1), 0.0)
        ga_m1 = tl.where(okm1 & okp1, _err_grad(ep1 - 2.0 * e0 + em1, L1), 0.0)
        ga_m2 = tl.where(okm2, _err_grad(e0 - 2.0 * em1 + em2, L1), 0.0)
        grad_e = (c_p[None, :] * tl.where(ok, _err_grad(e0, L1), 0.0)
                  + c_v[None, :] * (gv_m1 - gv_0)
                  + c_a[None, :] * (ga_m2 - 2.0 * ga_m1 + ga_0))

        out = (b * L64 + t)[:, None] * D + cols[None, :]
        if NEED_TARGET:
            tl.store(grad_target_ptr + out, (-grad_e).to(grad_target_ptr.dtype.element_ty), mask=ok)
        if NEED_PRED:
            grad_p = grad_e
            if REG:
                sign = (p0 > 0).to(ACC) - (p0 < 0).to(ACC)
                grad_p += c_r[None, :] * sign
            if LAST:
                cond = tl.load(cond_ptr + b * sc_b + cols64 * sc_d, mask=col_ok, other=0.0).to(ACC)
                g_last = c_l[None, :] * _err_grad(p0 - cond[None, :], L1)
                grad_p += tl.where((t == 0)[:, None] & ok, g_last, 0.0)
            tl.store(grad_pred_ptr + out, grad_p.to(grad_pred_ptr.dtype.element_ty), mask=ok)
        if NEED_COND:
            if t0 == 0:
                first = tl.load(pred_ptr + b * sp_b + cols64 * sp_d, mask=col_ok, other=0.0).to(ACC)
                cond = tl.load(cond_ptr + b * sc_b + cols64 * sc_d, mask=col_ok, other=0.0).to(ACC)
                g_cond = -(c_l * _err_grad(first - cond, L1))
                tl.store(grad_cond_ptr + b * D + cols, g_cond.to(grad_cond_ptr.dtype.element_ty), mask=col_ok)


def _tile(device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): GPU tiles, or small ones for the interpreter (fast, many programs)."""
    return (8, 64) if device.type == "cuda" else (8, 32)


def _grid(pred: torch.Tensor, per_sm: int) -> tuple[int, int, int, int]:
    """Tile and a persistent grid of (column blocks, row groups): about per_sm programs per SM,
    each walking (batch element, time chunk) tiles of its column block."""
    B, L, D = (int(n) for n in pred.shape)  # (sizes traced as symbols are specialised here)
    block_t, block_d = _tile(pred.device)
    col_blocks = triton.cdiv(D, block_d)
    tiles = B * triton.cdiv(L, block_t)
    row_groups = max(1, min(tiles, program_budget(pred.device, per_sm) // col_blocks))
    return block_t, block_d, col_blocks, row_groups


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _cond_args(pred, cond_frame, use_last_frame):
    if use_last_frame:
        return cond_frame, cond_frame.stride(0), cond_frame.stride(1)
    return pred, 0, 0  # never read


@triton_operator("fusedloss_triton::pva_forward", fake.forward_fake)
def pva_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: Optional[torch.Tensor],
    part_table: torch.Tensor,
    dim_ws: Optional[torch.Tensor],
    loss_type: str,
    use_last_frame: bool,
    use_reg: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, D = (int(n) for n in pred.shape)  # (sizes traced as symbols are specialised here)
    P = int(part_table.shape[0])
    K = fake.terms_per_part(use_last_frame, use_reg)
    block_t, block_d, col_blocks, row_groups = _grid(pred, per_sm=4)
    partials = torch.empty((col_blocks * row_groups, P * K), dtype=acc_dtype(pred.dtype), device=pred.device)
    terms, total = fake.empty_terms(pred, P, use_last_frame, use_reg)
    cond, sc_b, sc_d = _cond_args(pred, cond_frame, use_last_frame)
    with on_device(pred):
        wrap_triton(pva_forward_kernel)[(col_blocks, row_groups)](
            pred, target, cond, part_table, dim_ws if dim_ws is not None else part_table,
            partials, zeroed_counter(pred), terms, total,
            B, L, D, P,
            pred.stride(0), pred.stride(1), pred.stride(2),
            target.stride(0), target.stride(1), target.stride(2), sc_b, sc_d,
            K=K, L1=loss_type == "l1", LAST=use_last_frame, REG=use_reg, HAS_DIMW=dim_ws is not None,
            ACC=_tl_acc(pred.dtype),
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_TERMS=32, BLOCK_PROGS=128,
        )
    return terms, total


@triton_operator("fusedloss_triton::pva_backward", fake.backward_fake)
def pva_backward(
    grad_terms: torch.Tensor,
    grad_total: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: Optional[torch.Tensor],
    part_table: torch.Tensor,
    dim_ws: Optional[torch.Tensor],
    loss_type: str,
    use_last_frame: bool,
    use_reg: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, D = (int(n) for n in pred.shape)
    need_pred, need_target = bool(output_mask[0]), bool(output_mask[1])
    need_cond = bool(output_mask[2]) and use_last_frame
    grad_pred, grad_target, grad_cond = fake.empty_gradients(pred, output_mask, use_last_frame)
    if (need_pred or need_target or need_cond) and pred.numel() > 0:
        block_t, block_d, col_blocks, row_groups = _grid(pred, per_sm=8)
        cond, sc_b, sc_d = _cond_args(pred, cond_frame, use_last_frame)
        with on_device(pred):
            wrap_triton(pva_backward_kernel)[(col_blocks, row_groups)](
                grad_terms, grad_terms.stride(0), grad_total,
                pred, target, cond, part_table, dim_ws if dim_ws is not None else part_table,
                # outputs that are not wanted get pred as a placeholder pointer, never written
                grad_pred if need_pred else pred, grad_target if need_target else pred,
                grad_cond if need_cond else pred,
                B, L, D, part_table.shape[0],
                pred.stride(0), pred.stride(1), pred.stride(2),
                target.stride(0), target.stride(1), target.stride(2), sc_b, sc_d,
                K=fake.terms_per_part(use_last_frame, use_reg),
                L1=loss_type == "l1", LAST=use_last_frame, REG=use_reg, HAS_DIMW=dim_ws is not None,
                NEED_PRED=need_pred, NEED_TARGET=need_target, NEED_COND=need_cond,
                ACC=_tl_acc(pred.dtype),
                BLOCK_T=block_t, BLOCK_D=block_d,
            )
    return grad_pred, grad_target, grad_cond


# The autograd of the operators (core/autograd.py), and its eager form: pred, target and cond_frame
# (0, 1, 2) get gradients.
pva_forward_eager = register_terms_autograd(pva_forward, pva_backward, grad_inputs=(0, 1, 2))
