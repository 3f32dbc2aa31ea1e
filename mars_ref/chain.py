r"""The decisions of one MARS step, each made in one place.

:mod:`mars_ref.pieces` holds the math of each link; this module holds every *decision* the
chain makes around that math, so that the three implementations of the step
(:mod:`~mars_ref.readable`, :mod:`~mars_ref.foreach`, :mod:`~mars_ref.fused`), the variance
probe, the toys and the notebooks all make it the same way (``docs/algorithm.md`` §2–§9):

====================================  ==========================================================
which tensors take the MARS path      :func:`branch` (2-D tensors, or all with ``optimize_1d``;
                                      the others take the AdamW fallback)
the previous gradient ``g_prev``      :func:`previous_gradient` (``g_{t−1}`` in approx mode,
                                      ``∇f(x_{t−1}, ξ_t)`` in exact mode, zero at step 1)
the corrected gradient ``c_t``        :func:`correction`
the clip factor from the norms        :func:`clip_factors`, :func:`group_clip_factors`
the preconditioner's direction        :func:`direction` (AdamW, Lion, Shampoo)
the AdamW fallback and its lr         :func:`fallback_lr`, :func:`adamw_update`
the swap to ``x_{t−1}``               :func:`at_previous_point` (random state restored)
what can refuse a step                :func:`check_tensors`, :func:`checked_norms`
====================================  ==========================================================

The optimizer gathers each parameter group into a :class:`Tensors` (flat lists) and a
:class:`Settings` (numbers) and hands them to :mod:`mars_ref.functional`; nothing here sees an
optimizer object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .pieces import (
    adam_direction_eps_first,
    adamw_direction,
    clip_factor,
    decoupled_step,
    global_norm,
    lion_direction,
    momentum,
    muon_scale,
    newton_schulz,
    second_moment,
    shampoo_scale,
    storm_correction,
)

PRECONDITIONERS = ("adamw", "lion", "shampoo", "muon")  # "muon": MARS-M (Liu, Yuan, Gu, arXiv 2510.21800)
CLIP_MODES = ("tensor", "global", "none")
#: what a tensor's step is: a MARS branch (by its preconditioner) or the AdamW fallback
BRANCHES = ("adamw", "lion", "shampoo", "muon", "fallback")
#: Newton–Schulz's ε for MARS-M (the authors' and torch.optim.Muon's); MARS-Shampoo uses the group's ``eps``
MUON_NS_EPS = 1e-7


# ---------------------------------------------------------------------------------------- what a step takes


@dataclass(frozen=True)
class Settings:
    """The hyperparameters of one parameter group, as plain numbers."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    gamma: float
    preconditioner: str
    exact: bool
    clip: str
    max_norm: float
    optimize_1d: bool
    fallback: bool  # every tensor of the group takes the AdamW fallback
    lr_1d: float  # the fallback's learning rate as applied: η · lr_1d / base_lr (see fallback_lr)
    beta1_1d: float
    beta2_1d: float
    weight_decay_1d: float
    ns_steps: int
    ns_dtype: torch.dtype | None

    @property
    def fallback_eps_first(self) -> bool:
        """Where the fallback's AdamW puts ε: before the bias corrections for MARS-M (the authors' MARS-M code),
        after them for the others (the authors' MARS code, torch.optim.AdamW)."""
        return self.preconditioner == "muon"

    @classmethod
    def of(cls, group: dict) -> Settings:
        """The settings of a ``MARS`` parameter group (already validated)."""
        (beta1, beta2), (beta1_1d, beta2_1d) = group["betas"], group["betas_1d"]
        return cls(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], gamma=group["gamma"], preconditioner=group["preconditioner"],
                   exact=group["exact"],
                   clip=group["clip"], max_norm=group["max_norm"], optimize_1d=group["optimize_1d"],
                   fallback=group.get("fallback", False),
                   lr_1d=fallback_lr(float(group["lr"]), group["lr_1d"], group["base_lr"]), beta1_1d=beta1_1d,
                   beta2_1d=beta2_1d, weight_decay_1d=group["weight_decay_1d"], ns_steps=group["ns_steps"],
                   ns_dtype=group["ns_dtype"])


