r"""The readable MARS step: one tensor at a time, each line under the equation it computes.

For each tensor ``x`` on the MARS path, with ``g_t = ∇f(x_t, ξ_t)`` (``docs/algorithm.md`` §2–§5):

.. math::

    c_t &= g_t + γ \frac{β_1}{1-β_1}(g_t - g_{prev})                     && \text{1. correction} \\
    c_t &← c_t \min(1, τ/‖c_t‖)                                          && \text{2. clip} \\
    m_t &= β_1 m_{t-1} + (1-β_1) c_t                                     && \text{3. momentum} \\
    u_t &= P(m_t)\quad \text{(AdamW, Lion, Shampoo or MARS-M's Muon)}    && \text{4. precondition} \\
    x_{t+1} &= x_t - η(λ x_t + u_t)                                      && \text{5. decay + step}

The clip needs ``‖c_t‖`` of every tensor before any momentum may change (and, for the global
rule, of all of them together), so a step is two passes over the group: :func:`correction_norms`
(pass 1, run for every group by the optimizer before anything changes: a non-finite norm is a
non-finite gradient and refuses the step), then :func:`step` (pass 2). Tensors off the MARS path
take the AdamW fallback on the raw ``g_t`` (:func:`mars_ref.chain.adamw_update`).

This is the teaching text, and the reference the other implementations are tested against:
:mod:`mars_ref.foreach` and :mod:`mars_ref.fused` compute the same step with the same signature.
It allocates a new tensor per link (the pieces are pure functions) and copies the results into
the state; that is its whole cost over the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import chain
from .chain import Settings, Tensors
from .pieces import decoupled_step, momentum, second_moment


def correction_norms(t: Tensors, s: Settings) -> list[Tensor]:
    """Pass 1: ``‖c_t‖`` of each tensor on the MARS path, ``‖g_t‖`` of each fallback tensor (there it is
    only the finite check)."""
    return [torch.linalg.vector_norm(g if b == "fallback" else chain.correction(g, gp, s))
            for g, gp, b in zip(t.grads, t.prev_grads, t.branches, strict=True)]


def step(t: Tensors, s: Settings, clip: list[Tensor]) -> None:
    """Pass 2: the step of every tensor, in place (parameters and state); ``clip[i]`` is tensor i's clip
    factor from :func:`mars_ref.chain.group_clip_factors`."""
    for i, x in enumerate(t.params):
        g, m, v, branch = t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i], t.branches[i]
        if s.exact:  # remember x_t: the next step evaluates its second gradient there
            t.prev_params[i].copy_(x)
        if branch == "fallback":
            chain.adamw_update(x, g, m, v, t.steps[i], s.lr_1d, s.beta1_1d, s.beta2_1d, s.eps, s.weight_decay_1d,
                               s.fallback_eps_first)
            continue
        # 1. correction:  c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)
        c = chain.correction(g, t.prev_grads[i], s)
        # 2. clip:  c_t ← c_t · min(1, τ/‖c_t‖)
        c = c * clip[i]
        if not s.exact:  # the next step's g_prev: a copy of g_t, never a reference to .grad
            t.prev_grads[i].copy_(g)
        # 3. momentum:  m_t = β1·m_{t−1} + (1−β1)·c_t
        m.copy_(momentum(m, c, s.beta1))
        # 4. precondition:  u_t = P(m_t)   (AdamW first updates v_t = β2·v_{t−1} + (1−β2)·c_t²)
        if branch == "adamw":
            v.copy_(second_moment(v, c, s.beta2))
        u = chain.direction(branch, m, v, t.steps[i], x.shape, s)
        # 5. decay + step:  x_{t+1} = x_t − η·(λ·x_t + u_t)
        x.copy_(decoupled_step(x, u, s.lr, s.weight_decay))
