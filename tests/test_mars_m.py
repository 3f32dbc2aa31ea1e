"""MARS-M (``MARS(preconditioner="muon")``; Liu, Yuan, Gu, arXiv 2510.21800) against a naive float64 transcription
of the update the authors' ``MARS_M/optimizers/mars_m.py`` computes (written below from its equations, plain
elementwise math, never calling ``mars_ref``), its reduction at γ = 0 to the Muon it is built on
(``torch.optim.Muon`` without Nesterov, ``adjust_lr_fn="match_rms_adamw"``), the foreach step, and bad input.

The authors' update, per 2-D ("Muon") tensor, with k = γ·μ/(1−μ):
    c = g + k·(g − g_prev);  c ← c/‖c‖ if ‖c‖ > 1 (always: their ``clip_c`` flag is read nowhere)
    b ← μ·b + (1−μ)·c;  O = NS_5(b) (quintic, X/(‖X‖+1e-7) first, the wide orientation)
    x ← x·(1 − η·λ) − η·0.2·√max(rows, cols)·O
and AdamW for the others (their "AdamW backup": same η and λ, ε added *before* the bias corrections):
    m ← lerp(m, g, 1−β1);  v ← lerp(v, g², 1−β2);  x ← x·(1 − η·λ) − η·√(1−β2^t)/(1−β1^t) · m/(√v + ε)
Approx mode: g_prev = the previous step's g. Exact mode (as the paper defines it; their training script's protocol
is harder to read): g_prev = ∇f(x_{t−1}, ξ_t). Step 1: g_prev = 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import single_steps_vs_torch_muon
from torch import nn

from mars_ref import MARS

F64 = torch.float64
A, B, C = 3.4445, -4.7750, 2.0315


def naive_ns(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The authors' zeropower_via_newtonschulz5, in float64."""
    X = G.clone()
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X = X / (torch.sqrt((X * X).sum()) + 1e-7)
    for _ in range(steps):
        Agram = X @ X.T
        X = A * X + (B * Agram + C * Agram @ Agram) @ X
    return X.T if tall else X


class NaiveMarsM:
    """The update above, one dict of state per tensor; ``muon`` tensors and ``adamw`` tensors."""

    def __init__(self, muon, adamw, lr, wd, mu, gamma, betas_1d=(0.9, 0.95), eps=1e-8):
        self.muon, self.adamw = muon, adamw
        self.lr, self.wd, self.mu, self.k, self.betas, self.eps = lr, wd, mu, gamma * mu / (1 - mu), betas_1d, eps
        self.state = {id(p): {} for p in muon + adamw}

    @torch.no_grad()
    def step(self, grads: dict, g_prev_exact: dict | None = None):
        for p in self.muon:
            g, st = grads[id(p)], self.state[id(p)]
            if g_prev_exact is not None:
                g_prev = g_prev_exact.get(id(p), torch.zeros_like(g))
            else:
                g_prev = st.get("last", torch.zeros_like(g))
            c = g + self.k * (g - g_prev)
            norm = math.sqrt(float((c * c).sum()))
            if norm > 1:
                c = c / norm
            st["b"] = self.mu * st.get("b", torch.zeros_like(g)) + (1 - self.mu) * c
            O = naive_ns(st["b"])
            scale = 0.2 * math.sqrt(max(p.shape))
            p.copy_(p * (1 - self.lr * self.wd) - self.lr * scale * O)
            st["last"] = g.clone()
        b1, b2 = self.betas
        for p in self.adamw:
            g, st = grads[id(p)], self.state[id(p)]
            st["t"] = st.get("t", 0) + 1
            m = st.get("m", torch.zeros_like(g))
            v = st.get("v", torch.zeros_like(g))
            st["m"] = m + (1 - b1) * (g - m)
            st["v"] = v + (1 - b2) * (g * g - v)
            u = st["m"] / (self.eps + torch.sqrt(st["v"]))
            t = st["t"]
            p.copy_(p * (1 - self.lr * self.wd) - self.lr * math.sqrt(1 - b2**t) / (1 - b1**t) * u)


