"""``torch.compile`` of the foreach step (``MARS(foreach=True).step``): one graph, no graph break, no
recompilation once the first steps have made the changing numbers (step count, scheduled lr) symbolic,
and the same parameters as the eager step. On CPU here; on a GPU this is what fuses the ~15 launches per
tensor of the eager foreach step."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from mars_ref import MARS

SHAPES = [(8, 6), (6,), (5, 8), (7, 7)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _optimizer(params, **kw):
    opt = MARS(params, lr=1e-2, weight_decay=0.1, foreach=True, **kw)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))


@pytest.mark.parametrize("preconditioner", ["adamw", "lion"])
@pytest.mark.parametrize("clip", ["tensor", "global"])
def test_compiled_foreach_step_equals_eager_without_recompiling(preconditioner, clip):
    torch._dynamo.reset()
    pa, pb = _params(), _params()
    eager, eager_lr = _optimizer(pa, preconditioner=preconditioner, clip=clip)
    compiled, compiled_lr = _optimizer(pb, preconditioner=preconditioner, clip=clip)
    counter = CompileCounter()
    step = torch.compile(compiled.step, backend=counter)
    gen = torch.Generator().manual_seed(1)
    frames = []
    for t in range(8):
        for a, b in zip(pa, pb, strict=True):
            a.grad = torch.randn(a.shape, generator=gen) * (3.0 if t % 2 else 0.01)
            b.grad = a.grad.clone()
        eager.step()
        step()
        eager_lr.step()
        compiled_lr.step()
        frames.append(counter.frame_count)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # step 1 creates the state, step 2 sees the first change of t and lr; from then on one graph is reused
    assert frames[2] == frames[-1] <= 3, frames


def test_compiled_foreach_step_has_no_graph_break():
    torch._dynamo.reset()
    params = _params()
    opt, _ = _optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the state exists: what is explained is the step every later call runs
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_eager_step_still_refuses_non_finite_gradients():
    """Only a compiled step trusts its gradients (no host synchronisation inside it); eager raises."""
    params = _params()
    opt, _ = _optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameter group 0, parameter 2"):
        opt.step()


@pytest.mark.parametrize("step_impl,exact,compiled", [("foreach", False, True), ("readable", False, True),
                                                     ("fused", False, False), ("foreach", True, False)])
def test_trainer_compiles_the_optimizer_step(step_impl, exact, compiled):
    """``--compile`` compiles MARS's step where it can (readable, foreach; approx mode), and the compiled step
    trains to the eager one's parameters."""
    from mars_ref.gpt.train import TrainConfig, compile_step

    torch._dynamo.reset()
    cfg = TrainConfig(compile=True, step_impl=step_impl, exact=exact)
    pa, pb = _params(), _params()
    eager = MARS(pa, lr=1e-2, foreach=step_impl == "foreach", fused=step_impl == "fused")
    other = MARS(pb, lr=1e-2, foreach=step_impl == "foreach", fused=step_impl == "fused")
    step = compile_step(other, cfg)
    assert (step != other.step) == compiled
    if exact:
        return
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for a, b in zip(pa, pb, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        eager.step()
        step()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