@dataclass
class Tensors:
    """The flat lists of one parameter group: the tensors that have a gradient this step, in group order.

    ``prev_grads[i]`` is ``g_prev`` (the state's ``g_{t−1}`` in approx mode, which the step overwrites
    with ``g_t``; ``∇f(x_{t−1}, ξ_t)`` in exact mode), ``None`` for zero (step 1, and the fallback).
    ``prev_params[i]`` is where the step stores ``x_t`` for the next step (exact mode), else ``None``.
    ``steps[i]`` is this step's ``t`` (from 1). ``names[i]`` says where the tensor is, for messages.
    """

    params: list[Tensor]
    grads: list[Tensor]
    prev_grads: list[Tensor | None]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor | None]
    prev_params: list[Tensor | None]
    steps: list[int]
    branches: list[str]
    names: list[str]


# ---------------------------------------------------------------------------------------- the decisions


def branch(p: Tensor, preconditioner: str, optimize_1d: bool, fallback: bool = False) -> str:
    """Which step a tensor takes: its group's preconditioner on the MARS path (2-D tensors, or every
    tensor with ``optimize_1d``; the non-2-D tensors of MARS-Shampoo and MARS-M take the AdamW branch), else
    ``"fallback"`` (also every tensor of a group with ``fallback=True``, e.g. MARS-M's embeddings)."""
    if fallback or not (optimize_1d or p.ndim == 2):
        return "fallback"
    if preconditioner in ("shampoo", "muon") and p.ndim != 2:
        return "adamw"
    return preconditioner


def state_keys(branch_: str, exact: bool) -> tuple[str, ...]:
    """The state tensors a tensor on this branch keeps (besides ``step``): ``m`` always; ``v`` where the
    AdamW branch or the fallback runs; ``g_prev`` on the MARS path in approx mode; ``x_prev`` in exact mode."""
    keys = ["m"]
    if branch_ in ("adamw", "fallback"):
        keys.append("v")
    if exact:
        keys.append("x_prev")
    elif branch_ != "fallback":
        keys.append("g_prev")
    return tuple(keys)


def previous_gradient(p: Tensor, state: dict, branch_: str, exact: bool,
                      at_previous_point: dict[Tensor, Tensor]) -> Tensor | None:
    """``g_prev`` of the correction: ``∇f(x_{t−1}, ξ_t)`` (exact) or the stored ``g_{t−1}`` (approx);
    ``None`` (zero) at the first step and for the fallback, which has no correction."""
    if branch_ == "fallback":
        return None
    if exact:
        return at_previous_point.get(p)
    return state.get("g_prev")


def correction(grad: Tensor, grad_prev: Tensor | None, s: Settings) -> Tensor:
    """``c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)``, with ``g_prev = 0`` where there is none."""
    return storm_correction(grad, torch.zeros_like(grad) if grad_prev is None else grad_prev, s.gamma, s.beta1)


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
    raise ValueError(f"clip must be one of {CLIP_MODES}, not {clip!r}")


def group_clip_factors(norms: Sequence[Tensor], t: Tensors, s: Settings) -> list[Tensor]:
    """:func:`clip_factors` over a group's MARS-path tensors (the global rule clips them together, not across
    groups); the fallback's tensors are not clipped (1). Each factor a 0-d tensor in its gradient's dtype."""
    on_path = [i for i, b in enumerate(t.branches) if b != "fallback"]
    factors = [torch.ones((), dtype=g.dtype, device=g.device) for g in t.grads]
    for i, f in zip(on_path, clip_factors([norms[i] for i in on_path], s.clip, s.max_norm), strict=True):
        factors[i] = f.to(device=t.grads[i].device, dtype=t.grads[i].dtype)
    return factors