class Net(nn.Module):
    """An "embedding" (2-D, kept on AdamW as the authors do), a tall and a wide matrix, biases."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(6, 5, dtype=F64) * 0.3)
        self.fc1 = nn.Linear(5, 9).double()
        self.fc2 = nn.Linear(9, 3).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(x @ self.emb.T @ self.emb))))


def data():
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(32, 5, generator=g, dtype=F64), torch.randn(32, 3, generator=g, dtype=F64)
    return X, Y, [torch.randperm(32, generator=g)[:8] for _ in range(30)]


def make(seed=0):
    torch.manual_seed(seed)
    net = Net()
    muon = [net.fc1.weight, net.fc2.weight]
    adamw = [net.emb, net.fc1.bias, net.fc2.bias]
    return net, muon, adamw


def grads_at(net, X, Y):
    net.zero_grad()
    nn.functional.mse_loss(net(X), Y).backward()
    return {id(p): p.grad.detach().clone() for p in net.parameters()}


HP = dict(lr=0.02, wd=0.1, mu=0.95, gamma=0.025)


def ours(net, muon, adamw, exact=False, **extra):
    hp = dict(lr=HP["lr"], betas=(HP["mu"], 0.99), gamma=HP["gamma"], weight_decay=HP["wd"], weight_decay_1d=HP["wd"],
              lr_1d=HP["lr"], betas_1d=(0.9, 0.95), eps=1e-8, ns_dtype=F64, exact=exact, preconditioner="muon")
    hp.update(extra)
    return MARS([{"params": muon}, {"params": adamw, "fallback": True}], **hp)


@pytest.mark.parametrize("impl", [{}, {"foreach": True}], ids=["readable", "foreach"])
def test_approx_matches_the_authors_update(impl):
    X, Y, batches = data()
    net_a, muon_a, adamw_a = make()
    net_b, muon_b, adamw_b = make()
    opt = ours(net_a, muon_a, adamw_a, **impl)
    ref = NaiveMarsM(muon_b, adamw_b, HP["lr"], HP["wd"], HP["mu"], HP["gamma"])
    for idx in batches[:20]:
        grads_at(net_a, X[idx], Y[idx])
        opt.step()
        ref.step(grads_at(net_b, X[idx], Y[idx]))
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert (p - q).abs().max().item() < 1e-12


def test_exact_matches_the_authors_update_with_the_previous_point():
    X, Y, batches = data()
    net_a, muon_a, adamw_a = make()
    net_b, muon_b, adamw_b = make()
    opt = ours(net_a, muon_a, adamw_a, exact=True)
    ref = NaiveMarsM(muon_b, adamw_b, HP["lr"], HP["wd"], HP["mu"], HP["gamma"])
    x_prev = None
    for idx in batches[:20]:
        def closure(idx=idx):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net_a(X[idx]), Y[idx])
            loss.backward()
            return loss

        opt.step(closure)
        g_prev = {}
        if x_prev is not None:  # ∇f(x_{t−1}, ξ_t): the same minibatch at the previous point
            now = [p.detach().clone() for p in net_b.parameters()]
            with torch.no_grad():
                for p, x in zip(net_b.parameters(), x_prev, strict=True):
                    p.copy_(x)
            g_prev = grads_at(net_b, X[idx], Y[idx])
            with torch.no_grad():
                for p, x in zip(net_b.parameters(), now, strict=True):
                    p.copy_(x)
        grads = grads_at(net_b, X[idx], Y[idx])
        x_prev = [p.detach().clone() for p in net_b.parameters()]
        ref.step(grads, g_prev)
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert (p - q).abs().max().item() < 1e-12


def test_the_transcription_sees_a_difference():
    """The comparison can fail: without the correction (γ = 0) MARS-M moves away from the authors' update."""
    X, Y, batches = data()
    net_a, muon_a, adamw_a = make()
    net_b, muon_b, adamw_b = make()
    opt = ours(net_a, muon_a, adamw_a, gamma=0.0)
    ref = NaiveMarsM(muon_b, adamw_b, HP["lr"], HP["wd"], HP["mu"], HP["gamma"])
    for idx in batches[:5]:
        grads_at(net_a, X[idx], Y[idx])
        opt.step()
        ref.step(grads_at(net_b, X[idx], Y[idx]))
    assert max((p - q).abs().max().item() for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True)) > 1e-4


SHAPES = [(16, 12), (12, 16), (32, 8)]


def _single_steps(make_ours, steps=6):
    """Ours beside torch.optim.Muon(nesterov=False, adjust_lr_fn="match_rms_adamw"), re-synchronised every step."""
    return single_steps_vs_torch_muon(make_ours, SHAPES, "m", steps, nesterov=False, adjust_lr_fn="match_rms_adamw")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_gamma_zero_is_muon():
    """At γ = 0 without clipping, MARS-M is Muon with an EMA momentum, no Nesterov and Moonlight's scale.
    Newton–Schulz runs in bfloat16 in both, grouped differently (see tests/test_baselines.py for the bound); a
    real difference (the correction on) is an order of magnitude larger."""
    hp = dict(lr=0.02, betas=(0.95, 0.99), weight_decay=0.1, preconditioner="muon", clip="none")
    upd, buf = _single_steps(lambda ps: MARS(ps, gamma=0.0, **hp))
    assert upd <= 0.06 and buf <= 1e-6
    upd64, _ = _single_steps(lambda ps: MARS(ps, gamma=0.0, ns_dtype=F64, **hp))
    assert upd64 <= 0.035
    upd_corrected, _ = _single_steps(lambda ps: MARS(ps, gamma=0.5, **hp), steps=3)
    assert upd_corrected > 0.3


def test_state_is_the_momentum_only():
    p = nn.Parameter(torch.randn(8, 4))
    opt = MARS([p], preconditioner="muon")
    p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(opt.state[p]) == ["g_prev", "m", "step"]


def test_bad_input():
    p = nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match="fused=True.*'adamw' or 'lion', not 'muon'.*use foreach=True"):
        MARS([p], preconditioner="muon", fused=True)
    with pytest.raises(ValueError, match=r"invalid preconditioner='moun'.*'shampoo', 'muon'"):
        MARS([p], preconditioner="moun")
    with pytest.raises(ValueError, match="invalid fallback=1"):
        MARS([p], preconditioner="muon", fallback=1)
    opt = MARS([p], preconditioner="muon")
    p.grad = torch.randn_like(p)
    p.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameter group 0, parameter 0"):
        opt.step()
