"""The blendshape CUDA kernels (csrc/blendshape/blendshape_cuda.cu), run on CPU threads under ASan + UBSan
(tests/simt), against the family's reference: every computed term, the total, the column statistics
and the gradients of pred, target (through the importance weights too) and raw_pred.

Each case launches the forward twice in two block orders (bitwise equal, arrival counter back to
0) and the backward once, through the host functions the torch dispatch calls, with every output
poisoned beforehand.
"""

import math

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

from fusedloss.blendshape.config import (
    DUAL_STREAM_GROUPS,
    BlendshapeConfig,
    computed_terms,
    landmark_gram,
)
from fusedloss.blendshape.fake import needs_col_stats
from fusedloss.blendshape.reference import blendshape_loss_reference

pytestmark = pytest.mark.simt

ALL = (1.0, 0.1, 0.5, 0.3, 0.2, 0.4, 0.6)  # mse l1 perceptual temporal landmark smoothing consistency


def make_input(shape, dtype, g, layout):
    if layout == "transposed" and len(shape) == 3:  # a [B, T, K] view of a [B, K, T] tensor
        B, T, K = shape
        return torch.randn(B, K, T, generator=g).to(dtype).transpose(1, 2)
    if layout == "sliced":  # every other column of a wider tensor, every other row
        return torch.randn(2 * shape[0], *shape[1:-1], 2 * shape[-1], generator=g).to(dtype)[::2, ..., ::2]
    if layout == "offset":  # contiguous, one element past a 16-byte aligned start
        return torch.randn(math.prod(shape) + 1, generator=g).to(dtype)[1:].view(shape)
    return torch.randn(*shape, generator=g).to(dtype)


def strides3(x):
    """(b, t, k) strides as csrc/blendshape/blendshape.cpp's strides3: t stride 0 for [B, K]."""
    if x is None:
        return [0, 0, 0]
    return list(x.stride()) if x.dim() == 3 else [x.stride(0), 0, x.stride(1)]