def corrected_gradients(t: Tensors, s: Settings) -> list[Tensor]:
    """``c_t`` of every MARS-path tensor, clipped as the step clips it (``g_t`` for the fallback's tensors):
    links 1 and 2 of the chain in one call, for whoever wants to look at ``c_t`` (the variance probe)."""
    cs = [g if b == "fallback" else correction(g, gp, s) for g, gp, b in zip(t.grads, t.prev_grads, t.branches,
                                                                              strict=True)]
    factors = group_clip_factors([torch.linalg.vector_norm(c) for c in cs], t, s)
    return [c * f for c, f in zip(cs, factors, strict=True)]


def direction(branch_: str, m: Tensor, v: Tensor | None, step: int, shape: torch.Size, s: Settings) -> Tensor:
    r"""The preconditioned update direction ``u_t`` of the momentum ``m_t`` (``v`` = ``v_t``, AdamW only).

    AdamW: ``m̂_t/(√v̂_t + ε)`` with the authors' ε placement; Lion: ``sign(m_t)``; Shampoo (2-D):
    ``NS_5(m_t/(1−β1)) · √max(1, rows/cols)``, Newton–Schulz as the authors ran it; MARS-M (2-D):
    ``NS_5(m_t) · 0.2·√max(rows, cols)``, as the authors' MARS-M code.
    """
    if branch_ == "lion":
        return lion_direction(m)
    if branch_ == "muon":
        return newton_schulz(m, s.ns_steps, MUON_NS_EPS, s.ns_dtype) * muon_scale(shape)
    if branch_ == "shampoo":
        return newton_schulz(m / (1.0 - s.beta1), s.ns_steps, s.eps, s.ns_dtype) * shampoo_scale(shape)
    return adamw_direction(m, v, step, s.beta1, s.beta2, s.eps)


def fallback_lr(lr: float, lr_1d: float, base_lr: float) -> float:
    r"""The learning rate of the AdamW fallback:  .. math:: η · lr_{1d} / base\_lr

    ``base_lr`` is the group's ``lr`` at construction, so a scheduler that scales ``lr`` scales the
    fallback with it (the authors' rule); ``base_lr = 0`` gives ``lr``.
    """
    return lr * (lr_1d / base_lr) if base_lr > 0 else lr


def adamw_update(x: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, eps_first: bool = False) -> None:
    """One AdamW step of ``x`` on the raw gradient ``g``, in place (``x``, ``m``, ``v``): the fallback of MARS
    for tensors off its path (and the 1-D part of Muon). ``eps_first``: ε before the bias corrections
    (:func:`mars_ref.pieces.adam_direction_eps_first`, MARS-M's AdamW)."""
    #   m_t = β1·m + (1−β1)·g_t ;  v_t = β2·v + (1−β2)·g_t²
    m.copy_(momentum(m, g, beta1))
    v.copy_(second_moment(v, g, beta2))
    #   x_{t+1} = x_t − η_1d·(λ_1d·x_t + m̂_t/(√v̂_t + ε))
    direction_ = adam_direction_eps_first if eps_first else adamw_direction
    x.copy_(decoupled_step(x, direction_(m, v, step, beta1, beta2, eps), lr, weight_decay))


# ---------------------------------------------------------------------------------------- the previous point


