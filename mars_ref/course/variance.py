r"""How close is each optimizer's gradient estimate to the full gradient?

MARS's claim is variance reduction: its corrected gradient ``c_t`` and momentum ``m_t``
should track the full gradient ``∇F(x_t)`` better than the minibatch gradient ``g_t``
does. ``VarianceProbe`` measures that during training (``--variance-every K``), at the
current point ``x_t``, *before* the optimizer step, on the step's own gradient:

* ``∇F(x_t)`` is estimated by the mean gradient over a fixed held-out set of
  ``variance_batches`` micro-batches from the training split (always the same ones, drawn
  from their own random stream, so they are not the step's batch). Being a mean of N
  minibatch gradients, it carries noise of about 1/N of a minibatch gradient's variance:
  every MSE below includes that floor.
* ``g``: the raw minibatch gradient ``g_t`` of the step's global batch, *before* the global
  norm clip (the clip is undone by dividing by its factor), an unbiased estimate of ∇F.
* ``m``: the optimizer's momentum, the quantity its update is computed from, at step t
  (recomputed from the stored ``m_{t−1}`` and the clipped ``g_t`` the optimizer is about to see):

  - AdamW: ``exp_avg`` after the update, bias-corrected: ``m_t / (1 − β1^t)``.
  - Lion: the argument of its sign, ``β1·m_{t−1} + (1−β1)·g_t``, not rescaled.
  - Muon: the Nesterov momentum ``(1−μ)g_t + μ·b_t`` on 2-D tensors, divided by
    ``1 − μ^{t+1}`` (the sum of its weights); AdamW's bias-corrected ``exp_avg`` on the others.
  - MARS: ``m_t = β1·m_{t−1} + (1−β1)·c_t`` bias-corrected by ``1 − β1^t`` (AdamW
    fallback tensors: their own AdamW momentum).
* ``c`` (MARS only): the corrected, clipped gradient
  ``c_t = clip(g_t + γ·β1/(1−β1)·(g_t − g_prev))``, recomputed here by the optimizer's own chain
  (:func:`mars_ref.optimizer.corrected_gradients`: the same path, ``g_prev`` and clip decisions) from the
  optimizer's stored ``g_prev`` (approx) or from ``∇f(x_{t−1}, ξ_t)`` evaluated here on the
  step's batch at the stored previous point (exact, :func:`mars_ref.optimizer.at_previous_point`),
  then global-norm clipped like the training closure. Tensors off the MARS path contribute their ``g_t``.

How good is the held-out ``∇F`` itself? Also logged: ``full_grad_sq = ‖∇F̂‖²/n``,
``heldout_var``, the variance per coordinate of one held-out minibatch gradient (estimated
from their spread; ``mse_g`` should be about ``heldout_var / grad_accum + heldout_noise``), and
``heldout_noise = heldout_var / N``, the noise floor that every ``mse_*`` includes (subtract
it to estimate the error to the true ∇F). When ``heldout_noise`` is not small against
``full_grad_sq`` (late in training, near a minimum), ∇F̂ is mostly noise and every cosine
tends to 0 (``cos_err`` to 1): use more ``--variance-batches`` (default ``max(32, 8 ×
grad_accum)``).

For each estimate ``e`` of ``∇F`` (all parameters concatenated) three numbers are logged:

* ``mse_<e> = ‖e − ∇F‖² / n``: the mean squared error per coordinate. It depends on the
  estimate's scale, and clipping changes ``c_t``'s scale (each tensor's ``c_t`` has norm ≤ 1).
* ``rel_<e> = ‖e − ∇F‖² / ‖∇F‖²``: the same, relative to the size of the gradient.
* ``cos_err_<e> = 1 − cos(e, ∇F)``: scale-free. ``1 − cos²`` is the relative error left after
  the best scalar fit ``min_α ‖α·e − ∇F‖² / ‖∇F‖²``, so this is the fair comparison
  between clipped and unclipped estimates.

The probe computes its gradients with ``torch.autograd.grad`` on the bare model (never
through DDP, never into ``.grad``), in eval mode (no dropout), and restores the random
state, so the training trajectory is the same with or without it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._exact import at_previous_point, rng_state, set_rng_state
from ..optimizer import branch, corrected_gradients
from ..pieces import momentum


class VarianceProbe:
    """Measure the gradient estimates of ``optimizer`` against a held-out full gradient.

    Args:
        model: the bare model (not the DDP or compiled wrapper); its parameters are the optimizer's.
        optimizer: ``torch.optim.AdamW``, ``Lion``, ``Muon`` or ``MARS``.
        cfg: the training config (``optimizer`` names the kind).
        held_out: the fixed list of ``(inputs, targets)`` micro-batches defining ∇F.
        autocast: the training autocast context (reused for the same numerics).
    """

    def __init__(self, model, optimizer, cfg, held_out, autocast):
        self.model, self.optimizer, self.kind = model, optimizer, cfg.optimizer
        self.held_out, self.autocast = held_out, autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.group_of = {p: g for g in optimizer.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ gradients

    def _mean_gradient(self, batches, spread: dict | None = None) -> list[Tensor]:
        """Mean over ``batches`` of the loss gradient at the model's current parameters. With a dict
        ``spread``, also store there ``sum_sq``: the sum over batches of each gradient's squared norm."""
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        sum_sq = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                for x, y in batches:
                    with self.autocast:
                        _, loss = self.model(x, y)
                    grads = torch.autograd.grad(loss, self.params)
                    for t, g in zip(total, grads, strict=True):
                        t.add_(g.float())
                    if spread is not None:
                        sum_sq += sum(float(torch.linalg.vector_norm(g.double()) ** 2) for g in grads)
        finally:
            self.model.train(was_training)
        if spread is not None:
            spread["sum_sq"] = sum_sq
        return [t / len(batches) for t in total]

    def _exact_previous_gradients(self, step_batches, clip: float) -> dict[Tensor, Tensor]:
        """``∇f(x_{t−1}, ξ_t)`` for the MARS tensors with a stored previous point, globally clipped
        like the training closure (which clips every gradient it computes)."""
        state = self.optimizer.state
        swapped = [p for p in self.params if "x_prev" in state.get(p, {})]
        if not swapped:
            return {}
        with at_previous_point(swapped, [state[p]["x_prev"] for p in swapped]):
            grads = self._mean_gradient(step_batches)
        if clip > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = min(1.0, clip / (norm.item() + 1e-6))
            grads = [g * scale for g in grads]
        keep = set(swapped)
        return {p: g.to(p.dtype) for p, g in zip(self.params, grads, strict=True) if p in keep}

    # ------------------------------------------------------------------ the optimizers' estimates

    def _adamw_momentum(self, p: Tensor, g: Tensor, beta1: float, m_key: str) -> Tensor:
        state = self.optimizer.state.get(p, {})
        t = int(state["step"]) + 1 if "step" in state else 1
        m = state.get(m_key, torch.zeros_like(p))
        #   m̂_t = (β1·m_{t−1} + (1−β1)·g_t) / (1 − β1^t)
        return torch.lerp(g, m, beta1) / (1.0 - beta1**t)

    def estimates(self, step: int, grads: list[Tensor], g_prev_exact: dict) -> dict[str, list[Tensor]]:
        """The optimizer's estimates of ∇F at step ``step`` (1-based) from the clipped gradients ``grads``."""
        state = self.optimizer.state
        kind = self.kind
        ms: list[Tensor] = []
        if kind == "adamw":
            ms = [self._adamw_momentum(p, g, self.group_of[p]["betas"][0], "exp_avg")
                  for p, g in zip(self.params, grads, strict=True)]
            return {"m": ms}
        if kind == "lion":
            for p, g in zip(self.params, grads, strict=True):
                m = state.get(p, {}).get("m", torch.zeros_like(p))
                ms.append(torch.lerp(g, m, self.group_of[p]["betas"][0]))  # β1·m_{t−1} + (1−β1)·g_t
            return {"m": ms}
        if kind == "muon":
            for p, g in zip(self.params, grads, strict=True):
                group = self.group_of[p]
                if p.ndim == 2:
                    mu = group["momentum"]
                    b = torch.lerp(g, state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)), mu)
                    if group["nesterov"]:
                        ms.append(torch.lerp(g, b, mu) / (1.0 - mu ** (step + 1)))
                    else:
                        ms.append(b / (1.0 - mu**step))
                else:
                    ms.append(self._adamw_momentum(p, g, group["betas_1d"][0], "m"))
            return {"m": ms}

        # MARS: c_t by the optimizer's own chain (correction, clip), group by group, then the momentum.
        cs: list[Tensor] = list(grads)
        ms = [None] * len(self.params)
        index = {p: i for i, p in enumerate(self.params)}
        for group in self.optimizer.param_groups:
            ps = [p for p in group["params"] if p in index]
            beta1, beta1_1d = group["betas"][0], group["betas_1d"][0]
            branches = [branch(p, group) for p in ps]
            prev = [None if b == "fallback" else g_prev_exact.get(p) if group["exact"] else
                    state.get(p, {}).get("g_prev") for p, b in zip(ps, branches, strict=True)]
            corrected = corrected_gradients(self.optimizer, {**group, "params": ps}, [grads[index[p]] for p in ps],
                                            prev)
            for p, b, c in zip(ps, branches, corrected, strict=True):
                i = index[p]
                cs[i] = c
                if b == "fallback":
                    ms[i] = self._adamw_momentum(p, grads[i], beta1_1d, "m")
                    continue
                st = state.get(p, {})
                step_t = st.get("step", 0) + 1
                #   m̂_t = (β1·m_{t−1} + (1−β1)·c_t) / (1 − β1^t)
                ms[i] = momentum(st.get("m", torch.zeros_like(p)), c, beta1) / (1.0 - beta1**step_t)
        return {"c": cs, "m": ms}

    # ------------------------------------------------------------------ the measurement

    @torch.no_grad()
    def measure(self, step: int, grad_norm, clip: float, step_batches) -> dict:
        """Compare ``g``, (``c``,) ``m`` with ∇F at the current point. Call after the step's gradient
        is in ``.grad`` (clipped) and before ``optimizer.step`` touches anything.

        ``grad_norm`` is the norm ``clip_grad_norm_`` returned (None if no clipping); ``step_batches``
        the step's whole global batch, or a function returning it (only exact MARS needs it, for
        ``∇f(x_{t−1}, ξ_t)``).
        """
        rng = rng_state()
        try:
            spread: dict = {}
            full = self._mean_gradient(self.held_out, spread)
            n_batches, n_coords = len(self.held_out), sum(f.numel() for f in full)
            full_sq = _dot(full, full)
            # Unbiased variance of one held-out minibatch gradient, per coordinate, and that of their mean.
            var = (spread["sum_sq"] - n_batches * full_sq) / max(n_batches - 1, 1) / n_coords
            clipped = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                       for p in self.params]
            scale = 1.0
            if clip > 0 and grad_norm is not None:
                scale = min(1.0, clip / (float(grad_norm) + 1e-6))  # clip_grad_norm_'s factor
            raw = [g / scale for g in clipped]
            exact = self.kind.startswith("mars") and any(g["exact"] for g in self.optimizer.param_groups)
            g_prev = {}
            if exact:
                g_prev = self._exact_previous_gradients(
                    step_batches() if callable(step_batches) else step_batches, clip)
            record = {"n_batches": n_batches, "full_grad_sq": full_sq / n_coords,
                      "heldout_var": var, "heldout_noise": var / n_batches,
                      "clip_scale": scale}
            for name, est in {"g": raw, **self.estimates(step, clipped, g_prev)}.items():
                record.update({f"{k}_{name}": v for k, v in compare(est, full).items()})
        finally:
            set_rng_state(rng)
        return record


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def compare(estimate: list[Tensor], full: list[Tensor]) -> dict[str, float]:
    """``mse`` (per coordinate), ``rel`` (÷ ‖∇F‖²), ``cos_err`` (1 − cosine) of ``estimate`` vs ``full``."""
    n = sum(f.numel() for f in full)
    diff = [e.float() - f for e, f in zip(estimate, full, strict=True)]
    se, ff, ee, ef = _dot(diff, diff), _dot(full, full), _dot(estimate, estimate), _dot(estimate, full)
    cos = ef / math.sqrt(ee * ff) if ee > 0 and ff > 0 else 0.0
    return {"mse": se / n, "rel": se / ff if ff > 0 else math.inf, "cos_err": 1.0 - cos}


