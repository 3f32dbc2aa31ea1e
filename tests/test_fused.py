"""The fused CPU step (``MARS(fused=True)``, :mod:`mars_ref.fused`, ``mars_ref/fused.c``).

(Mixed groups with missing gradients, the state size and non-finite gradients are tested for both
fast paths in tests/test_foreach.py.)

Each comparison runs the readable optimizer and the fused one side by side on two copies of the same
float32 parameters with the same gradients for 20 steps. The C loop computes each element with the
same operations as the readable chain, but the compiler may fuse a multiply and an add, and the
clipping norm is summed in another order: the parameters agree to float32 rounding (≤ 1e-6 asserted).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import assert_same_state, exact_side_by_side, make_params, max_diff, run_side_by_side, set_grads

from mars_ref import fused
from mars_ref.optimizer import MARS

FUSED = dict(fused=True)
STATE_TOL = dict(atol=1e-6, rtol=1e-6)  # v ~ c² reaches ~10 here: a few float32 ulps of it exceed 1e-6


@pytest.mark.parametrize("preconditioner", ["adamw", "lion"])
@pytest.mark.parametrize("clip", ["tensor", "global", "none"])
@pytest.mark.parametrize("optimize_1d", [False, True])
def test_same_parameters_as_readable(preconditioner, clip, optimize_1d):
    kw = dict(lr=1e-2, preconditioner=preconditioner, clip=clip, optimize_1d=optimize_1d, weight_decay=0.1)
    pa, pb, A, B = run_side_by_side(kw, FUSED)
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(A, B, pa, pb, **STATE_TOL)
    assert max_diff(pa, make_params()) > 1e-2  # and the parameters did move


@pytest.mark.parametrize("preconditioner", ["adamw", "lion"])
@pytest.mark.parametrize("clip", ["tensor", "global", "none"])
def test_exact_mode_same_as_readable(preconditioner, clip):
    pa, pb, oa, ob = exact_side_by_side(FUSED, preconditioner=preconditioner, clip=clip)
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(oa, ob, pa, pb, **STATE_TOL)
    assert all("x_prev" in ob.state[p] and "g_prev" not in ob.state[p] for p in pb)


def test_big_tensors_many_blocks_and_lr_schedule():
    """Tensors of many 8192-element blocks (the norm is a sum of block sums), with a LambdaLR schedule."""
    shapes = [(300, 257), (70001,), (129, 65)]
    pa, pb = make_params(shapes), make_params(shapes)
    A = MARS(pa, lr=3e-3, weight_decay=0.1, optimize_1d=True)
    B = MARS(pb, lr=3e-3, weight_decay=0.1, optimize_1d=True, fused=True)
    sa, sb = (torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9**k) for o in (A, B))
    gen = torch.Generator().manual_seed(2)
    for t in range(20):
        set_grads([pa, pb], t, gen)
        A.step()
        B.step()
        sa.step()
        sb.step()
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(A, B, pa, pb, **STATE_TOL)


def test_same_numbers_with_one_or_two_threads():
    """The block sums are added in index order, so the thread count does not change a bit."""
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, pb, _, _ = run_side_by_side(dict(lr=1e-2), FUSED, shapes=[(300, 257), (64, 32), (64,)])
            results.append(pb)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_state_dict_moves_between_paths():
    """A checkpoint of one path resumes on another (readable → fused → foreach), each keeping its own flags."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    pa, pb = make_params(), make_params()
    A, B = MARS(pa, **kw), MARS(pb, fused=True, **kw)
    gen = torch.Generator().manual_seed(2)
    for t in range(20):
        if t in (7, 14):
            sa, sb = A.state_dict(), B.state_dict()
            path = dict(fused=True) if t == 7 else dict(foreach=True)
            A, B = MARS(pa, **path, **kw), MARS(pb, **kw)
            A.load_state_dict(sb)
            B.load_state_dict(sa)
            assert A.param_groups[0]["fused"] == (t == 7) and bool(A.param_groups[0]["foreach"]) == (t == 14)
            assert not B.param_groups[0]["fused"] and not B.param_groups[0]["foreach"]
        set_grads([pa, pb], t, gen)
        A.step()
        B.step()
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(A, B, pa, pb, **STATE_TOL)