def rng_state() -> tuple:
    """The random state a closure draws from (CPU, and CUDA when in use): dropout masks, sampling."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def at_previous_point(params: Sequence[Tensor], prev_params: Sequence[Tensor],
                      rng: tuple | None = None) -> Iterator[None]:
    """Inside the block each parameter holds its previous value ``x_{t−1}``; with ``rng`` (the random
    state the step's first gradient started from) the random state is that one, so a closure sees the same
    dropout masks. On leaving, ``x_t`` is back and the random state is what it was on entering."""
    now = [p.detach().clone() for p in params]
    after = rng_state() if rng is not None else None
    with torch.no_grad():
        for p, x_prev in zip(params, prev_params, strict=True):
            p.copy_(x_prev)
    if rng is not None:
        set_rng_state(rng)
    try:
        yield
    finally:
        if after is not None:
            set_rng_state(after)
        with torch.no_grad():
            for p, x in zip(params, now, strict=True):
                p.copy_(x)


# ---------------------------------------------------------------------------------------- what can refuse a step


def check_tensors(t: Tensors, state: Sequence[dict], exact: bool, where: str) -> None:
    """Refuse sparse gradients and state tensors that do not fit their parameter (a state dict loaded into
    other parameters, or saved with another preconditioner or mode)."""
    for p, g, st, branch_, name in zip(t.params, t.grads, state, t.branches, t.names, strict=True):
        if g.is_sparse:
            raise RuntimeError(f"MARS does not support sparse gradients ({name}, shape {tuple(p.shape)}); "
                               "use dense gradients (e.g. nn.Embedding(sparse=False)).")
        check_state(p, st, branch_, exact, name, where)


def check_state(p: Tensor, state: dict, branch_: str, exact: bool, name: str, where: str = "") -> None:
    """One tensor's state has every tensor its branch keeps (:func:`state_keys`), each of its parameter's shape,
    dtype and device; else ``ValueError`` naming the tensor and what was found."""
    keys = state_keys(branch_, exact)
    for key in keys:
        value = state.get(key)
        if not torch.is_tensor(value):
            raise ValueError(f"MARS: the state of {name}{where} has no tensor {key!r} (it has {sorted(state)}): a "
                             f"{branch_!r} tensor in {'exact' if exact else 'approx'} mode keeps {('step', *keys)}; "
                             "was the state dict saved by another optimizer, preconditioner or mode?")
        if value.shape != p.shape or value.dtype != p.dtype or value.device != p.device:
            raise ValueError(
                f"MARS: state {key!r} of {name}{where} is a {value.dtype} tensor of shape {tuple(value.shape)} "
                f"on {value.device}, but the parameter is {p.dtype} of shape {tuple(p.shape)} on {p.device}: "
                "the state dict does not belong to these parameters.")


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """True if every (0-d) tensor is finite: one host synchronisation per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for x in tensors:
        by_device.setdefault(x.device, []).append(x)
    return all(bool(torch.isfinite(torch.stack(xs)).all()) for xs in by_device.values())


def checked_norms(norms: list[Tensor], t: Tensors, s: Settings, where: str) -> list[Tensor]:
    """The norms, once each is known finite; else raise naming the first tensor whose gradient (or previous
    gradient) has a NaN or inf. A norm that overflowed although its inputs are finite (float32 squares
    overflow above ~1.8e19, float16 ones above 256) is taken again in float64 and scaled, so every
    implementation clips it alike."""
    if torch.compiler.is_compiling() or _all_finite(norms):
        # Compiled (torch.compile), the step has no host synchronisation, so no check can raise from
        # inside it: as torch's own optimizers, it trusts its gradients (check the loss, or use GradScaler).
        return norms
    norms = list(norms)
    for i, n in enumerate(norms):
        if bool(torch.isfinite(n)):
            continue
        g, gp, name = t.grads[i], t.prev_grads[i], t.names[i]
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"MARS: non-finite gradient{where} (nan or inf) in {name}, shape "
                                     f"{tuple(g.shape)}; nothing was updated. Skip this step or lower the learning "
                                     "rate.")
        if gp is not None and not bool(torch.isfinite(gp).all()):
            which = "gradient at the previous point (exact mode)" if s.exact else "previous gradient g_prev (state)"
            raise FloatingPointError(f"MARS: non-finite {which}{where} (nan or inf) in {name}, shape "
                                     f"{tuple(g.shape)}; nothing was updated.")
        c = g.double() if t.branches[i] == "fallback" else correction(g.double(), _double(gp), s)
        if not bool(torch.isfinite(c).all()):  # beyond float64 too: c itself is not a number
            raise FloatingPointError(f"MARS: the corrected gradient of {name}{where} overflows (|g| near the "
                                     f"largest {g.dtype} value); nothing was updated.")
        norms[i] = _scaled_norm(c)
    return norms


def _scaled_norm(c: Tensor) -> Tensor:
    """``‖c‖ = a·‖c/a‖`` with ``a = max|c|``: no square overflows, whatever the size of the finite ``c``."""
    largest = c.abs().max()
    return largest * torch.linalg.vector_norm(c / largest) if largest > 0 else largest


def _double(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.double()
