"""Tests of ``mars_ref.pieces``: each piece against an independent computation.

The Newton–Schulz bounds below were MEASURED (float64, 5 steps, authors' coefficients) and are
stated where they are asserted:

* NS acts on singular values only: ``NS(M) = U φ⁵(Σ / (‖M‖_F + ε)) Vᵀ`` with the scalar quintic
  ``φ(x) = a x + b x³ + c x⁵``; checked to 1e-12.
* ``φ⁵`` maps [0, 1] into [0, 1.2024] and [0.002, 1] into [0.6818, 1.2024] (grid of 2·10⁶ points).
  Hence the singular values of NS(M) lie in [0.68, 1.21] whenever σ_min(M) ≥ 0.002·‖M‖_F,
  and never exceed 1.21.
* Relative Frobenius error ‖NS(M) − U Vᵀ‖_F / ‖U Vᵀ‖_F: measured ≤ 0.234 on well-conditioned
  matrices (Gaussian tall/wide, or condition number 100), asserted ≤ 0.25; on badly conditioned
  ones (log-spaced spectrum, condition 1e4 and 1e8) measured 0.48–0.79, asserted ≤ 0.80. NS is not
  a polar decomposition: the tiny singular directions are not brought up to 1 in 5 steps.
* NS in bfloat16 (the default) vs float64, relative Frobenius distance: measured ≤ 0.06 on
  well-conditioned matrices, asserted ≤ 0.08.
"""

from __future__ import annotations

import math

import pytest
import torch

from mars_ref import pieces