def test_g_prev_is_a_copy_and_zero_grad_in_place_is_safe():
    """approx mode writes g_t into its own g_prev buffer: zeroing .grad in place changes nothing."""
    runs = []
    for set_to_none in (True, False):
        pa = make_params()
        opt = MARS(pa, lr=1e-2, fused=True)
        gen = torch.Generator().manual_seed(2)
        for _ in range(6):
            opt.zero_grad(set_to_none=set_to_none)
            grads = [torch.randn(p.shape, generator=gen) for p in pa]
            for p, g in zip(pa, grads, strict=True):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            opt.step()
        w = pa[0]
        assert opt.state[w]["g_prev"].data_ptr() != w.grad.data_ptr()
        assert torch.equal(opt.state[w]["g_prev"], w.grad)
        runs.append([p.detach().clone() for p in pa])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ---------------------------------------------------------------------------------------- bad input


def test_huge_finite_gradient_is_not_mistaken_for_inf():
    """Σ c² overflows float32 for |g| ~ 1e20: the fused step recomputes it in float64 instead of raising.

    The clipped correction then has norm 1 and the first AdamW step moves each 2-D entry by exactly lr.
    (The readable path's float32 ``vector_norm`` is inf there, so it clips c to 0 and does not move.)
    """
    p = make_params()[0]
    x0 = p.detach().clone()
    opt = MARS([p], lr=1e-2, fused=True)
    p.grad = torch.full_like(p, 1e20)
    opt.step()
    c = 1e20 * (1 + opt.param_groups[0]["gamma"] * 0.95 / 0.05)
    torch.testing.assert_close(opt.state[p]["m"].double(), torch.full_like(x0, 0.05 * c).double()
                               / (c * x0.numel() ** 0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(p.detach(), x0 - 1e-2, rtol=0, atol=1e-6)


def test_sparse_gradient_gets_the_readable_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MARS(emb.parameters(), fused=True)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*parameter group 0, parameter 0"):
        opt.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(fused=True, foreach=True), "fused=True and foreach=True"),
    (dict(fused=True, preconditioner="shampoo"), "takes preconditioner 'adamw' or 'lion'.*Newton–Schulz"),
    (dict(fused=1), "invalid fused=1"),
])
def test_bad_flags(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MARS([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_parameters_the_kernel_cannot_take_are_refused_at_construction():
    p = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"fused=True\) runs a C loop on CPU float32 tensors; parameter 1 \(parameter "
                                         r"group 0\) is a cpu torch.bfloat16 tensor: use foreach=True"):
        MARS([torch.zeros(2, 2, requires_grad=True), p], fused=True)


def test_tensors_the_kernel_cannot_take_are_named():
    p = torch.zeros(3, 4).t().requires_grad_()  # not contiguous: known only when the step reads it
    opt = MARS([torch.zeros(2, 2, requires_grad=True), p], fused=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"CPU float32 kernel.*parameter group 0, parameter 1 \(shape \(4, 3\)\)"
                                           r".*use foreach=True"):
        opt.step()
    assert torch.equal(p, torch.zeros_like(p))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_refused_with_the_flag_to_use():
    p = torch.zeros(4, 3, device="cuda", requires_grad=True)
    with pytest.raises(ValueError, match="cuda.*use foreach=True"):
        MARS([p], fused=True)


# ---------------------------------------------------------------------------------------- building


def test_compiled_once_and_cached(tmp_path, monkeypatch):
    """A fresh cache folder gets one shared library; a new process loads it without compiling."""
    monkeypatch.setenv("MARS_REF_CACHE", str(tmp_path))
    code = ("import torch; from mars_ref import fused; lib, flags = fused.library(); "
            "print(fused.kernel_dir()); print(' '.join(flags))")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    built = sorted((tmp_path / "kernels").glob("fused_*.so"))
    assert len(built) == 1 and str(tmp_path / "kernels") in first.stdout
    mtime = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert sorted((tmp_path / "kernels").glob("fused_*.so")) == built
    assert built[0].stat().st_mtime_ns == mtime


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="compiles mars_ref/fused.c with a C compiler.*foreach=True"):
        fused._compiler()


def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setenv("MARS_REF_CACHE", str(tmp_path / "cache"))
    fused.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not compile .*broken.c"):
            fused.library()
    finally:
        fused.library.cache_clear()
