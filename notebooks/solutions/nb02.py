"""Solutions to the exercises of notebook 02 (STORM step by step). Checked by tests/test_exercises_01_03.py."""

from __future__ import annotations

import math


def exact_storm_error_additive(a: float, sigma: float, t: int, dim: int = 2) -> float:
    r"""``E‖d_t − ∇F(x_t)‖²`` of exact STORM when the gradient noise ``σ ξ`` does not depend on ``x``.

    Same sample at both points: ``∇f(x_t, ξ_t) − ∇f(x_{t−1}, ξ_t) = ∇F(x_t) − ∇F(x_{t−1})`` exactly,
    so ``e_t = (1 − a) e_{t−1} + a σ ξ_t`` with ``e_1 = σ ξ_1`` (``d_0 = g_prev = 0``). Hence
    ``E‖e_t‖² = dim σ² [ q^{t−1} + a² (1 − q^{t−1}) / (1 − q) ]`` with ``q = (1 − a)²``, which tends to
    ``dim σ² a / (2 − a)``. It does not depend on the step size or the trajectory at all.
    """
    q = (1.0 - a) ** 2
    return dim * sigma**2 * (q ** (t - 1) + a**2 * (1.0 - q ** (t - 1)) / (1.0 - q))


def gamma_doubling_noise(beta1: float) -> float:
    r"""The ``γ`` at which approx MARS's ``c_t`` has twice the noise variance of ``g_t``.

    ``c_t − E c_t = (1 + k) ε_t − k ε_{t−1}`` with independent ``ε``: variance ratio ``(1+k)² + k²``.
    ``(1+k)² + k² = 2  ⇔  2k² + 2k − 1 = 0  ⇔  k = (√3 − 1)/2 ≈ 0.366``, and ``γ = k (1 − β1)/β1``.
    At ``β1 = 0.95`` that is ``γ ≈ 0.0193``: the default ``γ = 0.025`` is above it (ratio 2.4).
    """
    k = (math.sqrt(3.0) - 1.0) / 2.0
    return k * (1.0 - beta1) / beta1
