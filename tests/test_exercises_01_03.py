"""The toy problems of mars_ref.course.toys and the exercise solutions of notebooks 01–03."""


import pytest
import torch
from helpers import load_solution

from mars_ref.course import toys

nb01 = load_solution("nb01")


# --------------------------------------------------------------------------- mars_ref.course.toys


@pytest.mark.parametrize("shape", [(), (3,)])
def test_two_layer_gradients_match_autograd(shape):
    problem = toys.TwoLayerRegression(n=32, d_in=4, hidden=5, batch=6)
    gen = torch.Generator().manual_seed(0)
    x = problem.init(gen, shape).requires_grad_()
    idx = problem.sample(gen, shape)
    for index in (None, idx):
        x.grad = None
        problem.loss(x, index).sum().backward()
        torch.testing.assert_close(problem.grad(x.detach(), index), x.grad, rtol=1e-12, atol=1e-14)
    full = problem.grad(x.detach())
    per_sample = torch.stack([problem.grad(x.detach(), torch.full((*shape, 1), i)) for i in range(32)])
    torch.testing.assert_close(per_sample.mean(0), full)  # ∇F is the mean of the N per-sample gradients


def test_noisy2d_gradient_and_noise():
    valley = toys.Noisy2D(sigma=0.5)
    x = torch.tensor([[0.3, -0.2], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    valley.loss(x).sum().backward()
    torch.testing.assert_close(valley.grad(x.detach()), x.grad)
    assert valley.loss(torch.tensor([1.0, 1.0], dtype=torch.float64)).item() == 0
    xi = valley.sample(torch.Generator().manual_seed(1), (2,))
    torch.testing.assert_close(valley.stoch_grad(x.detach(), xi) - valley.grad(x.detach()), 0.5 * xi)


def test_run_is_deterministic_and_uses_common_random_numbers():
    problem = toys.TwoLayerRegression(n=32, hidden=4, batch=4)
    a = toys.run(problem, "sgd", lr=0.1, steps=20, seeds=3, seed=5)
    b = toys.run(problem, "sgd", lr=0.1, steps=20, seeds=3, seed=5)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.err, b.err)
    # SGD's error is the minibatch noise of the very gradient it steps with
    assert a.evals_per_step == 1 and toys.run(problem, "mars-exact", lr=0.1, steps=2, seeds=1).evals_per_step == 2


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_gamma_one_mars_momentum_is_storm(mode):
    problem = toys.TwoLayerRegression(n=32, hidden=4, batch=4)
    storm = toys.run(problem, f"storm-{mode}", lr=0.1, steps=50, seeds=4, beta=0.9)
    mars = toys.run(problem, f"mars-{mode}", lr=0.1, steps=50, seeds=4, beta=0.9, gamma=1.0)
    torch.testing.assert_close(mars.loss, storm.loss, rtol=0, atol=1e-12)


def test_run_clips_each_run_with_the_library_rules():
    problem = toys.TwoLayerRegression(n=32, d_in=3, hidden=4, batch=4)
    c = torch.randn(5, problem.dim, dtype=torch.float64) * 3
    tensor = toys._clip_rows(problem, c, "tensor", 1.0)
    glob = toys._clip_rows(problem, c, "global", 1.0)
    for row_t, row_g in zip(tensor, glob, strict=True):
        assert all(abs(p.norm().item() - 1) < 1e-12 for p in problem.split(row_t))
        assert abs(row_g.norm().item() - 1) < 1e-12
    with pytest.raises(ValueError):
        toys.run(problem, "adam", lr=0.1, steps=1)


def test_divergence_is_detected_and_frozen():
    r = toys.run(toys.Noisy2D(sigma=1.0), "sgd", lr=1.0, steps=30, seeds=4)
    assert r.diverged.all() and torch.isinf(r.final_loss).all()


# --------------------------------------------------------------------------- notebook 01


def _lyapunov_floor(H, eta, sigma, iters=20000):
    """E[F] = ½ tr(H P) with P the fixed point of P ← A P Aᵀ + η²σ² I, iterated (no eigenvalues)."""
    A = torch.eye(len(H), dtype=torch.float64) - eta * H
    P = torch.zeros_like(H)
    for _ in range(iters):
        P = A @ P @ A.T + eta**2 * sigma**2 * torch.eye(len(H), dtype=torch.float64)
    return 0.5 * torch.trace(H @ P).item()


@pytest.mark.parametrize("eta", [0.005, 0.02, 0.035])
def test_sgd_noise_floor_matches_the_lyapunov_fixed_point(eta):
    H = torch.tensor([[42.0, -20.0], [-20.0, 10.0]], dtype=torch.float64)  # Noisy2D's Hessian at (1, 1)
    assert nb01.sgd_noise_floor(H, eta, 1.5) == pytest.approx(_lyapunov_floor(H, eta, 1.5), rel=1e-6)
    assert nb01.sgd_noise_floor(H, 2.1 / 51.6, 1.0) == float("inf")


def test_sgd_noise_floor_matches_simulation():
    H = torch.tensor([[42.0, -20.0], [-20.0, 10.0]], dtype=torch.float64)
    r = toys.run(toys.Noisy2D(sigma=1.0), "sgd", lr=0.01, steps=3000, seeds=128, seed=9, x0=torch.tensor([1.0, 1.0]))
    assert r.loss[1500:].mean().item() == pytest.approx(nb01.sgd_noise_floor(H, 0.01, 1.0), rel=0.1)


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_noise_without_replacement_matches_sampling(batch):
    problem = toys.TwoLayerRegression(n=48, hidden=6)
    gen = torch.Generator().manual_seed(3)
    x = problem.init(gen)
    idx = torch.stack([torch.randperm(48, generator=gen)[:batch] for _ in range(6000)])
    measured = (problem.grad(x.expand(6000, -1), idx) - problem.grad(x)).square().sum(-1).mean().item()
    assert nb01.noise_without_replacement(problem, x, batch) == pytest.approx(measured, rel=0.06)
    assert nb01.noise_without_replacement(problem, x, 48) == pytest.approx(0, abs=1e-20)


# --------------------------------------------------------------------------- notebook 02

nb02 = load_solution("nb02")


@pytest.mark.parametrize("a", [0.05, 0.3])
def test_exact_storm_error_under_additive_noise_matches_simulation(a):
    r = toys.run(toys.Noisy2D(sigma=0.7), "storm-exact", lr=0.01, steps=60, seeds=4000, seed=11, beta=1 - a)
    for t in (1, 5, 20, 60):
        expected = nb02.exact_storm_error_additive(a, 0.7, t)
        assert r.err[t - 1].mean().item() == pytest.approx(expected, rel=0.08)
    assert nb02.exact_storm_error_additive(a, 1.0, 10_000) == pytest.approx(2 * a / (2 - a))


def test_gamma_doubling_noise_doubles_the_noise_of_c():
    from mars_ref.pieces import storm_correction

    beta1 = 0.95
    gamma = nb02.gamma_doubling_noise(beta1)
    gen = torch.Generator().manual_seed(0)
    eps_t, eps_prev = torch.randn(2, 400_000, generator=gen, dtype=torch.float64)
    ratio = storm_correction(eps_t, eps_prev, gamma, beta1).var().item() / eps_t.var().item()
    assert ratio == pytest.approx(2.0, rel=0.01)
    assert 0.019 < gamma < 0.02 < 0.025


# --------------------------------------------------------------------------- notebook 03

nb03 = load_solution("nb03")


@pytest.mark.parametrize("clip", ["tensor", "global"])
def test_max_step_norm_bounds_the_clipped_iterates(clip):
    problem = toys.TwoLayerRegression(n=32, d_in=4, hidden=6, batch=2)
    r = toys.run(problem, "mars-exact", lr=0.3, steps=60, seeds=8, beta=0.5, gamma=1.0, clip=clip, max_norm=0.05,
                 keep_path=True)
    steps = (r.path[1:] - r.path[:-1]).norm(dim=-1)
    bound = nb03.max_step_norm(0.3, 0.05, 2, clip)
    assert steps.max().item() <= bound * (1 + 1e-12)
    assert steps.max().item() > 0.5 * bound  # the bound is not vacuous: large corrections reach it
    with pytest.raises(ValueError):
        nb03.max_step_norm(0.3, 0.5, 2, "none")


def test_clip_cosine():
    gen = torch.Generator().manual_seed(2)
    small = [torch.randn(3, 4, generator=gen) * 0.01, torch.randn(5, generator=gen) * 0.01]
    assert nb03.clip_cosine(small, 1.0) == pytest.approx(1.0, abs=1e-6)  # nothing clipped
    a, b = torch.randn(30, generator=gen) * 10, torch.randn(4, generator=gen) * 0.1
    # independent computation: only `a` is clipped, by the factor 1/‖a‖
    u = torch.cat([a / a.norm(), b]).double()
    v = torch.cat([a, b]).double()
    assert nb03.clip_cosine([a, b], 1.0) == pytest.approx((u @ v / (u.norm() * v.norm())).item(), rel=1e-6)
    assert nb03.clip_cosine([a, b], 1.0) < 0.999


# --------------------------------------------------------------------------- notebook 03b

nb03b = load_solution("nb03b")


class _Quadratic1D:
    """F(x) = h x² / 2 with additive gradient noise σξ: the problem of exercise 03b.1, in toys.run's interface."""

    dim, dtype = 1, torch.float64

    def __init__(self, h, sigma=1.0):
        self.h, self.sigma = h, sigma

    def init(self, gen=None, shape=()):
        return torch.zeros(*shape, 1, dtype=self.dtype)

    def split(self, x):
        return (x,)

    def sample(self, gen, shape=()):
        return torch.randn(*shape, 1, generator=gen, dtype=self.dtype)

    def loss(self, x):
        return 0.5 * self.h * x.square().sum(-1)

    def grad(self, x):
        return self.h * x

    def loss_and_grad(self, x):
        return self.loss(x), self.grad(x)

    def stoch_grad(self, x, xi):
        return self.grad(x) + self.sigma * xi


@pytest.mark.parametrize("a, eta, h", [(0.05, 0.1, 5.0), (0.2, 0.05, 2.0), (0.05, 0.01, 0.5)])
def test_storm_floor_ratio_matches_simulation(a, eta, h):
    problem = _Quadratic1D(h)
    floors = [toys.run(problem, method, lr=eta, steps=6000, seeds=2000, seed=4, beta=1 - a).loss[1000:].mean().item()
              for method in ("storm-exact", "sgd")]
    assert floors[0] / floors[1] == pytest.approx(nb03b.storm_floor_ratio(a, eta, h), rel=0.06)


def test_storm_floor_ratio_limits():
    assert nb03b.storm_floor_ratio(1e-4, 1e-4, 1.0) == pytest.approx(0.5, rel=1e-3)  # a = ηh: half
    assert nb03b.storm_floor_ratio(0.05, 1e-6, 1.0) == pytest.approx(1.0, rel=1e-3)  # flat direction: nothing
    assert nb03b.storm_floor_ratio(1.0, 0.1, 1.0) == pytest.approx(1.0)               # a = 1: STORM is SGD
