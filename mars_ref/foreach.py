r"""The foreach MARS step: the readable step (:mod:`mars_ref.readable`) as grouped kernels.

Selected per parameter group by ``MARS(..., foreach=True)``, with the readable step's signature
(:func:`correction_norms`, then :func:`step`). The readable step walks the tensors one by one
and calls one pure function per link of the chain; this module runs the same chain

    correction → clip (tensor / global / none) → momentum → precondition → decay + step

as grouped ``torch._foreach_*`` kernels over all tensors of a group and branch, with no host
synchronisation per tensor (norms and clip factors stay on the device; the decisions, which
branch a tensor takes and which factor clips it, come from :mod:`mars_ref.chain`).

Memory traffic is what limits a step on big tensors, so on CPU the grouped kernels do not sweep
each whole list once per operation (one pass over memory per operation, about a dozen passes
per step). Every tensor is cut into flat chunks and the chunks are packed into *waves* of about
``WAVE_ELEMENTS`` elements (a few MB per state array, so a wave stays in the CPU caches); the
whole chain runs on one wave, then on the next. Per step each state array then crosses main
memory about once in each direction, plus one extra read of ``g_t`` and ``g_prev`` in pass 1 to get
the clipping norm (the norm must be known before the momentum may change). Small tensors (norm
weights, biases) share a wave, so they cost one grouped call, not one call each. On CUDA the
waves are the whole lists (``torch._foreach_*`` there already fuses across tensors).

State is exactly the readable path's (keys ``step``, ``m``, ``v``, ``g_prev`` / ``x_prev``, same
shapes and dtypes), so a ``state_dict`` saved by one path loads into the other. The correction
``c_t`` lives only in per-wave temporaries: no persistent buffer is added.

Each grouped kernel is the one the readable step's pure function calls on the whole tensor (``add``
with ``alpha``, ``mul``/``add`` for the averages, ``sqrt``/``div``/``add``/``mul`` for AdamW's
denominator, …), so an element gets the same float operations in the same order: the two steps
differ only where a norm is summed in another order (a tensor split across waves).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import chain
from .chain import Settings, Tensors
from .pieces import correction_scale

#: CPU: elements per wave (about 2 MB per state array: the chain of kernels on one wave stays in cache).
WAVE_ELEMENTS = 1 << 19


# ---------------------------------------------------------------------------------------- waves


def _waves(ps: list[Tensor], lists: list[list[Tensor]], wave: int | None) -> list[list[tuple[int, slice | None]]]:
    """Cut the tensors into flat chunks and pack the chunks into waves of about ``wave`` elements.

    A piece is ``(index, slice of the flattened tensor)``, or ``(index, None)`` for the whole tensor:
    small tensors, tensors where ``p`` or a companion (``lists[k][index]``) is not contiguous, and
    every tensor when ``wave is None`` (one wave holding everything).
    """
    waves: list[list[tuple[int, slice | None]]] = []
    current: list[tuple[int, slice | None]] = []
    filled = 0
    for i, p in enumerate(ps):
        n = p.numel()
        contiguous = p.is_contiguous() and all(ts[i].is_contiguous() for ts in lists)
        if wave is None or n <= wave or not contiguous:
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
    """The views of ``tensors`` that a wave's pieces name."""
    return [tensors[i] if sl is None else tensors[i].view(-1)[sl] for i, sl in pieces]


def _wave_size(tensors: list[Tensor]) -> int | None:
    return WAVE_ELEMENTS if tensors and tensors[0].device.type == "cpu" else None


# ---------------------------------------------------------------------------------------- the step


def _select(t: Tensors, idx: list[int]) -> Tensors:
    """The tensors ``idx`` of a group's lists."""
    return Tensors(*([getattr(t, f)[i] for i in idx] for f in Tensors.__dataclass_fields__))


def _previous_gradients(t: Tensors) -> list[Tensor]:
    """``g_prev`` of each tensor, zero where there is none (exact mode's first step)."""
    return [torch.zeros_like(g) if gp is None else gp for g, gp in zip(t.grads, t.prev_grads, strict=True)]


def correction_norms(t: Tensors, s: Settings) -> list[Tensor]:
    """Pass 1: ``‖c_t‖`` of each tensor on the MARS path (wave by wave: ``c_t`` is never stored whole),
    ``‖g_t‖`` of each fallback tensor (only the finite check reads it)."""
    norms: list[Tensor | None] = [None] * len(t.params)
    fallback = [i for i, b in enumerate(t.branches) if b == "fallback"]
    if fallback:
        for i, n in zip(fallback, torch._foreach_norm([t.grads[i] for i in fallback]), strict=True):
            norms[i] = n
    on_path = [i for i, b in enumerate(t.branches) if b != "fallback"]
    if on_path:
        mars = _select(t, on_path)
        scale = correction_scale(s.gamma, s.beta1)
        for i, n in zip(on_path, _correction_norms(mars.params, mars.grads, _previous_gradients(mars), scale),
                        strict=True):
            norms[i] = n
    return norms


def step(t: Tensors, s: Settings, clip: list[Tensor]) -> None:
    """Pass 2: the step of every tensor, in place, branch by branch (the same result as
    :func:`mars_ref.readable.step`)."""
    fallback = [i for i, b in enumerate(t.branches) if b == "fallback"]
    if fallback:
        _adamw_fallback(_select(t, fallback), s)
    for kind in ("adamw", "lion", "shampoo", "muon"):
        idx = [i for i, b in enumerate(t.branches) if b == kind]
        if idx:
            _update(kind, _select(t, idx), [clip[i] for i in idx], s)


