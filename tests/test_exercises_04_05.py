"""The exercise solutions of notebooks 04 and 05, checked against independent computations."""

import statistics

import pytest
import torch
from helpers import load_solution

import mars_ref
from mars_ref.pieces import newton_schulz, shampoo_direction

nb04, nb05 = load_solution("nb04"), load_solution("nb05")


# --------------------------------------------------------------------------- notebook 04


@pytest.mark.parametrize("shape", [(40, 40), (64, 24), (24, 64)])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_ns_singular_values_match_the_matrix_iteration(shape, steps):
    gen = torch.Generator().manual_seed(steps)
    M = torch.randn(*shape, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -3, shape[1], dtype=torch.float64))
    expected = torch.linalg.svdvals(newton_schulz(M, steps, dtype=torch.float64))
    torch.testing.assert_close(nb04.ns_singular_values(M, steps), expected, rtol=1e-9, atol=1e-12)


def test_steps_to_reach_matches_newton_schulz_on_a_matrix():
    # a 2 x 2 matrix whose small singular value is 1e-6 of its Frobenius norm
    M = torch.diag(torch.tensor([1.0, 1e-6], dtype=torch.float64))
    M = M / torch.linalg.norm(M)
    k = nb04.steps_to_reach(1e-6, 0.5)
    small = [torch.linalg.svdvals(newton_schulz(M, j, eps=0.0, dtype=torch.float64))[-1].item()
             for j in (k - 1, k)]
    assert small[0] < 0.5 <= small[1]
    assert 10 <= k <= 14  # 3.4445^k · 1e-6 ≈ 0.5 at k ≈ 10.7, plus the nonlinear end


@pytest.mark.parametrize("eps", [1e-12, 1e-3, 1.0])
@pytest.mark.parametrize("shape", [(30, 30), (48, 20), (20, 48)])
def test_damped_one_step_shampoo_matches_shampoo_direction(eps, shape):
    gen = torch.Generator().manual_seed(7)
    M = torch.randn(*shape, generator=gen, dtype=torch.float64)
    expected = shampoo_direction(M @ M.T, M.T @ M, M, eps)
    torch.testing.assert_close(nb04.damped_one_step_shampoo(M, eps), expected, rtol=1e-7, atol=1e-9)


def test_damping_suppresses_weak_directions():
    U, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    M = U @ torch.diag(torch.tensor([1.0] * 4 + [1e-4] * 4, dtype=torch.float64))
    s = torch.linalg.svdvals(nb04.damped_one_step_shampoo(M, 1e-4))
    assert torch.allclose(s[:4], torch.ones(4, dtype=torch.float64), atol=1e-3)
    assert (s[4:] < 0.02).all()


# --------------------------------------------------------------------------- notebook 05


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr", [1e-2, 3e-1])  # 3e-1: big steps, so the per-tensor clip is active too
def test_exact_mars_by_hand_matches_mars_exact(lr, weight_decay):
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    batches = [(torch.randn(16, 6, generator=gen, dtype=torch.float64),
                torch.randn(16, 3, generator=gen, dtype=torch.float64)) for _ in range(12)]
    kw = dict(lr=lr, betas=(0.9, 0.99), gamma=0.5, eps=1e-8, weight_decay=weight_decay)
    mine = nb05.exact_mars_adamw_by_hand(W0, batches, **kw)

    W = torch.nn.Parameter(W0.clone())
    opt = mars_ref.MARS([W], exact=True, **kw)
    for A, B in batches:
        def closure(A=A, B=B):
            opt.zero_grad()
            loss = ((A @ W - B) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    torch.testing.assert_close(mine, W.detach(), rtol=0, atol=1e-12)
    assert (mine - W0).abs().max() > 1e-3  # it moved


def test_lsq_grad_is_autograd():
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    A, B = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(9, 2, generator=gen, dtype=torch.float64)
    ((A @ W - B) ** 2).mean().backward()
    torch.testing.assert_close(nb05.lsq_grad(W.detach(), A, B), W.grad)


def test_paired_difference_against_statistics():
    a, b = [0.987, 0.983, 0.991, 0.979], [0.990, 0.985, 0.999, 0.984]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, std, t = nb05.paired_difference(a, b)
    assert mean == pytest.approx(statistics.fmean(d), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(d), rel=1e-12)
    assert t == pytest.approx(statistics.fmean(d) / (statistics.stdev(d) / len(d) ** 0.5), rel=1e-12)
    assert nb05.paired_difference([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0, 0.0)
