"""The foreach step (``MARS(foreach=True)``, ``optimizer._multi_tensor_mars``) gives the readable step's parameters.

Each test runs two optimizers side by side on two copies of the same parameters with the same
gradients for 20 steps and compares. Tensors below ``foreach.WAVE_ELEMENTS`` go through the same float
operations in the same order on both paths (bit-identical results); a tensor split across waves
gets its clipping norm summed in another order, which moves a parameter by a few float32 ulps
(measured ≤ 1e-6 after 20 steps) and can flip ``sign(m)`` of MARS-Lion where ``m`` is within rounding
of 0 (tested separately below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state, exact_side_by_side, make_params, max_diff, run_side_by_side, set_grads

from mars_ref import optimizer as foreach  # WAVE_ELEMENTS: the foreach step's wave size
from mars_ref.optimizer import MARS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread (bfloat16 matmuls with 2 threads on a loaded 2-core machine take ~100× longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FOREACH = dict(foreach=True)


def _run(kw, **options):
    return run_side_by_side(kw, FOREACH, **options)


@pytest.mark.parametrize("preconditioner", ["adamw", "lion", "shampoo"])
@pytest.mark.parametrize("clip", ["tensor", "global", "none"])
@pytest.mark.parametrize("optimize_1d", [False, True])
def test_same_parameters_as_readable(preconditioner, clip, optimize_1d):
    kw = dict(lr=1e-2, preconditioner=preconditioner, clip=clip, optimize_1d=optimize_1d, weight_decay=0.1)
    pa, pb, A, B = _run(kw)
    assert max_diff(pa, pb) <= 1e-6  # measured: 0 (tensors of one wave take the same float operations)
    assert_same_state(A, B, pa, pb)


@pytest.mark.parametrize("preconditioner", ["adamw", "lion", "shampoo"])
@pytest.mark.parametrize("clip", ["tensor", "global"])
def test_exact_mode_same_as_readable(preconditioner, clip):
    pa, pb, oa, ob = exact_side_by_side(FOREACH, preconditioner=preconditioner, clip=clip)
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(oa, ob, pa, pb)
    assert all("x_prev" in ob.state[p] and "g_prev" not in ob.state[p] for p in pb)


# the fused path (tests/test_fused.py) keeps state equal to rounding, not to the bit
PATHS = {"foreach": (dict(foreach=True), {}), "fused": (dict(fused=True), dict(atol=1e-6, rtol=1e-6))}


@pytest.mark.parametrize("path", PATHS)
def test_groups_weight_decay_and_missing_grads(path):
    """The foreach and fused steps: three groups with different settings, some steps without a gradient."""
    flags, state_tol = PATHS[path]
    groups = [
        ([0, 1], dict(lr=2e-2, weight_decay=0.3, clip="global", gamma=0.05)),
        ([2, 3], dict(lr=5e-3, preconditioner="lion", betas=(0.9, 0.98), lr_1d=1e-3)),
        ([4], dict(weight_decay_1d=0.0, betas_1d=(0.8, 0.9), clip="none")),
    ]
    pa, pb, A, B = run_side_by_side(dict(lr=1e-2), flags, groups=groups, skip_every=3)
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(A, B, pa, pb, **state_tol)
    assert A.state[pa[0]]["step"] < 20  # some steps had no gradient for that tensor


def test_mixed_groups_readable_and_foreach():
    """foreach is per group: a group on each path in one optimizer equals the readable optimizer."""
    pa, pb = make_params(), make_params()
    A = MARS(pa, lr=1e-2)
    B = MARS([dict(params=pb[:2], foreach=True), dict(params=pb[2:])], lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for t in range(10):
        set_grads([pa, pb], t, gen)
        A.step()
        B.step()
    assert max_diff(pa, pb) <= 1e-6


@pytest.mark.parametrize("preconditioner", ["adamw", "lion", "shampoo"])
def test_tensors_split_across_waves(monkeypatch, preconditioner):
    """Big tensors are cut into chunks: only the summation order of the clipping norm changes."""
    monkeypatch.setattr(foreach, "WAVE_ELEMENTS", 50)
    shapes = [(40, 30), (30,), (23, 17), (5, 3, 4), (9, 9)]
    for clip in ("tensor", "global", "none"):
        # Newton–Schulz in float32: in bfloat16 (the default) an ulp of m can cross a bfloat16 rounding
        # boundary and move the update by ~1e-4 (measured 3e-4 after 20 steps at lr 1e-2)
        kw = dict(lr=1e-2, preconditioner=preconditioner, clip=clip, optimize_1d=True, weight_decay=0.1,
                  ns_dtype=None)
        pa, pb, A, B = _run(kw, shapes=shapes)
        if preconditioner == "lion":
            # m agrees to rounding; sign(m) may flip where |m| is within rounding of 0 (a 2·lr move)
            for a, b in zip(pa, pb, strict=True):
                torch.testing.assert_close(A.state[a]["m"], B.state[b]["m"], rtol=1e-5, atol=1e-7)
                flipped = (a - b).abs() > 1e-6
                assert flipped.float().mean() <= 0.01
        else:
            assert max_diff(pa, pb) <= 1e-6


def test_state_dict_moves_between_paths():
    kw = dict(lr=1e-2, weight_decay=0.1)
    pa, pb = make_params(), make_params()
    A, B = MARS(pa, **kw), MARS(pb, foreach=True, **kw)
    gen = torch.Generator().manual_seed(2)
    for t in range(20):
        if t == 7:  # swap: each path resumes from the other's checkpoint, keeping its own foreach
            sa, sb = A.state_dict(), B.state_dict()
            A, B = MARS(pa, **kw), MARS(pb, foreach=True, **kw)
            A.load_state_dict(sb)
            B.load_state_dict(sa)
            assert not A.param_groups[0]["foreach"] and B.param_groups[0]["foreach"]
        set_grads([pa, pb], t, gen)
        A.step()
        B.step()
    assert max_diff(pa, pb) <= 1e-6
    assert_same_state(A, B, pa, pb)


@pytest.mark.parametrize("path,preconditioner,per_param", [
    ("foreach", "adamw", 12), ("foreach", "lion", 8), ("foreach", "shampoo", 8), ("fused", "adamw", 12),
    ("fused", "lion", 8)])
def test_state_bytes_per_parameter(path, preconditioner, per_param):
    p = torch.randn(64, 32, requires_grad=True)
    opt = MARS([p], preconditioner=preconditioner, **PATHS[path][0])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    assert nbytes == per_param * p.numel()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("clip", ["tensor", "none"])
def test_non_finite_gradient_raises_and_updates_nothing(path, bad, clip):
    """Every group is checked before any is updated: a NaN in the last group leaves the first untouched
    (the fused path's check is its first pass, which also computes the clipping norm)."""
    pa, pb = make_params(), make_params()
    A = MARS([dict(params=pa[:2]), dict(params=pa[2:])], lr=1e-2, clip=clip)
    B = MARS([dict(params=pb[:2]), dict(params=pb[2:])], lr=1e-2, clip=clip, **PATHS[path][0])
    gen = torch.Generator().manual_seed(2)
    set_grads([pa, pb], 0, gen)
    A.step()
    B.step()
    set_grads([pa, pb], 1, gen)
    pa[3].grad[2, 5] = bad
    pb[3].grad[2, 5] = bad
    before = [p.detach().clone() for p in pb]
    state_before = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in B.state[p].items()} for p in pb}
    messages = []
    for opt in (A, B):
        with pytest.raises(FloatingPointError) as info:
            opt.step()
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "parameter group 1, parameter 1" in messages[1]
    assert all(torch.equal(a, b) for a, b in zip(before, pb, strict=True))
    for p in pb:
        for k, v in B.state[p].items():
            assert torch.equal(v, state_before[p][k]) if torch.is_tensor(v) else v == state_before[p][k]