def _correction(g: list[Tensor], gp: list[Tensor], scale: float) -> list[Tensor]:
    """c_t = g_t + s·(g_t − g_prev) in per-wave temporaries, with the kernels of ``storm_correction``."""
    return torch._foreach_add(g, torch._foreach_sub(g, gp), alpha=scale)


def _correction_norms(ps: list[Tensor], gs: list[Tensor], gps: list[Tensor], scale: float) -> list[Tensor]:
    """‖c_t‖₂ of each tensor, computed wave by wave (``c_t`` is never stored whole)."""
    chunk_norms: list[list[Tensor]] = [[] for _ in ps]
    for pieces in _waves(ps, [gs, gps], _wave_size(ps)):
        c = _correction(_take(gs, pieces), _take(gps, pieces), scale)
        for (i, _), n in zip(pieces, torch._foreach_norm(c), strict=True):
            chunk_norms[i].append(n)
    return [ns[0] if len(ns) == 1 else torch.linalg.vector_norm(torch.stack(ns)) for ns in chunk_norms]


def _update(kind: str, t: Tensors, clip: list[Tensor], s: Settings) -> None:
    """Correction (recomputed), clip, momentum, preconditioner, decay + step of one branch, wave by wave."""
    scale = correction_scale(s.gamma, s.beta1)
    P, G, GP, M, V, X = t.params, t.grads, _previous_gradients(t), t.exp_avgs, t.exp_avg_sqs, t.prev_params
    companions = [G, GP, M] + ([V] if kind == "adamw" else []) + ([X] if s.exact else [])
    for pieces in _waves(P, companions, _wave_size(P)):
        p, g, gp, m = _take(P, pieces), _take(G, pieces), _take(GP, pieces), _take(M, pieces)
        # 1. c_t = g_t + s·(g_t − g_prev)   (in a per-wave temporary)
        c = _correction(g, gp, scale)
        # 2. c_t ← c_t · min(1, τ/‖c_t‖)
        torch._foreach_mul_(c, [clip[i] for i, _ in pieces])
        # 3. m_t = β1·m_{t−1} + (1−β1)·c_t
        torch._foreach_mul_(m, s.beta1)
        torch._foreach_add_(m, c, alpha=1.0 - s.beta1)
        if s.exact:  # the previous point x_{t−1} for the next step
            torch._foreach_copy_(_take(X, pieces), p)
        else:  # the next step's g_prev (a copy, never a reference to p.grad)
            torch._foreach_copy_(gp, g)
        if kind in ("shampoo", "muon"):
            continue  # Newton–Schulz needs the whole momentum: below, per tensor
        if kind == "lion":
            # 4. u_t = sign(m_t)
            u = torch._foreach_sign(m)
        else:
            # 4. v_t = β2·v + (1−β2)·c_t²;  u_t = m_t / ((√v_t/√(1−β2^t) + ε)(1−β1^t))
            v = _take(V, pieces)
            torch._foreach_mul_(v, s.beta2)
            torch._foreach_addcmul_(v, c, c, 1.0 - s.beta2)
            u = _adam_direction(m, v, [t.steps[i] for i, _ in pieces], s.beta1, s.beta2, s.eps)
        # 5. x_{t+1} = x_t − η·(λ·x_t + u_t)
        _decoupled_step(p, u, s.lr, s.weight_decay)
    if kind in ("shampoo", "muon"):
        # 4. u_t = NS(m_t/(1−β1))·√max(1, rows/cols)  or (MARS-M)  NS(m_t)·0.2·√max(rows, cols);  5. as above
        #    (per tensor, the readable step's own direction)
        for p, m, step_ in zip(P, M, t.steps, strict=True):
            _decoupled_step([p], [chain.direction(kind, m, None, step_, p.shape, s)], s.lr, s.weight_decay)


def _adam_direction(m, v, steps, beta1, beta2, eps, eps_first: bool = False) -> list[Tensor]:
    """u = m / ((√v/√(1−β2^t) + ε)·(1−β1^t)), the denominator in a per-wave temporary; ``eps_first``:
    u = m / ((√v + ε)·(1−β1^t)/√(1−β2^t)) (MARS-M's AdamW)."""
    denom = torch._foreach_sqrt(v)
    if eps_first:
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, [(1.0 - beta1**t) / math.sqrt(1.0 - beta2**t) for t in steps])
        return torch._foreach_div(m, denom)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, [1.0 - beta1**t for t in steps])
    return torch._foreach_div(m, denom)


def _decoupled_step(p, u, lr, wd) -> None:
    """x ← x − η·(λ·x + u), in place (``u`` is a temporary and is overwritten)."""
    if wd != 0.0:
        torch._foreach_add_(u, p, alpha=wd)
    torch._foreach_add_(p, u, alpha=-lr)


def _adamw_fallback(t: Tensors, s: Settings) -> None:
    """Plain AdamW on the raw g_t for tensors off the MARS path (betas_1d, weight_decay_1d, the fallback lr)."""
    beta1, beta2 = s.beta1_1d, s.beta2_1d
    P, G, M, V, X = t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.prev_params
    for pieces in _waves(P, [G, M, V] + ([X] if s.exact else []), _wave_size(P)):
        p, g, m, v = _take(P, pieces), _take(G, pieces), _take(M, pieces), _take(V, pieces)
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1.0 - beta2)
        if s.exact:
            torch._foreach_copy_(_take(X, pieces), p)
        u = _adam_direction(m, v, [t.steps[i] for i, _ in pieces], beta1, beta2, s.eps, s.fallback_eps_first)
        _decoupled_step(p, u, s.lr_1d, s.weight_decay_1d)
