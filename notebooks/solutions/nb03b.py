"""Solution to the exercise of notebook 03b (where variance reduction pays off).

Checked by tests/test_exercises_01_03.py.
"""

from __future__ import annotations


def storm_floor_ratio(a: float, eta: float, h: float) -> float:
    r"""Stationary ``E[F]`` of exact STORM over that of SGD, same step ``η``, on ``F(x) = ½ h x²`` with noise ``σξ``.

    SGD: ``x ← ρ x − η σ ξ`` with ``ρ = 1 − η h``, so ``Var(x) = η² σ² / (1 − ρ²)``.
    Exact STORM with additive noise: ``d_t = ∇F(x_t) + e_t``, ``e_t = φ e_{t−1} + a σ ξ_t`` with ``φ = 1 − a``
    (the same sample at both points cancels the noise exactly), so ``x ← ρ x − η e`` is driven by an
    AR(1) noise of variance ``a² σ² / (1 − φ²) = a σ² / (2 − a)``. For ``y ← ρ y + u`` with ``u`` AR(1) of
    coefficient ``φ`` and variance ``s²``: ``Var(y) = s² (1 + ρφ) / ((1 − ρ²)(1 − ρφ))``. Hence

        ratio = a/(2 − a) · (1 + ρφ)/(1 − ρφ)  ≈  a / (η h + a)   for small η h and a.

    Where ``η h ≫ a`` (stiff directions, long averaging) the floor drops by ``a/(ηh)``; where ``η h ≪ a``
    (flat directions) the ratio is about 1: variance reduction buys nothing there.
    """
    rho, phi = 1.0 - eta * h, 1.0 - a
    return a / (2.0 - a) * (1.0 + rho * phi) / (1.0 - rho * phi)
