r"""The pieces MARS is made of: one pure function per equation, usable on plain tensors.

MARS (Yuan et al., arXiv 2411.10438; ``docs/algorithm.md`` §2–§5) is a chain of five
transformations of the stochastic gradient ``g_t = ∇f(x_t, ξ_t)``:

    correction    c_t = g_t + γ · β1/(1−β1) · (g_t − g_prev)            (STORM, scaled)
    clip          c_t ← c_t · min(1, τ/‖c_t‖)                            (τ = 1 per tensor)
    momentum      m_t = β1 · m_{t−1} + (1−β1) · c_t
    precondition  u_t = P(m_t)            AdamW: m̂/(√v̂+ε), Lion: sign(m), Shampoo: U Vᵀ
    decay + step  x_{t+1} = x_t − η · (λ · x_t + u_t)

Each function below is the expression under its equation: it returns a new tensor, changes
none of its inputs, keeps no state and stays differentiable (a notebook may take its gradient).
Who owns ``m``, ``v`` and ``g_prev``, which tensors take which branch and how the clip norm is
chosen are decisions, made once in :mod:`mars_ref.chain`; speed lives in :mod:`mars_ref.foreach`
and :mod:`mars_ref.fused`, never here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------
# 1. Correction (STORM, scaled)
# ---------------------------------------------------------------------------


def correction_scale(gamma: float, beta1: float) -> float:
    r"""The weight of ``g_t − g_prev`` in the correction:  .. math:: k = γ β_1 / (1 − β_1)"""
    return gamma * beta1 / (1.0 - beta1)


def storm_correction(grad: Tensor, grad_prev: Tensor, gamma: float, beta1: float) -> Tensor:
    r"""The variance-reduced gradient estimate of MARS.

    .. math::  c_t = g_t + γ \frac{β_1}{1-β_1} (g_t - g_{prev})

    ``grad_prev`` is ``∇f(x_{t-1}, ξ_t)`` (exact MARS, same minibatch, previous point)
    or ``g_{t-1}`` (approx MARS, the previous step's own gradient); zero at step 1.
    With ``gamma = 0`` this is ``g_t`` and MARS falls back to its base optimizer.
    """
    #   c_t = g_t + k · (g_t − g_prev),   k = γ·β1/(1−β1)
    return torch.add(grad, grad - grad_prev, alpha=correction_scale(gamma, beta1))


def storm_estimator(grad: Tensor, grad_prev: Tensor, d_prev: Tensor, a: float) -> Tensor:
    r"""The original STORM recursion (Cutkosky & Orabona, 2019), for comparison.

    .. math::  d_t = g_t + (1-a)(d_{t-1} - g_{prev})

    MARS folds this recursion into its momentum. Expanding ``m_t = β1 m_{t−1} + (1−β1) c_t``
    with ``c_t`` from :func:`storm_correction` gives
    ``m_t = (1−β1) g_t + β1 m_{t−1} + γ β1 (g_t − g_prev)``; at ``γ = 1`` (no clipping)
    that is ``m_t = g_t + β1 (m_{t−1} − g_prev)``: exactly STORM with ``1 − a = β1``.
    ``γ`` interpolates between plain momentum (γ = 0) and full STORM (γ = 1).
    """
    #   d_t = g_t + (1 − a) · (d_{t−1} − g_prev)
    return torch.add(grad, d_prev - grad_prev, alpha=1.0 - a)


# ---------------------------------------------------------------------------
# 2. Clipping
# ---------------------------------------------------------------------------


def clip_factor(norm: Tensor, max_norm: float = 1.0) -> Tensor:
    r"""The factor that clips a vector of norm ``norm`` to at most ``max_norm``.

    .. math::  \min(1, τ / ‖c‖)

    The authors write ``if ‖c‖ > 1: c = c / ‖c‖``; that is ``c · min(1, 1/‖c‖)``. Elementwise in
    ``norm`` (a 0-d tensor, or one norm per run in the toys); ``‖c‖ = 0`` gives 1.
    """
    return torch.clamp(max_norm / norm, max=1.0)


def global_norm(norms: Sequence[Tensor]) -> Tensor:
    r"""The norm of a concatenation from the norms of its parts, summed in float64.

    .. math::  ‖(c_1, …, c_n)‖ = \sqrt{\textstyle\sum_j ‖c_j‖^2}
    """
    return torch.linalg.vector_norm(torch.stack([n.double() for n in norms]), dim=0)


def clip_factors(norms: Sequence[Tensor], clip: str, max_norm: float) -> list[Tensor]:
    r"""The factor each ``c_i`` is multiplied by, from the norms ``‖c_i‖`` of the tensors clipped together.

    ``"tensor"``: ``min(1, τ/‖c_i‖)`` (the authors' rule); ``"global"``: ``min(1, τ/‖(c_1, …, c_n)‖)``, one
    factor for all (float64); ``"none"``: 1. Elementwise over any leading dimensions of the norms (the toys
    clip one run per row).
    """
    if clip == "tensor":
        if len({(n.device, n.dtype, n.shape) for n in norms}) == 1:  # one kernel for all (same numbers)
            return list(clip_factor(torch.stack(list(norms)), max_norm).unbind())
        return [clip_factor(n, max_norm) for n in norms]
    if clip == "global":
        shared = clip_factor(global_norm(norms), max_norm) if norms else None
        return [shared for _ in norms]
    if clip == "none":
        return [torch.ones_like(n) for n in norms]
    raise ValueError(f"clip must be one of ('tensor', 'global', 'none'), not {clip!r}")


def clip_by_norm(c: Tensor, max_norm: float = 1.0) -> Tensor:
    r"""Clip one tensor by its own Euclidean norm (the authors' rule, ``max_norm = 1``).

    .. math::  c ← c · \min(1, τ / ‖c‖_2)
    """
    return c * clip_factor(torch.linalg.vector_norm(c), max_norm)


def clip_by_global_norm(cs: Sequence[Tensor], max_norm: float = 1.0) -> list[Tensor]:
    r"""Clip a list of tensors together by the norm of their concatenation (Levanter's rule).

    .. math::  c_i ← c_i · \min(1, τ / \sqrt{\textstyle\sum_j ‖c_j‖^2})
    """
    if len(cs) == 0:
        return []
    factor = clip_factor(global_norm([torch.linalg.vector_norm(c) for c in cs]), max_norm)
    return [c * factor.to(c.dtype) for c in cs]


# ---------------------------------------------------------------------------
# 3. Momentum (and the second moment of the AdamW branch)
# ---------------------------------------------------------------------------


def momentum(m: Tensor, c: Tensor, beta1: float) -> Tensor:
    r"""Exponential moving average.   .. math:: m_t = β_1 m_{t-1} + (1-β_1) c_t"""
    return torch.add(m * beta1, c, alpha=1.0 - beta1)


def second_moment(v: Tensor, c: Tensor, beta2: float) -> Tensor:
    r"""Second moment.   .. math:: v_t = β_2 v_{t-1} + (1-β_2) c_t^2

    In MARS-AdamW ``c`` is the clipped corrected gradient, not ``g_t``.
    """
    return torch.addcmul(v * beta2, c, c, value=1.0 - beta2)


# ---------------------------------------------------------------------------
# 4. Preconditioners: each maps momentum (and state) to an update direction u_t
# ---------------------------------------------------------------------------


def adamw_direction(m: Tensor, v: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    r"""AdamW's diagonal preconditioner with the authors' ε placement.

    .. math::  \mathrm{denom} = \left(\frac{\sqrt{v_t}}{\sqrt{1-β_2^t}} + ε\right)(1-β_1^t),
               \qquad u_t = m_t / \mathrm{denom}

    ε sits *after* the √(1−β2^t) scaling, exactly as in ``torch.optim.AdamW``.
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    #   denom = (√v_t / √(1−β2^t) + ε) · (1−β1^t)
    denom = (v.sqrt() / math.sqrt(bias_correction2) + eps) * bias_correction1
    #   u_t = m_t / denom
    return m / denom


def adam_direction_eps_first(m: Tensor, v: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    r"""Adam's direction with ε added *before* the bias corrections (Moonlight's AdamW, and the AdamW part of
    the authors' MARS-M).

    .. math::  u_t = \frac{m_t}{\sqrt{v_t} + ε} \cdot \frac{\sqrt{1-β_2^t}}{1-β_1^t}

    The same as :func:`adamw_direction` but for where ε sits (it is ε/√(1−β2^t) there, in these units).
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    #   denom = (√v_t + ε) · (1−β1^t)/√(1−β2^t)
    denom = (v.sqrt() + eps) * (bias_correction1 / math.sqrt(bias_correction2))
    return m / denom


def lion_direction(m: Tensor) -> Tensor:
    r"""Lion's preconditioner as MARS uses it:  .. math:: u_t = \mathrm{sign}(m_t)

    Note: ``m_t`` is the β1-average of the clipped ``c_t``. Lion itself (Chen et al.,
    2023) uses ``sign(β1 m_{t−1} + (1−β1) g_t)`` with a second β for the stored
    average; the two coincide when Lion's β1 = β2 (see ``baselines.Lion``).
    """
    return torch.sign(m)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    M: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = torch.bfloat16
) -> Tensor:
    r"""Approximate ``U Vᵀ`` of ``M = U Σ Vᵀ`` by the quintic Newton–Schulz iteration.

    .. math::
        X_0 = M / (‖M‖_F + ε), \qquad
        A = X X^T,\; B = A X,\; X ← aX + bB + cAB \quad (\text{``steps'' times})

    with the authors' ``(a, b, c) = (3.4445, −4.7750, 2.0315)``. These coefficients
    push every singular value into roughly [0.7, 1.2] fast instead of converging to
    exactly 1, so the result is close to, not equal to, ``U Vᵀ``. ``dtype`` is the
    compute dtype (the authors use bfloat16; ``None`` keeps ``M``'s dtype).
    """
    if M.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D tensor, got shape {tuple(M.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = M if dtype is None else M.to(dtype)
    #   X_0 = M / (‖M‖_F + ε)
    X = X / (torch.linalg.norm(X) + eps)
    tall = M.size(0) > M.size(1)
    if tall:  # iterate on the wide orientation, so X Xᵀ is the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        #   A = X Xᵀ
        A = X @ X.T
        #   B = A X
        B = A @ X
        #   X ← a X + b B + c A B
        X = a * X + b * B + c * A @ B
    if tall:
        X = X.T
    return X.to(M.dtype)


def polar_svd(M: Tensor) -> Tensor:
    r"""One-step Shampoo, exactly:  ``U Vᵀ`` where ``M = U Σ Vᵀ`` (thin SVD).

    This is what Shampoo's ``L^{-1/4} M R^{-1/4}`` becomes with ``L = M Mᵀ`` and
    ``R = Mᵀ M`` taken from this one matrix, no accumulation, no ε:
    ``(UΣ²Uᵀ)^{-1/4} UΣVᵀ (VΣ²Vᵀ)^{-1/4} = U Σ^{-1/2} Σ Σ^{-1/2} Vᵀ = U Vᵀ``.
    """
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def inverse_root(A: Tensor, root: int = 4, eps: float = 1e-12) -> Tensor:
    r"""``(A + εI)^{-1/root}`` of a symmetric positive semi-definite matrix, by eigendecomposition.

    .. math::  A = Q Λ Q^T \;\Rightarrow\; (A+εI)^{-1/r} = Q (Λ+ε)^{-1/r} Q^T
    """
    eigenvalues, Q = torch.linalg.eigh(A)
    #   (Λ + ε)^{−1/r}, with tiny negative eigenvalues from round-off clamped to 0
    scale = (eigenvalues.clamp(min=0) + eps).pow(-1.0 / root)
    return (Q * scale) @ Q.T


def shampoo_factors(L: Tensor, R: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    r"""Shampoo's Kronecker factors after one more gradient.

    .. math::  L_t = L_{t-1} + G G^T, \qquad R_t = R_{t-1} + G^T G
    """
    return torch.addmm(L, G, G.T), torch.addmm(R, G.T, G)


def shampoo_direction(L: Tensor, R: Tensor, M: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Full Shampoo's update direction (Gupta et al., 2018).

    .. math::  u = L^{-1/4} \, M \, R^{-1/4}
    """
    return inverse_root(L, 4, eps) @ M @ inverse_root(R, 4, eps)


def shampoo_scale(shape: Sequence[int]) -> float:
    r"""The authors' shape factor for the orthogonalised update: ``sqrt(max(1, rows/cols))``."""
    rows, cols = shape
    return max(1.0, rows / cols) ** 0.5


def muon_scale(shape: Sequence[int]) -> float:
    r"""MARS-M's (and Moonlight's) shape factor: ``0.2 · sqrt(max(rows, cols))``, which gives the orthogonalised
    update about the RMS of an AdamW update (torch.optim.Muon's ``adjust_lr_fn="match_rms_adamw"``)."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols))


def fallback_lr(lr, lr_1d: float, base_lr: float):
    r"""The learning rate of the AdamW fallback:  .. math:: η · lr_{1d} / base\_lr

    ``base_lr`` is the group's ``lr`` at construction, so a scheduler that scales ``lr`` scales the
    fallback with it (the authors' rule); ``base_lr = 0`` gives ``lr``. ``lr`` may be a number or a 0-d tensor.
    """
    return lr * (lr_1d / base_lr) if base_lr > 0 else lr


# ---------------------------------------------------------------------------
# 5. Decay and step
# ---------------------------------------------------------------------------


def decoupled_step(x: Tensor, direction: Tensor, lr: float, weight_decay: float) -> Tensor:
    r"""Decoupled weight decay applied to the pre-update point, then the step.

    .. math::  x_{t+1} = x_t - η (λ x_t + u_t)
    """
    #   x_{t+1} = x_t − η · (λ · x_t + u_t)
    return torch.add(x, torch.add(direction, x, alpha=weight_decay), alpha=-lr)
