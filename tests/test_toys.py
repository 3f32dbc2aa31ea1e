"""SVRG, SARAH and SPIDER in mars_ref.course.toys.run: the algorithms written out by hand give the same runs, every
component gradient is counted (full passes included), the control-variate records add up, and the t-interval."""

import math

import pytest
import torch

from mars_ref.course import toys


def _problem():
    return toys.TwoLayerRegression(n=24, d_in=3, hidden=4, batch=3, seed=1)


def _by_hand(problem, method, lr, steps, seeds, seed, m, alpha=lambda t: 1.0, max_norm=None):
    """SVRG (Johnson & Zhang) or SARAH (Nguyen et al.) written out, with the runner's random stream: returns the
    final iterates and the component gradients counted."""
    gen = torch.Generator().manual_seed(seed)
    x = problem.init(gen, (seeds,))
    x_prev = snap = mu = v = None
    evals = []
    spent = 0
    for t in range(steps):
        xi = problem.sample(gen, (seeds,))
        if method == "svrg":
            if t % m == 0:
                snap, mu = x.clone(), problem.grad(x)
                spent += problem.n
            v = problem.grad(x, xi) - alpha(t) * (problem.grad(snap, xi) - mu)
            spent += 2 * problem.batch
        else:
            if t % m == 0:
                v = problem.grad(x)
                spent += problem.n
            else:
                v = problem.grad(x, xi) - problem.grad(x_prev, xi) + v
                spent += 2 * problem.batch
        evals.append(spent)
        x_prev = x
        if max_norm is None:
            x = x - lr * v
        else:  # SPIDER: a step of length min(lr ||v||, max_norm)
            x = x - lr * v * torch.clamp(max_norm / (lr * v.norm(dim=-1, keepdim=True)), max=1.0)
    return x, torch.tensor(evals)


@pytest.mark.parametrize("method", ["svrg", "sarah"])
def test_svrg_and_sarah_match_the_algorithm_written_out(method):
    problem = _problem()
    r = toys.run(problem, method, lr=0.1, steps=23, seeds=3, seed=4, epoch=5, keep_path=True)
    x, evals = _by_hand(problem, method, 0.1, 23, 3, 4, 5)
    torch.testing.assert_close(r.path[-1], x, rtol=0, atol=1e-12)
    assert torch.equal(r.grad_evals, evals)
    restarts = math.ceil(23 / 5)  # steps 1, 6, 11, 16, 21 take a full pass of N = 24
    inner = 23 if method == "svrg" else 23 - restarts  # SARAH's restart steps take the full gradient only
    assert r.grad_evals[-1].item() == restarts * 24 + inner * 2 * 3
    assert r.evals_per_step == 2


def test_alpha_svrg_takes_the_coefficient_per_step():
    problem = _problem()
    schedule = lambda t: 1.0 - t / 20  # the linear decay of alpha-SVRG
    r = toys.run(problem, "svrg", lr=0.1, steps=20, seeds=2, seed=3, epoch=4, alpha=schedule, keep_path=True,
                 keep_cv=True)
    x, _ = _by_hand(problem, "svrg", 0.1, 20, 2, 3, 4, alpha=schedule)
    torch.testing.assert_close(r.path[-1], x, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.cv["c"][:, 0], torch.tensor([schedule(t) for t in range(20)], dtype=torch.float64))
    # SVRG's error is its control variate's: ||zeta_X - c zeta_Y||^2 = var_x - 2 c cov + c^2 var_y, per step and seed
    c = r.cv["c"]
    torch.testing.assert_close(r.err, r.cv["var_x"] - 2 * c * r.cv["cov"] + c * c * r.cv["var_y"],
                               rtol=1e-9, atol=1e-15)


def test_spider_is_sarah_with_a_normalised_step():
    problem = _problem()
    spider = toys.run(problem, "spider", lr=0.3, steps=15, seeds=3, seed=2, epoch=4, max_norm=0.05, keep_path=True)
    x, _ = _by_hand(problem, "sarah", 0.3, 15, 3, 2, 4, max_norm=0.05)
    torch.testing.assert_close(spider.path[-1], x, rtol=0, atol=1e-12)
    lengths = (spider.path[1:] - spider.path[:-1]).norm(dim=-1)
    assert lengths.max().item() <= 0.05 * (1 + 1e-12) and lengths.max().item() > 0.049
    loose = toys.run(problem, "spider", lr=0.1, steps=15, seeds=3, seed=2, epoch=4, max_norm=1e9)
    sarah = toys.run(problem, "sarah", lr=0.1, steps=15, seeds=3, seed=2, epoch=4)
    torch.testing.assert_close(loose.loss, sarah.loss, rtol=0, atol=1e-14)  # a cap never reached: SARAH


