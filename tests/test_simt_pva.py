"""The PVA CUDA kernels (csrc/pva/pva_cuda.cu), run on CPU threads under ASan + UBSan (tests/simt),
against the family's reference: every term, the total and the gradient of every input.

Each case launches the forward twice in two block orders (bitwise equal, arrival counter back to
0) and the backward once, through the host functions the torch dispatch calls, with inputs laid
out as the case says and every output poisoned beforehand.
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

from fusedloss.pva.config import DITTO_PARTS, PVAConfig
from fusedloss.pva.reference import pva_loss_reference

pytestmark = pytest.mark.simt


def parts_for(D: int) -> dict:
    """A whole-width part, an overlapping one and one at the end (leaving gaps elsewhere)."""
    if D < 5:
        return {"all": (0, 0, 1.0)}
    return {"all": (0, 0, 1.0), "head": (1, min(D, 40), 0.7), "tail": (max(D - 5, 1), D, 2.0)}


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if how == "transposed":  # the last dimension is not the fastest
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "strided":  # every other element of a wider buffer, in each dimension
        wide = torch.full([2 * s for s in t.shape], float("nan"), dtype=t.dtype)
        wide[tuple(slice(None, None, 2) for _ in t.shape)] = t
        return wide[tuple(slice(None, None, 2) for _ in t.shape)]
    return t


def check(B, L, D, dtype, loss_type="l2", last_frame=True, reg=True, dim_ws=True, parts=None, pred_layout="contiguous",
          target_layout="contiguous", grad_stride=1, mask=(True, True, True), sms=2, min_blocks=1, grid_stride=False,
          null=""):


    k = use_device(sms).pva
    g = torch.Generator().manual_seed(B * 1000 + L * 10 + D)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    config = PVAConfig.build(parts or parts_for(D), use_last_frame_loss=last_frame, use_reg_loss=reg,
                             loss_type=loss_type)
    pred = layout(torch.randn(B, L, D, generator=g).to(dtype), pred_layout)
    target = layout(torch.randn(B, L, D, generator=g).to(dtype), target_layout)
    cond = layout(torch.randn(B, D, generator=g).to(dtype), pred_layout) if last_frame else None
    w = torch.rand(D, generator=g, dtype=torch.float64) + 0.5 if dim_ws else None
    table = config.part_table()
    # As csrc/pva/pva.cpp's cuda_inputs fills it.
    inputs = make(k.CudaInputs, pred=address(pred), target=address(target), pred_strides=pred.stride(),
                  target_strides=target.stride(), table=address(table), num_parts=table.shape[0], dim_ws=address(w),
                  B=B, L=L, D=D, dtype=dtype_of(pred),
                  opts=make(k.Options, l1=loss_type == "l1", last_frame=last_frame, reg=reg))
    if last_frame:
        inputs.cond, inputs.cond_strides = address(cond), cond.stride()

    names = config.term_names()
    terms, total = poisoned((len(names),), acc), poisoned((), acc)
    ws = workspace(k.forward_workspace_bytes(inputs))
    launches = forward_twice(lambda: k.forward_cuda(inputs, address(terms), address(total), address(ws),
                                                    address(arrival_counter())), [terms, total])
    ref_total, ref_terms = pva_loss_reference(pred, target, cond, config, w)
    assert_close(terms, torch.stack([ref_terms[n] for n in names]), dtype, msg=f"terms {names}")
    assert_close(total, ref_total, dtype, msg="total")
    blocks = launches[0]["grid"][0] * launches[0]["grid"][1]
    assert blocks >= min_blocks, f"the forward ran {blocks} blocks, the case needs {min_blocks}"
    if grid_stride:  # work items (batch element, 16-row chunk) beyond one pass of the item blocks
        items = B * -(-L // 16)
        assert items > launches[0]["grid"][1] * 8, f"{items} items fit one pass of grid {launches[0]['grid']}"

    # Backward: d(loss)/d(term j) = grad_terms[j] + grad_total.
    grad_terms = torch.randn(len(names) * max(grad_stride, 1), generator=g, dtype=acc)[::max(grad_stride, 1)]
    if grad_stride == 0:
        grad_terms = torch.tensor(0.8, dtype=acc).expand(len(names))
    grad_total = torch.tensor(-0.3, dtype=acc)
    # null="terms" | "total": no gradient reaches them, a null pointer the kernel reads as 0.
    if null == "terms":
        grad_terms = torch.zeros((), dtype=acc).expand(len(names))
    if null == "total":
        grad_total = torch.tensor(0.0, dtype=acc)
    wanted = (mask[0], mask[1], mask[2] and last_frame)
    grads = [poisoned(shape, dtype) if want else None
             for shape, want in zip(((B, L, D), (B, L, D), (B, D)), wanted)]
    error = k.backward_cuda(inputs, make(k.CudaGradients, grad_terms=0 if null == "terms" else address(grad_terms),
                                         grad_terms_stride=grad_terms.stride(0),
                                         grad_total=0 if null == "total" else address(grad_total),
                                         grad_pred=address(grads[0]), grad_target=address(grads[1]),
                                         grad_cond=address(grads[2])))
    assert error == 0, f"backward launch failed: cudaError {error}"
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (pred, target, cond)]
    total_r, terms_r = pva_loss_reference(*leaves, config, w)
    loss = (torch.stack([terms_r[n] for n in names]) * grad_terms).sum() + total_r * grad_total
    loss.backward()
    for name, got, leaf in zip(("pred", "target", "cond_frame"), grads, leaves):
        if got is not None:
            assert_close(got, leaf.grad, dtype, grad=True, msg=f"d/d{name}")
            assert_rounded_like(got, leaf.grad, f"d/d{name}")


CASES = {
    "fp32 all terms": dict(B=2, L=40, D=70, dtype=torch.float32),
    "fp64 l1 grad_terms stride 2": dict(B=3, L=17, D=33, dtype=torch.float64, loss_type="l1", grad_stride=2),
    "L=2 no reg": dict(B=1, L=2, D=5, dtype=torch.float32, reg=False),
    "L=1 no last frame": dict(B=2, L=1, D=31, dtype=torch.float32, last_frame=False),
    "D=1 L=3": dict(B=2, L=3, D=1, dtype=torch.float64),
    "fp16 no dim_ws": dict(B=4, L=50, D=64, dtype=torch.float16, dim_ws=False),
    "bf16 l1": dict(B=2, L=33, D=40, dtype=torch.bfloat16, loss_type="l1"),
    "transposed pred, strided target": dict(B=2, L=20, D=45, dtype=torch.float32, pred_layout="transposed",
                                            target_layout="strided"),
    "strided pred fp64": dict(B=3, L=18, D=34, dtype=torch.float64, pred_layout="strided", loss_type="l1"),
    "grad_terms broadcast": dict(B=2, L=9, D=37, dtype=torch.float32, grad_stride=0),
    "no grad_terms (null)": dict(B=2, L=9, D=37, dtype=torch.float32, null="terms"),
    "no grad_total (null)": dict(B=2, L=9, D=37, dtype=torch.float64, null="total"),
    "only d/dtarget": dict(B=2, L=19, D=33, dtype=torch.float32, mask=(False, True, False)),
    "only d/dcond": dict(B=3, L=5, D=40, dtype=torch.float16, mask=(False, False, True)),
    "only d/dpred, l1, no last frame": dict(B=2, L=4, D=50, dtype=torch.bfloat16, loss_type="l1", last_frame=False,
                                            mask=(True, False, False)),
    "Ditto parts D=265": dict(B=1, L=12, D=265, dtype=torch.float32, parts=DITTO_PARTS),
    # 1 SM: 2 item blocks of 8 lanes walk 36 items (grid-stride loops iterate).
    "grid-stride, 1 SM": dict(B=9, L=64, D=36, dtype=torch.float32, sms=1, grid_stride=True),
    # 16 SMs: 4 column blocks x 6 item blocks race for the last-block ticket.
    "24 blocks race, 16 SMs": dict(B=16, L=48, D=100, dtype=torch.float32, sms=16, min_blocks=24),
    "9 blocks race, fp64 l1": dict(B=7, L=33, D=90, dtype=torch.float64, loss_type="l1", sms=6, min_blocks=9),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_pva_cuda_kernels_match_reference(sanitized, case):
    sanitized(check, **case)
