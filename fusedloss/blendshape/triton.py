"""Blendshape loss in Triton: one forward launch for every computed term, one backward launch.

Math (csrc/blendshape/blendshape_math.h): inputs viewed as [B, T, K] (T = 1 for [B, K]); e = pred - target;
the forward accumulates the sums of e^2, |e|, the threshold mismatches, group_coef[k] e^2,
(e[t+1] - e[t])^2, e^T G e (G = M^T M), |pred - raw_pred|, (pred - prev_pred)^2, and for the
default perceptual form the column sums over b of target and e^2 (importance weights
w = target.mean(0), weighted = sum_c w^2 colS2 / N). Each term is its sum over its count.

forward:  programs (time block, batch group) read [BLOCK_B, BLOCK_T, KP] tiles (all K columns, so a
          row's e^T G e is in one program); each writes its partial sums, and its column sums when
          several batch groups share a column. The last program to arrive (atomic ticket) reduces
          them in a fixed order into the terms, the weighted total and the column statistics.
backward: the same programs compute the gradient coefficients once, then write d/dpred, d/dtarget
          (with the path through the importance weights) and d/draw_pred of their tiles.
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
    sm_count,
    sum_partials,
    triton_operator,
    zeroed_counter,
)
from . import fake, layout

# Positions in a program's row of partial sums (layout.SUMS, then the weighted column sum).
S_SQ = tl.constexpr(layout.SUMS.index("sq_err"))
S_ABS = tl.constexpr(layout.SUMS.index("abs_err"))
S_ACTIVE = tl.constexpr(layout.SUMS.index("active"))
S_GROUP = tl.constexpr(layout.SUMS.index("group_sq"))
S_TEMPORAL = tl.constexpr(layout.SUMS.index("temporal_sq"))
S_LANDMARK = tl.constexpr(layout.SUMS.index("landmark_sq"))
S_SMOOTH = tl.constexpr(layout.SUMS.index("smooth_abs"))
S_CONSISTENCY = tl.constexpr(layout.SUMS.index("consistency_sq"))
S_WEIGHTED = tl.constexpr(layout.WEIGHTED_SUM)
PARTIALS_WIDTH = tl.constexpr(layout.PARTIALS_WIDTH)  # partial sums per program
THRESHOLD = tl.constexpr(layout.THRESHOLD)  # slot of the settings table
# Rows of col_stats [2, T*K]: importance weights, then sum_b e^2.
COL_IMPORTANCE = tl.constexpr(layout.COL_IMPORTANCE)
COL_SQ_ERR = tl.constexpr(layout.COL_SQ_ERR)
# Terms (layout.TERMS order); a term's weight is settings[term].
T_MSE = tl.constexpr(layout.TERMS.index("mse"))
T_L1 = tl.constexpr(layout.TERMS.index("l1"))
T_PERC = tl.constexpr(layout.TERMS.index("perceptual"))
T_TEMP = tl.constexpr(layout.TERMS.index("temporal"))
T_LAND = tl.constexpr(layout.TERMS.index("landmark"))
T_SMOOTH = tl.constexpr(layout.TERMS.index("smoothing"))
T_CONS = tl.constexpr(layout.TERMS.index("consistency"))
# Column sums of the batch groups are combined by the last program: keep them small.


@triton.jit
def _gram_times(pred_ptr, target_ptr, gram_ptr, base_p, base_q, sk_p, sk_q, mask_rows, ks, K,
                BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """(G e)[k] for every row of the tile: sum over j of e[:, :, j] * G[j, k]."""
    out = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    for j in range(K):
        ej = (tl.load(pred_ptr + base_p + j * sk_p, mask=mask_rows, other=0.0).to(ACC)
              - tl.load(target_ptr + base_q + j * sk_q, mask=mask_rows, other=0.0).to(ACC))
        gj = tl.load(gram_ptr + j * K + ks, mask=ks < K, other=0.0).to(ACC)
        out += ej[:, :, None] * gj[None, None, :]
    return out


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> nearest bfloat16 (ties to even), as float32: done on the bits because the Triton
    interpreter truncates casts to bfloat16 (a GPU rounds them)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _threshold(settings_ptr, INPUT: tl.constexpr, ACC: tl.constexpr):
    """The threshold rounded to the inputs' dtype (double -> float -> dtype, as PyTorch does)."""
    thr = tl.load(settings_ptr + THRESHOLD)
    if ACC == tl.float64:
        return thr
    elif INPUT == tl.bfloat16:
        return _round_to_bfloat16(thr.to(tl.float32))
    else:
        return thr.to(tl.float32).to(INPUT).to(tl.float32)