# ---------------------------------------------------------------------- the control variate on the model

CV_METHODS = ("exact STORM", "SVRG", "approx MARS")


def token_batches(tokens, batch_size: int, block_size: int):
    """A function ``draw(generator) -> (inputs, targets)``: ``batch_size`` random windows of ``block_size``
    tokens from the 1-D ids ``tokens`` (a tensor, or a numpy array such as a ``train.bin`` memmap), targets
    shifted by one, the offsets drawn from ``generator``."""
    ids = torch.as_tensor(tokens[:].astype("int64")) if not isinstance(tokens, Tensor) else tokens.long()

    def draw(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([ids[s:s + block_size] for s in starts.tolist()])
        y = torch.stack([ids[s + 1:s + 1 + block_size] for s in starts.tolist()])
        return x, y

    return draw


def _flat_gradient(model, params: list[Tensor], batch) -> Tensor:
    """The loss gradient on ``batch`` at the model's current parameters, all tensors concatenated (float64)."""
    with torch.enable_grad():
        _, loss = model(*batch)
        grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1).double() for g in grads])


def _gradients_at(model, params: list[Tensor], point: list[Tensor], batches) -> Tensor:
    """``(len(batches), n)``: the per-batch gradients with the parameters set to ``point`` (restored after)."""
    here = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, q in zip(params, point, strict=True):
            p.copy_(q)
    try:
        return torch.stack([_flat_gradient(model, params, b) for b in batches])
    finally:
        with torch.no_grad():
            for p, q in zip(params, here, strict=True):
                p.copy_(q)


