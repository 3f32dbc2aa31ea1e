"""``torch.compile`` of MARS's step (``torch.compile(opt.step)``): no recompilation under an lr schedule once the
first steps have run (the scheduled lr enters the compiled step as a tensor), the same parameters as the eager
step, and the hyperparameter checks still run at every step (outside the compiled graphs). On CPU here; on a GPU
this is what fuses the ~15 launches per tensor of the eager foreach step."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from mars_ref import MARS

SHAPES = [(8, 6), (6,), (5, 8), (7, 7)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _optimizer(params, **kw):
    opt = MARS(params, **{"lr": 1e-2, "weight_decay": 0.1, "foreach": True, **kw})
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
    # step 1 creates the state, step 2 sees the first change of t and lr; from then on the same graphs are reused
    assert frames[2] == frames[-1], frames


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "readable"])
def test_compiled_step_under_a_schedule_stops_compiling_after_the_first_steps(foreach):
    """With a real backend (aot_eager) and a LambdaLR that changes lr at every step, the compiled frames stop
    growing after step 3 (no recompilation per step, no fall-back to eager at the recompile limit), and 20 steps
    equal the eager ones."""
    torch._dynamo.reset()
    pa, pb = _params(), _params()
    eager, eager_lr = _optimizer(pa, foreach=foreach)
    compiled, compiled_lr = _optimizer(pb, foreach=foreach)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled.step, backend=counter)
    gen = torch.Generator().manual_seed(1)
    frames = []
    for _ in range(20):
        for a, b in zip(pa, pb, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        eager.step()
        step()
        eager_lr.step()
        compiled_lr.step()
        frames.append(counter.frame_count)
    assert frames[2] == frames[-1], frames
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, value", [("lr", float("nan")), ("lr", -1.0), ("weight_decay", -5.0)])
def test_compiled_step_still_checks_the_hyperparameters(name, value):
    """A group edited after compiling (as a scheduler or a user does) is checked at the next step: refused with
    the eager step's message, nothing changed."""
    torch._dynamo.reset()
    params = _params()
    opt, _ = _optimizer(params)
    step = torch.compile(opt.step, backend=CompileCounterWithBackend("aot_eager"))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=f"invalid {name}="):
        step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


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
