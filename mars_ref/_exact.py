"""Exact MARS's second gradient: ``∇f(x_{t−1}, ξ_t)``, the closure evaluated again on the step's minibatch at the
previous point ``x_{t−1}`` and with the random state the step's first gradient started from (same dropout masks)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


def gradients_at_previous_point(opt, closure, rng) -> dict[Tensor, Tensor]:
    """∇f(x_{t−1}, ξ_t) for every tensor of ``opt`` that has a previous point (state ``x_prev``); afterwards ``x_t``
    and the current gradients ``g_t`` are back in place."""
    previous = [p for group in opt.param_groups for p in group["params"]
                if p.grad is not None and "x_prev" in opt.state[p]]
    if not previous:
        return {}
    grads_now = {p: p.grad.clone() for group in opt.param_groups for p in group["params"] if p.grad is not None}
    with at_previous_point(previous, [opt.state[p]["x_prev"] for p in previous], rng):
        with torch.enable_grad():
            closure()
        g_prev = {p: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for p in previous}
    for p, g in grads_now.items():
        if p.grad is not None and p.grad.shape == g.shape:
            p.grad.copy_(g)  # keeps DDP's bucket views intact
        else:
            p.grad = g
    return g_prev


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
def at_previous_point(params: Sequence[Tensor], prev_params: Sequence[Tensor], rng: tuple | None = None
                      ) -> Iterator[None]:
    """Inside the block each parameter holds its previous value ``x_{t−1}``; with ``rng`` (the random state the
    step's first gradient started from) the random state is that one, so a closure sees the same dropout masks.
    On leaving, ``x_t`` is back and the random state is what it was on entering."""
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