def test_foreach_is_validated():
    with pytest.raises(ValueError, match="foreach"):
        MARS([torch.zeros(2, 2, requires_grad=True)], foreach="yes")
    opt = MARS([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="foreach"):
        opt.add_param_group(dict(params=[torch.zeros(3, requires_grad=True)], foreach=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("preconditioner", ["adamw", "lion", "shampoo"])
def test_cuda_same_as_readable(preconditioner):
    pa = [p.detach().cuda().requires_grad_() for p in make_params()]
    pb = [p.detach().cuda().requires_grad_() for p in make_params()]
    kw = dict(lr=1e-2, preconditioner=preconditioner, weight_decay=0.1)
    A, B = MARS(pa, **kw), MARS(pb, foreach=True, **kw)
    gen = torch.Generator().manual_seed(2)
    for t in range(20):
        grads = [torch.randn(p.shape, generator=gen).cuda() * (3.0 if t % 2 else 0.01) for p in pa]
        for a, b, g in zip(pa, pb, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        A.step()
        B.step()
    # on CUDA the grouped kernels may round differently from the per-tensor ones (fused foreach)
    if preconditioner == "lion":
        for a, b in zip(pa, pb, strict=True):
            torch.testing.assert_close(A.state[a]["m"], B.state[b]["m"], rtol=1e-5, atol=1e-7)
    else:
        assert max_diff(pa, pb) <= 1e-5


def test_benchmark_smoke():
    """benchmarks/step_time.py --small runs and prints its table (times are printed, never asserted)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--small", "--repeats", "1", "--warmup", "0",
         "--no-shampoo"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "| MARS-AdamW foreach |" in out.stdout and "× fused AdamW" in out.stdout
    assert "| MARS-AdamW fused |" in out.stdout and "| memory traffic only: MARS-AdamW's 11 arrays |" in out.stdout
    assert "MARS-AdamW fused / torch AdamW fused: median" in out.stdout
