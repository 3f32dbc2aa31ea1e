r"""Toy problems whose full gradient is known exactly, for the teaching notebooks (01–03 and later).

Both problems share one small interface, vectorised over any leading batch dimensions (one row
per seed, so 64 independent runs are one tensor of shape ``(64, dim)``):

    xi = problem.sample(gen, shape)   # the randomness ξ of one stochastic gradient, for `shape` runs
    g  = problem.stoch_grad(x, xi)    # ∇f(x, ξ), x of shape (*shape, dim)
    G  = problem.grad(x)              # ∇F(x) = E_ξ ∇f(x, ξ), exactly
    F  = problem.loss(x)              # F(x), shape `shape`
    F, G = problem.loss_and_grad(x)   # both, sharing one forward pass
    x0 = problem.init(gen, shape)     # a starting point per run
    parts = problem.split(x)          # the "tensors" of x (for per-tensor clipping), views

Evaluating ``stoch_grad`` at two points with the same ``xi`` is the "same sample twice" of
exact STORM / exact MARS.

* :class:`TwoLayerRegression`: a finite sum ``F(x) = 1/N Σ_i ½ (w_2ᵀ tanh(W_1 a_i) − b_i)²``
  (a tanh network fitted to a noisy teacher; nonconvex). ``ξ`` is a minibatch of indices drawn
  with replacement, so ``E‖∇f(x, ξ) − ∇F(x)‖² = tr Σ(x) / batch``: the batch size sets the noise.
* :class:`Noisy2D`: the Rosenbrock-type valley ``F(u, v) = (1 − u)² + b (v − u²)²`` with additive
  Gaussian gradient noise ``∇f = ∇F + σ ξ``, ``ξ ~ N(0, I₂)``; minimum ``F* = 0`` at ``(1, 1)``.

:func:`run` runs SGD, momentum, STORM or MARS-momentum on many seeds at once and records, per
step and seed, ``F(x_t)``, ``‖∇F(x_t)‖²`` and the estimator's error ``‖d_t − ∇F(x_t)‖²``. It
calls the pieces of :mod:`mars_ref.pieces` (``storm_estimator``, ``storm_correction``, ``momentum``)
and the optimizer's own clip rule (:func:`mars_ref.pieces.clip_factors`) for those. On a finite sum it
also runs the two classic variance-reduced methods that need full gradients, SVRG (with an optional
coefficient ``α`` on its correction: α-SVRG) and SARAH (SPIDER: the same estimator with a normalised
step), and counts every component gradient they evaluate, full passes included (``Run.grad_evals``),
so that all methods can be compared at equal cost. ``keep_cv=True`` records each method's control
variate (``X``, ``Y`` and the mean of ``Y``) along the run. :func:`t_interval` gives the mean over
seeds with its Student-t confidence interval.

Everything is float64 by default and deterministic given the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import CLIP_MODES
from ..pieces import clip_factors, momentum, storm_correction, storm_estimator

__all__ = ["TwoLayerRegression", "Noisy2D", "Run", "run", "METHODS", "FULL_GRADIENT_METHODS",
           "t_quantile", "t_interval"]


class TwoLayerRegression:
    r"""Finite-sum regression with a two-layer tanh network (bias-free), exact full gradient.

    .. math::  F(x) = \frac1N \sum_{i=1}^N f_i(x), \qquad
               f_i(x) = \tfrac12\big(w_2^\top \tanh(W_1 a_i) - b_i\big)^2, \qquad x = (W_1, w_2)

    Data: ``a_i ~ N(0, I)`` in ``R^{d_in}``, ``b_i`` = a random teacher network of the same shape
    plus ``label_noise · N(0, 1)``. ``x`` is flat: ``dim = hidden·d_in + hidden``, ``W_1`` first
    (row-major ``(hidden, d_in)``), then ``w_2``. The problem (data, teacher) is fixed by ``seed``.
    """

    def __init__(self, n: int = 128, d_in: int = 8, hidden: int = 16, batch: int = 8,
                 label_noise: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.d_in, self.hidden, self.batch, self.dtype = n, d_in, hidden, batch, dtype
        self.dim = hidden * d_in + hidden
        self.A = torch.randn(n, d_in, generator=gen, dtype=dtype)
        teacher = torch.cat([torch.randn(hidden * d_in, generator=gen, dtype=dtype) / d_in**0.5,
                             torch.randn(hidden, generator=gen, dtype=dtype) * 2 / hidden**0.5])
        self.b = self._predict(teacher, self.A) + label_noise * torch.randn(n, generator=gen, dtype=dtype)

    # -- the parameters
    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(W_1, w_2)`` as views of ``x``: shapes ``(*, hidden, d_in)`` and ``(*, hidden)``."""
        k = self.hidden * self.d_in
        return x[..., :k].unflatten(-1, (self.hidden, self.d_in)), x[..., k:]

    def init(self, gen: torch.Generator, shape: tuple[int, ...] = ()) -> Tensor:
        """A random starting point per run: ``W_1 ~ N(0, 1/d_in)``, ``w_2 ~ N(0, 1/hidden)``."""
        W1 = torch.randn(*shape, self.hidden * self.d_in, generator=gen, dtype=self.dtype) / self.d_in**0.5
        w2 = torch.randn(*shape, self.hidden, generator=gen, dtype=self.dtype) / self.hidden**0.5
        return torch.cat([W1, w2], dim=-1)

    # -- the randomness
    def sample(self, gen: torch.Generator, shape: tuple[int, ...] = ()) -> Tensor:
        """A minibatch of ``batch`` indices in ``[0, n)``, drawn with replacement, per run: ``(*shape, batch)``."""
        return torch.randint(self.n, (*shape, self.batch), generator=gen)

    # -- values and gradients
    def _predict(self, x: Tensor, A: Tensor) -> Tensor:
        W1, w2 = self.split(x)
        return (torch.tanh(A @ W1.transpose(-1, -2)) @ w2.unsqueeze(-1)).squeeze(-1)

    def _data(self, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        return (self.A, self.b) if idx is None else (self.A[idx], self.b[idx])

    def loss(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``F(x)`` (``idx=None``) or the minibatch loss ``f(x, idx)``; differentiable by autograd too."""
        A, b = self._data(idx)
        return 0.5 * (self._predict(x, A) - b).square().mean(-1)

    def grad(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``∇F(x)`` (``idx=None``, the mean over all N samples) or ``∇f(x, idx)``, in closed form."""
        return self.loss_and_grad(x, idx)[1]

    def loss_and_grad(self, x: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(F(x), ∇F(x))`` or ``(f(x, idx), ∇f(x, idx))`` with one forward pass."""
        A, b = self._data(idx)
        W1, w2 = self.split(x)
        H = torch.tanh(A @ W1.transpose(-1, -2))                      # (*, B, hidden)
        r = (H @ w2.unsqueeze(-1)).squeeze(-1) - b                    # residuals (*, B)
        count = A.shape[-2]
        g_w2 = (H.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1) / count   # Σ_i r_i tanh(W1 a_i) / B
        g_pre = (r.unsqueeze(-1) * w2.unsqueeze(-2)) * (1 - H * H)    # ∂f_i/∂(W1 a_i)
        g_W1 = g_pre.transpose(-1, -2) @ A / count                    # (*, hidden, d_in)
        return 0.5 * r.square().mean(-1), torch.cat([g_W1.flatten(-2), g_w2], dim=-1)

    def stoch_grad(self, x: Tensor, xi: Tensor) -> Tensor:
        """``∇f(x, ξ)``: the gradient on the minibatch ``ξ`` (indices from :meth:`sample`)."""
        return self.grad(x, xi)


class Noisy2D:
    r"""A 2-D Rosenbrock-type valley with additive Gaussian gradient noise of size ``sigma``.

    .. math::  F(u, v) = (1-u)^2 + b\,(v - u^2)^2, \qquad \nabla f(x, ξ) = \nabla F(x) + σ ξ,
               \quad ξ \sim N(0, I_2)

    Nonconvex (a curved valley), minimum ``F* = 0`` at ``(1, 1)``, Hessian there
    ``[[2 + 8b, −4b], [−4b, 2b]]``. ``E‖∇f − ∇F‖² = 2σ²``.
    """

    dim = 2
    minimum = (1.0, 1.0)

    def __init__(self, sigma: float = 1.0, b: float = 5.0, dtype: torch.dtype = torch.float64):
        self.sigma, self.b, self.dtype = sigma, b, dtype

    def split(self, x: Tensor) -> tuple[Tensor]:
        return (x,)

    def init(self, gen: torch.Generator | None = None, shape: tuple[int, ...] = ()) -> Tensor:
        """The classic start ``(−1.2, 1)`` for every run (``gen`` unused, kept for the interface)."""
        return torch.tensor([-1.2, 1.0], dtype=self.dtype).expand(*shape, 2).clone()

    def sample(self, gen: torch.Generator, shape: tuple[int, ...] = ()) -> Tensor:
        """Standard normal ``ξ`` of shape ``(*shape, 2)``."""
        return torch.randn(*shape, 2, generator=gen, dtype=self.dtype)

    def loss(self, x: Tensor) -> Tensor:
        u, v = x[..., 0], x[..., 1]
        return (1 - u) ** 2 + self.b * (v - u * u) ** 2

    def loss_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss(x), self.grad(x)

    def grad(self, x: Tensor) -> Tensor:
        u, v = x[..., 0], x[..., 1]
        return torch.stack([-2 * (1 - u) - 4 * self.b * u * (v - u * u), 2 * self.b * (v - u * u)], dim=-1)

    def stoch_grad(self, x: Tensor, xi: Tensor) -> Tensor:
        return self.grad(x) + self.sigma * xi


METHODS = ("sgd", "momentum", "storm-exact", "storm-approx", "mars-exact", "mars-approx", "svrg", "sarah", "spider")
FULL_GRADIENT_METHODS = ("svrg", "sarah", "spider")  # they take full gradients: finite sums only


@dataclass
class Run:
    """What :func:`run` records, per step ``t = 1..steps`` (rows) and seed (columns).

    ``loss[t−1] = F(x_t)`` and ``grad_sq[t−1] = ‖∇F(x_t)‖²`` at the point where ``d_t`` is computed;
    ``err[t−1] = ‖d_t − ∇F(x_t)‖²`` (the estimator's error); ``corr[t−1] = ‖c_t − g_t‖`` (MARS
    only, before clipping; 0 otherwise); ``final_loss = F(x_{steps+1})``; ``path`` the iterates
    ``x_1..x_{steps+1}`` if asked for; ``diverged`` whether a run left ``‖x‖ ≤ 1e6`` or became
    non-finite (it is frozen from then on and its records are ``inf``, ``corr`` ``nan``, from the
    step it diverged on); ``evals_per_step``:
    stochastic gradient evaluations per step (2 for the exact methods, SVRG and SARAH's inner steps;
    full passes not included).

    ``grad_evals[t−1]``: the component gradients ``∇f_i`` evaluated in steps ``1..t``, every cost
    included: a minibatch gradient costs ``batch``, a full gradient ``N`` (``problem.n``; on a problem
    without ``n`` and ``batch``, such as :class:`Noisy2D`, one stochastic gradient counts 1).

    ``cv`` (with ``keep_cv=True``): the method's control variate ``X − c (Y − E[Y])`` along the run, per
    step and seed, with ``X`` the fresh stochastic gradient at ``x_t`` and ``ζ_X = X − ∇F(x_t)``,
    ``ζ_Y = Y − E[Y]``: ``"cov"`` ``⟨ζ_X, ζ_Y⟩``, ``"var_x"`` ``‖ζ_X‖²``, ``"var_y"`` ``‖ζ_Y‖²``,
    ``"dist"`` ``‖x_t − x_Y‖`` (the point ``Y`` is evaluated at), ``"c"`` the coefficient. Their means
    over seeds estimate ``tr Cov[X, Y]``, ``tr Var[X]``, ``tr Var[Y]``. ``Y`` and ``E[Y]`` are:
    SVRG ``∇f_ξ(x̃)`` and ``∇F(x̃)`` (``c = α_t``); SARAH/SPIDER and exact STORM/MARS
    ``∇f(x_{t−1}, ξ_t)`` and ``∇F(x_{t−1})``; approx STORM/MARS ``g_{t−1}`` and ``∇F(x_{t−1})``
    (STORM: ``c = β``; MARS: ``c = k/(1+k)``, ``k = γβ/(1−β)``, since ``c_t = (1+k)(X − cY)``).
    ``nan`` where a method has no control variate (SGD, momentum, step 1, SARAH's restarts).
    """

    loss: Tensor
    grad_sq: Tensor
    err: Tensor
    corr: Tensor
    final_loss: Tensor
    diverged: Tensor
    evals_per_step: int
    grad_evals: Tensor
    path: Tensor | None = None
    cv: dict[str, Tensor] | None = None


def _clip_rows(problem, c: Tensor, clip: str | None, max_norm: float) -> Tensor:
    """Clip every run's ``c`` (rows of a ``(seeds, dim)`` tensor) by the optimizer's rule
    (:func:`mars_ref.pieces.clip_factors`), the parts of ``problem.split`` taking the place of tensors."""
    if clip is None or clip == "none":
        return c
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be None, 'none', 'tensor' or 'global', not {clip!r}")
    parts = problem.split(c)
    norms = [part.flatten(1).norm(dim=1) for part in parts]  # one norm per run and part
    out = torch.empty_like(c)
    for target, part, factor in zip(problem.split(out), parts, clip_factors(norms, clip, max_norm), strict=True):
        target.copy_(part * factor.to(c.dtype).view(-1, *[1] * (part.ndim - 1)))
    return out


def _cost(problem) -> tuple[int, int]:
    """Component gradients in one stochastic gradient and in one full gradient."""
    batch = getattr(problem, "batch", 1)
    return batch, getattr(problem, "n", batch)


def run(problem, method: str, lr: float, steps: int, seeds: int = 64, seed: int = 0, *,
        beta: float = 0.95, gamma: float = 1.0, clip: str | None = None, max_norm: float = 1.0,
        x0: Tensor | None = None, keep_path: bool = False, epoch: int | None = None,
        alpha: float | Callable[[int], float] = 1.0, keep_cv: bool = False) -> Run:
    r"""Run ``x_{t+1} = x_t − η d_t`` on ``seeds`` independent runs at once; ``d_t`` by ``method``:

    * ``"sgd"``: ``d_t = g_t = ∇f(x_t, ξ_t)``
    * ``"momentum"``: ``d_t = m_t = β m_{t−1} + (1−β) g_t`` (``momentum``)
    * ``"storm-exact"`` / ``"storm-approx"``: ``d_t = g_t + (1−a)(d_{t−1} − g_prev)`` with
      ``1 − a = β`` (``storm_estimator``); exact: ``g_prev = ∇f(x_{t−1}, ξ_t)``, approx: ``g_{t−1}``
    * ``"mars-exact"`` / ``"mars-approx"``: ``c_t = g_t + γ β/(1−β)(g_t − g_prev)``
      (``storm_correction``), clipped if ``clip`` is ``"tensor"``/``"global"`` (per run, over
      ``problem.split``), then ``d_t = m_t = β m_{t−1} + (1−β) c_t``
    * ``"svrg"`` (Johnson & Zhang, 2013): every ``epoch`` steps (from step 1) a snapshot ``x̃ = x_t`` and
      its full gradient ``μ = ∇F(x̃)`` (``N`` component gradients); every step
      ``d_t = ∇f(x_t, ξ_t) − α_t (∇f(x̃, ξ_t) − μ)`` (``2·batch``). ``α_t = 1`` is SVRG; a schedule
      ``alpha(t)`` (``t = 0, 1, …``, e.g. ``lambda t: 0.75 * (1 − t / steps)``) is α-SVRG (Yin et al., 2025).
    * ``"sarah"`` (Nguyen et al., 2017): every ``epoch`` steps (from step 1) a restart ``d_t = ∇F(x_t)``
      (``N``); the other steps ``d_t = ∇f(x_t, ξ_t) − ∇f(x_{t−1}, ξ_t) + d_{t−1}`` (``2·batch``).
    * ``"spider"`` (Fang et al., 2018): SARAH's estimator with SPIDER's normalised step
      ``x_{t+1} = x_t − min(η, δ/‖d_t‖) d_t``, a step of length at most ``δ = max_norm`` (their
      ``η_t = min(ε/(L n_0 ‖v_t‖), 1/(2 L n_0))``).

    ``g_prev = 0`` and ``d_0 = m_0 = 0`` at step 1 (the authors' convention). ``x0``: a start of
    shape ``(dim,)`` or ``(seeds, dim)``; default ``problem.init`` with the run's generator. The
    minibatches come from ``torch.Generator().manual_seed(seed)``, one ``ξ_t`` per step for every method
    (SARAH's restarts draw one and leave it unused), so two methods run with the same ``seed`` see the
    same samples ``ξ_1, ξ_2, …`` (common random numbers). ``epoch``: the inner-loop length ``m`` of
    SVRG, SARAH and SPIDER (default ``N / batch``: one pass of minibatches). ``keep_cv``: record the
    control variates (``Run.cv``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method in FULL_GRADIENT_METHODS and not hasattr(problem, "n"):
        raise ValueError(f"{method} needs a finite sum with full gradients (a problem with n samples)")
    batch, full_cost = _cost(problem)
    m_inner = max(1, full_cost // batch) if epoch is None else int(epoch)
    if m_inner < 1:
        raise ValueError(f"epoch must be at least 1, not {epoch}")
    alpha_at = alpha if callable(alpha) else (lambda t, a=float(alpha): a)
    gen = torch.Generator().manual_seed(seed)
    x = problem.init(gen, (seeds,)) if x0 is None else x0.to(problem.dtype).expand(seeds, problem.dim).clone()
    exact = method.endswith("exact")
    d = torch.zeros_like(x)          # d_{t−1} (STORM, SARAH) or m_{t−1} (momentum, MARS)
    g_prev = torch.zeros_like(x)     # g_{t−1} (approx); exact recomputes ∇f(x_{t−1}, ξ_t)
    x_prev = full_prev = snap = mu = None
    diverged = torch.zeros(seeds, dtype=torch.bool)
    rec = {k: torch.empty(steps, seeds, dtype=problem.dtype) for k in ("loss", "grad_sq", "err", "corr")}
    cv = {k: torch.full((steps, seeds), math.nan, dtype=problem.dtype) for k in ("cov", "var_x", "var_y", "dist", "c")
          } if keep_cv else None
    evals = torch.zeros(steps, dtype=torch.int64)
    spent = 0
    path = [x.clone()] if keep_path else None
    for t in range(steps):
        xi = problem.sample(gen, (seeds,))
        rec["loss"][t], full = problem.loss_and_grad(x)
        pair = None  # (X, Y, E[Y], point of Y, c) of the control variate, for keep_cv
        corr = torch.zeros(seeds, dtype=problem.dtype)
        if method == "svrg":
            if t % m_inner == 0:
                snap, mu = x.clone(), full.clone()  # ∇F(x̃): a full pass
                spent += full_cost
            g, y = problem.stoch_grad(x, xi), problem.stoch_grad(snap, xi)
            a_t = float(alpha_at(t))
            d = g - a_t * (y - mu)
            spent += 2 * batch
            pair = (g, y, mu, snap, a_t)
        elif method in ("sarah", "spider"):
            if t % m_inner == 0:
                d = full.clone()  # the restart: a full pass
                spent += full_cost
            else:
                g, y = problem.stoch_grad(x, xi), problem.stoch_grad(x_prev, xi)
                d = g - y + d
                spent += 2 * batch
                pair = (g, y, full_prev, x_prev, 1.0)
        else:
            g = problem.stoch_grad(x, xi)
            if exact:
                g_prev = problem.stoch_grad(x_prev, xi) if x_prev is not None else torch.zeros_like(x)
            spent += (2 if exact else 1) * batch
            if method == "sgd":
                d = g
            elif method == "momentum":
                d = momentum(d, g, beta)
            elif method.startswith("storm"):
                d = storm_estimator(g, g_prev, d, 1.0 - beta)
            else:
                c = storm_correction(g, g_prev, gamma, beta)
                corr = (c - g).norm(dim=-1)
                d = momentum(d, _clip_rows(problem, c, clip, max_norm), beta)
            if x_prev is not None and method not in ("sgd", "momentum"):
                k = gamma * beta / (1 - beta)
                pair = (g, g_prev, full_prev, x_prev, beta if method.startswith("storm") else k / (1 + k))
        evals[t] = spent
        rec["grad_sq"][t] = full.square().sum(-1)
        rec["err"][t] = (d - full).square().sum(-1)
        rec["corr"][t] = corr
        if keep_cv and pair is not None:
            X, Y, mean_y, at, c_t = pair
            zx, zy = X - full, Y - mean_y
            cv["cov"][t], cv["var_x"][t] = (zx * zy).sum(-1), zx.square().sum(-1)
            cv["var_y"][t], cv["dist"][t] = zy.square().sum(-1), (x - at).norm(dim=-1)
            cv["c"][t] = c_t
        if method not in ("svrg", "sarah", "spider") and not exact:
            g_prev = g
        x_prev, full_prev = x.clone(), full
        if method == "spider":  # a step of length min(η‖d‖, δ): SPIDER's normalised step
            scale = torch.clamp(max_norm / (lr * d.norm(dim=-1, keepdim=True)), max=1.0)
            step = lr * scale * d
        else:
            step = lr * d
        x = torch.where(diverged.unsqueeze(-1), x, x - step)
        bad = ~torch.isfinite(x).all(-1) | (x.norm(dim=-1) > 1e6)
        if bad.any():
            diverged |= bad
            x = torch.where(diverged.unsqueeze(-1), torch.nan_to_num(x_prev), x)  # freeze where it was
            d = torch.where(diverged.unsqueeze(-1), torch.zeros_like(d), d)
            g_prev = torch.where(diverged.unsqueeze(-1), torch.zeros_like(g_prev), g_prev)
            if snap is not None:
                snap = torch.where(diverged.unsqueeze(-1), torch.nan_to_num(snap), snap)
                mu = torch.where(diverged.unsqueeze(-1), torch.nan_to_num(mu), mu)
        for k in rec:  # a diverged run has no meaningful records: inf (nan for the correction size)
            rec[k][t] = torch.where(diverged, torch.nan if k == "corr" else torch.inf, rec[k][t])
        if keep_cv:
            for k in cv:
                cv[k][t] = torch.where(diverged, torch.nan, cv[k][t])
        if keep_path:
            path.append(x.clone())
    final = torch.where(diverged, torch.inf, problem.loss(x))
    return Run(loss=rec["loss"], grad_sq=rec["grad_sq"], err=rec["err"], corr=rec["corr"], final_loss=final,
               diverged=diverged, evals_per_step=2 if exact or method in FULL_GRADIENT_METHODS else 1,
               grad_evals=evals, path=torch.stack(path) if keep_path else None, cv=cv)


def t_quantile(p: float, df: int) -> float:
    r"""The ``p``-quantile of Student's t distribution with ``df`` degrees of freedom (``0.5 < p < 1``).

    Its density ``Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + s²/ν)^{−(ν+1)/2}`` integrated by Simpson's rule in the
    variable ``u = atan(s)`` (which keeps the heavy tails of small ``ν`` finite), then inverted by bisection;
    accurate to about 1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p = {p}, df = {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(q: float) -> float:  # P(T ≤ q) = ½ + ∫_0^q density, with s = tan u, ds = du / cos² u
        n = 2000
        h = math.atan(q) / n
        total = 0.0
        for j in range(n + 1):
            u = j * h
            s = math.tan(u)
            f = math.exp(log_norm - (df + 1) / 2 * math.log1p(s * s / df)) / math.cos(u) ** 2
            total += f * (1 if j in (0, n) else 4 if j % 2 else 2)
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Tensor, level: float = 0.95, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``(mean, half_width)`` over ``dim``: the mean and the half-width ``t·s/√n`` of its ``level``
    Student-t confidence interval (``s`` the sample standard deviation of the ``n`` values, one per seed)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.shape[dim]
    if n < 2:
        raise ValueError("a t-interval needs at least two values")
    t = t_quantile(0.5 + level / 2, n - 1)
    return values.mean(dim), t * values.std(dim) / math.sqrt(n)
