"""Argument checks shared by every loss family.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) naming the argument and the expected form, before any kernel runs. They look only at
metadata (shape, dtype, device), never at values on the device, so they never synchronise.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(name: str, value, *, rank: int | None = None, shape_doc: str = "") -> torch.Tensor:
    """A floating-point tensor of the given rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + shape_doc if shape_doc else ''}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {value.dtype}"
        )
    if rank is not None and value.dim() != rank:
        raise ValueError(f"{name} must be {shape_doc or f'{rank}-D'}, got shape {tuple(value.shape)}")
    return value


def same_tensor_kind(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` must share ``ref``'s dtype and device."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {value.device}")


def shape(name: str, value: torch.Tensor, expected: Sequence[int], doc: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must be {doc} = {tuple(expected)}, got {tuple(value.shape)}")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def real(name: str, value) -> float:
    """A finite Python number (a weight or a threshold); tensors are not accepted here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
