"""Optimizer state dicts written by an earlier ``mars_ref`` (commit 7b9481a) load into ``MARS`` and resume on the
trajectory that code took. ``tests/data/mars_state_7b9481a.pt`` (written by the code of commit
7b9481a with ``tests/data/make_mars_state_fixture.py``, see ``tests/data/README.md``) holds, per configuration,
the parameters and the optimizer's ``state_dict()`` after 3 steps and the parameters that code reached 2 steps
later."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_rounding

from mars_ref import MARS

FIXTURE = Path(__file__).with_name("data") / "mars_state_7b9481a.pt"
SAVED = torch.load(FIXTURE, weights_only=True)


def grads(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * (3.0 if t % 2 else 0.01) for p in ps]


@pytest.mark.parametrize("name", [n for n in SAVED if n != "exact"])
def test_an_old_state_dict_resumes_on_the_old_trajectory(name):
    saved = SAVED[name]
    ps = [p.clone().requires_grad_() for p in saved["params"]]
    kw = dict(saved["kwargs"])
    opt = MARS(ps, lr=1e-2, weight_decay=0.1, **kw)
    opt.load_state_dict(saved["optimizer"])
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["fallback"] is False  # new settings
    for t in range(3, 5):
        for p, g in zip(ps, grads(ps, t), strict=True):
            p.grad = g
        opt.step()
    # The fixture was computed on another machine: equal to rounding (tests/helpers.py), not to the bit. The fused C
    # step (float32, -march=native, its own summation order) is held to float32's rounding over 5 steps.
    for p, q in zip(ps, saved["params_after"], strict=True):
        if name == "fused":
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
        else:
            assert_close_to_rounding(p.detach(), q)


def test_an_old_exact_mode_state_dict_resumes_on_the_old_trajectory():
    saved = SAVED["exact"]
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    Y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    W, b = (p.clone().requires_grad_() for p in saved["params"])
    opt = MARS([W, b], lr=1e-2, exact=True, weight_decay=0.1)
    opt.load_state_dict(saved["optimizer"])
    for t in range(3, 5):
        rows = slice((t % 4) * 8, (t % 4) * 8 + 8)

        def closure(rows=rows):
            opt.zero_grad()
            loss = ((X[rows] @ W.T + b - Y[rows]) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
    for p, q in zip((W, b), saved["params_after"], strict=True):
        assert_close_to_rounding(p.detach(), q)  # another machine's numbers: equal to rounding
