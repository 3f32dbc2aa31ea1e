r"""``MARS``: the optimizer, in the shape of ``torch.optim.adam``: the class, then ``mars()``, which runs one of
``_single_tensor_mars`` (the readable step), ``_multi_tensor_mars`` (grouped ``torch._foreach_*`` kernels) or
``_fused_mars`` (a C loop per tensor, CPU float32).

For each tensor ``x`` on the MARS path (``ndim == 2``, or every tensor with ``optimize_1d=True``), one step is,
with ``g_t = ∇f(x_t, ξ_t)`` (``docs/algorithm.md`` §2–§5; each equation is a pure function of
:mod:`mars_ref.pieces`):

.. math::

    c_t &= g_t + γ \frac{β_1}{1-β_1}(g_t - g_{prev})                     && \text{1. correction} \\
    c_t &← c_t \min(1, τ/‖c_t‖)                                          && \text{2. clip (per tensor or global)} \\
    m_t &= β_1 m_{t-1} + (1-β_1) c_t                                     && \text{3. momentum} \\
    u_t &= P(m_t)\quad\text{AdamW, Lion, Shampoo or MARS-M}               && \text{4. precondition} \\
    x_{t+1} &= x_t - η(λ x_t + u_t)                                      && \text{5. decay + step}

``g_prev`` is the previous step's own gradient (approx MARS, the default; a copy, never a reference to ``p.grad``)
or ``∇f(x_{t−1}, ξ_t)``, the gradient at the previous point on the current minibatch (exact MARS, ``exact=True``,
computed inside ``step(closure)``). At step 1, ``g_prev = 0``. Tensors off the MARS path (biases, norms) take plain
AdamW on the raw ``g_t`` with ``betas_1d``, ``weight_decay_1d`` and the learning rate ``lr · lr_1d / base_lr``
(``base_lr``: the group's ``lr`` at construction, so a scheduler scales both).

The clip needs ``‖c_t‖`` of every tensor before any momentum may change, so a step is two passes: pass 1 takes the
norms of every group (and is where a non-finite gradient, or a ``c_t`` that overflows the parameters' dtype,
refuses the step: :mod:`mars_ref._checks`), pass 2 is the update. A refused step changes nothing, in any group.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._exact import gradients_at_previous_point, rng_state
from .pieces import (
    adam_direction_eps_first,
    adamw_direction,
    clip_factors,
    correction_scale,
    decoupled_step,
    fallback_lr,
    lion_direction,
    momentum,
    muon_scale,
    newton_schulz,
    second_moment,
    shampoo_scale,
)

PRECONDITIONERS, CLIP_MODES = _checks.PRECONDITIONERS, _checks.CLIP_MODES
MUON_NS_EPS = 1e-7  # Newton–Schulz's ε for MARS-M (the authors' and torch.optim.Muon's); MARS-Shampoo uses ``eps``
WAVE_ELEMENTS = 1 << 19  # foreach on CPU: elements per wave (a few MB per state array: a wave stays in cache)
KEEP_ELEMENTS = 1 << 19  # the readable step keeps c_t from pass 1 for tensors up to this size


class MARS(torch.optim.Optimizer):
    """MARS-AdamW / MARS-Lion / MARS-Shampoo (Yuan et al., 2024) and MARS-M (Liu et al., 2025), exact or approximate.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate η of the MARS path (a number, or a 1-element tensor that a scheduler fills in place).
        betas: (β1, β2): momentum and second-moment constants.
        eps: ε of the AdamW denominator (also the ε of MARS-Shampoo's Newton–Schulz normalisation).
        weight_decay: decoupled weight decay λ of the MARS path.
        gamma: γ, the scale of the variance-reduction correction (0 gives the base optimizer).
        preconditioner: ``"adamw"``, ``"lion"``, ``"shampoo"`` (Newton–Schulz, as the authors ran it) or
            ``"muon"`` (MARS-M: Newton–Schulz of the momentum scaled by 0.2·√max(rows, cols)).
        exact: exact MARS: ``step(closure)`` evaluates the gradient at the previous point on the current
            minibatch (two gradient evaluations per step).
        clip: ``"tensor"`` (the authors' per-tensor rule), ``"global"`` (over the group) or ``"none"``.
        max_norm: clipping threshold τ (the authors use 1.0).
        optimize_1d: send every tensor down the MARS path, not only 2-D ones.
        fallback: send every tensor of the group to the AdamW fallback (e.g. MARS-M's embeddings).
        lr_1d, betas_1d, weight_decay_1d: the AdamW fallback for tensors off the MARS path.
        ns_steps, ns_dtype: Newton–Schulz iterations and compute dtype (``None`` = parameter dtype).
        maximize: maximise the objective (the step of −f).
        foreach: ``True``: grouped ``torch._foreach_*`` kernels; ``False``: the readable step; ``None`` (default):
            foreach when every parameter of the group is on CUDA, else the readable step. Same numbers up to rounding.
        fused: the C loop of ``fused.c`` (MARS-AdamW and MARS-Lion, CPU float32), same state.
    """

    def __init__(self, params, lr: float | Tensor = 3e-3, betas: tuple[float, float] = (0.95, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, gamma: float = 0.025, preconditioner: str = "adamw", exact: bool = False,
                 clip: str = "tensor", max_norm: float = 1.0, optimize_1d: bool = False, fallback: bool = False,
                 lr_1d: float = 3e-3, betas_1d: tuple[float, float] = (0.9, 0.95), weight_decay_1d: float = 0.1,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = torch.bfloat16, maximize: bool = False,
                 foreach: bool | None = None, fused: bool = False):
        defaults = dict(lr=lr, betas=_tuple(betas), eps=eps, weight_decay=weight_decay, gamma=gamma,
                        preconditioner=preconditioner, exact=exact, clip=clip, max_norm=max_norm,
                        optimize_1d=optimize_1d, fallback=fallback, lr_1d=lr_1d, betas_1d=_tuple(betas_1d),
                        weight_decay_1d=weight_decay_1d, ns_steps=ns_steps, ns_dtype=ns_dtype, maximize=maximize,
                        foreach=foreach, fused=fused)
        _checks.hyperparameters(defaults, where="")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (parameter group {len(self.param_groups) - 1})"
        try:
            _checks.hyperparameters(group, where)
            _checks.parameters(group, where)
            if group["exact"] != self.param_groups[0]["exact"]:
                raise ValueError(_checks.exact_message(group["exact"], where))
        except ValueError:
            self.param_groups.pop()  # a refused group is not kept (nor stepped)
            raise
        if group["fused"]:
            from . import fused

            fused.library()  # compile the C step now (once per machine), not at the first step
        group.setdefault("base_lr", _number(group["lr"]))  # what the fallback's ratio lr_1d / lr refers to

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then checked: a state dict that does not fit these
        parameters (another optimizer's, other shapes or dtypes, another mode, NaN or negative state) is refused
        with ``ValueError`` and this optimizer is left as it was. ``foreach`` and ``fused`` stay this optimizer's
        (they say how it computes, not what), so a checkpoint moves between the three steps."""
        impls = [(group["foreach"], group["fused"]) for group in self.param_groups]
        before = (self.__getstate__()["state"], [dict(g) for g in self.param_groups])
        super().load_state_dict(state_dict)
        try:
            for i, (group, (foreach_, fused_)) in enumerate(zip(self.param_groups, impls, strict=True)):
                group["foreach"], group["fused"] = foreach_, fused_
                for key in _DEFAULT_KEYS:  # settings a state dict written by an earlier version lacks
                    group.setdefault(key, self.defaults[key])
                group.setdefault("base_lr", _number(group["lr"]))
                where = f" (parameter group {i}, as loaded)"
                _checks.hyperparameters(group, where)
                for j, p in enumerate(group["params"]):
                    st = self.state.get(p)
                    if st:
                        b = branch(p, group)
                        name = f"parameter group {i}, parameter {j}"
                        _checks.state(p, st, state_keys(b, group["exact"]), b, group["exact"], name,
                                      " (in the loaded state dict)")
                        _checks.loaded_values(st, name)
        except ValueError:
            self.state, self.param_groups[:] = before[0], before[1]
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One MARS step. In exact mode ``closure`` is required: it must zero the gradients, evaluate the loss on
        the current minibatch, call ``backward`` and return the loss."""
        exact = _checks.read_mode(self.param_groups)
        if exact and closure is None:
            raise RuntimeError("MARS(exact=True) needs step(closure): the closure must zero the gradients, evaluate "
                               "the loss on the current minibatch, call backward() and return the loss; step calls "
                               "it again at the previous point to get the gradient ∇f(x_{t-1}, ξ_t).")
        loss, rng = None, None
        if closure is not None:
            rng = rng_state() if exact else None
            with torch.enable_grad():
                loss = closure()
        at_previous_point = gradients_at_previous_point(self, closure, rng) if exact else {}

        groups: list[_Group] = []
        try:  # every check and pass 1, for every group, before any tensor changes
            for i, group in enumerate(self.param_groups):
                groups.append(self._gather_group(i, group, at_previous_point))
            norms = _checked_norms(groups)
        except BaseException:
            for g in groups:  # the state made for this step's new tensors goes again
                for p in g.created:
                    del self.state[p]
            raise
        for g, n in zip(groups, norms, strict=True):  # nothing was refused: pass 2
            for st, t in zip(g.states, g.lists.steps, strict=True):
                st["step"] = t
            mars(g.lists, g.hyper, n, g.impl, g.cs)
        return loss

    def _gather_group(self, i: int, group: dict, at_previous_point: dict[Tensor, Tensor]) -> _Group:
        """Group ``i``'s flat lists (tensors with a non-empty gradient), their state (made at a tensor's first
        step), ``g_prev`` and this step's ``t``, with the group's numbers read and checked."""
        where = f" (parameter group {i})"
        hyper = _read_group(group, where, torch.compiler.is_compiling())
        stepping = [(j, p) for j, p in enumerate(group["params"]) if p.grad is not None and p.numel() > 0]
        if not torch.compiler.is_compiling():  # a dtype that cannot hold a setting refuses before any state exists
            _checks.magnitudes(group, _number(hyper.lr), _number(hyper.fallback_lr), {p.dtype for _, p in stepping},
                               where)
        lists = _Lists([], [], [], [], [], [], [], [], [])
        states, created = [], []
        try:
            for j, p in stepping:  # an empty tensor has nothing to step
                b, name = branch(p, group), f"parameter group {i}, parameter {j}"
                g = -p.grad if hyper.maximize else p.grad  # maximize: the step of −f
                _checks.gradients([p], [g], [name])
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = 0
                    for key in state_keys(b, hyper.exact):
                        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    created.append(p)
                _checks.state(p, st, state_keys(b, hyper.exact), b, hyper.exact, name)
                if b == "fallback":
                    g_prev = None
                elif hyper.exact:
                    g_prev = at_previous_point.get(p)
                    g_prev = -g_prev if hyper.maximize and g_prev is not None else g_prev
                else:
                    g_prev = st["g_prev"]  # approx: the stored g_{t−1} (already negated under maximize)
                row = (p, g, g_prev, st.get("m"), st.get("v"), st.get("x_prev"), st["step"] + 1, b, name)
                for column, x in zip(lists, row, strict=True):
                    column.append(x)
                states.append(st)
        except BaseException:
            for p in created:
                del self.state[p]
            raise
        impl = _implementation(group, lists.params)
        return _Group(lists, hyper, impl, states, created, None)  # (not "_init_group": compile treats that name apart)


_DEFAULT_KEYS = tuple(inspect.signature(MARS.__init__).parameters)[2:]  # lr … fused


class _Lists(NamedTuple):
    """One group's tensors that step now, in group order; ``ms``, ``vs``, ``g_prevs``, ``x_prevs`` are the state
    tensors ``m``, ``v``, ``g_prev``, ``x_prev`` (``None`` where a branch keeps none). ``g_prevs[i]`` is the
    stored ``g_{t−1}`` (approx, overwritten by the step with ``g_t``) or ``∇f(x_{t−1}, ξ_t)`` (exact), ``None`` for
    zero. ``steps[i]`` is this step's ``t`` (from 1); ``names[i]`` says where the tensor is, for messages."""

    params: list[Tensor]
    grads: list[Tensor]
    g_prevs: list[Tensor | None]
    ms: list[Tensor]
    vs: list[Tensor | None]
    x_prevs: list[Tensor | None]
    steps: list[int]
    branches: list[str]
    names: list[str]


class Hyper(NamedTuple):
    """One group's numbers for this step. ``lr`` and ``fallback_lr`` (= lr · lr_1d / base_lr, the rate the
    fallback applies) are Python numbers, or 0-d tensors when the group's ``lr`` is a tensor or the step is
    compiled (so a scheduler's new value is an input of the compiled step, not a constant that recompiles it)."""

    lr: float | Tensor
    fallback_lr: float | Tensor
    beta1: float
    beta2: float
    beta1_1d: float
    beta2_1d: float
    eps: float
    weight_decay: float
    weight_decay_1d: float
    k: float  # the correction's scale γ·β1/(1−β1)
    clip: str
    max_norm: float
    exact: bool
    maximize: bool
    preconditioner: str
    ns_steps: int
    ns_dtype: torch.dtype | None


class _Group(NamedTuple):
    lists: _Lists
    hyper: Hyper
    impl: str
    states: list[dict]
    created: list[Tensor]  # tensors whose state this step made (removed again if the step is refused)
    cs: list[Tensor] | None  # the readable step's c_t from pass 1 (computed once)


def _tuple(value):
    """``betas`` as a tuple when it is a sequence (anything else is refused by the check, not by ``tuple()``)."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _number(x) -> float | None:
    """A rate as a Python number; None for a tensor on a device (reading it would wait for the device)."""
    return x if not torch.is_tensor(x) else float(x) if x.device.type == "cpu" else None


def _read_group(group: dict, where: str, as_tensors: bool = False) -> Hyper:
    """The group's numbers, checked (every step: a scheduler or a user may have edited the group)."""
    lr, lr_fallback = _rates(group, where, as_tensors)
    (beta1, beta2), (beta1_1d, beta2_1d) = group["betas"], group["betas_1d"]
    return Hyper(lr, lr_fallback, beta1, beta2, beta1_1d, beta2_1d, group["eps"], group["weight_decay"],
                 group["weight_decay_1d"], correction_scale(group["gamma"], beta1), group["clip"], group["max_norm"],
                 group["exact"], group["maximize"], group["preconditioner"], group["ns_steps"], group["ns_dtype"])


@torch.compiler.disable
def _rates(group: dict, where: str, as_tensors: bool) -> tuple:
    """Check the group's settings and return its learning rates ``(lr, lr · lr_1d / base_lr)``. Never compiled:
    under ``torch.compile(opt.step)`` the checks still run at every step, and the rates a scheduler changes enter
    the compiled step as 0-d tensors, inputs of one graph, not constants that recompile it."""
    _checks.hyperparameters(group, where)
    lr = group["lr"]
    if torch.is_tensor(lr) and lr.device.type == "cpu" and not as_tensors:
        lr = float(lr)  # on the CPU reading it costs nothing, and the float path is the readable one
    elif torch.is_tensor(lr) or as_tensors:  # on a device, or compiled: a 0-d tensor, never read on the host
        device = next((p.device for p in group["params"]), torch.device("cpu"))
        lr = lr.reshape(()).to(device) if torch.is_tensor(lr) else torch.tensor(lr, device=device)
    return lr, fallback_lr(lr, group["lr_1d"], group["base_lr"])


def _implementation(group: dict, params: list[Tensor]) -> str:
    if group["fused"]:
        return "fused"
    foreach = group["foreach"]
    if foreach is None:  # as torch.optim: grouped kernels on CUDA, where one launch per tensor and op is the cost
        foreach = bool(params) and all(p.device.type == "cuda" for p in params)
    return "foreach" if foreach else "readable"


def branch(p: Tensor, group: dict) -> str:
    """Which step a tensor takes: its group's preconditioner on the MARS path (2-D tensors, or every tensor with
    ``optimize_1d``; the non-2-D tensors of MARS-Shampoo and MARS-M take the AdamW branch), else ``"fallback"``
    (also every tensor of a group with ``fallback=True``)."""
    if group.get("fallback", False) or not (group["optimize_1d"] or p.ndim == 2):
        return "fallback"
    if group["preconditioner"] in ("shampoo", "muon") and p.ndim != 2:
        return "adamw"
    return group["preconditioner"]


def state_keys(branch_: str, exact: bool) -> tuple[str, ...]:
    """The state tensors a tensor on this branch keeps (besides ``step``): ``m`` always; ``v`` where the AdamW
    branch or the fallback runs; ``g_prev`` on the MARS path in approx mode; ``x_prev`` in exact mode."""
    keys = ["m"]
    if branch_ in ("adamw", "fallback"):
        keys.append("v")
    if exact:
        keys.append("x_prev")
    elif branch_ != "fallback":
        keys.append("g_prev")
    return tuple(keys)


# ------------------------------------------------------------------------------------------- pass 1: the norms


def _checked_norms(groups: list[_Group]) -> list[list[Tensor]]:
    """Pass 1 for every group: ``‖c_t‖`` of each tensor (``‖g_t‖`` on the fallback), known finite and with squares
    the parameters' dtype holds; one host synchronisation for all groups (per device). The readable step keeps
    the ``c_t`` it computed here for pass 2. Raises ``FloatingPointError`` naming the tensor otherwise."""
    norms_of, checked = [], []
    for i, g in enumerate(groups):
        h, lists = g.hyper, g.lists
        if g.impl == "readable":
            cs, norms = [], []
            for grad, gp, b in zip(lists.grads, lists.g_prevs, lists.branches, strict=True):
                c = grad if b == "fallback" else _correction(grad, gp, h.k)
                norms.append(torch.linalg.vector_norm(c))
                # c_t is kept for pass 2 where it is small (it stays in cache); a large one is computed again
                # there (the same operations, the same bits) rather than held in memory for the whole group
                cs.append(c if c.numel() <= KEEP_ELEMENTS else None)
            groups[i] = g = g._replace(cs=cs)
        elif g.impl == "foreach":
            norms = _multi_tensor_norms(lists, h.k)
        else:
            from . import fused

            fused.check_tensors(lists)
            norms = fused.correction_norms(lists, h.k)
        norms_of.append(norms)
        checked.extend(norms)
        largest: dict[torch.dtype, list[Tensor]] = {}  # v_t squares these unclipped: their largest elements must fit
        for idx, (b, p) in enumerate(zip(lists.branches, lists.params, strict=True)):
            if _checks.squared_unclipped(b, h.clip):
                largest.setdefault(p.dtype, []).append(torch.linalg.vector_norm(_unclipped(g, idx), ord=math.inf))
        for dtype, bigs in largest.items():
            big = torch.stack(bigs)
            checked.append(torch.where(big <= _checks.square_limit(dtype), big, torch.nan))
    if torch.compiler.is_compiling() or _checks.all_finite(checked):
        # Compiled, the step has no host synchronisation, so nothing can raise from inside it: as torch's own
        # optimizers, it trusts its gradients (the hyperparameters are still checked, eagerly).
        return norms_of
    _checks.name_the_culprit(groups, norms_of, _unclipped)  # the slow path: raises, or corrects a norm
    return norms_of


def _unclipped(g: _Group, idx: int) -> Tensor:
    """What tensor ``idx`` of group ``g`` squares into ``v_t`` unclipped: ``g_t`` on the fallback, else ``c_t``."""
    lists = g.lists
    if lists.branches[idx] == "fallback":
        return lists.grads[idx]
    return _kept_or_computed(g.cs, lists, idx, g.hyper.k)


def _kept_or_computed(cs: list[Tensor | None] | None, lists: _Lists, i: int, k: float) -> Tensor:
    """Tensor ``i``'s ``c_t``: the one pass 1 kept, or (not kept: a large tensor, or another impl) computed again."""
    if cs is not None and cs[i] is not None:
        return cs[i]
    return _correction(lists.grads[i], lists.g_prevs[i], k)


def _correction(g: Tensor, g_prev: Tensor | None, k: float) -> Tensor:
    #   c_t = g_t + k·(g_t − g_prev),  k = γ·β1/(1−β1);  g_prev = 0 where there is none
    return torch.add(g, g - (torch.zeros_like(g) if g_prev is None else g_prev), alpha=k)


def _clip_factors(norms: list[Tensor], lists: _Lists, h: Hyper) -> list[Tensor | None]:
    """The clip factor of each tensor (a 0-d tensor in its gradient's dtype): ``min(1, τ/‖c_t‖)`` per tensor or
    over the group's MARS-path tensors together (``clip="global"``); None (no multiplication) for ``"none"`` and
    for the fallback."""
    factors: list[Tensor | None] = [None] * len(lists.params)
    if h.clip == "none":
        return factors
    on_path = [i for i, b in enumerate(lists.branches) if b != "fallback"]
    for i, f in zip(on_path, clip_factors([norms[i] for i in on_path], h.clip, h.max_norm), strict=True):
        factors[i] = f.to(device=lists.grads[i].device, dtype=lists.grads[i].dtype)
    return factors


# ------------------------------------------------------------------------------------------- pass 2: the step


def mars(lists: _Lists, h: Hyper, norms: list[Tensor], impl: str = "readable", cs: list[Tensor] | None = None):
    """Pass 2 of one group, in place: the clip factors from the norms of pass 1, then the step of every tensor by
    the chosen implementation (the same numbers up to rounding, the same state)."""
    clip = _clip_factors(norms, lists, h)
    if impl == "readable":
        _single_tensor_mars(lists, h, clip, cs)
    elif impl == "foreach":
        _multi_tensor_mars(lists, h, clip)
    elif impl == "fused":
        _fused_mars(lists, h, clip)
    else:
        raise ValueError(f"MARS: unknown step implementation {impl!r}; choose readable, foreach or fused")


def _single_tensor_mars(lists: _Lists, h: Hyper, clip: list[Tensor], cs: list[Tensor] | None) -> None:
    """The readable step: one tensor at a time, each line under the equation it computes."""
    for i, x in enumerate(lists.params):
        g, m, v, t, b = lists.grads[i], lists.ms[i], lists.vs[i], lists.steps[i], lists.branches[i]
        if h.exact:  # remember x_t: the next step evaluates its second gradient there
            lists.x_prevs[i].copy_(x)
        if b == "fallback":  # plain AdamW on the raw g_t
            adamw_update(x, g, m, v, t, h.fallback_lr, h.beta1_1d, h.beta2_1d, h.eps, h.weight_decay_1d,
                         eps_first=h.preconditioner == "muon")
            continue
        # 1. correction:  c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)   (computed in pass 1)
        c = _kept_or_computed(cs, lists, i, h.k)
        # 2. clip:  c_t ← c_t · min(1, τ/‖c_t‖)
        if clip[i] is not None:
            c = c * clip[i]
        if not h.exact:  # the next step's g_prev: a copy of g_t, never a reference to .grad
            lists.g_prevs[i].copy_(g)
        # 3. momentum:  m_t = β1·m_{t−1} + (1−β1)·c_t
        m.copy_(momentum(m, c, h.beta1))
        # 4. precondition:  u_t = P(m_t)
        if b == "adamw":
            #   v_t = β2·v_{t−1} + (1−β2)·c_t² ;  u_t = m_t / ((√v_t/√(1−β2^t) + ε)(1−β1^t))
            v.copy_(second_moment(v, c, h.beta2))
            u = adamw_direction(m, v, t, h.beta1, h.beta2, h.eps)
        elif b == "lion":
            #   u_t = sign(m_t)
            u = lion_direction(m)
        elif b == "shampoo":
            #   u_t = NS_5(m_t/(1−β1)) · √max(1, rows/cols)
            u = newton_schulz(m / (1.0 - h.beta1), h.ns_steps, h.eps, h.ns_dtype) * shampoo_scale(x.shape)
        else:
            #   u_t = NS_5(m_t) · 0.2·√max(rows, cols)   (MARS-M)
            u = newton_schulz(m, h.ns_steps, MUON_NS_EPS, h.ns_dtype) * muon_scale(x.shape)
        # 5. decay + step:  x_{t+1} = x_t − η·(λ·x_t + u_t)
        _decoupled_step_(x, u, h.lr, h.weight_decay)


def adamw_update(x: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr, beta1: float, beta2: float,
                 eps: float, weight_decay: float, eps_first: bool = False) -> None:
    """One AdamW step of ``x`` on the raw gradient ``g``, in place (``x``, ``m``, ``v``): MARS's fallback for tensors
    off its path (and Muon's 1-D part). ``eps_first``: ε before the bias corrections (MARS-M's AdamW)."""
    #   m_t = β1·m + (1−β1)·g_t ;  v_t = β2·v + (1−β2)·g_t²
    m.copy_(momentum(m, g, beta1))
    v.copy_(second_moment(v, g, beta2))
    #   x_{t+1} = x_t − η_1d·(λ_1d·x_t + m̂_t/(√v̂_t + ε))
    direction = adam_direction_eps_first if eps_first else adamw_direction
    _decoupled_step_(x, direction(m, v, step, beta1, beta2, eps), lr, weight_decay)


def _decoupled_step_(x: Tensor, u: Tensor, lr, weight_decay: float) -> None:
    """x ← x − η·(λ·x + u) in place; η a number (the pure function of pieces) or a 0-d tensor."""
    if torch.is_tensor(lr):
        x.sub_(torch.add(u, x, alpha=weight_decay).mul_(lr))
    else:
        x.copy_(decoupled_step(x, u, lr, weight_decay))


# ------------------------------------------------------------------------------------------- foreach


def _multi_tensor_norms(lists: _Lists, k: float) -> list[Tensor]:
    """Pass 1 of the foreach step: ``‖c_t‖`` wave by wave (``c_t`` is never stored whole), ``‖g_t‖`` on the
    fallback."""
    norms: list[Tensor | None] = [None] * len(lists.params)
    fb = [i for i, b in enumerate(lists.branches) if b == "fallback"]
    for i, n in zip(fb, torch._foreach_norm([lists.grads[i] for i in fb]) if fb else [], strict=True):
        norms[i] = n
    on = [i for i, b in enumerate(lists.branches) if b != "fallback"]
    P, G, GP = ([lists.params[i] for i in on], [lists.grads[i] for i in on], _g_prevs(lists, on))
    parts: list[list[Tensor]] = [[] for _ in on]
    for pieces in _waves(P, [G, GP]):
        c = torch._foreach_add(_take(G, pieces), torch._foreach_sub(_take(G, pieces), _take(GP, pieces)), alpha=k)
        for (j, _), n in zip(pieces, torch._foreach_norm(c), strict=True):
            parts[j].append(n)
    for i, ns in zip(on, parts, strict=True):
        norms[i] = ns[0] if len(ns) == 1 else torch.linalg.vector_norm(torch.stack(ns))
    return norms


def _multi_tensor_mars(lists: _Lists, h: Hyper, clip: list[Tensor]) -> None:
    """The readable step as grouped ``torch._foreach_*`` kernels, branch by branch. On CPU every tensor is cut into
    flat chunks packed into waves of about ``WAVE_ELEMENTS`` elements, and the whole chain runs on one wave (in
    cache) before the next; on CUDA a wave is the whole list. Each kernel is the one the readable step's function
    calls, so an element gets the same float operations: the two differ where a norm is summed in another order."""
    for kind in ("fallback", "adamw", "lion", "shampoo", "muon"):
        idx = [i for i, b in enumerate(lists.branches) if b == kind]
        if not idx:
            continue
        P, G, M, V, X = ([getattr(lists, f)[i] for i in idx] for f in ("params", "grads", "ms", "vs", "x_prevs"))
        GP = G if kind == "fallback" else _g_prevs(lists, idx)  # the fallback has no g_prev: G holds its place
        steps, C = [lists.steps[i] for i in idx], [clip[i] for i in idx]
        adam = kind in ("adamw", "fallback")
        b1, b2, lr, wd = ((h.beta1_1d, h.beta2_1d, h.fallback_lr, h.weight_decay_1d) if kind == "fallback"
                          else (h.beta1, h.beta2, h.lr, h.weight_decay))
        for pieces in _waves(P, [G, GP, M] + ([V] if adam else []) + ([X] if h.exact else [])):
            p, g, gp, m = _take(P, pieces), _take(G, pieces), _take(GP, pieces), _take(M, pieces)
            if kind == "fallback":
                c = g
            else:
                # 1. c_t = g_t + k·(g_t − g_prev);  2. c_t ← c_t · clip
                c = torch._foreach_add(g, torch._foreach_sub(g, gp), alpha=h.k)
                if h.clip != "none":
                    torch._foreach_mul_(c, [C[j] for j, _ in pieces])
            # 3. m_t = β1·m_{t−1} + (1−β1)·c_t
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, c, alpha=1.0 - b1)
            if h.exact:  # the previous point x_{t−1} for the next step
                torch._foreach_copy_(_take(X, pieces), p)
            elif kind != "fallback":  # the next step's g_prev (a copy, never a reference to p.grad)
                torch._foreach_copy_(gp, g)
            if kind in ("shampoo", "muon"):
                continue  # Newton–Schulz needs the whole momentum: below, per tensor
            if kind == "lion":
                u = torch._foreach_sign(m)  # 4. u_t = sign(m_t)
            else:
                # 4. v_t = β2·v + (1−β2)·c_t²;  u_t = m_t / ((√v_t/√(1−β2^t) + ε)(1−β1^t))
                v = _take(V, pieces)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, c, c, 1.0 - b2)
                ts = [steps[j] for j, _ in pieces]
                denom = torch._foreach_sqrt(v)
                if kind == "fallback" and h.preconditioner == "muon":  # MARS-M's AdamW: ε before the corrections
                    torch._foreach_add_(denom, h.eps)
                    torch._foreach_mul_(denom, [(1.0 - b1**t) / math.sqrt(1.0 - b2**t) for t in ts])
                else:
                    torch._foreach_div_(denom, [math.sqrt(1.0 - b2**t) for t in ts])
                    torch._foreach_add_(denom, h.eps)
                    torch._foreach_mul_(denom, [1.0 - b1**t for t in ts])
                u = torch._foreach_div(m, denom)
            # 5. x_{t+1} = x_t − η·(λ·x_t + u_t)
            _foreach_decoupled_step_(p, u, lr, wd)
        if kind in ("shampoo", "muon"):  # 4.–5. per tensor, the readable step's direction
            for x, m in zip(P, M, strict=True):
                if kind == "shampoo":
                    u = newton_schulz(m / (1.0 - h.beta1), h.ns_steps, h.eps, h.ns_dtype) * shampoo_scale(x.shape)
                else:
                    u = newton_schulz(m, h.ns_steps, MUON_NS_EPS, h.ns_dtype) * muon_scale(x.shape)
                _foreach_decoupled_step_([x], [u], lr, wd)


