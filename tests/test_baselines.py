"""Reductions and baselines: MARS at γ = 0 is its base optimizer; Lion and Muon against independent
implementations (a naive Lion written here, ``torch.optim.AdamW``, ``torch.optim.Muon``)."""

from __future__ import annotations

import pytest
import torch
from helpers import single_steps_vs_torch_muon
from torch import nn

from mars_ref import MARS, Lion, Muon

F64 = torch.float64


def _problem():
    g = torch.Generator().manual_seed(4321)
    X = torch.randn(40, 5, generator=g, dtype=F64)
    Y = torch.randn(40, 3, generator=g, dtype=F64)
    batches = [torch.randperm(40, generator=g)[:8] for _ in range(50)]  # a different minibatch each step
    return X, Y, batches


X_DATA, Y_DATA, BATCHES = _problem()


def _mlp(seed=0):
    """Tiny MLP with biases and a LayerNorm: 2-D and 1-D tensors."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).to(F64)
    with torch.no_grad():
        model[2].weight.add_(0.1 * torch.randn(8, dtype=F64))
        model[2].bias.add_(0.1 * torch.randn(8, dtype=F64))
    return model


def _train_together(model_a, opt_a, model_b, opt_b, steps=50, tol=1e-12):
    """Step both on the same minibatches; assert the parameters agree to ``tol`` after every step."""
    for t in range(steps):
        idx = BATCHES[t]
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            ((model(X_DATA[idx]) - Y_DATA[idx]) ** 2).mean().backward()
            opt.step()
        diff = max((p - q).abs().max().item() for p, q in zip(model_a.parameters(), model_b.parameters(),
                                                               strict=True))
        assert diff < tol, f"step {t + 1}: max |Δx| = {diff:.3e}"
    start = _mlp().parameters()
    moved = max((p - q).abs().max().item() for p, q in zip(model_a.parameters(), start, strict=True))
    assert moved > 1e-2  # the comparison is not vacuous


# ---------------------------------------------------------------------------- AdamW


def test_mars_at_gamma_zero_is_adamw():
    """γ = 0, clip="none", optimize_1d=True: MARS-AdamW is torch.optim.AdamW (float64, 50 steps, 1e-12)."""
    a, b = _mlp(), _mlp()
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    mars = MARS(a.parameters(), gamma=0.0, clip="none", optimize_1d=True, **hp)
    adamw = torch.optim.AdamW(b.parameters(), **hp)
    _train_together(a, mars, b, adamw)


def test_1d_fallback_is_adamw_with_1d_settings():
    """Tensors off the MARS path run AdamW(lr_1d, betas_1d, weight_decay_1d), whatever γ, lr, wd say."""

    class NormOnly(nn.Module):  # only 1-D parameters
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(5)
            proj = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
            self.register_buffer("proj", proj)

        def forward(self, x):
            return self.norm(x) @ self.proj

    a, b = NormOnly().to(F64), NormOnly().to(F64)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.add_(0.3 * torch.randn_like(p))
            q.copy_(p)
    mars = MARS(a.parameters(), lr=5e-2, weight_decay=0.5, gamma=0.3, eps=1e-7,
                lr_1d=2e-2, betas_1d=(0.85, 0.97), weight_decay_1d=0.2)
    adamw = torch.optim.AdamW(b.parameters(), lr=2e-2, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.2)
    for t in range(30):
        idx = BATCHES[t]
        for model, opt in ((a, mars), (b, adamw)):
            opt.zero_grad()
            ((model(X_DATA[idx]) - Y_DATA[idx]) ** 2).mean().backward()
            opt.step()
        pairs = zip(a.parameters(), b.parameters(), strict=True)
        assert max((p - q).abs().max().item() for p, q in pairs) < 1e-12


# ---------------------------------------------------------------------------- Lion


class NaiveLion:
    """Lion (Chen et al., 2023, Algorithm 2), transcribed: c = β1 m + (1−β1) g; x ← x − η(sign(c) + λx);
    m ← β2 m + (1−β2) g."""

    def __init__(self, params, lr, betas, weight_decay):
        self.params, self.lr, self.betas, self.wd = list(params), lr, betas, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            g = p.grad
            c = b1 * self.m[i] + (1 - b1) * g
            p.copy_(p - self.lr * (torch.sign(c) + self.wd * p))
            self.m[i] = b2 * self.m[i] + (1 - b2) * g


def test_lion_matches_naive_transcription():
    a, b = _mlp(), _mlp()
    lion = Lion(a.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    naive = NaiveLion(b.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    _train_together(a, lion, b, naive)


def test_mars_lion_at_gamma_zero_is_lion_with_equal_betas():
    """γ = 0, clip="none": MARS-Lion is Lion with β1 = β2 (its β2 is unused)."""
    a, b = _mlp(), _mlp()
    mars = MARS(a.parameters(), lr=1e-3, betas=(0.9, 0.5), weight_decay=0.1, gamma=0.0, clip="none",
                preconditioner="lion", optimize_1d=True)
    lion = Lion(b.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.1)
    _train_together(a, mars, b, lion)


def test_lion_rejects_bad_input():
    p = [nn.Parameter(torch.zeros(2))]
    for kwargs, match in ((dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
                          (dict(weight_decay=-1.0), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            Lion(p, **kwargs)


# ---------------------------------------------------------------------------- Muon

SHAPES = [(32, 32), (64, 16), (16, 64)]  # square, tall (lr factor 2), wide


def _muon_single_steps(make_ours, steps=10):
    """Ours beside torch.optim.Muon(adjust_lr_fn="original"), re-synchronised every step (tests/helpers.py)."""
    return single_steps_vs_torch_muon(make_ours, SHAPES, "momentum_buffer", steps, adjust_lr_fn="original")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_matches_torch_muon_on_2d_tensors():
    """mars_ref.Muon vs torch.optim.Muon(adjust_lr_fn="original"), float32 parameters, per step.

    torch always runs Newton–Schulz in bfloat16, grouped as X ← aX + (bA + cA²)X with the norm
    clamped at ε; ours is X ← aX + bAX + cA(AX) with ε added. These are equal in exact arithmetic,
    so the updates differ only by bfloat16 rounding (unit roundoff 2⁻⁸ ≈ 0.004, amplified by the five
    iterations, a ≈ 3.4). Measured: relative Frobenius distance of the updates ≤ 0.038 (ours in
    bf16) and ≤ 0.021 (ours in float64, i.e. torch's own bf16 error); asserted ≤ 0.06 and ≤ 0.035.
    A real difference is far larger: without Nesterov the distance is ≈ 0.68, a wrong shape factor
    on the tall matrix gives 0.5. Momentum buffers agree to float32 rounding (asserted ≤ 1e-6).
    """
    hp = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    upd, buf = _muon_single_steps(lambda ps: Muon(ps, **hp))
    assert upd <= 0.06 and buf <= 1e-6
    upd64, _ = _muon_single_steps(lambda ps: Muon(ps, ns_dtype=F64, **hp))
    assert upd64 <= 0.035
    # the bound discriminates: a different algorithm (no Nesterov) fails it by an order of magnitude
    upd_plain, _ = _muon_single_steps(lambda ps: Muon(ps, nesterov=False, **hp), steps=3)
    assert upd_plain > 0.3


def test_muon_1d_fallback_is_adamw():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3, dtype=F64)), nn.Parameter(torch.randn(4, dtype=F64))
    b_ref = nn.Parameter(b.detach().clone())
    muon = Muon([w, b], lr=0.02, lr_1d=3e-3, betas_1d=(0.9, 0.95), eps_1d=1e-8, weight_decay_1d=0.1)
    adamw = torch.optim.AdamW([b_ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grad = torch.randn(4, generator=g, dtype=F64)
        w.grad, b.grad, b_ref.grad = torch.randn(4, 3, generator=g, dtype=F64), grad.clone(), grad.clone()
        muon.step()
        adamw.step()
        assert (b - b_ref).abs().max() < 1e-12
