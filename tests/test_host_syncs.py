"""A MARS step waits for the device once: one host synchronisation per step (per device) for the finite check of
every group, whatever the number of groups and tensors. Counted on the CPU by the tensor-to-Python conversions a
step makes (``bool``, ``float``, ``int``, ``item``, ``tolist``), each of which is a host synchronisation on a GPU;
the test fails when a step adds one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mars_ref import MARS


@contextlib.contextmanager
def counting_syncs():
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in ("__bool__", "__float__", "__int__", "item", "tolist")}

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _model_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (6,), (5, 8), (5,), (7, 7)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


@pytest.mark.parametrize("kw", [dict(foreach=False), dict(foreach=True), dict(foreach=False, clip="none"),
                                dict(foreach=True, clip="global"), dict(foreach=True, preconditioner="lion"),
                                dict(foreach=False, exact=False, gamma=0.0)],
                         ids=["readable", "foreach", "readable-clip-none", "foreach-global", "foreach-lion", "gamma0"])
def test_one_host_synchronisation_per_step(kw):
    ps = _model_params()
    opt = MARS([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-3}], lr=1e-2, weight_decay=0.1, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        with counting_syncs() as calls:
            opt.step()
        counts.append(len(calls))
        sched.step()
    assert counts == [1, 1, 1, 1], counts


def test_the_counter_sees_a_synchronisation():
    """The counter itself: a step that reads a tensor on the host is seen (else the test above could not fail)."""
    with counting_syncs() as calls:
        bool(torch.ones(()) > 0)
        torch.ones(2).sum().item()
    assert calls == ["__bool__", "item"]