@triton.jit
def _term_count(TERM: tl.constexpr, B, T, K, J, GROUPS: tl.constexpr):
    """The count a term's sum is divided by (csrc/blendshape/blendshape_math.h term_count); 0 for an empty set."""
    B64 = tl.cast(B, tl.int64)  # (tl.cast: an int equal to 1 may be specialised to a constexpr)
    T64 = tl.cast(T, tl.int64)
    if TERM == T_PERC and GROUPS:
        return B64 * T64
    elif TERM == T_TEMP:
        return B64 * (T64 - 1) * K
    elif TERM == T_LAND:
        return B64 * T64 * J
    else:
        return B64 * T64 * K


@triton.jit
def _mean(total, count, ACC: tl.constexpr):
    return tl.where(count > 0, total / tl.maximum(count, 1).to(ACC), 0.0)


@triton.jit
def _store_term(terms_ptr, settings_ptr, TERM: tl.constexpr, INDEX: tl.constexpr, term_sum, total, B, T, K, J,
                GROUPS: tl.constexpr, ACC: tl.constexpr):
    """A computed term (INDEX >= 0): its value, term_sum / count, into terms[INDEX]; returns total
    plus its weight times it."""
    if INDEX >= 0:
        value = _mean(term_sum, _term_count(TERM, B, T, K, J, GROUPS), ACC)
        tl.store(terms_ptr + INDEX, value)
        total += tl.load(settings_ptr + TERM).to(ACC) * value
    return total


@triton.jit
def _offsets(b, t, ks, sb, st, sk):
    return (b.to(tl.int64)[:, None, None] * sb + t.to(tl.int64)[None, :, None] * st
            + ks.to(tl.int64)[None, None, :] * sk)


