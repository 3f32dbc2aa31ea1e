"""Solutions to the exercises of notebook 01 (noisy toys). Checked by tests/test_exercises_01_03.py."""

from __future__ import annotations

import torch


def sgd_noise_floor(H: torch.Tensor, eta: float, sigma: float) -> float:
    r"""Stationary ``E[F]`` of SGD with additive noise ``σ ξ`` on ``F(x) = ½ xᵀ H x``.

    In the eigenbasis of ``H`` the coordinates decouple: ``e ← (1 − η h) e − η σ ξ`` has stationary
    variance ``η² σ² / (1 − (1 − η h)²) = η σ² / (h (2 − η h))``, so
    ``E[F] = Σ_k h_k/2 · η σ² / (h_k (2 − η h_k)) = η σ²/2 · Σ_k 1/(2 − η h_k)``.
    It grows without bound as ``η h_max → 2`` (the edge of stability), and is ``inf`` beyond.
    """
    h = torch.linalg.eigvalsh(H.double())
    if (eta * h >= 2).any() or (h <= 0).any():
        return float("inf")
    return (eta * sigma**2 / 2 * (1.0 / (2.0 - eta * h)).sum()).item()


def noise_without_replacement(problem, x: torch.Tensor, batch: int) -> float:
    r"""``E‖g − ∇F‖²`` for a minibatch of ``batch`` distinct indices of a finite sum.

    Sampling without replacement correlates the draws negatively; the finite-population
    correction gives ``(N − B)/(N − 1) · tr Σ / B``, with ``tr Σ = 1/N Σ_i ‖∇f_i − ∇F‖²``.
    ``B = N`` gives 0: the full batch is the full gradient.
    """
    n = problem.n
    full = problem.grad(x)
    per_sample = problem.grad(x.expand(n, -1), torch.arange(n).unsqueeze(-1))
    tr_sigma = (per_sample - full).square().sum(-1).mean().item()
    return (n - batch) / (n - 1) * tr_sigma / batch
