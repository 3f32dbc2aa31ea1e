"""The exercises of notebook 02b: each reference solution passes its check, plausible mistakes (off by a constant,
a forgotten term, the wrong statistic) and unfinished stubs do not."""

import pytest
import torch
from helpers import load_solution

from mars_ref.course import exercises, toys

nb02b = load_solution("nb02b")


def _stub(*args, **kwargs):
    raise NotImplementedError


def _centred(X, Y):
    return X - X.mean(0), Y - Y.mean(0)


WRONG = {
    "02b.1": {
        "forgets 1/B": lambda X, Y, a, B: nb02b.svrg_variance(X, Y, a, 1),
        "forgets the covariance": lambda X, Y, a, B: (nb02b.svrg_variance(X, Y, 0.0, B)
                                                      + a * a * nb02b.svrg_variance(Y, Y, 0.0, B)),
        "does not centre": lambda X, Y, a, B: (X - a * Y).square().sum(-1).mean().item() / B,
        "without replacement": lambda X, Y, a, B: (nb02b.svrg_variance(X, Y, a, B) * (len(X) - B) / (len(X) - 1)),
        "alpha ignored": lambda X, Y, a, B: nb02b.svrg_variance(X, Y, 1.0, B),
        "off by a factor 1.001": lambda X, Y, a, B: 1.001 * nb02b.svrg_variance(X, Y, a, B),
    },
    "02b.2": {
        "the correlation": lambda X, Y: ((lambda zx, zy: ((zx * zy).sum() / (zx.norm() * zy.norm())).item())(
            *_centred(X, Y))),
        "the break-even 2 Cov / Var Y": lambda X, Y: 2 * nb02b.optimal_alpha(X, Y),
        "Cov / Var X": lambda X, Y: ((lambda zx, zy: ((zx * zy).sum() / zx.square().sum()).item())(*_centred(X, Y))),
        "always 1 (plain SVRG)": lambda X, Y: 1.0,
        "uncentred": lambda X, Y: ((X * Y).sum() / Y.square().sum()).item(),
    },
}


@pytest.mark.parametrize("exercise", ["02b.1", "02b.2"])
def test_the_reference_solution_passes(exercise):
    right, verdict = exercises.verify(exercise, getattr(nb02b, exercises.EXERCISES[exercise].name))
    assert right and verdict.startswith(f"Exercise {exercise} ") and ": right." in verdict, verdict


@pytest.mark.parametrize(("exercise", "mistake"), [(e, m) for e, wrong in WRONG.items() for m in wrong])
def test_plausible_mistakes_are_rejected(exercise, mistake):
    right, verdict = exercises.verify(exercise, WRONG[exercise][mistake])
    assert not right and "not right yet" in verdict, (mistake, verdict)


@pytest.mark.parametrize("exercise", ["02b.1", "02b.2"])
def test_stubs_are_not_answered_yet(exercise, capsys):
    right, verdict = exercises.verify(exercise, _stub)
    assert not right and "not answered yet" in verdict
    exercises.check(exercise, _stub)
    assert "not answered yet" in capsys.readouterr().out


def test_the_solutions_agree_with_a_toy_run():
    """The exact variance of SVRG's estimate at one point of a run is what toys.run's error averages to."""
    problem = toys.TwoLayerRegression(n=16, d_in=3, hidden=4, batch=2, seed=3)
    x = problem.init(torch.Generator().manual_seed(0))
    snap = x + 0.05 * torch.randn(problem.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = torch.arange(problem.n).unsqueeze(-1)
    X, Y = problem.grad(x.expand(problem.n, -1), idx), problem.grad(snap.expand(problem.n, -1), idx)
    gen = torch.Generator().manual_seed(2)
    xi = problem.sample(gen, (200_000,))
    v = problem.grad(x.expand(200_000, -1), xi) - 0.7 * (problem.grad(snap.expand(200_000, -1), xi)
                                                          - problem.grad(snap))
    simulated = (v - problem.grad(x)).square().sum(-1).mean().item()
    assert abs(simulated / nb02b.svrg_variance(X, Y, 0.7, 2) - 1) < 0.02
    best = nb02b.optimal_alpha(X, Y)
    assert all(nb02b.svrg_variance(X, Y, best, 2) < nb02b.svrg_variance(X, Y, best + d, 2) for d in (-0.01, 0.01))