def check(B, T, K, dtype, weights=ALL, groups=None, J=5, raw=True, prev=True, layout="contiguous", threshold=0.1,
          grad_stride=1, mask=(True, True, True), ties=False, sms=2, min_blocks=1, min_groups=1, null="",
          raw_layout="sliced", same_as_unaligned=False):


    k = use_device(sms).blendshape
    g = torch.Generator().manual_seed(B * 100 + K)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shape = (B, K) if T is None else (B, T, K)
    pred = make_input(shape, dtype, g, layout)
    target = make_input(shape, dtype, g, "contiguous")
    if ties:  # values exactly at the threshold, and e == 0 (sign(0), |x| at 0)
        target.view(-1)[::3] = threshold
        pred[..., ::4] = target[..., ::4]
    raw_pred = make_input(shape, dtype, g, raw_layout) if raw else None
    prev_pred = make_input(shape, dtype, g, "contiguous") if prev else None
    config = BlendshapeConfig.build(*weights, threshold=threshold, perceptual_groups=groups)
    names, term_mask = computed_terms(tuple(w != 0 for w in config.weights), pred.dim(), raw, prev)
    settings, group_coef = config.settings(), config.group_coef()
    matrix = torch.randn(J, K, generator=g, dtype=torch.float64).to(dtype) if "landmark" in names else None
    gram = landmark_gram(matrix).contiguous() if matrix is not None else None
    Tn = 1 if T is None else T

    def cuda_inputs(pred, target, raw_pred, prev_pred):  # as csrc/blendshape/blendshape.cpp's cuda_inputs
        return make(k.CudaInputs, pred=address(pred), target=address(target), raw_pred=address(raw_pred),
                    prev_pred=address(prev_pred), strides=[strides3(x) for x in (pred, target, raw_pred, prev_pred)],
                    settings=address(settings), group_coef=address(group_coef),
                    group_len=0 if group_coef is None else group_coef.numel(), gram=address(gram),
                    dtype=dtype_of(pred),
                    problem=make(k.Problem, B=B, T=Tn, K=K, J=J if matrix is not None else 0, term_mask=term_mask,
                                 group_form=group_coef is not None))

    inputs = cuda_inputs(pred, target, raw_pred, prev_pred)

    cols = needs_col_stats(term_mask, group_coef)
    out_terms, total = poisoned((len(names),), acc), poisoned((), acc)
    col_stats = poisoned((2, Tn * K if cols else 0), acc)
    ws = workspace(k.forward_workspace_bytes(inputs))
    launches = forward_twice(lambda: k.forward_cuda(inputs, address(out_terms), address(total), address(col_stats),
                                                    address(ws), address(arrival_counter())),
                             [out_terms, total, col_stats])
    ref = blendshape_loss_reference(pred, target, raw_pred, prev_pred, config, matrix)
    want = torch.stack([ref[n] for n in names]) if names else torch.zeros(0, dtype=acc)
    assert_close(out_terms, want, dtype, msg=f"terms {names}")
    assert_close(total, ref["total"], dtype, msg="total")
    if cols:
        p, t = pred.to(acc), target.to(acc)
        weights_col = (t.sum(0) / max(B, 1)).reshape(-1)
        assert_close(col_stats, torch.stack([weights_col, ((p - t) ** 2).sum(0).reshape(-1)]), dtype, msg="col_stats")
    grid = launches[0]["grid"]
    assert grid[0] * grid[1] >= min_blocks, f"the forward ran grid {grid}, the case needs {min_blocks} blocks"
    assert grid[1] >= min_groups, f"the forward ran grid {grid}, the case needs {min_groups} batch groups"
    if B == 0:
        return

    # Backward: d(loss)/d(term i) = grad_terms[i] + weight_i grad_total.
    if grad_stride == 0:
        grad_terms = torch.zeros((), dtype=acc).expand(len(names))
    else:
        grad_terms = torch.randn(len(names) * grad_stride, generator=g, dtype=acc)[::grad_stride]
    grad_total = torch.tensor(0.7, dtype=acc)
    # null="terms" | "total": no gradient reaches them, a null pointer the kernel reads as 0.
    if null == "terms":
        grad_terms = torch.zeros((), dtype=acc).expand(len(names))
    if null == "total":
        grad_total = torch.tensor(0.0, dtype=acc)
    wanted = (mask[0], mask[1], mask[2] and raw and "smoothing" in names)

    def backward(inputs):
        grads = [poisoned(shape, dtype) if want else None for want in wanted]
        error = k.backward_cuda(inputs, make(k.CudaGradients, grad_terms=0 if null == "terms" else address(grad_terms),
                                             grad_terms_stride=grad_terms.stride(0),
                                             grad_total=0 if null == "total" else address(grad_total),
                                             col_stats=address(col_stats), grad_pred=address(grads[0]),
                                             grad_target=address(grads[1]), grad_raw=address(grads[2])))
        assert error == 0, f"backward launch failed: cudaError {error}"
        return grads

    grads = backward(inputs)
    if same_as_unaligned:
        # The same values one element off 16-byte alignment (element by element): bitwise equal.
        def offset(x):
            return None if x is None else torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)

        shifted = [offset(x) for x in (pred, target, raw_pred, prev_pred)]  # (held while the kernel reads them)
        for name, got, want in zip(("pred", "target", "raw_pred"), grads, backward(cuda_inputs(*shifted))):
            if got is not None:
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), \
                    f"d/d{name}: aligned and unaligned inputs differ"
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (pred, target, raw_pred)]
    r = blendshape_loss_reference(leaves[0], leaves[1], leaves[2], prev_pred, config, matrix)
    loss = r["total"] * grad_total
    for i, name in enumerate(names):
        loss = loss + r[name] * grad_terms[i]
    loss.backward()
    for name, got, leaf in zip(("pred", "target", "raw_pred"), grads, leaves):
        if got is not None:
            want_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            assert_close(got, want_grad, dtype, grad=True, msg=f"d/d{name}")
            assert_rounded_like(got, want_grad, f"d/d{name}")


