r"""``MARS``: the pieces of :mod:`mars_ref.pieces` chained into a ``torch.optim.Optimizer``.

For each tensor ``x`` on the MARS path (``ndim == 2``, or every tensor with
``optimize_1d=True``), one step is, with ``g_t = ∇f(x_t, ξ_t)``:

.. math::

    c_t &= g_t + γ \frac{β_1}{1-β_1}(g_t - g_{prev})                     && \text{correction} \\
    c_t &← c_t \min(1, τ/‖c_t‖)                                          && \text{clip (per tensor or global)} \\
    m_t &= β_1 m_{t-1} + (1-β_1) c_t                                     && \text{momentum} \\
    u_t &= \begin{cases}
        m_t \,/\, \big((\sqrt{v_t}/\sqrt{1-β_2^t} + ε)(1-β_1^t)\big),\;
            v_t = β_2 v_{t-1} + (1-β_2) c_t^2   & \text{AdamW} \\
        \mathrm{sign}(m_t)                       & \text{Lion} \\
        \mathrm{NS}_5\big(m_t/(1-β_1)\big)\sqrt{\max(1, \text{rows}/\text{cols})} & \text{Shampoo (2-D)}
    \end{cases}                                                          && \text{precondition} \\
    x_{t+1} &= x_t - η(λ x_t + u_t)                                      && \text{decay + step}

``g_prev`` is the previous step's own gradient (approx MARS, the default; copied,
never a reference to ``p.grad``) or ``∇f(x_{t−1}, ξ_t)``, the gradient at the previous
point on the current minibatch (exact MARS, ``exact=True``, computed inside
``step(closure)``). At step 1, ``g_prev = 0``.

Tensors off the MARS path (biases, norms, conv kernels when ``optimize_1d=False``)
take plain AdamW on the raw ``g_t`` with ``betas_1d``, ``weight_decay_1d`` and the
learning rate ``lr · lr_1d / base_lr``, where ``base_lr`` is the group's ``lr`` at
construction, so any scheduler that scales ``lr`` scales them too (the authors' rule).

Every hyperparameter is read per parameter group. Choices where the authors' code and
docs are silent, made here and tested:

* ``clip="global"`` clips by the norm over the MARS-path tensors *of one group*.
* A non-finite gradient raises ``FloatingPointError`` naming the parameter, before any
  state or parameter is touched, so the step can be skipped (``torch.amp.GradScaler``
  already skips such steps before calling ``step``).

The same step is computed three ways, chosen per group, with the same state (checkpoints move
between them): the readable loop of ``_step_group`` below, the teaching text; ``foreach=True``
(:mod:`mars_ref.fast`, grouped ``torch._foreach_*`` kernels, any device and dtype); ``fused=True``
(:mod:`mars_ref.fused` and ``fused.c``, one C loop per tensor and pass, float32 on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import fast, fused
from .pieces import (
    adamw_direction,
    clip_by_global_norm,
    clip_by_norm,
    decoupled_step_,
    fallback_lr,
    lion_direction,
    momentum_,
    newton_schulz,
    second_moment_,
    shampoo_scale,
    storm_correction,
)

PRECONDITIONERS = ("adamw", "lion", "shampoo")
CLIP_MODES = ("tensor", "global", "none")


class MARS(torch.optim.Optimizer):
    """MARS-AdamW / MARS-Lion / MARS-Shampoo (Yuan et al., 2024), exact or approximate.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate η of the MARS path.
        betas: (β1, β2): momentum and second-moment constants.
        eps: ε of the AdamW denominator (also the ε of Newton–Schulz's normalisation).
        weight_decay: decoupled weight decay λ of the MARS path.
        gamma: γ, the scale of the variance-reduction correction (0 gives the base optimizer).
        preconditioner: ``"adamw"``, ``"lion"`` or ``"shampoo"`` (Newton–Schulz, as the authors ran it).
        exact: exact MARS: ``step(closure)`` evaluates the gradient at the previous point on the
            current minibatch (two gradient evaluations per step).
        clip: ``"tensor"`` (the authors' per-tensor rule), ``"global"`` or ``"none"``.
        max_norm: clipping threshold τ (the authors use 1.0).
        optimize_1d: send every tensor down the MARS path, not only 2-D ones.
        lr_1d, betas_1d, weight_decay_1d: the AdamW fallback for tensors off the MARS path.
        ns_steps, ns_dtype: Newton–Schulz iterations and compute dtype (``None`` = parameter dtype).
        foreach: take the fast step of :mod:`mars_ref.fast` (grouped ``torch._foreach_*`` kernels, same
            math and state, equal up to float rounding) instead of the readable per-tensor loop below.
        fused: take the fused CPU step of :mod:`mars_ref.fused` (one C loop per tensor and pass, compiled
            once per machine; MARS-AdamW and MARS-Lion, float32 CPU tensors), same math and state.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma: float = 0.025,
        preconditioner: str = "adamw",
        exact: bool = False,
        clip: str = "tensor",
        max_norm: float = 1.0,
        optimize_1d: bool = False,
        lr_1d: float = 3e-3,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        foreach: bool = False,
        fused: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma=gamma,
            preconditioner=preconditioner, exact=exact, clip=clip, max_norm=max_norm,
            optimize_1d=optimize_1d, lr_1d=lr_1d, betas_1d=tuple(betas_1d),
            weight_decay_1d=weight_decay_1d, ns_steps=ns_steps, ns_dtype=ns_dtype,
            foreach=foreach, fused=fused,
        )
        _check_hyperparameters(defaults, where="")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (parameter group {len(self.param_groups) - 1})"
        _check_hyperparameters(group, where=where)
        if group["fused"]:
            fused.library()  # compile the C step now (once per machine), not at the first step
        if group["exact"] != self.param_groups[0]["exact"]:
            # exact mode evaluates the whole model at its previous point x_{t−1}: all groups or none
            raise ValueError(f"MARS: invalid exact={group['exact']!r}{where}: exact must be the same for "
                             "every parameter group (the previous point x_{t-1} is the whole model)")
        # The lr the 1-D fallback's ratio lr_1d / lr refers to: the group's lr at construction.
        group.setdefault("base_lr", group["lr"])

    def load_state_dict(self, state_dict: dict) -> None:
        # ``foreach`` and ``fused`` say how this optimizer computes, not what: keep this optimizer's
        # choice, so a checkpoint of the readable path resumes on a fast one and back (same state).
        paths = [(group["foreach"], group.get("fused", False)) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (foreach, fused_) in zip(self.param_groups, paths, strict=True):
            group["foreach"], group["fused"] = foreach, fused_

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One MARS step. In exact mode ``closure`` is required: it must zero the gradients,
        evaluate the loss on the current minibatch, call ``backward`` and return the loss."""
        exact = any(group["exact"] for group in self.param_groups)
        if exact and closure is None:
            raise RuntimeError(
                "MARS(exact=True) needs step(closure): the closure must zero the gradients, evaluate "
                "the loss on the current minibatch, call backward() and return the loss; step calls it "
                "again at the previous point to get the gradient ∇f(x_{t-1}, ξ_t)."
            )
        loss, rng_before = None, None
        if closure is not None:
            rng_before = _rng_state() if exact else None
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        g_prev_exact = self._gradients_at_previous_point(closure, rng_before) if exact else {}
        self._check_gradients(g_prev_exact, " at the previous point (exact mode)")
        # fused groups: every clipping norm (which is also the finite check) before anything changes
        sums = {i: fused.first_pass(self, i, group, g_prev_exact)
                for i, group in enumerate(self.param_groups) if group["fused"]}
        for i, group in enumerate(self.param_groups):
            if group["fused"]:
                fused.step_group(self, group, g_prev_exact, sums[i])  # same math, one C loop per tensor
            elif group["foreach"]:
                fast.step_group(self, group, g_prev_exact)  # same math, grouped kernels
            else:
                self._step_group(group, g_prev_exact)
        return loss

    def _step_group(self, group: dict, g_prev_exact: dict[Tensor, Tensor]) -> None:
        beta1, beta2 = group["betas"]
        on_path, cs = [], []

        # 1. correction:  c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, group)
            state["step"] += 1
            if not _on_mars_path(p, group):
                if group["exact"]:  # the previous point x_{t−1} is the whole model, fallback tensors too
                    state["x_prev"] = p.detach().clone()
                self._adamw_fallback(p, group)
                continue
            if group["exact"]:
                g_prev = g_prev_exact.get(p)
                if g_prev is None:  # step 1: there is no previous point
                    g_prev = torch.zeros_like(p.grad)
            else:
                g_prev = state["g_prev"]
            on_path.append(p)
            cs.append(storm_correction(p.grad, g_prev, group["gamma"], beta1))

        # 2. clip:  c_t ← c_t · min(1, τ/‖c_t‖)
        if group["clip"] == "tensor":
            cs = [clip_by_norm(c, group["max_norm"]) for c in cs]
        elif group["clip"] == "global":
            cs = clip_by_global_norm(cs, group["max_norm"])

        for p, c in zip(on_path, cs, strict=True):
            state = self.state[p]
            # 3. momentum:  m_t = β1·m_{t−1} + (1−β1)·c_t
            m = momentum_(state["m"], c, beta1)
            # 4. precondition:  u_t = P(m_t)
            if group["preconditioner"] == "lion":
                u = lion_direction(m)
            elif group["preconditioner"] == "shampoo" and p.ndim == 2:
                u = newton_schulz(m / (1.0 - beta1), group["ns_steps"], group["eps"], group["ns_dtype"])
                u = u * shampoo_scale(p.shape)
            else:  # AdamW, and the non-2-D tensors of MARS-Shampoo
                v = second_moment_(state["v"], c, beta2)
                u = adamw_direction(m, v, state["step"], beta1, beta2, group["eps"])
            # remember what the next step's correction needs
            if group["exact"]:
                state["x_prev"] = p.detach().clone()
            else:
                state["g_prev"].copy_(p.grad)
            # 5. decay + step:  x_{t+1} = x_t − η·(λ·x_t + u_t)
            decoupled_step_(p, u, group["lr"], group["weight_decay"])

    def _adamw_fallback(self, p: Tensor, group: dict) -> None:
        """The authors' plain AdamW on the raw gradient for tensors off the MARS path."""
        state = self.state[p]
        beta1, beta2 = group["betas_1d"]
        #   m_t = β1·m + (1−β1)·g_t ;  v_t = β2·v + (1−β2)·g_t²
        m = momentum_(state["m"], p.grad, beta1)
        v = second_moment_(state["v"], p.grad, beta2)
        u = adamw_direction(m, v, state["step"], beta1, beta2, group["eps"])
        #   x_{t+1} = x_t − η·lr_1d/base_lr·(λ_1d·x_t + u_t)
        lr = fallback_lr(group["lr"], group["lr_1d"], group["base_lr"])
        decoupled_step_(p, u, lr, group["weight_decay_1d"])

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = 0
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        on_path = _on_mars_path(p, group)
        if not on_path or _needs_second_moment(p, group):
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if on_path and not group["exact"]:
            state["g_prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ exact mode

    def _gradients_at_previous_point(self, closure, rng_before) -> dict[Tensor, Tensor]:
        """∇f(x_{t−1}, ξ_t) for every exact-mode tensor that has a previous point.

        Swap each such parameter to its previous value ``x_prev``, call the closure again on
        the same minibatch with the random state it started from (same dropout masks), read
        the gradients, swap back, and put the current gradients ``g_t`` back into ``.grad``.
        """
        previous = [
            p for group in self.param_groups if group["exact"] for p in group["params"]
            if p.grad is not None and "x_prev" in self.state[p]
        ]
        if not previous:
            return {}
        grads_now = {p: p.grad.clone() for group in self.param_groups for p in group["params"]
                     if p.grad is not None}
        x_now = {p: p.detach().clone() for p in previous}
        for p in previous:
            p.copy_(self.state[p]["x_prev"])
        rng_after = _rng_state()
        _set_rng_state(rng_before)
        try:
            with torch.enable_grad():
                closure()
        finally:
            _set_rng_state(rng_after)
            for p in previous:
                p.copy_(x_now[p])
        g_prev = {p: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for p in previous}
        for p, g in grads_now.items():
            if p.grad is not None and p.grad.shape == g.shape:
                p.grad.copy_(g)  # keeps DDP's bucket views intact
            else:
                p.grad = g
        return g_prev

    # ------------------------------------------------------------------ input checks

    def _check_gradients(self, grads: dict[Tensor, Tensor] | None = None, where: str = "") -> None:
        for i, group in enumerate(self.param_groups):
            if group["fused"] and grads is None:
                continue  # g_t is checked by the first pass of the fused step (fused.first_pass), in step()
            if group["foreach"] and fast.grads_finite(group["params"], grads):
                continue  # one stacked check for the group; if it fails, the loop below names the tensor
            self._check_group_gradients(i, group, grads, where)

    def _check_group_gradients(self, i: int, group: dict, grads: dict[Tensor, Tensor] | None, where: str) -> None:
        """Walk the tensors of group ``i``; raise, naming the first sparse or non-finite gradient."""
        for j, p in enumerate(group["params"]):
            grad = p.grad if grads is None else grads.get(p)
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"MARS does not support sparse gradients (parameter group {i}, parameter {j}, "
                    f"shape {tuple(p.shape)}); use dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            # a NaN or inf element makes the sum NaN or inf, so a finite sum clears the tensor in one cheap
            # reduction (isfinite(grad) alone is ~12x slower); a non-finite sum may be a float overflow: look closer
            if not torch.isfinite(grad.sum()) and not torch.isfinite(grad).all():
                raise FloatingPointError(
                    f"MARS: non-finite gradient{where} (nan or inf) in parameter group {i}, "
                    f"parameter {j}, shape {tuple(p.shape)}; nothing was updated. Skip this step or "
                    "lower the learning rate."
                )


def _on_mars_path(p: Tensor, group: dict) -> bool:
    return group["optimize_1d"] or p.ndim == 2


def _needs_second_moment(p: Tensor, group: dict) -> bool:
    """v is kept only where the AdamW branch runs: never for Lion, nor for 2-D Shampoo tensors."""
    if group["preconditioner"] == "lion":
        return False
    if group["preconditioner"] == "shampoo":
        return p.ndim != 2
    return True


def _check_hyperparameters(group: dict, where: str) -> None:
    def bad(name, rule):
        raise ValueError(f"MARS: invalid {name}={group[name]!r}{where}: {rule}")

    for name in ("lr", "eps", "weight_decay", "gamma", "lr_1d", "weight_decay_1d"):
        value = group[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            bad(name, "must be a number >= 0")
    if not group["max_norm"] > 0:
        bad("max_norm", "must be > 0")
    for name in ("betas", "betas_1d"):
        betas = group[name]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            bad(name, "must be two numbers in [0, 1)")
    if group["preconditioner"] not in PRECONDITIONERS:
        bad("preconditioner", f"must be one of {PRECONDITIONERS}")
    if group["clip"] not in CLIP_MODES:
        bad("clip", f"must be one of {CLIP_MODES}")
    if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
        bad("ns_steps", "must be an integer >= 1")
    if group["ns_dtype"] is not None and not (
        isinstance(group["ns_dtype"], torch.dtype) and group["ns_dtype"].is_floating_point
    ):
        bad("ns_dtype", "must be a floating torch.dtype or None")
    for name in ("exact", "optimize_1d", "foreach", "fused"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
    fused.check_group(group, where)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
