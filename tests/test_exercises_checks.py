"""`mars_ref.course.exercises.check` accepts every reference solution and says why a wrong or unfinished answer
is not."""

import itertools
import math
import threading
import time

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


def _floor_without_the_sign_test(H, eta, sigma):
    """01.1 with only the edge-of-stability test eta h_max < 2: finite for an H with a negative eigenvalue."""
    h = torch.linalg.eigvalsh(H.double())
    if (eta * h >= 2).any():
        return float("inf")
    return (eta * sigma**2 / 2 * (1.0 / (2.0 - eta * h)).sum()).item()


def _ns_by_the_matrix_iteration(M, steps, multiply=torch.matmul):
    """04.1 by copying newton_schulz's iteration (matrix products), then taking singular values."""
    q1, q3, q5 = mars_ref.pieces.NS_COEFFICIENTS
    X = M.double() / (torch.linalg.norm(M.double()) + 1e-7)
    for _ in range(steps):
        A = multiply(X, X.T)
        B = multiply(A, X)
        X = q1 * X + q3 * B + q5 * multiply(A, B)
    return torch.linalg.svdvals(X)


def _mars_with_c1_equal_to_g1(W0, batches, lr, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.0,
                              max_norm=1.0):
    """05.1 with g_prev = g_1 at step 1 (so c_1 = g_1) instead of MARS's g_prev = 0; right from step 2 on."""
    from mars_ref.pieces import adamw_direction, clip_by_norm, decoupled_step, momentum, second_moment, storm_correction

    lsq_grad = SOLUTIONS["nb05"].lsq_grad
    beta1, beta2 = betas
    W, W_prev = W0.clone(), None
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    for t, (A, B) in enumerate(batches, start=1):
        g = lsq_grad(W, A, B)
        g_prev = lsq_grad(W_prev, A, B) if W_prev is not None else g
        c = clip_by_norm(storm_correction(g, g_prev, gamma, beta1), max_norm)
        m, v = momentum(m, c, beta1), second_moment(v, c, beta2)
        W_prev, W = W.clone(), decoupled_step(W, adamw_direction(m, v, t, beta1, beta2, eps), lr, weight_decay)
    return W


REJECTED = {  # named wrong answers that look right: (exercise, answer, a word the verdict must contain)
    "01.1, inf only past eta h_max = 2, finite for an indefinite H": ("01.1", _floor_without_the_sign_test,
                                                                      "negative"),
    "03.1, tau fixed at the first case's 0.05": (
        "03.1", lambda lr, tau, n, clip: _bound(lr, 0.05, n, clip, math.sqrt, lambda n: 1), "tau = 3"),
    "03.1, lr fixed at the first case's 0.3": (
        "03.1", lambda lr, tau, n, clip: _bound(0.3, tau, n, clip, math.sqrt, lambda n: 1), "lr = 0.02"),
    "03.2, tau fixed at 1": ("03.2", lambda parts, tau: SOLUTIONS["nb03"].clip_cosine(parts, 1.0), "tau = 0.5"),
    "03.2, tau fixed at 1, checked at tau = 3": (
        "03.2", lambda parts, tau: SOLUTIONS["nb03"].clip_cosine(parts, 1.0 if tau != 0.5 else tau), "tau = 3"),
    "04.1, copying the matrix iteration with @": ("04.1", _ns_by_the_matrix_iteration, "multiplies matrices"),
    "04.1, copying the matrix iteration with einsum": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(M, steps, lambda X, Y: torch.einsum("ij,jk->ik", X, Y)),
        "multiplies matrices"),
    "04.1, copying the matrix iteration with a broadcast product": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(M, steps, lambda X, Y: (X[:, :, None] * Y[None]).sum(1)),
        "a matrix product written with broadcasting"),
    "04.1, copying the matrix iteration with expanded operands": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(
            M, steps, lambda X, Y: (X.unsqueeze(2).expand(-1, -1, Y.shape[1])
                                    * Y.unsqueeze(0).expand(X.shape[0], -1, -1)).sum(1)),
        "a matrix product written with broadcasting"),
    "04.1, copying the matrix iteration with a broadcast product through torch.mul": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(
            M, steps, lambda X, Y: torch.mul(X.unsqueeze(-1), Y.unsqueeze(0)).sum(dim=-2)),
        "aten.mul of shapes (40, 40, 1) and (1, 40, 40), broadcast against each other"),
    "04.1, copying the matrix iteration with a loop over rows (a vector scaling a matrix, summed)": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(
            M, steps, lambda X, Y: torch.stack([(row[:, None] * Y).sum(0) for row in X])),
        "computed piece by piece"),
    "04.1, copying the matrix iteration with conv1d": (
        "04.1", lambda M, steps: _ns_by_the_matrix_iteration(
            M, steps, lambda X, Y: torch.nn.functional.conv1d(X[None], Y.T[:, :, None])[0]),
        "multiplies matrices"),
    "04.1, singular values from the eigenvalues of M^T M": (
        "04.1", lambda M, steps: SOLUTIONS["nb04"].ns_singular_values(
            torch.linalg.eigvalsh(M.T @ M).clamp(min=0).sqrt().diag(), steps), "multiplies matrices"),
    "05.1, without the clip": (
        "05.1", lambda W0, batches, **kw: SOLUTIONS["nb05"].exact_mars_adamw_by_hand(W0, batches, max_norm=math.inf,
                                                                                     **kw), "max_norm = 1.0"),
    "05.1, g_prev = g_1 at step 1": ("05.1", _mars_with_c1_equal_to_g1, "g_prev = 0"),
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


def _ns_polynomial_by_broadcasting(M, steps):
    """04.1 right, with broadcasting on vectors only: p(s) = q1 s + q3 s^3 + q5 s^5 as (q * s[:, None] ** [1, 3, 5])
    summed over the powers, and the normalisation as a scalar times a matrix."""
    q = torch.tensor(mars_ref.pieces.NS_COEFFICIENTS, dtype=torch.float64)
    powers = torch.tensor([1, 3, 5], dtype=torch.float64)
    M = M.double()
    s = torch.linalg.svdvals(M * (1 / (torch.linalg.norm(M) + 1e-7)))
    for _ in range(steps):
        s = (q * s[:, None] ** powers).sum(1)
    return s.sort(descending=True).values


def test_broadcasting_on_vectors_is_not_taken_for_a_matrix_product():
    """The broadcast-product guard of 04.1 notices a product spread over three dimensions, not a vector broadcast
    against a matrix or a scalar times a matrix."""
    right, verdict = exercises.verify("04.1", _ns_polynomial_by_broadcasting)
    assert right, verdict
    A, B, v = torch.ones(3, 4), torch.ones(4, 5), torch.ones(4)
    assert exercises._broadcast_product(A[:, :, None], B[None])
    assert exercises._broadcast_product(A.unsqueeze(2).expand(3, 4, 5), B.unsqueeze(0).expand(3, 4, 5))
    assert not exercises._broadcast_product(A, v)                      # columns scaled by a vector
    assert not exercises._broadcast_product(A, torch.tensor(2.0))      # a scalar times a matrix
    assert not exercises._broadcast_product(v[:, None], v[None, :])    # an outer product of two vectors
    assert not exercises._broadcast_product(A, A)                      # elementwise, no broadcasting


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
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t is not threading.current_thread() and t.daemon
                and t.is_alive() and "target" in t.name], "the stopped answer runs on in the background"


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