CASES = {
    "all terms, 2 time tiles": dict(B=4, T=6, K=52, dtype=torch.float32, J=7),
    "fp64 odd K, batch groups": dict(B=37, T=5, K=33, dtype=torch.float64, J=4, min_groups=2),
    "2-D groups": dict(B=50, T=None, K=37, dtype=torch.float32, groups=((range(0, 10), 1.0), ((3, 30, 36), 2.0))),
    "fp16 no landmark, no prev": dict(B=3, T=9, K=20, dtype=torch.float16, weights=(1.0, 0.1, 0.5, 0.3, 0, 0.4, 0),
                                      prev=False),
    "bf16 seed 001 groups": dict(B=64, T=None, K=52, dtype=torch.bfloat16, weights=(1.0, 0.1, 0.5, 0, 0.2, 0, 0),
                                 groups=DUAL_STREAM_GROUPS, raw=False, prev=False, J=3),
    "transposed, grad_terms stride 2": dict(B=6, T=8, K=24, dtype=torch.float32, layout="transposed", grad_stride=2),
    "sliced pred and raw_pred": dict(B=5, T=3, K=21, dtype=torch.float64, layout="sliced"),
    "fp64 K=300 tail time tile": dict(B=5, T=7, K=300, dtype=torch.float64, J=3),
    "T=1, 3-D (empty temporal)": dict(B=3, T=1, K=19, dtype=torch.float32, layout="sliced"),
    "B=1": dict(B=1, T=4, K=10, dtype=torch.float32),
    "ties at the threshold, zero grad_terms": dict(B=10, T=4, K=31, dtype=torch.float32, ties=True, grad_stride=0),
    "no grad_terms (null)": dict(B=5, T=6, K=20, dtype=torch.float32, null="terms"),
    "no grad_total (null)": dict(B=5, T=6, K=20, dtype=torch.float64, null="total"),
    "bf16 ties": dict(B=5, T=4, K=12, dtype=torch.bfloat16, J=2, ties=True),
    "only d/dtarget": dict(B=9, T=3, K=40, dtype=torch.float32, mask=(False, True, False)),
    "only d/draw_pred": dict(B=4, T=3, K=17, dtype=torch.float16, mask=(False, False, True)),
    "fp16 one group over all": dict(B=7, T=3, K=16, dtype=torch.float16, groups=((range(0, 16), 1.0),), J=2),
    "empty batch": dict(B=0, T=3, K=8, dtype=torch.float32),
    # 1 SM: few blocks walk many batch rows (grid-stride); column partials of 2 groups.
    "grid-stride, 1 SM": dict(B=300, T=2, K=52, dtype=torch.float32, sms=1, weights=(1.0, 0.1, 0.5, 0.3, 0, 0, 0),
                              raw=False, prev=False),
    # The largest K: one batch row per tile step, 8 batch groups, a thread per column in the last block.
    "K=2048, 8 batch groups": dict(B=20, T=None, K=2048, dtype=torch.float32, weights=(1.0, 0.1, 0.5, 0, 0, 0, 0),
                                   raw=False, prev=False, min_groups=8),
    # 8 SMs: 32 batch groups race; the last block sums each column over them with a warp.
    "32 batch groups race, warp per column": dict(B=1024, T=None, K=64, dtype=torch.float32, sms=8,
                                                  weights=(1.0, 0.1, 0.5, 0, 0.2, 0, 0.3), raw=False, J=3,
                                                  min_groups=32),
    "16 blocks race, fp64": dict(B=24, T=16, K=52, dtype=torch.float64, sms=16, min_blocks=16),
    # Every input contiguous and aligned: both passes read (and the backward writes) runs of elements as
    # vector accesses (a run past the batch, a time row before or after outside the tensor, element by
    # element); the backward's gradients bitwise equal to those of the same values off alignment.
    "vector runs, all terms": dict(B=6, T=5, K=52, dtype=torch.float32, raw_layout="contiguous", sms=1,
                                   same_as_unaligned=True),
    # A contiguous tile with K = 7 (runs across time and batch rows; neighbouring rows not aligned), fp64.
    "vector runs across rows, fp64": dict(B=10, T=3, K=7, dtype=torch.float64, raw_layout="contiguous", sms=1, J=3,
                                          same_as_unaligned=True),
    "vector runs, fp16 (64-bit loads)": dict(B=9, T=4, K=20, dtype=torch.float16, raw_layout="contiguous", sms=1,
                                             J=2, same_as_unaligned=True),
    # Backward runs: C = 30 is not whole runs (the column statistics column by column), runs across rows.
    "vector runs, columns one by one": dict(B=7, T=5, K=6, dtype=torch.float32, raw_layout="contiguous", sms=1, J=2,
                                            same_as_unaligned=True),
    # Backward runs: the group form's coefficients, 2-D, bf16, only d/dtarget and d/draw_pred (d/dpred null).
    "vector runs, bf16 groups, no d/dpred": dict(B=33, T=None, K=52, dtype=torch.bfloat16, groups=DUAL_STREAM_GROUPS,
                                                 raw_layout="contiguous", sms=1, mask=(False, True, True),
                                                 same_as_unaligned=True),
    # The same shape one element off 16-byte alignment: element by element.
    "unaligned views (x[1:])": dict(B=6, T=5, K=52, dtype=torch.float32, layout="offset", raw_layout="offset", sms=1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blendshape_cuda_kernels_match_reference(sanitized, case):
    sanitized(check, **case)
