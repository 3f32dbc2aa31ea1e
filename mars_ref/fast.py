r"""The fast MARS step: the same math as :meth:`mars_ref.optimizer.MARS._step_group`, grouped.

Selected per parameter group by ``MARS(..., foreach=True)``. The readable step walks the
tensors one by one and calls one small function per link of the chain; this module runs the
same chain

    correction → clip (tensor / global / none) → momentum → precondition → decay + step

as grouped ``torch._foreach_*`` kernels over all tensors of a group and branch, with no host
synchronisation per tensor (clip scales stay on the device: ``min(1, τ/‖c‖)`` is a clamp, not a
Python ``if``; the non-finite check is one stacked test per group, see :func:`grads_finite`).

Memory traffic is what limits a step on big tensors, so on CPU the grouped kernels do not sweep
each whole list once per operation (one pass over memory per operation, about a dozen passes
per step). Every tensor is cut into flat chunks and the chunks are packed into *waves* of about
``WAVE_ELEMENTS`` elements (a few MB per state array, so a wave stays in the CPU caches); the
whole chain runs on one wave, then on the next. Per step each state array then crosses main
memory about once in each direction, plus one extra read of ``g_t`` and ``g_prev`` to get the
clipping norm (the norm must be known before the momentum may change). Small tensors (norm
weights, biases) share a wave, so they cost one grouped call, not one call each. On CUDA the
waves are the whole lists (``torch._foreach_*`` there already fuses across tensors).

State is exactly the readable path's (keys ``step``, ``m``, ``v``, ``g_prev`` / ``x_prev``, same
shapes and dtypes), so a ``state_dict`` saved by one path loads into the other. The correction
``c_t`` lives only in per-wave temporaries: no persistent buffer is added.

Results equal the readable path's up to float rounding (the order of a few operations differs:
``lerp`` for the two averages, one fused ``addcdiv`` for the AdamW update, chunked norms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .pieces import correction_scale, fallback_lr, newton_schulz, shampoo_scale

#: CPU: elements per wave (about 2 MB per state array: the chain of kernels on one wave stays in cache).
WAVE_ELEMENTS = 1 << 19
#: CPU, clip "tensor"/"none": tensors are processed in segments of about this many elements, the norm
#: pass and the update pass of one segment back to back, so the update re-reads g_t, g_prev from cache.
SEGMENT_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------------------- checks


def grads_finite(params, grads: dict[Tensor, Tensor] | None = None) -> bool:
    """True if every gradient of ``params`` (or ``grads[p]``) is dense and has a finite sum.

    A NaN or inf element makes its tensor's sum NaN or inf, so finite sums prove finite tensors: one
    sum per tensor (the cheapest full reduction: ``isfinite`` or a max-abs norm are 8–12× slower on
    CPU) and one host synchronisation per device. When it says False (a non-finite element, or a
    rare float overflow of a sum) the caller walks the tensors one by one to name the culprit
    (``MARS._check_group_gradients``), which looks closer before it raises.
    """
    gs = [p.grad if grads is None else grads.get(p) for p in params]
    gs = [g for g in gs if g is not None]
    if any(g.is_sparse for g in gs):
        return False
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in gs:
        if g.numel() > 0:
            by_device.setdefault(g.device, []).append(g)
    for tensors in by_device.values():
        sums = torch.stack([g.sum().float() for g in tensors])
        if not bool(torch.isfinite(sums).all()):
            return False
    return True


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


def _segments(sizes: list[int], limit: int | None) -> list[list[int]]:
    """Consecutive runs of tensor indices of about ``limit`` elements (all in one run if ``None``)."""
    if limit is None:
        return [list(range(len(sizes)))] if sizes else []
    runs, current, filled = [], [], 0
    for i, n in enumerate(sizes):
        if current and filled + n > limit:
            runs.append(current)
            current, filled = [], 0
        current.append(i)
        filled += n
    if current:
        runs.append(current)
    return runs


# ---------------------------------------------------------------------------------------- the step


def begin_step(opt, group: dict) -> tuple[list[Tensor], list[Tensor]]:
    """State (as the readable step creates it) and step counts for the tensors with a gradient;
    returns them split into (MARS path, AdamW fallback). ``x_prev`` is allocated here and filled by
    the step (the readable step clones ``x`` instead)."""
    from .optimizer import _on_mars_path  # the readable module imports this one lazily

    on_path: list[Tensor] = []
    fallback: list[Tensor] = []
    for p in group["params"]:
        if p.grad is None:
            continue
        state = opt.state[p]
        if len(state) == 0:
            opt._init_state(p, group)
        state["step"] += 1
        if group["exact"] and "x_prev" not in state:
            state["x_prev"] = torch.empty_like(p, memory_format=torch.preserve_format)
        (on_path if _on_mars_path(p, group) else fallback).append(p)
    return on_path, fallback


def step_group(opt, group: dict, g_prev_exact: dict[Tensor, Tensor]) -> None:
    """One MARS step for one parameter group, grouped: the same result as ``opt._step_group(group, …)``."""

    beta1, _ = group["betas"]
    exact = group["exact"]
    on_path, fallback = begin_step(opt, group)

    if fallback:
        _adamw_fallback(opt, group, fallback)
    if not on_path:
        return

    # g_prev: the previous step's gradient (approx) or ∇f(x_{t−1}, ξ_t) (exact; zero at step 1)
    if exact:
        g_prevs = [g_prev_exact[p] if p in g_prev_exact else torch.zeros_like(p.grad) for p in on_path]
    else:
        g_prevs = [opt.state[p]["g_prev"] for p in on_path]
    # 1. correction  c_t = g_t + s·(g_t − g_prev),  s = γ·β1/(1−β1)
    weight = correction_scale(group["gamma"], beta1)

    sizes = [p.numel() for p in on_path]
    cpu = on_path[0].device.type == "cpu"
    if group["clip"] == "global" or not cpu:
        segments = _segments(sizes, None)
    else:
        segments = _segments(sizes, SEGMENT_ELEMENTS)
    global_scale = None
    if group["clip"] == "global":
        global_scale = _global_clip_scale(on_path, g_prevs, weight, group["max_norm"])
    for seg in segments:
        ps = [on_path[i] for i in seg]
        gps = [g_prevs[i] for i in seg]
        # 2. clip  c_t ← c_t · min(1, τ/‖c_t‖): one scale per tensor, kept on the device
        if group["clip"] == "tensor":
            scales = [(group["max_norm"] / n).clamp_(max=1.0) for n in _correction_norms(ps, gps, weight)]
        elif group["clip"] == "global":
            scales = [global_scale.to(p.dtype) for p in ps]
        else:
            scales = None
        _update(opt, group, ps, gps, weight, scales)


def _correction(g: list[Tensor], gp: list[Tensor], scale: float) -> list[Tensor]:
    """c_t = g_t + s·(g_t − g_prev) in per-wave temporaries, with the kernels of ``storm_correction``."""
    return torch._foreach_add(g, torch._foreach_sub(g, gp), alpha=scale)


def _correction_norms(ps: list[Tensor], gps: list[Tensor], scale: float) -> list[Tensor]:
    """‖c_t‖₂ of each tensor, computed wave by wave (``c_t`` is never stored whole)."""
    gs = [p.grad for p in ps]
    chunk_norms: list[list[Tensor]] = [[] for _ in ps]
    for pieces in _waves(ps, [gs, gps], _wave_size(ps)):
        c = _correction(_take(gs, pieces), _take(gps, pieces), scale)
        for (i, _), n in zip(pieces, torch._foreach_norm(c), strict=True):
            chunk_norms[i].append(n)
    return [ns[0] if len(ns) == 1 else torch.linalg.vector_norm(torch.stack(ns)) for ns in chunk_norms]


def _global_clip_scale(ps, gps, weight: float, max_norm: float) -> Tensor:
    """``min(1, τ / ‖(c_1, …, c_n)‖₂)``, the norm accumulated in float64 as ``clip_by_global_norm`` does."""
    norms = _correction_norms(ps, gps, weight)
    total = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]))
    return (max_norm / total).clamp_(max=1.0)


def _update(opt, group, ps, gps, scale, clip_scales) -> None:
    """Correction (recomputed), clip, momentum, preconditioner, decay + step, wave by wave.

    Each grouped kernel is the one the readable path calls on the whole tensor (``add`` with
    ``alpha``, ``mul_``/``add_`` for the averages, ``sqrt``/``div``/``add_``/``mul_`` for AdamW's
    denominator, …), so an element gets the same float operations in the same order: the two paths
    differ only where a norm is summed in another order (tensors split across waves).
    """
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    exact = group["exact"]
    precond = group["preconditioner"]
    states = [opt.state[p] for p in ps]
    # which branch: AdamW (also non-2-D tensors of MARS-Shampoo), Lion, or 2-D Shampoo
    kinds = [
        "lion" if precond == "lion" else "shampoo" if precond == "shampoo" and p.ndim == 2 else "adamw"
        for p in ps
    ]
    gs = [p.grad for p in ps]
    ms = [s["m"] for s in states]
    vs = [s.get("v") for s in states]
    xs = [s["x_prev"] for s in states] if exact else None
    for kind in ("adamw", "lion", "shampoo"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        P = [ps[i] for i in idx]
        G, GP, M = [gs[i] for i in idx], [gps[i] for i in idx], [ms[i] for i in idx]
        V = [vs[i] for i in idx] if kind == "adamw" else None
        X = [xs[i] for i in idx] if exact else None
        S = [clip_scales[i] for i in idx] if clip_scales is not None else None
        steps = [states[i]["step"] for i in idx]
        companions = [G, GP, M] + ([V] if V else []) + ([X] if X else [])
        for pieces in _waves(P, companions, _wave_size(P)):
            p, g, gp, m = _take(P, pieces), _take(G, pieces), _take(GP, pieces), _take(M, pieces)
            # 1. c_t = g_t + s·(g_t − g_prev)   (in a per-wave temporary)
            c = _correction(g, gp, scale)
            # 2. c_t ← c_t · min(1, τ/‖c_t‖)
            if S is not None:
                torch._foreach_mul_(c, [S[i] for i, _ in pieces])
            # 3. m_t = β1·m_{t−1} + (1−β1)·c_t
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, c, alpha=1.0 - beta1)
            if exact:  # the previous point x_{t−1} for the next step
                torch._foreach_copy_(_take(X, pieces), p)
            else:  # the next step's g_prev (a copy, never a reference to p.grad)
                torch._foreach_copy_(gp, g)
            if kind == "shampoo":
                continue  # Newton–Schulz needs the whole momentum: below, per tensor
            if kind == "lion":
                # 4. u_t = sign(m_t)
                u = torch._foreach_sign(m)
            else:
                # 4. v_t = β2·v + (1−β2)·c_t²;  u_t = m_t / ((√v_t/√(1−β2^t) + ε)(1−β1^t))
                v = _take(V, pieces)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, c, c, 1.0 - beta2)
                u = _adam_direction(m, v, [steps[i] for i, _ in pieces], beta1, beta2, eps)
            # 5. x_{t+1} = x_t − η·(λ·x_t + u_t)
            _decoupled_step(p, u, lr, wd)
        if kind == "shampoo":
            # 4. u_t = NS(m_t/(1−β1))·√max(1, rows/cols);  5. as above   (per tensor, as the readable path)
            for p, m in zip(P, M, strict=True):
                u = newton_schulz(m / (1.0 - beta1), group["ns_steps"], group["eps"], group["ns_dtype"])
                u = u * shampoo_scale(p.shape)
                _decoupled_step([p], [u], lr, wd)


def _adam_direction(m, v, steps, beta1, beta2, eps) -> list[Tensor]:
    """u = m / ((√v/√(1−β2^t) + ε)·(1−β1^t)), the denominator in a per-wave temporary."""
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, [1.0 - beta1**t for t in steps])
    return torch._foreach_div(m, denom)


def _decoupled_step(p, u, lr, wd) -> None:
    """x ← x − η·(λ·x + u), in place (``u`` is a temporary and is overwritten)."""
    if wd != 0.0:
        torch._foreach_add_(u, p, alpha=wd)
    torch._foreach_add_(p, u, alpha=-lr)


def _adamw_fallback(opt, group: dict, ps: list[Tensor]) -> None:
    """Plain AdamW on the raw g_t for tensors off the MARS path (betas_1d, weight_decay_1d, lr·lr_1d/base_lr)."""
    beta1, beta2 = group["betas_1d"]
    lr, wd, eps = fallback_lr(group["lr"], group["lr_1d"], group["base_lr"]), group["weight_decay_1d"], group["eps"]
    states = [opt.state[p] for p in ps]
    G, M, V = [p.grad for p in ps], [s["m"] for s in states], [s["v"] for s in states]
    X = [s["x_prev"] for s in states] if group["exact"] else None
    steps = [s["step"] for s in states]
    for pieces in _waves(ps, [G, M, V] + ([X] if X else []), _wave_size(ps)):
        p, g, m, v = _take(ps, pieces), _take(G, pieces), _take(M, pieces), _take(V, pieces)
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1.0 - beta2)
        if X is not None:
            torch._foreach_copy_(_take(X, pieces), p)
        u = _adam_direction(m, v, [steps[i] for i, _ in pieces], beta1, beta2, eps)
        _decoupled_step(p, u, lr, wd)