A_NS, B_NS, C_NS = 3.4445, -4.7750, 2.0315
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(shape, singular_values, seed):
    """U diag(s) Vᵀ with random orthonormal U, V (independent of the code under test)."""
    g = _gen(seed)
    r, c = shape
    k = min(r, c)
    U, _ = torch.linalg.qr(torch.randn(r, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(c, k, generator=g, dtype=F64))
    return (U * singular_values) @ V.T


def _log_spectrum(k, cond):
    return torch.logspace(0, -math.log10(cond), k, dtype=F64)


def _phi5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The scalar NS map on a singular value, iterated."""
    for _ in range(steps):
        x = A_NS * x + B_NS * x**3 + C_NS * x**5
    return x


SHAPES = [(24, 24), (40, 12), (12, 40)]  # square, tall, wide


def _well_conditioned():
    for i, shape in enumerate(SHAPES):
        if shape[0] != shape[1]:  # Gaussian rectangular matrices are well conditioned (cond ≈ 3–4)
            yield f"gauss{shape}", torch.randn(*shape, generator=_gen(10 + i), dtype=F64)
        yield f"cond1e2{shape}", _with_spectrum(shape, _log_spectrum(min(shape), 1e2), 20 + i)


def _badly_conditioned():
    for i, shape in enumerate(SHAPES):
        for cond in (1e4, 1e8):
            yield f"cond{cond:.0e}{shape}", _with_spectrum(shape, _log_spectrum(min(shape), cond), 30 + i)


# ---------------------------------------------------------------------------- Newton–Schulz


def test_phi5_scalar_band():
    """Measured band of the 5-step scalar map (the numbers quoted in the module docstring)."""
    x = torch.linspace(0, 1, 2_000_001, dtype=F64)
    y = _phi5(x)
    assert y.min() >= 0 and y.max() <= 1.21
    assert y[x >= 0.002].min() >= 0.68


@pytest.mark.parametrize("name_M", list(_well_conditioned()) + list(_badly_conditioned()), ids=lambda t: t[0])
def test_newton_schulz_acts_on_singular_values(name_M):
    """NS(M) = U φ⁵(Σ/(‖M‖_F+ε)) Vᵀ exactly (float64): the iteration only reshapes the spectrum."""
    _, M = name_M
    eps = 1e-7
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    expected = (U * _phi5(S / (torch.sqrt((M * M).sum()) + eps))) @ Vh
    got = pieces.newton_schulz(M, steps=5, eps=eps, dtype=F64)
    assert got.dtype == F64
    assert (got - expected).abs().max() < 1e-12


@pytest.mark.parametrize("name_M", list(_well_conditioned()), ids=lambda t: t[0])
def test_newton_schulz_close_to_polar_factor_well_conditioned(name_M):
    _, M = name_M
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    assert S.min() >= 0.002 * M.norm()  # the precondition of the band below
    X = pieces.newton_schulz(M, steps=5, eps=1e-7, dtype=F64)
    s = torch.linalg.svdvals(X)
    assert 0.68 <= s.min() and s.max() <= 1.21
    polar = U @ Vh
    assert (X - polar).norm() / polar.norm() <= 0.25
    # bfloat16, the default compute dtype: bf16-level distance from the float64 result
    Xb = pieces.newton_schulz(M)
    assert Xb.dtype == M.dtype
    assert (Xb - X).norm() / X.norm() <= 0.08


@pytest.mark.parametrize("name_M", list(_badly_conditioned()), ids=lambda t: t[0])
def test_newton_schulz_badly_conditioned(name_M):
    _, M = name_M
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    X = pieces.newton_schulz(M, steps=5, eps=1e-7, dtype=F64)
    s = torch.linalg.svdvals(X)
    assert s.max() <= 1.21  # never amplifies past the band
    # directions with σ ≥ 0.002‖M‖_F are in the band; those with σ < 0.001‖M‖_F are not brought up
    # to 1 (φ⁵ is increasing on [0, 0.001] with φ⁵(0.001) = 0.4705)
    s_dir = torch.linalg.vector_norm(X @ Vh.T, dim=0)  # ‖X v_i‖ = φ⁵(σ_i/‖M‖) for each right vector
    big, small = S >= 0.002 * M.norm(), S < 0.001 * M.norm()
    assert big.any() and small.any()
    assert ((s_dir[big] >= 0.68) & (s_dir[big] <= 1.21)).all()
    assert (s_dir[small] < 0.48).all()
    polar = U @ Vh
    rel = (X - polar).norm() / polar.norm()
    assert 0.4 <= rel <= 0.80


def test_newton_schulz_transposes_tall_inputs():
    """Tall input gives the transpose of NS on the transposed (wide) input, same shape as M."""
    M = torch.randn(30, 7, generator=_gen(3), dtype=F64)
    X = pieces.newton_schulz(M, dtype=F64)
    assert X.shape == M.shape
    assert torch.allclose(X, pieces.newton_schulz(M.T, dtype=F64).T, atol=1e-14, rtol=0)


def test_newton_schulz_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        pieces.newton_schulz(torch.ones(3, 4, 5))


# ---------------------------------------------------------------------------- one-step Shampoo


def _cubic_newton_schulz(M, iters=80):
    """Classical (cubic) Newton–Schulz, X ← 1.5X − 0.5XXᵀX, converges to U Vᵀ for σ ∈ (0, √3)."""
    X = M / M.norm()
    for _ in range(iters):
        X = 1.5 * X - 0.5 * X @ X.T @ X
    return X


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_svd_is_the_polar_factor(shape):
    M = _with_spectrum(shape, _log_spectrum(min(shape), 10.0), 5)
    Q = pieces.polar_svd(M)
    # independent route to U Vᵀ
    assert (Q - _cubic_newton_schulz(M)).abs().max() < 1e-12
    # characterisation: orthonormal rows/columns and a symmetric PSD polar factor
    k = min(shape)
    gram = Q.T @ Q if shape[0] >= shape[1] else Q @ Q.T
    assert (gram - torch.eye(k, dtype=F64)).abs().max() < 1e-12
    H = Q.T @ M if shape[0] >= shape[1] else M @ Q.T
    assert (H - H.T).abs().max() < 1e-12
    assert torch.linalg.eigvalsh(H).min() > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_one_step_shampoo_equals_polar_factor(shape):
    """Shampoo's L^{-1/4} M R^{-1/4} with L = M Mᵀ, R = Mᵀ M (one step of factors, tiny ε) = U Vᵀ.

    Measured max error with ε = 1e-12 and condition number ≤ 100: ≤ 1.2e-9; asserted < 1e-8.
    """
    M = _with_spectrum(shape, _log_spectrum(min(shape), 100.0), 6)
    polar = pieces.polar_svd(M)
    direct = pieces.shampoo_direction(M @ M.T, M.T @ M, M, eps=1e-12)
    assert (direct - polar).abs().max() < 1e-8
    # the same, through the accumulating factors of full Shampoo after one step
    L = torch.zeros(shape[0], shape[0], dtype=F64)
    R = torch.zeros(shape[1], shape[1], dtype=F64)
    L, R = pieces.shampoo_factors(L, R, M)
    assert torch.allclose(L, M @ M.T, rtol=0, atol=1e-14) and torch.allclose(R, M.T @ M, rtol=0, atol=1e-14)
    assert (pieces.shampoo_direction(L, R, M, eps=1e-12) - polar).abs().max() < 1e-8


def test_shampoo_factors_accumulate():
    g = _gen(7)
    Gs = [torch.randn(5, 3, generator=g, dtype=F64) for _ in range(3)]
    L, R = torch.zeros(5, 5, dtype=F64), torch.zeros(3, 3, dtype=F64)
    for G in Gs:
        L, R = pieces.shampoo_factors(L, R, G)
    assert torch.allclose(L, sum(G @ G.T for G in Gs), rtol=0, atol=1e-13)
    assert torch.allclose(R, sum(G.T @ G for G in Gs), rtol=0, atol=1e-13)


@pytest.mark.parametrize("root", [2, 4])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_inverse_root(root, rank_deficient):
    """X = (A + εI)^{-1/r} is the unique SPD matrix with X^r (A + εI) = I."""
    g = _gen(8)
    B = torch.randn(6, 4 if rank_deficient else 9, generator=g, dtype=F64)
    A = B @ B.T  # PSD, rank 4 (singular) or full rank
    eps = 1e-3 if rank_deficient else 1e-12
    X = pieces.inverse_root(A, root, eps)
    I = torch.eye(6, dtype=F64)
    assert (X - X.T).abs().max() < 1e-12
    assert torch.linalg.eigvalsh(X).min() > 0
    assert (torch.linalg.matrix_power(X, root) @ (A + eps * I) - I).abs().max() < 1e-9
    if root == 2 and not rank_deficient:  # and against an explicit inverse square root
        assert (X @ X - torch.linalg.inv(A)).abs().max() < 1e-9


def test_shampoo_scale():
    assert pieces.shampoo_scale((12, 3)) == 2.0
    assert pieces.shampoo_scale((3, 12)) == 1.0
    assert pieces.shampoo_scale((5, 5)) == 1.0


# ---------------------------------------------------------------------------- elementwise pieces


def test_elementwise_pieces_against_formulas():
    g = _gen(9)
    gt, gp, m, v, x = (torch.randn(4, 5, generator=g, dtype=F64) for _ in range(5))
    v = v.abs()
    gamma, b1, b2, eps, t, lr, wd = 0.3, 0.9, 0.99, 1e-8, 3, 0.01, 0.1
    c = pieces.storm_correction(gt, gp, gamma, b1)
    assert torch.allclose(c, gt + gamma * b1 / (1 - b1) * (gt - gp), rtol=0, atol=1e-14)
    m_new = pieces.momentum(m, c, b1)
    assert torch.allclose(m_new, b1 * m + (1 - b1) * c, rtol=0, atol=1e-15)
    v_new = pieces.second_moment(v, c, b2)
    assert torch.allclose(v_new, b2 * v + (1 - b2) * c * c, rtol=0, atol=1e-14)
    u = pieces.adamw_direction(m_new, v_new, t, b1, b2, eps)
    denom = (torch.sqrt(v_new) / math.sqrt(1 - b2**t) + eps) * (1 - b1**t)
    assert torch.allclose(u, m_new / denom, rtol=1e-14, atol=0)
    assert torch.equal(pieces.lion_direction(m), torch.sign(m))
    x_new = pieces.decoupled_step(x, u, lr, wd)
    assert torch.allclose(x_new, x - lr * (wd * x + u), rtol=0, atol=1e-15)


def test_pieces_are_differentiable_and_pure():
    """Every piece is an expression: with inputs that require grad it gives the closed-form derivatives, and
    it changes none of its inputs."""
    g = _gen(10)
    gt, gp, m = (torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    v = torch.rand(4, 5, generator=g, dtype=F64).requires_grad_()
    gamma, b1, b2, eps, t = 0.3, 0.9, 0.99, 1e-8, 3
    k = gamma * b1 / (1 - b1)
    pieces.storm_correction(gt, gp, gamma, b1).sum().backward()
    assert torch.allclose(gt.grad, torch.full_like(gt, 1 + k)) and torch.allclose(gp.grad, torch.full_like(gp, -k))
    pieces.adamw_direction(m, v, t, b1, b2, eps).sum().backward()
    sqrt_b2, b1t = math.sqrt(1 - b2**t), 1 - b1**t
    denom = (v.detach().sqrt() / sqrt_b2 + eps) * b1t
    assert torch.allclose(m.grad, 1 / denom, rtol=1e-12, atol=0)
    expected_v = -m.detach() / denom**2 * b1t / (2 * v.detach().sqrt() * sqrt_b2)
    assert torch.allclose(v.grad, expected_v, rtol=1e-12, atol=0)
    with torch.no_grad():  # and under no_grad (the optimizer), requires_grad inputs are fine too
        assert torch.allclose(pieces.storm_correction(gt, gp, gamma, b1), gt + k * (gt - gp), rtol=0, atol=1e-14)
    x, u = (torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    inputs = [t.detach().clone() for t in (m, v, x, u)]
    lr, wd = 0.1, 0.01
    (pieces.momentum(m, u, b1).sum() + pieces.second_moment(v, u, b2).sum()
     + pieces.decoupled_step(x, u, lr, wd).sum()).backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 - lr * wd), rtol=0, atol=1e-15)
    # d/du: (1−β1) from the momentum, 2(1−β2)u from the second moment, −η from the step
    assert torch.allclose(u.grad, (1 - b1) + 2 * (1 - b2) * u.detach() - lr, rtol=0, atol=1e-14)
    assert all(torch.equal(a, b.detach()) for a, b in zip(inputs, (m, v, x, u), strict=True))


def test_clipping():
    c = torch.tensor([3.0, 4.0], dtype=F64)  # norm 5
    assert torch.allclose(pieces.clip_by_norm(c), c / 5)
    assert torch.allclose(pieces.clip_by_norm(c, 2.5), c / 2)
    small = torch.tensor([0.3, 0.4], dtype=F64)
    assert torch.equal(pieces.clip_by_norm(small), small)
    a, b = torch.tensor([3.0], dtype=F64), torch.tensor([0.0, 4.0], dtype=F64)  # global norm 5
    ca, cb = pieces.clip_by_global_norm([a, b], 1.0)
    assert torch.allclose(ca, a / 5) and torch.allclose(cb, b / 5)
    unclipped = pieces.clip_by_global_norm([a, b], 10.0)
    assert torch.equal(unclipped[0], a) and torch.equal(unclipped[1], b)
    assert pieces.clip_by_global_norm([], 1.0) == []


def test_momentum_of_corrections_is_storm_at_gamma_one():
    """The docstring's claim: with γ = 1 and no clipping, MARS' momentum is STORM with 1 − a = β1."""
    g = _gen(11)
    b1 = 0.9
    m = torch.zeros(7, dtype=F64)
    d = torch.zeros(7, dtype=F64)
    g_prev = torch.zeros(7, dtype=F64)
    for _ in range(6):
        g_t = torch.randn(7, generator=g, dtype=F64)
        m = pieces.momentum(m, pieces.storm_correction(g_t, g_prev, 1.0, b1), b1)
        d = pieces.storm_estimator(g_t, g_prev, d, a=1 - b1)  # from d_0 = 0, g_prev = 0: d_1 = g_1
        assert torch.allclose(m, d, rtol=0, atol=1e-13)
        g_prev = g_t + 0.1 * torch.randn(7, generator=g, dtype=F64)  # any "previous-point" gradient