@pytest.mark.parametrize("method", ["svrg", "sarah"])
def test_an_epoch_of_one_step_is_gradient_descent(method):
    """With m = 1 every step is a snapshot (SVRG: v = g_i(x) - g_i(x) + grad F(x)) or a restart (SARAH)."""
    problem = _problem()
    r = toys.run(problem, method, lr=0.2, steps=10, seeds=2, seed=0, epoch=1, keep_path=True)
    x = r.path[0]
    for _ in range(10):
        x = x - 0.2 * problem.grad(x)
    torch.testing.assert_close(r.path[-1], x, rtol=0, atol=1e-12)
    assert r.err.max().item() < 1e-25  # the estimate is the full gradient


def test_every_method_counts_its_component_gradients():
    problem = _problem()  # batch 3, N = 24: one epoch of SVRG/SARAH is N / batch = 8 steps by default
    for method, per_step in (("sgd", 3), ("momentum", 3), ("mars-approx", 3), ("storm-exact", 6), ("mars-exact", 6)):
        r = toys.run(problem, method, lr=0.1, steps=7, seeds=2)
        assert torch.equal(r.grad_evals, per_step * torch.arange(1, 8)), method
    svrg = toys.run(problem, "svrg", lr=0.1, steps=17, seeds=2)
    assert svrg.grad_evals[-1].item() == 3 * 24 + 17 * 6  # snapshots at steps 1, 9, 17
    assert toys.run(toys.Noisy2D(), "storm-exact", lr=0.01, steps=4, seeds=2).grad_evals.tolist() == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="finite sum"):
        toys.run(toys.Noisy2D(), "svrg", lr=0.01, steps=4)


def test_control_variate_records_name_each_methods_pair():
    problem = _problem()
    k = 0.025 * 0.9 / 0.1
    for method, c in (("storm-exact", 0.9), ("mars-exact", k / (1 + k)), ("mars-approx", k / (1 + k)),
                      ("sarah", 1.0)):
        r = toys.run(problem, method, lr=0.1, steps=9, seeds=4, beta=0.9, gamma=0.025 if "mars" in method else 1.0,
                     keep_cv=True, epoch=8)
        assert torch.isnan(r.cv["cov"][0]).all()  # step 1 (and a restart): no control variate
        torch.testing.assert_close(r.cv["c"][1:8], torch.full((7, 4), c, dtype=torch.float64))
        assert (r.cv["var_x"][1:8] > 0).all() and (r.cv["dist"][1:8] > 0).all()
        # Cauchy-Schwarz, seed by seed
        assert (r.cv["cov"][1:8].abs() <= (r.cv["var_x"][1:8] * r.cv["var_y"][1:8]).sqrt() * (1 + 1e-12)).all()
    sgd = toys.run(problem, "sgd", lr=0.1, steps=3, seeds=2, keep_cv=True)
    assert torch.isnan(sgd.cv["cov"]).all() and toys.run(problem, "sgd", lr=0.1, steps=3, seeds=2).cv is None


def test_exact_storm_control_variate_is_the_same_sample_at_two_points():
    """Exact STORM's X and Y share the minibatch: in the toy's smooth region they correlate almost perfectly,
    while approx MARS's Y is another minibatch's gradient, nearly uncorrelated with X."""
    problem = toys.TwoLayerRegression()
    exact = toys.run(problem, "storm-exact", lr=0.05, steps=40, seeds=32, seed=1, keep_cv=True)
    approx = toys.run(problem, "mars-approx", lr=0.05, steps=40, seeds=32, seed=1, gamma=0.025, keep_cv=True)

    def rho(r):
        cv = {key: v[20:].mean() for key, v in r.cv.items()}
        return (cv["cov"] / (cv["var_x"] * cv["var_y"]).sqrt()).item()

    assert rho(exact) > 0.95 and abs(rho(approx)) < 0.1


def test_t_quantile_and_interval():
    for p, df, expected in ((0.975, 1, 12.706204736), (0.975, 15, 2.131449546), (0.95, 3, 2.353363435),
                            (0.995, 30, 2.749995654)):
        assert abs(toys.t_quantile(p, df) - expected) < 1e-7, (p, df)
    values = torch.tensor([[1.0, 2.0, 4.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    mean, half = toys.t_interval(values)
    torch.testing.assert_close(mean, torch.tensor([3.0, 3.0], dtype=torch.float64))
    expected = toys.t_quantile(0.975, 3) * values[0].double().std().item() / 2
    torch.testing.assert_close(half, torch.tensor([expected, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        toys.t_interval(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        toys.t_quantile(0.4, 3)