def _foreach_decoupled_step_(p: list[Tensor], u: list[Tensor], lr, wd: float) -> None:
    """x ← x − η·(λ·x + u), in place (``u`` is a temporary and is overwritten)."""
    if wd != 0.0:
        torch._foreach_add_(u, p, alpha=wd)
    if torch.is_tensor(lr):
        torch._foreach_mul_(u, lr)
        torch._foreach_sub_(p, u)
    else:
        torch._foreach_add_(p, u, alpha=-lr)


def _g_prevs(lists: _Lists, idx: list[int]) -> list[Tensor]:
    """``g_prev`` of the tensors ``idx``, zero where there is none (step 1 of exact mode; the fallback)."""
    return [torch.zeros_like(lists.grads[i]) if lists.g_prevs[i] is None else lists.g_prevs[i] for i in idx]


def _waves(ps: list[Tensor], companions: list[list[Tensor]]) -> list[list[tuple[int, slice | None]]]:
    """Cut the tensors into flat chunks and pack them into waves of about ``WAVE_ELEMENTS`` elements (CPU; one
    wave of whole tensors elsewhere). A piece is ``(index, slice of the flattened tensor)``, or ``(index, None)``
    for the whole tensor (small ones, and those where the parameter or a companion is not contiguous)."""
    wave = WAVE_ELEMENTS if ps and ps[0].device.type == "cpu" else None
    waves, current, filled = [], [], 0
    for i, p in enumerate(ps):
        n = p.numel()
        if wave is None or n <= wave or not (p.is_contiguous() and all(ts[i].is_contiguous() for ts in companions)):
            pieces = [(i, None, n)]
        else:
            pieces = [(i, slice(a, min(n, a + wave)), min(n, a + wave) - a) for a in range(0, n, wave)]
        for i_, sl, size in pieces:
            if current and wave is not None and filled + size > wave:
                waves.append(current)
                current, filled = [], 0
            current.append((i_, sl))
            filled += size
    if current:
        waves.append(current)
    return waves


