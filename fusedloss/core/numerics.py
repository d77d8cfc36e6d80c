"""The arithmetic every backend shares (see docs/losses.md, "Dtypes")."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic, terms and grad_terms dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Plain mean; the mean over an empty set is 0 (and passes no gradient)."""
    return x.sum() / max(x.numel(), 1)
