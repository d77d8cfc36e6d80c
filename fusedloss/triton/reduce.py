"""Triton helpers of the kernels whose last program reduces every program's partial sums."""

import triton
import triton.language as tl


@triton.jit
def sum_partials(partials_ptr, n_progs, WIDTH: tl.constexpr, BLOCK_PROGS: tl.constexpr, DTYPE: tl.constexpr):
    """Column sums of the [n_progs, WIDTH] partials, in program order (deterministic). Read with
    .cg: the other programs wrote them, so they are not in this SM's L1."""
    sums = tl.zeros([WIDTH], DTYPE)
    for g0 in range(0, n_progs, BLOCK_PROGS):
        g = g0 + tl.arange(0, BLOCK_PROGS)
        part = tl.load(partials_ptr + g.to(tl.int64)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :],
                       mask=(g < n_progs)[:, None], other=0.0, cache_modifier=".cg")
        sums += tl.sum(part, axis=0)
    return sums


@triton.jit
def pick(values, INDEX: tl.constexpr):
    """values[INDEX] of a 1-D block, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, values.shape[0]) == INDEX, values, 0.0))
