"""Bad input to the PVA loss: a clear TypeError / ValueError naming the argument, before any kernel."""

import pytest
import torch

import fusedloss
from fusedloss import functional as F
from fusedloss.pva import config as pva_config
from fusedloss.pva import functional as pva_functional


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if any backend (fused or reference) is reached."""

    def reached(*args, **kwargs):
        raise AssertionError("a backend ran before the input was rejected")

    monkeypatch.setattr(pva_functional, "operator", reached)
    monkeypatch.setattr(pva_functional, "pva_loss_reference", reached)


def good(B=2, L=5, D=265, dtype=torch.float32):
    return torch.randn(B, L, D, dtype=dtype), torch.randn(B, L, D, dtype=dtype), torch.randn(B, D, dtype=dtype)


P, T, C = good()

CASES = [
    # (exception, words the message must contain, call)
    (TypeError, ["pred", "Tensor"], lambda: F.pva_loss(P.numpy(), T)),
    (TypeError, ["pred", "float"], lambda: F.pva_loss(P.long(), T.long())),
    (ValueError, ["pred", "[B, L, D]"], lambda: F.pva_loss(P[0], T[0])),
    (ValueError, ["pred", "frame"], lambda: F.pva_loss(P[:, :0], T[:, :0])),
    (TypeError, ["target", "Tensor"], lambda: F.pva_loss(P, None)),
    (ValueError, ["target", "shape"], lambda: F.pva_loss(P, T[:, :4])),
    (TypeError, ["target", "dtype"], lambda: F.pva_loss(P, T.double())),
    (ValueError, ["target", "device"], lambda: F.pva_loss(P, T.to("meta"))),
    (ValueError, ["cond_frame", "required"], lambda: F.pva_loss(P, T, use_last_frame_loss=True)),
    (ValueError, ["cond_frame", "[B, D]"], lambda: F.pva_loss(P, T, C[:1], use_last_frame_loss=True)),
    (ValueError, ["cond_frame", "[B, D]"], lambda: F.pva_loss(P, T, C[:, None], use_last_frame_loss=True)),
    (TypeError, ["cond_frame", "dtype"], lambda: F.pva_loss(P, T, C.half(), use_last_frame_loss=True)),
    (ValueError, ["dim_ws", "[D]"], lambda: F.pva_loss(P, T, dim_ws=torch.ones(264))),
    (TypeError, ["dim_ws", "float"], lambda: F.pva_loss(P, T, dim_ws=torch.ones(265, dtype=torch.int64))),
    (ValueError, ["dim_ws", "device"], lambda: F.pva_loss(P, T, dim_ws=torch.ones(265, device="meta"))),
    (TypeError, ["part_w_dict", "mapping"], lambda: F.pva_loss(P, T, part_w_dict=[(0, 1, 1.0)])),
    (ValueError, ["part_w_dict", "at least one"], lambda: F.pva_loss(P, T, part_w_dict={})),
    (ValueError, ["part_w_dict['a']", "(start, end, weight)"], lambda: F.pva_loss(P, T, part_w_dict={"a": (0, 1)})),
    (TypeError, ["part_w_dict['a'] start", "integer"], lambda: F.pva_loss(P, T, part_w_dict={"a": (0.5, 1, 1.0)})),
    (TypeError, ["part_w_dict['a'] weight", "real"], lambda: F.pva_loss(P, T, part_w_dict={"a": (0, 1, "1")})),
    (ValueError, ["part_w_dict['a'] weight", "finite"], lambda: F.pva_loss(P, T, part_w_dict={"a": (0, 1, float("nan"))})),
    (TypeError, ["part_w_dict keys"], lambda: F.pva_loss(P, T, part_w_dict={1: (0, 1, 1.0)})),
    (ValueError, ["part_w_dict['a']", "end <= D = 265"], lambda: F.pva_loss(P, T, part_w_dict={"a": (200, 300, 1.0)})),
    (ValueError, ["part_w_dict['a']", "start < end"], lambda: F.pva_loss(P, T, part_w_dict={"a": (10, 5, 1.0)})),
    (ValueError, ["reg_weights", "['nope']"], lambda: F.pva_loss(P, T, use_reg_loss=True, reg_weights={"nope": 1.0})),
    (TypeError, ["reg_weights", "mapping"], lambda: F.pva_loss(P, T, use_reg_loss=True, reg_weights=[1.0])),
    (ValueError, ["loss_type", "'l2'", "'l1'"], lambda: F.pva_loss(P, T, loss_type="mse")),
    (TypeError, ["use_last_frame_loss", "bool"], lambda: F.pva_loss(P, T, C, use_last_frame_loss="yes")),
    (TypeError, ["use_reg_loss", "bool"], lambda: F.pva_loss(P, T, use_reg_loss=1)),
    (ValueError, ["backend", "'triton'"], lambda: F.pva_loss(P, T, backend="gpu")),
    (ValueError, ["backend", "'auto'"], lambda: fusedloss.PVALoss(backend="gpu")),
    (ValueError, ["dim_ws", "[D]"], lambda: fusedloss.PVALoss(dim_ws=torch.ones(2, 265))),
    (TypeError, ["pred", "Tensor"], lambda: fusedloss.PVALoss()([1.0], T)),
    (ValueError, ["cond_frame", "required"], lambda: fusedloss.PVALoss(use_last_frame_loss=True)(P, T)),
    (ValueError, ["part", "['scale'"], lambda: fusedloss.PVALoss().set_part_weight("jaw", 1.0)),
]


@pytest.mark.parametrize("error,words,call", CASES, ids=[f"{i}-{c[1][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_rejected_before_any_kernel(no_kernel, error, words, call):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"


def test_dim_ws_requiring_grad_needs_the_reference(cpp_ops):
    """Fused backends treat dim_ws as a constant: asking for its gradient is an error, not a silent None."""
    dim_ws = torch.ones(265, requires_grad=True)
    with pytest.raises(ValueError, match="dim_ws requires grad"):
        F.pva_loss(P, T, dim_ws=dim_ws, backend="cpu")
    total, _ = F.pva_loss(P, T, dim_ws=dim_ws, backend="reference")
    total.backward()
    assert dim_ws.grad is not None and dim_ws.grad.abs().sum() > 0


@pytest.fixture
def cpp_ops():
    from fusedloss import backends

    if backends.unavailable_reason("cpu", "cpu"):
        pytest.skip(backends.unavailable_reason("cpu", "cpu"))
    backends.resolve("cpu", "cpu")


def test_operator_refuses_inputs_it_cannot_differentiate(cpp_ops):
    """Called directly, the operator raises instead of dropping the gradient of part_table."""
    config = pva_config.PVAConfig.build()
    table = config.part_table().requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient"):
        torch.ops.fusedloss.pva_forward(P, T, None, table, None, "l2", False, False)


def test_operator_checks_at_the_cpp_boundary(cpp_ops):
    """The C++ operator validates its own arguments too (no crash on a direct call)."""
    table = pva_config.PVAConfig.build({"a": (0, 300, 1.0)}).part_table()
    with pytest.raises(RuntimeError, match="not inside"):
        torch.ops.fusedloss.pva_forward(P, T, None, table, None, "l2", False, False)
    with pytest.raises(RuntimeError, match="loss_type"):
        torch.ops.fusedloss.pva_forward(P, T, None, pva_config.PVAConfig.build().part_table(), None, "l3", False, False)
