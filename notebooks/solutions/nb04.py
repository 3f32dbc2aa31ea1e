"""Solutions to the exercises of notebook 04 (preconditioners). Checked by tests/test_exercises_04_05.py."""

from __future__ import annotations

import torch

from mars_ref.pieces import NS_COEFFICIENTS


def ns_singular_values(M: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Singular values of ``newton_schulz(M, steps, eps, dtype=float64)``, computed on scalars only.

    ``X = U S Vᵀ`` gives ``X Xᵀ X = U S³ Vᵀ``, so one Newton–Schulz step maps every singular value
    ``s`` to ``p(s) = q1 s + q3 s³ + q5 s⁵`` and keeps ``U, V``. Start from ``s / (‖M‖_F + ε)``.
    Returned in descending order (``p`` is not monotone on [0, 1], so the order can change).
    """
    q1, q3, q5 = NS_COEFFICIENTS
    M = M.double()
    s = torch.linalg.svdvals(M) / (torch.linalg.norm(M) + eps)
    for _ in range(steps):
        s = q1 * s + q3 * s**3 + q5 * s**5
    return s.sort(descending=True).values


def steps_to_reach(s0: float, target: float = 0.5, max_steps: int = 100) -> int:
    """How many Newton–Schulz steps lift a normalised singular value ``s0`` to at least ``target``."""
    q1, q3, q5 = NS_COEFFICIENTS
    s, k = s0, 0
    while s < target:
        s = q1 * s + q3 * s**3 + q5 * s**5
        k += 1
        if k > max_steps:
            raise RuntimeError("did not reach the target")
    return k


def damped_one_step_shampoo(M: torch.Tensor, eps: float) -> torch.Tensor:
    """``(MMᵀ + εI)^{-1/4} M (MᵀM + εI)^{-1/4} = U diag(σ / sqrt(σ² + ε)) Vᵀ``, with one SVD.

    With ``M = U Σ Vᵀ``: ``(MMᵀ + εI)^{-1/4} = U (Σ² + ε)^{-1/4} Uᵀ`` on ``U``'s range (and ``ε^{-1/4}``
    on its complement, where ``M`` has no component), likewise for ``R``, so the product is
    ``U (Σ²+ε)^{-1/4} Σ (Σ²+ε)^{-1/4} Vᵀ``. Singular values ``σ ≫ √ε`` still map to 1; those
    ``σ ≪ √ε`` map to ``σ/√ε``, i.e. the damping suppresses the weak directions instead of
    blowing them up to 1 as ``U Vᵀ`` does.
    """
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * (S / (S**2 + eps).sqrt())) @ Vh


if __name__ == "__main__":
    print("steps for s0 = 1e-6 to reach 0.5:", steps_to_reach(1e-6))