def cv_statistics(X: Tensor, Y: Tensor, omega: float) -> dict[str, float]:
    r"""Section 4 of notebook 02b on samples: the rows of ``X`` and ``Y`` are paired draws of two random vectors.

    Traces of the covariances, with the sample means as the expectations (unbiased, ÷ (n − 1)):
    ``var_x = E‖X − EX‖²``, ``var_y``, ``cov = E⟨X − EX, Y − EY⟩``; ``rho = cov / √(var_x var_y)``;
    ``condition = 2ω cov / (ω² var_y)`` (> 1: the variance falls) and
    ``factor = Var[X − ωY] / Var[X] = 1 − 2ω cov / var_x + ω² var_y / var_x``."""
    n = X.shape[0]
    zx, zy = X - X.mean(0), Y - Y.mean(0)
    var_x = float((zx * zx).sum()) / (n - 1)
    var_y = float((zy * zy).sum()) / (n - 1)
    cov = float((zx * zy).sum()) / (n - 1)
    return {"omega": omega, "var_x": var_x, "var_y": var_y, "cov": cov, "rho": cov / math.sqrt(var_x * var_y),
            "condition": 2 * omega * cov / (omega**2 * var_y),
            "factor": (var_x - 2 * omega * cov + omega**2 * var_y) / var_x}


