"""Solutions to the exercises of notebook 02b (SVRG, SARAH and the control variate).

Checked by tests/test_exercises_02b.py.
"""

from __future__ import annotations

import torch


def svrg_variance(X: torch.Tensor, Y: torch.Tensor, alpha: float, batch: int) -> float:
    r"""``E‖d − ∇F(x)‖²`` of the (α-)SVRG estimate ``d = mean_{i∈ξ}(X_i − ω Y_i) + ω Ȳ`` on a minibatch ``ξ`` of
    ``batch`` indices drawn uniformly with replacement; ``X``, ``Y``: per-sample gradients ``(N, dim)`` at ``x`` and
    at the snapshot ``x̃``; the coefficient ``ω`` is the argument ``alpha``.

    ``d − ∇F(x) = mean_{i∈ξ}(ζ_i)`` with ``ζ_i = (X_i − X̄) − ω (Y_i − Ȳ)``, mean zero over ``i``. The ``batch``
    draws are independent, so the variance of their mean is ``1/batch`` of one draw's:

        E‖d − ∇F(x)‖² = (1/batch) · (1/N) Σ_i ‖(X_i − X̄) − ω (Y_i − Ȳ)‖²
                      = (1/batch) · (Var X − 2ω Cov[X, Y] + ω² Var Y)      (traces)
    """
    zeta = (X - X.mean(0)) - alpha * (Y - Y.mean(0))
    return zeta.square().sum(-1).mean().item() / batch


def optimal_alpha(X: torch.Tensor, Y: torch.Tensor) -> float:
    r"""The coefficient minimising that variance: ``ω* = Cov[X, Y] / Var[Y]`` (traces, over the N samples).

    ``Var X − 2ω Cov + ω² Var Y`` is a parabola in ``ω`` with its vertex at ``Cov / Var Y``, independent of the
    batch size; the variance falls below SGD's (``ω = 0``) for every ``ω`` between 0 and ``2 Cov / Var Y``.
    """
    zx, zy = X - X.mean(0), Y - Y.mean(0)
    return ((zx * zy).sum() / zy.square().sum()).item()
