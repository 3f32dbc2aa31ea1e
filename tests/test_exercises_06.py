"""The exercise solutions of notebook 06, checked against independent simulations."""


import pytest
import torch
from helpers import load_solution

from mars_ref.pieces import momentum, storm_correction

nb06 = load_solution("nb06")


def simulated_noise_ratio(gamma, beta1, n_heldout, trials=200_000, seed=0):
    """Monte Carlo: g_t = ∇F + ξ_t (independent steps), ∇F̂ = ∇F + mean of N held-out noises."""
    gen = torch.Generator().manual_seed(seed)
    dim = 4
    full = torch.randn(dim, generator=gen, dtype=torch.float64)
    g_prev = full + torch.randn(trials, dim, generator=gen, dtype=torch.float64)
    g = full + torch.randn(trials, dim, generator=gen, dtype=torch.float64)
    if n_heldout is None:
        estimate = full.expand(trials, dim)
    else:
        held = torch.randn(trials, n_heldout, dim, generator=gen, dtype=torch.float64)
        estimate = full + held.mean(1)
    c = storm_correction(g, g_prev, gamma, beta1)  # the library's c_t, not the closed form
    return ((c - estimate) ** 2).sum(1).mean().item() / ((g - estimate) ** 2).sum(1).mean().item()


@pytest.mark.parametrize("gamma, beta1", [(0.025, 0.95), (0.1, 0.9), (0.0, 0.95), (0.5, 0.5)])
@pytest.mark.parametrize("n_heldout", [None, 1, 8])
def test_noise_ratio_matches_a_simulation(gamma, beta1, n_heldout):
    expected = simulated_noise_ratio(gamma, beta1, n_heldout)
    assert nb06.noise_ratio(gamma, beta1, n_heldout) == pytest.approx(expected, rel=0.015)


def test_noise_ratio_at_the_recipe():
    assert nb06.noise_ratio(0.025, 0.95) == pytest.approx(1.475**2 + 0.475**2)
    assert nb06.noise_ratio(0.0, 0.95, 8) == pytest.approx(1.0)


def simulated_lag(gamma, beta1, steps=3000, drift=0.01):
    """Run MARS's correction and momentum on a noiseless ramp ∇F_t = t·d; return how many steps m_t lags."""
    m = torch.zeros(1, dtype=torch.float64)
    g_prev = torch.zeros(1, dtype=torch.float64)
    for t in range(1, steps + 1):
        g = torch.tensor([t * drift], dtype=torch.float64)
        m = momentum(m, storm_correction(g, g_prev, gamma, beta1), beta1)
        g_prev = g
    return (steps * drift - m.item()) / drift


@pytest.mark.parametrize("gamma", [0.0, 0.025, 0.3, 1.0])
@pytest.mark.parametrize("beta1", [0.9, 0.95])
def test_momentum_lag_matches_a_simulation(gamma, beta1):
    assert nb06.momentum_lag(gamma, beta1) == pytest.approx(simulated_lag(gamma, beta1), abs=1e-6)


def test_half_the_lag_costs_noise():
    assert nb06.momentum_lag(0.5, 0.95) == pytest.approx(nb06.momentum_lag(0.0, 0.95) / 2)
    assert nb06.noise_ratio(0.5, 0.95) == pytest.approx(200.5)
