"""`mars_ref.course.exercises.check` accepts every reference solution and says why a wrong or unfinished answer
is not."""

import pytest
from helpers import load_solution

from mars_ref.course import exercises

SOLUTIONS = {name: load_solution(name) for name in ("nb01", "nb02", "nb03", "nb03b", "nb04", "nb05", "nb06")}


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
    assert not right and "give the function itself" in verdict
