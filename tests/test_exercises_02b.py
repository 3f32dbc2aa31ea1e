"""The exercises of notebook 02b: each reference solution passes its check, plausible mistakes (off by a constant,
a forgotten term, the wrong statistic) and unfinished stubs do not."""

import itertools
import time

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


def _svrg_variance_by_enumeration(X, Y, alpha, batch):
    """02b.1 without the idea: the average over every ordered minibatch, listed one by one (N^B of them)."""
    n, full = len(X), X.mean(0)
    total = 0.0
    for idx in itertools.product(range(n), repeat=batch):
        v = X[list(idx)].mean(0) - alpha * (Y[list(idx)].mean(0) - Y.mean(0))
        total += (v - full).square().sum().item()
    return total / n**batch


def test_an_enumeration_of_the_minibatches_runs_out_of_time():
    """The check also asks for sizes (N = 64, B = 8 and larger: 1e14 minibatches and more) that no enumeration
    finishes; the reference solution, a closed form, answers them at once."""
    X, Y = exercises._svrg_cases()[0]
    assert abs(_svrg_variance_by_enumeration(X, Y, 0.5, 2) - nb02b.svrg_variance(X, Y, 0.5, 2)) < 1e-12
    right, verdict = exercises.verify("02b.1", _svrg_variance_by_enumeration, seconds=3)
    assert not right and "did not finish within 3 s" in verdict, verdict
    start = time.perf_counter()
    right, verdict = exercises.verify("02b.1", nb02b.svrg_variance, seconds=3)
    assert right and "where no enumeration finishes" in verdict and time.perf_counter() - start < 3, verdict


def test_the_large_cases_agree_with_an_enumeration_where_one_is_possible():
    """The check's count moments (used where no enumeration finishes) equal the enumeration on small cases."""
    for X, Y in exercises._svrg_cases():
        for alpha in (0.0, 0.7, 1.4):
            for batch in (1, 2, 4):
                listed = exercises._svrg_variance_enumerated(X, Y, alpha, batch)
                assert abs(exercises._svrg_variance_by_counts(X, Y, alpha, batch) - listed) <= 1e-12 * listed


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
