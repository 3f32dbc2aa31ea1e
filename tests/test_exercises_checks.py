"""`mars_ref.course.exercises.check` accepts every reference solution and says why a wrong or unfinished answer
is not."""

import itertools
import math
import threading

import pytest
import torch
from helpers import load_solution

import mars_ref.pieces
from mars_ref.course import exercises
from mars_ref.pieces import newton_schulz, shampoo_direction

SOLUTIONS = {f"nb{notebook}": load_solution(f"nb{notebook}")
             for notebook in sorted({exercise.split(".")[0] for exercise in exercises.EXERCISES})}


@pytest.mark.parametrize("exercise", sorted(exercises.EXERCISES))
def test_the_reference_solution_passes_its_check(exercise):
    solution = getattr(SOLUTIONS["nb" + exercise.split(".")[0]], exercises.EXERCISES[exercise].name)
    right, verdict = exercises.verify(exercise, solution)
    assert right, verdict
    assert verdict.startswith(f"Exercise {exercise} ") and ": right." in verdict


def _stub(*args, **kwargs):
    raise NotImplementedError


WRONG = {  # plausible mistakes, one per exercise
    "01.1": lambda H, eta, sigma: eta * sigma**2 / 2,                         # the small-eta approximation
    "01.2": lambda problem, x, B: SOLUTIONS["nb01"].noise_without_replacement(problem, x, 1) / B,  # with replacement
    "02.1": lambda a, sigma, t, dim=2: dim * sigma**2 * a / (2 - a),          # the limit only
    "02.2": lambda beta1: 0.025,
    "02b.1": lambda X, Y, alpha, batch: SOLUTIONS["nb02b"].svrg_variance(X, Y, alpha, 1),  # forgets the batch
    "02b.2": lambda X, Y: 1.0,                                                 # plain SVRG's coefficient
    "03.1": lambda lr, tau, n, clip: lr * tau,                               # forgets sqrt(J) per tensor
    "03.2": lambda parts, tau: 1.0,
    "03b.1": lambda a, eta, h: a / (eta * h + a),                            # the approximation, not exact
    "04.1": lambda M, steps: SOLUTIONS["nb04"].ns_singular_values(M, steps + 1),
    "04.2": lambda M, eps: SOLUTIONS["nb04"].damped_one_step_shampoo(M, 0.0),
    "05.1": lambda W0, batches, **kw: W0,
    "05.2": lambda a, b: (0.0, 1.0, 0.0),
    "06.1": lambda gamma, beta1, n_heldout=None: (1 + gamma * beta1 / (1 - beta1)) ** 2,  # forgets k^2
    "06.2": lambda gamma, beta1: beta1 / (1 - beta1),                         # ignores gamma
}


@pytest.mark.parametrize("exercise", sorted(exercises.EXERCISES))
def test_wrong_and_unfinished_answers_are_told_apart(exercise, capsys):
    right, verdict = exercises.verify(exercise, WRONG[exercise])
    assert not right and "not right yet" in verdict or "raised" in verdict, verdict
    right, verdict = exercises.verify(exercise, _stub)
    assert not right and "not answered yet" in verdict
    exercises.check(exercise, _stub)  # prints, never raises
    assert "not answered yet" in capsys.readouterr().out


def test_check_names_the_known_exercises():
    with pytest.raises(KeyError, match="01.1"):
        exercises.check("9.9", _stub)
    right, verdict = exercises.verify("01.1", 3.0)
    assert not right and "Give the function itself" in verdict


def _bound(lr, tau, n, clip, per_tensor, global_):
    if clip == "none":
        raise ValueError("no bound")
    return lr * tau * (per_tensor(n) if clip == "tensor" else global_(n))


def _enumerate_subsets(problem, x, B):
    """01.2 by brute force: the mean over every subset, one at a time (constant memory, never finishes at N = 128)."""
    full = problem.grad(x)
    per_sample = problem.grad(x.expand(problem.n, -1), torch.arange(problem.n).unsqueeze(-1))
    total, count = 0.0, 0
    for subset in itertools.combinations(range(problem.n), B):
        total += (per_sample[list(subset)].mean(0) - full).square().sum().item()
        count += 1
    return total / count


def _storm_error_by_the_loop(a, sigma, t, dim=2):
    """02.1 by iterating the variance recursion the exercise states, t − 1 times."""
    error = dim * sigma**2
    for _ in range(t - 1):
        error = (1 - a) ** 2 * error + a**2 * dim * sigma**2
    return error


