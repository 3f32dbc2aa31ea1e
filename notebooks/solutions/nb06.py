"""Solutions to the exercises of notebook 06 (GPT-2 with MARS). Checked by tests/test_exercises_06.py."""

from __future__ import annotations


def correction_scale(gamma: float, beta1: float) -> float:
    """``k = γ·β1/(1−β1)``: approximate MARS's ``c_t = g_t + k·(g_t − g_{t−1})``."""
    return gamma * beta1 / (1.0 - beta1)


def noise_ratio(gamma: float, beta1: float, n_heldout: int | None = None) -> float:
    """Expected ``‖c_t − ∇F̂‖² / ‖g_t − ∇F̂‖²`` for approximate MARS when the gradient does not move.

    Derivation. Write ``g_t = ∇F + σξ_t`` and ``∇F̂ = ∇F + σζ/√D`` (the mean of D held-out
    minibatch gradients), with ξ_t, ξ_{t−1}, ζ independent, mean 0, ``E‖ξ‖² = E‖ζ‖² = n``. Then

        c_t − ∇F̂ = σ((1+k)ξ_t − kξ_{t−1}) − σζ/√D     (the ∇F terms cancel: (1+k) − k = 1)
        g_t − ∇F̂ = σξ_t − σζ/√D

    and, the cross terms vanishing in expectation,

        E‖c_t − ∇F̂‖² = σ²n((1+k)² + k² + 1/D),   E‖g_t − ∇F̂‖² = σ²n(1 + 1/D).

    ``n_heldout=None`` is D = ∞ (the error to the true ∇F). At the recipe's γ = 0.025, β1 = 0.95:
    k = 0.475 and the ratio is 2.40 (2.25 with D = 8). At γ = 1: k = 19, ratio 761.

    Exact MARS takes both gradients on the same minibatch ξ_t: when x_t ≈ x_{t−1} their noises are
    nearly the same and cancel in ``g_t − ∇f(x_{t−1}, ξ_t)``, so ``c_t`` has the noise of ``g_t``:
    ratio ≈ 1, whatever γ. That is why exact MARS can afford a large γ and approximate MARS cannot.
    """
    k = correction_scale(gamma, beta1)
    floor = 0.0 if n_heldout is None else 1.0 / n_heldout
    return ((1 + k) ** 2 + k**2 + floor) / (1 + floor)


def momentum_lag(gamma: float, beta1: float) -> float:
    """Steady-state lag, in steps, of MARS's momentum behind a linearly drifting gradient.

    With ``∇F_t = t·d`` and no noise, ``c_t = t·d + k·d``. The exponential average
    ``m_t = β1·m_{t−1} + (1−β1)·c_t`` of a ramp lags it by ``β1/(1−β1)`` steps:
    ``m_t → (t − β1/(1−β1))·d + k·d``. The correction adds ``k = γ·β1/(1−β1)`` steps back, so

        lag = β1/(1−β1) − k = (1 − γ)·β1/(1−β1).

    At β1 = 0.95: 19 steps (γ = 0), 18.525 (γ = 0.025, the recipe: 2.5 % removed), 0 (γ = 1, STORM).
    γ = 0.5 halves the lag; then k = 9.5 and approximate MARS's noise ratio (exercise 1) is
    10.5² + 9.5² = 200.5: the lag bought back with approximate MARS costs noise quadratically in γ.
    """
    return (1.0 - gamma) * beta1 / (1.0 - beta1)