@triton.jit
def blendshape_forward_kernel(
    pred_ptr, target_ptr, raw_ptr, prev_ptr,   # [B, T, K] each, strides (s?b, s?t, s?k)
    settings_ptr,          # [8] float64: weights (mse, l1, perceptual, temporal, landmark, smoothing, consistency), threshold
    group_ptr, G_LEN,      # [G_LEN] float64 group coefficients (GROUPS)
    gram_ptr,              # [K, K] float64 M^T M (landmark)
    partials_ptr,          # [num_programs, PARTIALS_WIDTH] ACC scratch
    colpart_ptr,           # [batch groups, 2, T*K] ACC scratch (COLS and several batch groups)
    counter_ptr,           # [1] int32, 0 on entry and on exit
    terms_ptr, total_ptr,  # [number of terms], [] ACC
    cols_ptr,              # [2, T*K] ACC: importance weights, column sums of e^2 (COLS)
    B, T, K, J,
    spb, spt, spk, sqb, sqt, sqk, srb, srt, srk, svb, svt, svk,
    I_MSE: tl.constexpr, I_L1: tl.constexpr, I_PERC: tl.constexpr, I_TEMP: tl.constexpr,
    I_LAND: tl.constexpr, I_SMOOTH: tl.constexpr, I_CONS: tl.constexpr,  # output index or -1
    GROUPS: tl.constexpr, COLS: tl.constexpr, SINGLE_GROUP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr, BLOCK_PROGS: tl.constexpr,
    BLOCK_COLS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    n_t = tl.num_programs(0)
    n_b = tl.num_programs(1)
    INPUT: tl.constexpr = pred_ptr.dtype.element_ty
    thr = _threshold(settings_ptr, INPUT, ACC)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, KP)
    t_ok = ts < T
    k_ok = ks < K
    if GROUPS:
        gcoef = tl.load(group_ptr + ks, mask=ks < G_LEN, other=0.0).to(ACC)

    a_sq = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_abs = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_act = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_grp = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_tmp = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_lm = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_sm = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    a_cs = tl.zeros([BLOCK_B, BLOCK_T, KP], ACC)
    col_t = tl.zeros([BLOCK_T, KP], ACC)
    col_s2 = tl.zeros([BLOCK_T, KP], ACC)
    for b0 in range(pid_b * BLOCK_B, B, n_b * BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < B)[:, None, None] & t_ok[None, :, None] & k_ok[None, None, :]
        p = tl.load(pred_ptr + _offsets(bs, ts, ks, spb, spt, spk), mask=mask, other=0.0).to(ACC)
        q = tl.load(target_ptr + _offsets(bs, ts, ks, sqb, sqt, sqk), mask=mask, other=0.0).to(ACC)
        e = p - q
        a_sq += e * e
        a_abs += tl.abs(e)
        a_act += ((p > thr) != (q > thr)).to(ACC)
        if I_PERC >= 0:
            if GROUPS:
                a_grp += gcoef[None, None, :] * e * e
            else:
                col_t += tl.sum(q, axis=0)
                col_s2 += tl.sum(e * e, axis=0)
        if I_TEMP >= 0:
            next_mask = (bs < B)[:, None, None] & (ts + 1 < T)[None, :, None] & k_ok[None, None, :]
            e1 = (tl.load(pred_ptr + _offsets(bs, ts + 1, ks, spb, spt, spk), mask=next_mask, other=0.0).to(ACC)
                  - tl.load(target_ptr + _offsets(bs, ts + 1, ks, sqb, sqt, sqk), mask=next_mask, other=0.0).to(ACC))
            a_tmp += tl.where(next_mask, (e1 - e) * (e1 - e), 0.0)
        if I_LAND >= 0:
            rows = (bs < B)[:, None] & t_ok[None, :]
            base_p = bs.to(tl.int64)[:, None] * spb + ts.to(tl.int64)[None, :] * spt
            base_q = bs.to(tl.int64)[:, None] * sqb + ts.to(tl.int64)[None, :] * sqt
            ge = _gram_times(pred_ptr, target_ptr, gram_ptr, base_p, base_q, spk, sqk, rows, ks, K,
                             BLOCK_B, BLOCK_T, KP, ACC)
            a_lm += e * ge
        if I_SMOOTH >= 0:
            raw = tl.load(raw_ptr + _offsets(bs, ts, ks, srb, srt, srk), mask=mask, other=0.0).to(ACC)
            a_sm += tl.abs(p - raw)
        if I_CONS >= 0:
            prev = tl.load(prev_ptr + _offsets(bs, ts, ks, svb, svt, svk), mask=mask, other=0.0).to(ACC)
            a_cs += (p - prev) * (p - prev)

    program = pid_b * n_t + pid_t
    out = partials_ptr + program.to(tl.int64) * PARTIALS_WIDTH
    tl.store(out + S_SQ, tl.sum(a_sq))
    tl.store(out + S_ABS, tl.sum(a_abs))
    tl.store(out + S_ACTIVE, tl.sum(a_act))
    tl.store(out + S_GROUP, tl.sum(a_grp))
    tl.store(out + S_TEMPORAL, tl.sum(a_tmp))
    tl.store(out + S_LANDMARK, tl.sum(a_lm))
    tl.store(out + S_SMOOTH, tl.sum(a_sm))
    tl.store(out + S_CONSISTENCY, tl.sum(a_cs))
    C = T * K
    cols = ts[:, None] * K + ks[None, :]
    col_ok = t_ok[:, None] & k_ok[None, :]
    weighted = 0.0
    if COLS:
        if SINGLE_GROUP:  # this program holds whole columns: finish them here
            w = col_t / tl.maximum(B, 1)
            tl.store(cols_ptr + COL_IMPORTANCE * C + cols, w, mask=col_ok)
            tl.store(cols_ptr + COL_SQ_ERR * C + cols, col_s2, mask=col_ok)
            weighted = tl.sum(tl.sum(w * w * col_s2, axis=1), axis=0)
        else:
            part = colpart_ptr + pid_b.to(tl.int64) * 2 * C
            tl.store(part + COL_IMPORTANCE * C + cols, col_t, mask=col_ok)
            tl.store(part + COL_SQ_ERR * C + cols, col_s2, mask=col_ok)
    tl.store(out + S_WEIGHTED, weighted)

    # The last program to arrive reduces every program's partials, in program order.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1)
    if ticket == n_t * n_b - 1:
        sums = sum_partials(partials_ptr, n_t * n_b, PARTIALS_WIDTH, BLOCK_PROGS, ACC)
        s_sq, s_abs, s_act = pick(sums, S_SQ), pick(sums, S_ABS), pick(sums, S_ACTIVE)
        s_grp, s_tmp, s_lm = pick(sums, S_GROUP), pick(sums, S_TEMPORAL), pick(sums, S_LANDMARK)
        s_sm, s_cs, s_w = pick(sums, S_SMOOTH), pick(sums, S_CONSISTENCY), pick(sums, S_WEIGHTED)
        if COLS:
            if not SINGLE_GROUP:  # columns shared by the batch groups: [groups, columns] tiles
                acc_w = tl.zeros([BLOCK_COLS], ACC)
                for c0 in range(0, C, BLOCK_COLS):
                    c = c0 + tl.arange(0, BLOCK_COLS)
                    c_ok = c < C
                    colt = tl.zeros([BLOCK_COLS], ACC)
                    cols2 = tl.zeros([BLOCK_COLS], ACC)
                    for g0 in range(0, n_b, BLOCK_GROUPS):
                        g = g0 + tl.arange(0, BLOCK_GROUPS)
                        at = colpart_ptr + g.to(tl.int64)[:, None] * 2 * C + c[None, :]
                        ok = (g < n_b)[:, None] & c_ok[None, :]
                        colt += tl.sum(tl.load(at + COL_IMPORTANCE * C, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                        cols2 += tl.sum(tl.load(at + COL_SQ_ERR * C, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                    w = colt / tl.maximum(B, 1)
                    tl.store(cols_ptr + COL_IMPORTANCE * C + c, w, mask=c_ok)
                    tl.store(cols_ptr + COL_SQ_ERR * C + c, cols2, mask=c_ok)
                    acc_w += w * w * cols2
                s_w = tl.sum(acc_w)
        s_perc = s_grp if GROUPS else s_act + s_w
        total = tl.full([], 0.0, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_MSE, I_MSE, s_sq, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_L1, I_L1, s_abs, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_PERC, I_PERC, s_perc, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_TEMP, I_TEMP, s_tmp, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_LAND, I_LAND, s_lm, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_SMOOTH, I_SMOOTH, s_sm, total, B, T, K, J, GROUPS, ACC)
        total = _store_term(terms_ptr, settings_ptr, T_CONS, I_CONS, s_cs, total, B, T, K, J, GROUPS, ACC)
        tl.store(total_ptr, total)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, TERM: tl.constexpr, INDEX: tl.constexpr,
                 B, T, K, J, GROUPS: tl.constexpr, ACC: tl.constexpr):
    """(grad_terms[INDEX] + weight * grad_total) / count: d(loss)/d(sum of the term); 0 when the
    term is not computed (INDEX < 0)."""
    if INDEX >= 0:
        g = tl.load(grad_terms_ptr + INDEX * g_stride).to(ACC) + tl.load(settings_ptr + TERM).to(ACC) * g_total
        return _mean(g, _term_count(TERM, B, T, K, J, GROUPS), ACC)
    else:
        return tl.full([], 0.0, ACC)


@triton.jit
def blendshape_backward_kernel(
    grad_terms_ptr, g_stride, grad_total_ptr,  # [number of terms] ACC any stride, [] ACC
    cols_ptr,              # [2, T*K] ACC forward column statistics (COLS)
    pred_ptr, target_ptr, raw_ptr, prev_ptr,
    settings_ptr, group_ptr, G_LEN, gram_ptr,
    grad_pred_ptr, grad_target_ptr, grad_raw_ptr,  # [B, T, K] contiguous (NEED_*)
    B, T, K, J,
    spb, spt, spk, sqb, sqt, sqk, srb, srt, srk, svb, svt, svk,
    I_MSE: tl.constexpr, I_L1: tl.constexpr, I_PERC: tl.constexpr, I_TEMP: tl.constexpr,
    I_LAND: tl.constexpr, I_SMOOTH: tl.constexpr, I_CONS: tl.constexpr,
    GROUPS: tl.constexpr, COLS: tl.constexpr,
    NEED_PRED: tl.constexpr, NEED_TARGET: tl.constexpr, NEED_RAW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, KP: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    n_b = tl.num_programs(1)
    g_total = tl.load(grad_total_ptr).to(ACC)
    c_mse = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_MSE, I_MSE, B, T, K, J, GROUPS, ACC)
    c_l1 = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_L1, I_L1, B, T, K, J, GROUPS, ACC)
    c_perc = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_PERC, I_PERC, B, T, K, J, GROUPS, ACC)
    c_temp = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_TEMP, I_TEMP, B, T, K, J, GROUPS, ACC)
    c_land = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_LAND, I_LAND, B, T, K, J, GROUPS, ACC)
    c_smooth = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_SMOOTH, I_SMOOTH, B, T, K, J, GROUPS, ACC)
    c_cons = _coefficient(grad_terms_ptr, g_stride, g_total, settings_ptr, T_CONS, I_CONS, B, T, K, J, GROUPS, ACC)

    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, KP)
    t_ok = ts < T
    k_ok = ks < K
    cols = ts[:, None] * K + ks[None, :]
    col_ok = t_ok[:, None] & k_ok[None, :]
    if I_PERC >= 0:
        if GROUPS:
            perc_scale = (2.0 * c_perc * tl.load(group_ptr + ks, mask=ks < G_LEN, other=0.0).to(ACC))[None, None, :]
        else:
            w = tl.load(cols_ptr + COL_IMPORTANCE * T * K + cols, mask=col_ok, other=0.0).to(ACC)
            perc_scale = (2.0 * c_perc * w * w)[None, :, :]
            # d/dtarget through the importance weights w = target.mean(0)
            through_w = (2.0 * c_perc * w * tl.load(cols_ptr + COL_SQ_ERR * T * K + cols, mask=col_ok, other=0.0).to(ACC)
                         / tl.maximum(B, 1))[None, :, :]
    for b0 in range(pid_b * BLOCK_B, B, n_b * BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_ok = bs < B
        mask = b_ok[:, None, None] & t_ok[None, :, None] & k_ok[None, None, :]
        p = tl.load(pred_ptr + _offsets(bs, ts, ks, spb, spt, spk), mask=mask, other=0.0).to(ACC)
        e = p - tl.load(target_ptr + _offsets(bs, ts, ks, sqb, sqt, sqk), mask=mask, other=0.0).to(ACC)
        ge = 2.0 * c_mse * e + c_l1 * ((e > 0).to(ACC) - (e < 0).to(ACC))
        if I_PERC >= 0:
            ge += perc_scale * e
        if I_TEMP >= 0:
            prev_mask = b_ok[:, None, None] & (t_ok & (ts >= 1))[None, :, None] & k_ok[None, None, :]
            next_mask = b_ok[:, None, None] & (ts + 1 < T)[None, :, None] & k_ok[None, None, :]
            e_prev = (tl.load(pred_ptr + _offsets(bs, ts - 1, ks, spb, spt, spk), mask=prev_mask, other=0.0).to(ACC)
                      - tl.load(target_ptr + _offsets(bs, ts - 1, ks, sqb, sqt, sqk), mask=prev_mask, other=0.0).to(ACC))
            e_next = (tl.load(pred_ptr + _offsets(bs, ts + 1, ks, spb, spt, spk), mask=next_mask, other=0.0).to(ACC)
                      - tl.load(target_ptr + _offsets(bs, ts + 1, ks, sqb, sqt, sqk), mask=next_mask, other=0.0).to(ACC))
            ge += 2.0 * c_temp * (tl.where(prev_mask, e - e_prev, 0.0) - tl.where(next_mask, e_next - e, 0.0))
        if I_LAND >= 0:
            rows = b_ok[:, None] & t_ok[None, :]
            base_p = bs.to(tl.int64)[:, None] * spb + ts.to(tl.int64)[None, :] * spt
            base_q = bs.to(tl.int64)[:, None] * sqb + ts.to(tl.int64)[None, :] * sqt
            ge += 2.0 * c_land * _gram_times(pred_ptr, target_ptr, gram_ptr, base_p, base_q, spk, sqk, rows, ks, K,
                                              BLOCK_B, BLOCK_T, KP, ACC)
        out = (bs.to(tl.int64)[:, None, None] * T + ts[None, :, None]) * K + ks[None, None, :]
        if NEED_TARGET:
            g_target = -ge
            if COLS:
                g_target += through_w
            tl.store(grad_target_ptr + out, g_target.to(grad_target_ptr.dtype.element_ty), mask=mask)
        g_pred = ge
        if I_SMOOTH >= 0:
            raw = tl.load(raw_ptr + _offsets(bs, ts, ks, srb, srt, srk), mask=mask, other=0.0).to(ACC)
            g_smooth = c_smooth * ((p > raw).to(ACC) - (p < raw).to(ACC))
            g_pred += g_smooth
            if NEED_RAW:
                tl.store(grad_raw_ptr + out, (-g_smooth).to(grad_raw_ptr.dtype.element_ty), mask=mask)
        if I_CONS >= 0:
            prev = tl.load(prev_ptr + _offsets(bs, ts, ks, svb, svt, svk), mask=mask, other=0.0).to(ACC)
            g_pred += 2.0 * c_cons * (p - prev)
        if NEED_PRED:
            tl.store(grad_pred_ptr + out, g_pred.to(grad_pred_ptr.dtype.element_ty), mask=mask)


def _layout(pred: torch.Tensor, gpu: Optional[bool] = None, sms: Optional[int] = None):
    """(B, T, K) of pred viewed as [B, T, K], and its tile (see _layout_for), for pred's device
    (or for a GPU of ``sms`` SMs with ``gpu=True``: the model and the sm_90 compile use that)."""
    shape = (pred.shape[0], 1, pred.shape[1]) if pred.dim() == 2 else pred.shape
    gpu = pred.device.type == "cuda" if gpu is None else gpu
    return _layout_for(tuple(int(n) for n in shape), gpu, sms or sm_count(pred.device), pred.dtype == torch.float64)


def _layout_for(shape: tuple[int, int, int], gpu: bool, sms: int, wide: bool = False):
    """(B, T, K, KP, BLOCK_T, BLOCK_B): all K columns (padded to KP), BLOCK_T time rows, BLOCK_B
    batch rows. A tile holds up to 16 rows (8 in the interpreter), fewer for wide K: at most 1024
    values (512 for float64, ``wide``), so that the kernels' per-element accumulators (8 per
    value of the tile in the forward) fit in registers without spilling on sm_90; time tiles are
    made short enough for one per SM when T is long."""
    B, T, K = shape
    kp = max(16, triton.next_power_of_2(K))
    rows = max(1, min(16 if gpu else 8, (512 if wide else 1024) // kp))
    block_t = min(rows, triton.next_power_of_2(T))
    while block_t > 1 and triton.cdiv(T, block_t) < sms:
        block_t //= 2
    return B, T, K, kp, block_t, max(1, rows // block_t)


def _warps(kp: int, block_t: int, block_b: int, wide: bool) -> int:
    """Warps of a program: 4, more for a tile wider than the row limit of ``_layout_for`` (a single
    row of K > 1024 columns, 512 for float64), so that a thread still holds at most 8 (4 float64)
    values of each accumulator; at most 16 warps (beyond K = 4096 columns, 2048 for float64, the
    forward's accumulators no longer fit in registers)."""
    per_thread_max = 4 if wide else 8
    return max(4, min(16, kp * block_t * block_b // (32 * per_thread_max)))


def _strides(x: Optional[torch.Tensor]):
    """(b, t, k) strides of x viewed as [B, T, K]; zeros for an absent input (never read)."""
    if x is None:
        return 0, 0, 0
    return (x.stride(0), 0, x.stride(1)) if x.dim() == 2 else (x.stride(0), x.stride(1), x.stride(2))


def _term_indices(term_mask: int) -> dict:
    """The kernels' output index of each term of the mask (layout.TERMS order), -1 if not computed."""
    names = ("I_MSE", "I_L1", "I_PERC", "I_TEMP", "I_LAND", "I_SMOOTH", "I_CONS")
    out, index = {}, 0
    for term, name in zip(layout.TERMS, names, strict=True):
        if term_mask & layout.TERM_BIT[term]:
            out[name] = index
            index += 1
        else:
            out[name] = -1
    return out


def _grid(pred: torch.Tensor, needs_cols: bool, per_sm: int):
    B, T, K, kp, block_t, block_b = _layout(pred)
    t_blocks = triton.cdiv(T, block_t)
    b_groups = max(1, min(triton.cdiv(B, block_b), program_budget(pred.device, per_sm) // t_blocks))
    if needs_cols and b_groups > 1:
        b_groups = max(1, min(b_groups, layout.COLUMN_PARTIALS_MAX // (2 * T * K)))
    return t_blocks, b_groups


def _placeholder(x: Optional[torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
    return pred if x is None else x  # never read when absent (constexpr flags)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton_operator("fusedloss_triton::blendshape_forward", fake.forward_fake)
def blendshape_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: Optional[torch.Tensor],
    prev_pred: Optional[torch.Tensor],
    settings: torch.Tensor,
    group_coef: Optional[torch.Tensor],
    landmark_gram: Optional[torch.Tensor],
    landmark_rows: int,
    term_mask: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, K, kp, block_t, block_b = _layout(pred)
    needs_cols = fake.needs_col_stats(term_mask, group_coef)
    t_blocks, b_groups = _grid(pred, needs_cols, per_sm=4)
    acc = acc_dtype(pred.dtype)
    out_terms, total, col_stats = fake.empty_outputs(pred, term_mask, group_coef)
    partials = torch.empty((t_blocks * b_groups, layout.PARTIALS_WIDTH), dtype=acc, device=pred.device)
    single_group = b_groups == 1
    colpart = torch.empty((b_groups, 2, T * K) if needs_cols and not single_group else (1,), dtype=acc,
                          device=pred.device)
    with on_device(pred):
        wrap_triton(blendshape_forward_kernel)[(t_blocks, b_groups)](
            pred, target, _placeholder(raw_pred, pred), _placeholder(prev_pred, pred),
            settings, _placeholder(group_coef, settings), 0 if group_coef is None else group_coef.shape[0],
            _placeholder(landmark_gram, settings),
            partials, colpart, zeroed_counter(pred), out_terms, total, col_stats if needs_cols else partials,
            B, T, K, max(landmark_rows, 1),
            *_strides(pred), *_strides(target), *_strides(raw_pred), *_strides(prev_pred),
            **_term_indices(term_mask),
            GROUPS=group_coef is not None, COLS=needs_cols, SINGLE_GROUP=single_group, ACC=_tl_acc(pred.dtype),
            BLOCK_B=block_b, BLOCK_T=block_t, KP=kp, BLOCK_PROGS=64, BLOCK_COLS=64, BLOCK_GROUPS=32,
            num_warps=_warps(kp, block_t, block_b, pred.dtype == torch.float64),
        )
    return out_terms, total, col_stats


@triton_operator("fusedloss_triton::blendshape_backward", fake.backward_fake)
def blendshape_backward(
    grad_terms: torch.Tensor,
    grad_total: torch.Tensor,
    col_stats: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: Optional[torch.Tensor],
    prev_pred: Optional[torch.Tensor],
    settings: torch.Tensor,
    group_coef: Optional[torch.Tensor],
    landmark_gram: Optional[torch.Tensor],
    landmark_rows: int,
    term_mask: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_pred, grad_target, grad_raw = fake.empty_gradients(pred, output_mask, raw_pred is not None)
    need = (grad_pred.numel() > 0, grad_target.numel() > 0, grad_raw.numel() > 0)
    if not any(need):
        return grad_pred, grad_target, grad_raw
    B, T, K, kp, block_t, block_b = _layout(pred)
    needs_cols = fake.needs_col_stats(term_mask, group_coef)
    t_blocks, b_groups = _grid(pred, False, per_sm=8)
    with on_device(pred):
        wrap_triton(blendshape_backward_kernel)[(t_blocks, b_groups)](
            grad_terms, grad_terms.stride(0), grad_total, col_stats if needs_cols else grad_total,
            pred, target, _placeholder(raw_pred, pred), _placeholder(prev_pred, pred),
            settings, _placeholder(group_coef, settings), 0 if group_coef is None else group_coef.shape[0],
            _placeholder(landmark_gram, settings),
            # outputs that are not wanted get pred as a placeholder pointer, never written
            grad_pred if need[0] else pred, grad_target if need[1] else pred, grad_raw if need[2] else pred,
            B, T, K, max(landmark_rows, 1),
            *_strides(pred), *_strides(target), *_strides(raw_pred), *_strides(prev_pred),
            **_term_indices(term_mask),
            GROUPS=group_coef is not None, COLS=needs_cols,
            NEED_PRED=need[0], NEED_TARGET=need[1], NEED_RAW=need[2], ACC=_tl_acc(pred.dtype),
            BLOCK_B=block_b, BLOCK_T=block_t, KP=kp,
            num_warps=_warps(kp, block_t, block_b, pred.dtype == torch.float64),
        )
    return grad_pred, grad_target, grad_raw


# The autograd of the operators (core/autograd.py), and its eager form: col_stats is the one aux
# output.
blendshape_forward_eager = register_terms_autograd(blendshape_forward, blendshape_backward, layout.GRAD_INPUTS,
                                                   num_aux=1, constants=layout.CONSTANTS)
