"""Solutions to the exercises of notebook 05 (MARS as a PyTorch optimizer). Checked by tests/test_exercises_04_05.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mars_ref.pieces import (
    adamw_direction,
    clip_by_norm,
    decoupled_step,
    momentum,
    second_moment,
    storm_correction,
)


def lsq_grad(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Gradient of ``mean((A W − B)²)`` with respect to ``W``: ``2/numel(B) · Aᵀ (A W − B)``."""
    return (2.0 / B.numel()) * A.T @ (A @ W - B)


def exact_mars_adamw_by_hand(
    W0: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    betas: tuple[float, float] = (0.95, 0.99),
    gamma: float = 0.025,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_norm: float = 1.0,
) -> torch.Tensor:
    """Exact MARS-AdamW on the least-squares loss, from the pieces; returns the final W.

    The single line that differs for approximate MARS is ``g_prev``: it would be the previous
    step's own gradient ``lsq_grad(W_prev, A_prev, B_prev)`` instead of ``lsq_grad(W_prev, A, B)``.
    """
    beta1, beta2 = betas
    W = W0.clone()
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    W_prev = None
    for t, (A, B) in enumerate(batches, start=1):
        g = lsq_grad(W, A, B)
        # exact: the gradient at the previous point on the *current* minibatch (zero at step 1)
        g_prev = lsq_grad(W_prev, A, B) if W_prev is not None else torch.zeros_like(W)
        c = clip_by_norm(storm_correction(g, g_prev, gamma, beta1), max_norm)
        m = momentum(m, c, beta1)
        v = second_moment(v, c, beta2)
        u = adamw_direction(m, v, t, beta1, beta2, eps)
        W_prev = W.clone()
        W = decoupled_step(W, u, lr, weight_decay)
    return W


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean and sample standard deviation of ``a_i − b_i`` and the paired t statistic."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return mean, std, t
