r"""Baselines for fair comparisons: Lion, and Muon with an AdamW fallback.

AdamW is ``torch.optim.AdamW``. Lion is written here (no well-kept package fits a
reference project's dependency list). Muon is written here too, as one optimizer that
also steps the non-2-D tensors with AdamW (as everyone trains it), so a single object
works with ``torch.optim.lr_scheduler`` and checkpoints; on its 2-D tensors it is
tested equal to ``torch.optim.Muon`` where torch has it (2.9+).
"""

from __future__ import annotations

import torch

from .chain import adamw_update, fallback_lr
from .pieces import decoupled_step, momentum, newton_schulz


class Lion(torch.optim.Optimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math::
        u_t = \mathrm{sign}(β_1 m_{t-1} + (1-β_1) g_t), \qquad
        m_t = β_2 m_{t-1} + (1-β_2) g_t, \qquad
        x_{t+1} = x_t - η(λ x_t + u_t)

    With ``β1 = β2`` the interpolation and the stored average coincide and Lion is
    MARS-Lion at ``γ = 0`` without clipping.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"Lion: invalid lr={lr!r}: must be >= 0")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Lion: invalid betas={betas!r}: must be two numbers in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: invalid weight_decay={weight_decay!r}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["m"] = torch.zeros_like(p)
                m = state["m"]
                #   u_t = sign(β1·m_{t−1} + (1−β1)·g_t)
                u = torch.sign(torch.lerp(p.grad, m, beta1))
                #   m_t = β2·m_{t−1} + (1−β2)·g_t
                m.copy_(momentum(m, p.grad, beta2))
                #   x_{t+1} = x_t − η·(λ·x_t + u_t)
                p.copy_(decoupled_step(p, u, group["lr"], group["weight_decay"]))
        return loss


class Muon(torch.optim.Optimizer):
    r"""Muon (Jordan et al., 2024) on 2-D tensors, AdamW on the others.

    For 2-D tensors, as ``torch.optim.Muon`` with ``adjust_lr_fn="original"``:

    .. math::
        b_t = μ b_{t-1} + (1-μ) g_t, \quad
        M_t = (1-μ) g_t + μ b_t \;(\text{Nesterov}), \quad
        x_{t+1} = x_t(1-ηλ) - η\sqrt{\max(1, r/c)}\,\mathrm{NS}_5(M_t)

    Other tensors: AdamW with ``lr_1d``, ``betas_1d``, ``weight_decay_1d`` (as MARS).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype=torch.bfloat16, eps: float = 1e-7,
                 lr_1d: float = 3e-3, betas_1d=(0.9, 0.95), eps_1d: float = 1e-8, weight_decay_1d: float = 0.1):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("lr_1d", lr_1d),
                            ("weight_decay_1d", weight_decay_1d), ("eps", eps), ("eps_1d", eps_1d)):
            if not value >= 0:
                raise ValueError(f"Muon: invalid {name}={value!r}: must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: invalid momentum={momentum!r}: must be in [0, 1)")
        if not (len(betas_1d) == 2 and all(0.0 <= b < 1.0 for b in betas_1d)):
            raise ValueError(f"Muon: invalid betas_1d={betas_1d!r}: must be two numbers in [0, 1)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, eps=eps, lr_1d=lr_1d,
                        betas_1d=tuple(betas_1d), eps_1d=eps_1d, weight_decay_1d=weight_decay_1d)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if p.ndim == 2:
                    if len(state) == 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    #   b_t = μ·b_{t−1} + (1−μ)·g_t
                    b = state["momentum_buffer"]
                    b.copy_(momentum(b, g, mu))
                    #   M_t = (1−μ)·g_t + μ·b_t  (Nesterov)   or   M_t = b_t
                    M = torch.lerp(g, b, mu) if group["nesterov"] else b
                    u = newton_schulz(M, group["ns_steps"], group["eps"], group["ns_dtype"])
                    lr = group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    #   x ← x(1 − ηλ) − η'·NS(M)
                    p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(u, alpha=-lr)
                else:
                    if len(state) == 0:
                        state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                    state["step"] += 1
                    #   the AdamW fallback, as MARS's (mars_ref.chain): lr · lr_1d / base_lr
                    lr = fallback_lr(group["lr"], group["lr_1d"], group["base_lr"])
                    adamw_update(p, g, state["m"], state["v"], state["step"], lr, *group["betas_1d"],
                                 group["eps_1d"], group["weight_decay_1d"])
        return loss
