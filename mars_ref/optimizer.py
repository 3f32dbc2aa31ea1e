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
        \mathrm{NS}_5\big(m_t/(1-β_1)\big)\sqrt{\max(1, \text{rows}/\text{cols})} & \text{Shampoo (2-D)} \\
        \mathrm{NS}_5(m_t)\cdot 0.2\sqrt{\max(\text{rows}, \text{cols})} & \text{MARS-M (2-D)}
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
With ``preconditioner="muon"`` (MARS-M, the authors' matrix-level variant, arXiv 2510.21800)
that AdamW adds ε before its bias corrections, as their MARS-M code does.

Every hyperparameter is read per parameter group (and checked again at every step, so a group
edited after construction is checked too). Choices where the authors' code and docs are silent,
made here and tested (``docs/algorithm.md`` §9):

* ``clip="global"`` clips by the norm over the MARS-path tensors *of one group*.
* A non-finite gradient raises ``FloatingPointError`` naming the parameter, before any
  state or parameter is touched, so the step can be skipped (``torch.amp.GradScaler``
  already skips such steps before calling ``step``).

This class does what ``torch.optim.AdamW`` does around its functional step: it validates the
hyperparameters, keeps the state, gathers each group's flat lists (:class:`mars_ref.chain.Tensors`)
and hands them to :mod:`mars_ref.functional`, which runs one implementation per group, chosen
by the flags: the readable loop of :mod:`mars_ref.readable` (the teaching text, the default),
``foreach=True`` (:mod:`mars_ref.foreach`, grouped ``torch._foreach_*`` kernels, any device and
dtype) or ``fused=True`` (:mod:`mars_ref.fused` and ``fused.c``, one C loop per tensor and pass,
float32 on CPU). The three compute the same step with the same state, so checkpoints move
between them. Every check that can refuse a step (sparse or non-finite gradients, state that does
not fit its parameter) runs for every group before any tensor changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import chain, functional, fused
from .pieces import correction_scale


class MARS(torch.optim.Optimizer):
    """MARS-AdamW / MARS-Lion / MARS-Shampoo (Yuan et al., 2024) and MARS-M (Liu et al., 2025), exact or approximate.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate η of the MARS path.
        betas: (β1, β2): momentum and second-moment constants.
        eps: ε of the AdamW denominator (also the ε of Newton–Schulz's normalisation).
        weight_decay: decoupled weight decay λ of the MARS path.
        gamma: γ, the scale of the variance-reduction correction (0 gives the base optimizer).
        preconditioner: ``"adamw"``, ``"lion"``, ``"shampoo"`` (Newton–Schulz, as the authors ran it) or
            ``"muon"`` (MARS-M: Newton–Schulz of the momentum scaled by 0.2·√max(rows, cols), as the authors'
            MARS-M code; give it ``lr_1d=lr`` and the embeddings in a ``fallback=True`` group to match them).
        exact: exact MARS: ``step(closure)`` evaluates the gradient at the previous point on the
            current minibatch (two gradient evaluations per step).
        clip: ``"tensor"`` (the authors' per-tensor rule), ``"global"`` or ``"none"``.
        max_norm: clipping threshold τ (the authors use 1.0).
        optimize_1d: send every tensor down the MARS path, not only 2-D ones.
        fallback: send every tensor of the group to the AdamW fallback (a group setting: e.g. the embeddings, which
            the authors' MARS-M code keeps off its Muon path).
        lr_1d, betas_1d, weight_decay_1d: the AdamW fallback for tensors off the MARS path.
        ns_steps, ns_dtype: Newton–Schulz iterations and compute dtype (``None`` = parameter dtype).
        foreach: take the foreach step of :mod:`mars_ref.foreach` (grouped ``torch._foreach_*`` kernels, same
            math and state, equal up to float rounding) instead of the readable one of :mod:`mars_ref.readable`.
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
        fallback: bool = False,
        lr_1d: float = 3e-3,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        maximize: bool = False,
        foreach: bool = False,
        fused: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=_tuple(betas), eps=eps, weight_decay=weight_decay, gamma=gamma,
            preconditioner=preconditioner, exact=exact, clip=clip, max_norm=max_norm,
            optimize_1d=optimize_1d, fallback=fallback, lr_1d=lr_1d, betas_1d=_tuple(betas_1d),
            weight_decay_1d=weight_decay_1d, ns_steps=ns_steps, ns_dtype=ns_dtype,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        _check_hyperparameters(defaults, where="")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (parameter group {len(self.param_groups) - 1})"
        try:
            _check_hyperparameters(group, where=where)
            _check_parameters(group, where=where)
            if group["exact"] != self.param_groups[0]["exact"]:
                raise ValueError(_exact_message(group["exact"], where))
        except ValueError:
            self.param_groups.pop()  # a refused group is not kept (nor stepped)
            raise
        if group["fused"]:
            fused.library()  # compile the C step now (once per machine), not at the first step
        # The lr the 1-D fallback's ratio lr_1d / lr refers to: the group's lr at construction.
        group.setdefault("base_lr", float(group["lr"]))

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then checked: a state dict that does not fit these
        parameters (another optimizer's, other shapes or dtypes, another preconditioner or mode) is refused
        with ``ValueError`` and this optimizer is left as it was."""
        # ``foreach`` and ``fused`` say how this optimizer computes, not what: keep this optimizer's
        # choice, so a checkpoint of the readable path resumes on a fast one and back (same state).
        impls = [(group["foreach"], group.get("fused", False)) for group in self.param_groups]
        before = (self.__getstate__()["state"], [dict(g) for g in self.param_groups])
        super().load_state_dict(state_dict)
        try:
            for i, (group, (foreach_, fused_)) in enumerate(zip(self.param_groups, impls, strict=True)):
                group["foreach"], group["fused"] = foreach_, fused_
                for key, value in self.defaults.items():  # settings added since the state dict was written
                    group.setdefault(key, value)
                group.setdefault("base_lr", float(group["lr"]))
                _check_loaded_group(self, i, group)
        except ValueError:
            self.state, self.param_groups[:] = before[0], before[1]
            raise

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One MARS step. In exact mode ``closure`` is required: it must zero the gradients,
        evaluate the loss on the current minibatch, call ``backward`` and return the loss."""
        modes = {group["exact"] for group in self.param_groups}
        if len(modes) > 1:
            raise ValueError(_exact_message(False, " (parameter groups changed after construction)"))
        exact = modes == {True}
        if exact and closure is None:
            raise RuntimeError(
                "MARS(exact=True) needs step(closure): the closure must zero the gradients, evaluate "
                "the loss on the current minibatch, call backward() and return the loss; step calls it "
                "again at the previous point to get the gradient ∇f(x_{t-1}, ξ_t)."
            )
        loss, rng = None, None
        if closure is not None:
            rng = chain.rng_state() if exact else None
            with torch.enable_grad():
                loss = closure()
        at_previous_point = self._gradients_at_previous_point(closure, rng) if exact else {}

        groups = [self._gather(i, group, at_previous_point) for i, group in enumerate(self.param_groups)]
        try:  # pass 1 and every check, for every group, before any tensor changes
            norms = []
            for g in groups:
                functional.check(g.tensors, g.settings, g.state, g.impl)
                norms.append(functional.correction_norms(g.tensors, g.settings, g.impl))
        except BaseException:
            for g in groups:  # the state made for this step's new tensors goes again
                for p in g.created:
                    del self.state[p]
            raise
        for g, n in zip(groups, norms, strict=True):  # nothing was refused: the step
            for state, t in zip(g.state, g.tensors.steps, strict=True):
                state["step"] = t
            functional.step(g.tensors, g.settings, n, g.impl)  # pass 2
        return loss

    def _gather(self, i: int, group: dict, at_previous_point: dict[Tensor, Tensor]) -> _Group:
        """Group ``i``'s flat lists for the functional step: the tensors with a gradient, their state
        (made here at a tensor's first step), ``g_prev`` and this step's ``t``."""
        where = f" (parameter group {i})"
        compiling = torch.compiler.is_compiling()  # compiled, checks on numbers would become recompilations
        if not compiling:
            _check_hyperparameters(group, where)  # again: a group may have been edited since construction
        s = chain.Settings.of(group)
        if not compiling:
            _check_magnitudes(group, s, {p.dtype for p in group["params"] if p.grad is not None}, where)
        t = chain.Tensors([], [], [], [], [], [], [], [], [])
        states, created = [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            branch = chain.branch(p, s.preconditioner, s.optimize_1d, s.fallback)
            state = self.state[p]
            if len(state) == 0:
                state.update(_new_state(p, branch, s.exact))
                created.append(p)
            t.params.append(p)
            t.grads.append(-p.grad if group["maximize"] else p.grad)  # maximize: the step of −f
            g_prev = chain.previous_gradient(p, state, branch, s.exact, at_previous_point)
            if group["maximize"] and s.exact and g_prev is not None:  # approx stores the negated g_t already
                g_prev = -g_prev
            t.prev_grads.append(g_prev)
            t.exp_avgs.append(state.get("m"))
            t.exp_avg_sqs.append(state.get("v"))
            t.prev_params.append(state.get("x_prev"))
            t.steps.append(state.get("step", 0) + 1)
            t.branches.append(branch)
            t.names.append(f"parameter group {i}, parameter {j}")
            states.append(state)
        impl = "fused" if group["fused"] else "foreach" if group["foreach"] else "readable"
        return _Group(t, s, impl, states, created)

    # ------------------------------------------------------------------ exact mode

    def _gradients_at_previous_point(self, closure, rng) -> dict[Tensor, Tensor]:
        """∇f(x_{t−1}, ξ_t) for every tensor that has a previous point: the closure called again on the
        same minibatch, at ``x_{t−1}`` and with the random state it started from (same dropout masks);
        afterwards ``x_t`` and the current gradients ``g_t`` are back in place."""
        previous = [p for group in self.param_groups for p in group["params"]
                    if p.grad is not None and "x_prev" in self.state[p]]
        if not previous:
            return {}
        grads_now = {p: p.grad.clone() for group in self.param_groups for p in group["params"]
                     if p.grad is not None}
        with chain.at_previous_point(previous, [self.state[p]["x_prev"] for p in previous], rng):
            with torch.enable_grad():
                closure()
            g_prev = {p: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for p in previous}
        for p, g in grads_now.items():
            if p.grad is not None and p.grad.shape == g.shape:
                p.grad.copy_(g)  # keeps DDP's bucket views intact
            else:
                p.grad = g
        return g_prev


class _Group(NamedTuple):
    """One parameter group, gathered for the functional step."""

    tensors: chain.Tensors
    settings: chain.Settings
    impl: str
    state: list[dict]
    created: list[Tensor]  # tensors whose state this step made (removed again if the step is refused)


def _new_state(p: Tensor, branch: str, exact: bool) -> dict:
    """Zero state for a tensor's first step: ``step`` and the tensors of :func:`mars_ref.chain.state_keys`."""
    state: dict = {"step": 0}
    for key in chain.state_keys(branch, exact):
        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _exact_message(value, where: str) -> str:
    # exact mode evaluates the whole model at its previous point x_{t−1}: all groups or none
    return (f"MARS: invalid exact={value!r}{where}: exact must be the same for every parameter group "
            "(the previous point x_{t-1} is the whole model)")


#: the hyperparameters that are real numbers (``lr`` may also be a 1-element tensor, as in torch.optim)
NUMBERS = {"lr": ">= 0", "eps": ">= 0", "weight_decay": ">= 0", "gamma": ">= 0", "lr_1d": ">= 0",
           "weight_decay_1d": ">= 0", "max_norm": "> 0"}


def _check_hyperparameters(group: dict, where: str) -> None:
    """Refuse a group whose settings MARS cannot run, naming the setting, the group and what would be valid."""
    def bad(name, rule):
        raise ValueError(f"MARS: invalid {name}={group.get(name)!r}{where}: {rule}")

    for name in (*NUMBERS, "betas", "betas_1d", "preconditioner", "clip", "ns_steps", "ns_dtype", "exact",
                 "optimize_1d", "fallback", "maximize", "foreach", "fused"):
        if name not in group:
            raise ValueError(f"MARS: parameter group{where} has no setting {name!r} (was it removed by hand?)")
    for name, rule in NUMBERS.items():
        value = group[name]
        if torch.is_tensor(value) and name == "lr":
            if value.numel() != 1:
                raise ValueError(f"MARS: invalid lr{where}: Tensor lr must be 1-element, got shape "
                                 f"{tuple(value.shape)}")
            value = float(value)
        if not _is_real(value):
            bad(name, f"must be a real number {rule}")
        if not math.isfinite(value):
            bad(name, f"must be finite (a number {rule})")
        if not (value > 0 if rule == "> 0" else value >= 0):
            bad(name, f"must be a number {rule}")
    for name in ("betas", "betas_1d"):
        betas = group[name]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0.0 <= b < 1.0
                                                                             for b in betas)):
            bad(name, "must be two numbers in [0, 1)")
    if group["preconditioner"] not in chain.PRECONDITIONERS:
        bad("preconditioner", f"must be one of {chain.PRECONDITIONERS}")
    if group["clip"] not in chain.CLIP_MODES:
        bad("clip", f"must be one of {chain.CLIP_MODES}")
    if not isinstance(group["ns_steps"], int) or isinstance(group["ns_steps"], bool) or group["ns_steps"] < 1:
        bad("ns_steps", "must be an integer >= 1")
    if group["ns_dtype"] is not None and not (
        isinstance(group["ns_dtype"], torch.dtype) and group["ns_dtype"].is_floating_point
    ):
        bad("ns_dtype", "must be a floating torch.dtype or None")
    for name in ("exact", "optimize_1d", "fallback", "maximize", "foreach", "fused"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
    if group["fused"]:
        if group["foreach"]:
            raise ValueError(f"MARS: fused=True and foreach=True{where}: choose one (as torch.optim.AdamW)")
        fused.check_settings(group["preconditioner"], where)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_parameters(group: dict, where: str) -> None:
    """Refuse parameters MARS cannot step: complex or integer tensors (torch.optim's own checks refuse the rest:
    non-tensors, non-leaves, duplicates across groups)."""
    for j, p in enumerate(group["params"]):
        if not p.is_floating_point():
            hint = " (split a complex parameter into its real and imaginary parts)" if p.is_complex() else ""
            raise ValueError(f"MARS takes real floating-point parameters (float16, bfloat16, float32, float64); "
                             f"parameter {j}{where} is a {p.dtype} tensor of shape {tuple(p.shape)}{hint}")


def _check_magnitudes(group: dict, s: chain.Settings, dtypes: set[torch.dtype], where: str) -> None:
    """Refuse settings the parameters' dtype cannot hold: a step computed with them would be inf (e.g. lr=1e308
    on float32 parameters), which would turn the parameters into inf or NaN without an error."""
    for dtype in dtypes:
        largest = torch.finfo(dtype).max
        for name, value in (("lr", s.lr), ("lr_1d", s.lr_1d), ("weight_decay", s.weight_decay),
                            ("weight_decay_1d", s.weight_decay_1d), ("eps", s.eps),
                            ("lr * weight_decay", s.lr * s.weight_decay),
                            ("lr_1d * weight_decay_1d", s.lr_1d * s.weight_decay_1d),
                            ("gamma * beta1 / (1 - beta1)", correction_scale(s.gamma, s.beta1))):
            if not value <= largest:
                raise ValueError(f"MARS: {name} = {value:g}{where} is larger than the largest {dtype} value "
                                 f"({largest:g}) of the parameters: a step would overflow to inf; use a smaller value")
        if s.eps > 0 and float(torch.tensor(s.eps, dtype=dtype)) == 0.0:
            raise ValueError(f"MARS: eps = {s.eps:g}{where} is 0 in {dtype} (the parameters' dtype): an element whose "
                             f"v_t underflows to 0 would divide by 0; use eps >= {torch.finfo(dtype).tiny:g} or "
                             "float32 parameters")


def _tuple(value):
    """``betas`` as a tuple when it is a sequence (anything else is refused by the check, not by ``tuple()``)."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _check_loaded_group(opt: MARS, i: int, group: dict) -> None:
    """After ``load_state_dict``: the group's settings are valid and each tensor's state is what its branch keeps,
    with its parameter's shape, dtype and device, and a step count."""
    where = f" (parameter group {i}, as loaded)"
    _check_hyperparameters(group, where)
    for j, p in enumerate(group["params"]):
        state = opt.state.get(p)
        if not state:
            continue
        name = f"parameter group {i}, parameter {j}"
        branch = chain.branch(p, group["preconditioner"], group["optimize_1d"], group["fallback"])
        chain.check_state(p, state, branch, group["exact"], name, " (in the loaded state dict)")
        step = state.get("step")
        if torch.is_tensor(step) and step.numel() == 1:  # torch's optimizers keep a tensor: accept its value
            state["step"] = step = int(step.item())
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise ValueError(f"MARS: the loaded state of {name} has step={step!r}; expected a count >= 0")