def control_variate_on_model(model, batches, *, lr: float, steps: int, probe_at, snapshot_lag: int = 20,
                             n_batches: int = 16, optimizer: str = "adamw", beta1: float = 0.95,
                             gamma: float = 0.025, warmup: int = 0, seed: int = 0) -> list[dict]:
    r"""Notebook 02b §4's control-variate condition, measured along a training run of ``model``.

    Trains ``model`` (in place) for ``steps`` steps with a plain loop (``optimizer``: ``"adamw"``,
    ``torch.optim.AdamW(lr, betas=(0.9, 0.95))``, or ``"mars"``, approx ``MARS(lr, betas=(β1, 0.99), γ)``),
    the learning rate ``lr · min(1, (t + 1) / warmup)`` at step ``t`` (constant with ``warmup = 0``),
    one minibatch ``batches(generator)`` per step, keeping the parameters of the last ``snapshot_lag + 1``
    steps. At each step ``t`` in ``probe_at`` (before step ``t``'s update; ``t ≥ snapshot_lag``), on
    ``n_batches`` fresh minibatches ``ξ_1..ξ_n`` (the same for all three methods):

    * ``X = ∇f(x_t, ξ_i)``;
    * exact STORM: ``Y = ∇f(x_{t−1}, ξ_i)``, ``ω = β1``;
    * SVRG: ``Y = ∇f(x̃, ξ_i)``, ``x̃ = x_{t−snapshot_lag}``, ``ω = 1``;
    * approx MARS: ``Y = ∇f(x_{t−1}, ξ'_i)`` on ``n_batches`` *other* fresh minibatches, ``ω = k/(1+k)``,
      ``k = γβ1/(1−β1)``.

    Returns one dict per probe: ``step`` and, per method of ``CV_METHODS``, :func:`cv_statistics`
    (``var_x``, ``cov``, ``var_y``, ``rho``, ``condition``, ``factor``). Deterministic given ``seed``
    (one ``torch.Generator`` draws every batch; the model has no dropout in eval mode, which the probes use).
    """
    probe_at = sorted(set(int(t) for t in probe_at))
    if probe_at and (probe_at[0] < max(snapshot_lag, 1) or probe_at[-1] >= steps):
        raise ValueError(f"probe steps must lie in [{max(snapshot_lag, 1)}, {steps}), not {probe_at}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    elif optimizer == "mars":
        from ..optimizer import MARS
        opt = MARS(params, lr=lr, betas=(beta1, 0.99), gamma=gamma)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'mars', not {optimizer!r}")
    k = gamma * beta1 / (1 - beta1)
    omegas = {"exact STORM": beta1, "SVRG": 1.0, "approx MARS": k / (1 + k)}
    generator = torch.Generator().manual_seed(seed)
    history: list[list[Tensor]] = []  # x_{t−lag}, ..., x_{t−1}
    out = []
    model.train()
    for t in range(steps):
        if t in probe_at:
            model.eval()
            xi = [batches(generator) for _ in range(n_batches)]
            other = [batches(generator) for _ in range(n_batches)]
            X = torch.stack([_flat_gradient(model, params, b) for b in xi])
            Ys = {"exact STORM": _gradients_at(model, params, history[-1], xi),
                  "SVRG": _gradients_at(model, params, history[-snapshot_lag], xi),
                  "approx MARS": _gradients_at(model, params, history[-1], other)}
            out.append({"step": t, **{m: cv_statistics(X, Ys[m], omegas[m]) for m in CV_METHODS}})
            model.train()
        history.append([p.detach().clone() for p in params])
        del history[:-max(snapshot_lag, 1)]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (t + 1) / warmup) if warmup > 0 else lr
        opt.zero_grad(set_to_none=True)
        _, loss = model(*batches(generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return out