def _take(tensors: list[Tensor], pieces: list[tuple[int, slice | None]]) -> list[Tensor]:
    return [tensors[i] if sl is None else tensors[i].view(-1)[sl] for i, sl in pieces]


# ------------------------------------------------------------------------------------------- fused


def _fused_mars(lists: _Lists, h: Hyper, clip: list[Tensor]) -> None:
    """The C loop of ``fused.c``: correction, clip, m_t (and v_t), u_t, x_{t+1} and g_prev ← g_t (or x_prev ← x_t)
    of one tensor in one pass over memory (:mod:`mars_ref.fused`, loaded when a group asks for it)."""
    from . import fused

    fused.step(lists, h, clip)


def corrected_gradients(opt: MARS, group: dict, grads: Sequence[Tensor], g_prevs: Sequence[Tensor | None]
                        ) -> list[Tensor]:
    """``c_t`` of each of the group's parameters as the step would clip it, for gradients ``grads`` and previous
    gradients ``g_prevs`` (``g_t`` itself on the fallback): what the variance probe measures."""
    h = _read_group(group, "")
    params = list(group["params"])
    lists = _Lists(params, list(grads), list(g_prevs), [], [], [], [], [branch(p, group) for p in params], [])
    cs = [g if b == "fallback" else _correction(g, gp, h.k) for g, gp, b in zip(grads, g_prevs, lists.branches,
                                                                              strict=True)]
    clip = _clip_factors([torch.linalg.vector_norm(c) for c in cs], lists, h)
    return [c if f is None else c * f for c, f in zip(cs, clip, strict=True)]