REJECTED = {  # named wrong answers that look right: (exercise, answer, a word the verdict must contain)
    "03.1, the loose bound eta tau J per tensor": (
        "03.1", lambda lr, tau, n, clip: _bound(lr, tau, n, clip, lambda n: n, lambda n: 1), "not the least"),
    "03.1, the loose bound eta tau sqrt(J) for global clipping too": (
        "03.1", lambda lr, tau, n, clip: _bound(lr, tau, n, clip, math.sqrt, math.sqrt), "not the least"),
    "01.1, off by a factor 2": ("01.1", lambda H, eta, sigma: 2 * SOLUTIONS["nb01"].sgd_noise_floor(H, eta, sigma),
                                "expected"),
    "02.1, off by a constant factor": (
        "02.1", lambda a, sigma, t, dim=2: 1.01 * SOLUTIONS["nb02"].exact_storm_error_additive(a, sigma, t, dim),
        "expected"),
    "03b.1, off by an additive constant": (
        "03b.1", lambda a, eta, h: SOLUTIONS["nb03b"].storm_floor_ratio(a, eta, h) + 0.01, "expected"),
    "06.2, off by one step": ("06.2", lambda gamma, beta1: SOLUTIONS["nb06"].momentum_lag(gamma, beta1) + 1,
                              "expected"),
    "02.2, the negative root, which MARS refuses": (
        "02.2", lambda beta1: -(math.sqrt(3) + 1) / 2 * (1 - beta1) / beta1, "refuses"),
    "04.1, calling newton_schulz": (
        "04.1", lambda M, steps: torch.linalg.svdvals(newton_schulz(M, steps, dtype=torch.float64)), "newton_schulz"),
    "04.1, calling newton_schulz through the module": (
        "04.1", lambda M, steps: torch.linalg.svdvals(mars_ref.pieces.newton_schulz(M, steps, dtype=torch.float64)),
        "newton_schulz"),
    "04.2, calling shampoo_direction": (
        "04.2", lambda M, eps: shampoo_direction(M @ M.T, M.T @ M, M, eps), "shampoo_direction"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_named_wrong_answers_are_rejected(case):
    exercise, answer, word = REJECTED[case]
    right, verdict = exercises.verify(exercise, answer)
    assert not right and "not right yet" in verdict and word in verdict, verdict


@pytest.mark.parametrize(("exercise", "answer"), [("01.2", _enumerate_subsets), ("02.1", _storm_error_by_the_loop)])
def test_answers_without_the_idea_run_out_of_time(exercise, answer):
    right, verdict = exercises.verify(exercise, answer, seconds=3)
    assert not right and "did not finish within 3 s" in verdict and "closed form" in verdict, verdict


def test_an_answer_that_never_returns_is_stopped_with_a_message():
    def forever(H, eta, sigma):
        while True:
            pass

    right, verdict = exercises.verify("01.1", forever, seconds=1)
    assert not right and "did not finish within 1 s" in verdict
    outcome = {}  # the same outside the main thread, where no alarm signal can be used
    worker = threading.Thread(target=lambda: outcome.update(v=exercises.verify("01.1", forever, seconds=1)))
    worker.start()
    worker.join(10)
    assert not outcome["v"][0] and "did not finish within 1 s" in outcome["v"][1]


def test_an_answer_that_changes_its_input_cannot_break_the_check():
    def vandal(H, eta, sigma):
        value = SOLUTIONS["nb01"].sgd_noise_floor(H, eta, sigma)
        H.fill_(float("nan"))  # the check reuses its H after this call
        return value

    right, verdict = exercises.verify("01.1", vandal)
    assert right, verdict


def test_a_failure_of_the_check_itself_is_not_blamed_on_the_answer(monkeypatch):
    def broken_check(answer):
        answer(torch.eye(2, dtype=torch.float64), 0.1, 1.0)
        return {}["missing"]  # the check's own bug

    monkeypatch.setitem(exercises.EXERCISES, "01.1", exercises.Exercise("sgd_noise_floor", broken_check))
    right, verdict = exercises.verify("01.1", SOLUTIONS["nb01"].sgd_noise_floor)
    assert not right and "the check itself failed (KeyError" in verdict and "not a verdict on your answer" in verdict

    def crashes(H, eta, sigma):
        return 1 / 0

    right, verdict = exercises.verify("01.1", crashes)
    assert not right and "your function raised ZeroDivisionError" in verdict
