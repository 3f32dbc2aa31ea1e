r"""Checks for the notebooks' exercises: ``check("01.1", your_function)`` says right, or not yet and why.

Each notebook ends with its exercises as cells: a function to write (it starts as
``raise NotImplementedError``) and a cell that calls :func:`check`. The check never raises: it prints
one of

    Exercise 01.1 (sgd_noise_floor): not answered yet. ...
    Exercise 01.1 (sgd_noise_floor): not right yet. For H = ..., expected 1.234e-02, got 2.468e-02.
    Exercise 01.1 (sgd_noise_floor): right. <what was checked>

(:func:`verify` returns the same verdict with ``True`` or ``False``, for tests). Every check compares
the answer with an *independent* computation (a linear solve, an enumeration, a simulation, the
library's own optimizer), never with the formula the exercise asks for, so it cannot give the answer
away. Where an exercise asks for an idea (a closed form, a formula instead of an enumeration, a
computation without the library function it explains), the check also uses inputs on which the
shortcut fails: a size at which a loop or an enumeration cannot finish in time, a matrix on which the
library function is inaccurate, or a guard that notices a call to the function being explained (or to the
torch operators it is made of, such as the matrix products of an iteration the exercise does on scalars, also
when written out with broadcasting).

The answer is called on copies of the check's inputs (an answer that changes its input in place
cannot break the check), within a time limit (a minute, less where the point is to avoid a loop), and
a failure of the check's own code is reported as such, not blamed on the answer. The reference
solutions are in ``notebooks/solutions/`` and ``tests/test_exercises_*.py`` checks that each one passes
its check.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import decimal
import itertools
import math
import signal
import statistics
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["check", "verify", "EXERCISES", "Wrong"]


class Wrong(AssertionError):
    """An answer that does not match: the message says for which input, what was expected and what came."""


@dataclass(frozen=True)
class Exercise:
    name: str                          # the function the student writes
    verify: Callable[[Callable], str]  # raises Wrong (or NotImplementedError from the stub); returns what it checked
    seconds: float = 60.0              # time limit of the whole check (answer and check together)


class _AnswerFailed(Exception):
    """The student's function raised ``error`` (any exception but ``NotImplementedError``)."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class _TimeUp(BaseException):  # not an Exception: neither the answer's nor the check's `except Exception` stops it
    pass


class _Answer:
    """The student's function as a check calls it: on deep copies of the inputs, its exceptions marked as its own,
    and, while ``forbidden`` names library functions, a record of whether it called one of them."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.forbidden: dict[str, Callable] = {}
        self.called: set[str] = set()
        self.forbidden_ops: frozenset[str] = frozenset()  # torch operators ("aten.mm", ...) to notice
        self.ops_called: set[str] = set()
        self.product_work = [0]  # elements produced by elementwise products of two non-scalar tensors

    def __call__(self, *args, **kwargs):
        args, kwargs = copy.deepcopy((args, kwargs))
        undo = self._guard()
        try:
            if self.forbidden_ops:
                with _recording_ops(self.forbidden_ops, self.ops_called, self.product_work):
                    return self.fn(*args, **kwargs)
            return self.fn(*args, **kwargs)
        except (NotImplementedError, _TimeUp):
            raise
        except Exception as e:
            raise _AnswerFailed(e) from e
        finally:
            for namespace, key, value in undo:
                namespace[key] = value

    def _guard(self) -> list:
        """Replace each forbidden function, where the answer can reach it, by a wrapper that records the call."""
        undo = []
        for name, original in self.forbidden.items():
            def tripwire(*a, _name=name, _original=original, **kw):
                self.called.add(_name)
                return _original(*a, **kw)
            namespaces = [vars(module) for module in list(sys.modules.values())
                          if module is not None and getattr(module, "__name__", "").startswith("mars_ref")]
            namespaces.append(getattr(self.fn, "__globals__", {}))
            for namespace in namespaces:
                for key, value in list(namespace.items()):
                    if value is original:
                        undo.append((namespace, key, value))
                        namespace[key] = tripwire
        return undo


def _recording_ops(forbidden: frozenset[str], seen: set[str], work: list[int]):
    """A context in which every call of a torch operator named in ``forbidden`` (however it is reached: ``@``,
    ``torch.matmul``, ``einsum``, ``tensordot``, a library function) is added to ``seen``; the call still runs.
    With :data:`_BROADCAST_PRODUCT` in ``forbidden``, so is every elementwise product that multiplies a matrix
    product out by broadcasting (:func:`_broadcast_product`), described with its operands' shapes. ``work[0]``
    adds up the elements of every elementwise product of two non-scalar tensors: a matrix product computed piece
    by piece (a loop over rows, each a vector scaling a matrix) shows there as m·n·k elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in forbidden:
                seen.add(name)
            elif name in _ELEMENTWISE_PRODUCTS:
                a, b = args[1:3] if name.startswith("aten.addcmul") else args[:2]
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() > 1 and b.numel() > 1:
                    with contextlib.suppress(RuntimeError):
                        work[0] += math.prod(torch.broadcast_shapes(a.shape, b.shape))
                if _BROADCAST_PRODUCT in forbidden and _broadcast_product(a, b):
                    shapes = [tuple(1 if stride == 0 else size for size, stride in zip(t.shape, t.stride(),
                                                                                         strict=True)) for t in (a, b)]
                    seen.add(f"{name} of shapes {shapes[0]} and {shapes[1]}, broadcast against each other: "
                             f"{_BROADCAST_PRODUCT}, as in (A[:, :, None] * B[None]).sum(1)")
            return func(*args, **(kwargs or {}))

    return Recorder()


def _broadcast_product(a, b) -> bool:
    """Whether the elementwise product of tensors ``a`` and ``b`` spreads out a matrix product by broadcasting, as
    ``(A[:, :, None] * B[None]).sum(1)`` does: the result has a dimension along which only ``a`` varies, one along
    which only ``b`` varies, and one along which both vary (the one a sum then contracts). A dimension in which a
    tensor has size 1, or stride 0 (``expand``), or which it lacks, is one along which it does not vary. A scalar
    times a tensor, a vector scaling the columns of a matrix, or an outer product of two vectors is not such a
    product."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.layout != torch.strided \
            or b.layout != torch.strided:
        return False
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False

    def varies(t: torch.Tensor) -> list[bool]:
        pad = len(shape) - t.dim()
        return [d >= pad and t.shape[d - pad] > 1 and t.stride(d - pad) != 0 for d in range(len(shape))]

    pairs = list(zip(varies(a), varies(b), strict=True))
    return (any(x and not y for x, y in pairs) and any(y and not x for x, y in pairs)
            and any(x and y for x, y in pairs))


# the operators a matrix product reaches, whichever function or operator the answer writes it with
_MATRIX_PRODUCTS = frozenset(f"aten.{op}" for op in (
    "mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "dot", "vdot", "matmul", "_addmm_activation",
    "convolution", "_convolution"))
# a matrix product written out with broadcasting: an elementwise product of mutually broadcast operands, then a sum
_BROADCAST_PRODUCT = "a matrix product written with broadcasting"
_ELEMENTWISE_PRODUCTS = frozenset({"aten.mul", "aten.mul_", "aten.addcmul", "aten.addcmul_"})


def _number(value, what: str) -> float:
    """``value`` as a float, or Wrong naming what came instead."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise Wrong(f"{what}: expected a number, got {type(value).__name__} ({e}).") from None


def _tensor(value, what: str) -> torch.Tensor:
    """``value`` as a float64 tensor, or Wrong naming what came instead."""
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise Wrong(f"{what}: expected a tensor, got {type(value).__name__} ({e}).") from None


def _close(got, expected, rel: float, what: str, abs_: float = 0.0) -> None:
    got = _number(got, what)
    if math.isinf(expected):
        if not math.isinf(got):
            raise Wrong(f"{what}: expected inf (no stationary state), got {got:.4g}.")
        return
    if not math.isfinite(got) or abs(got - expected) > rel * abs(expected) + abs_:
        raise Wrong(f"{what}: expected {expected:.6g}, got {got:.6g}.")


def _lyapunov(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """The stationary covariance ``P = A P Aᵀ + Q`` of ``s ← A s + noise``, by one linear solve."""
    n = A.shape[0]
    K = torch.eye(n * n, dtype=torch.float64) - torch.kron(A, A)
    return torch.linalg.solve(K, Q.reshape(-1)).reshape(n, n)


# ----------------------------------------------------------------------------------------------- notebook 01


def _sgd_noise_floor(answer) -> str:
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    cases = [(torch.tensor([[42.0, -20.0], [-20.0, 10.0]], dtype=torch.float64), eta, 1.5)
             for eta in (0.005, 0.02, 0.035)] + [(R @ R.T + 0.5 * torch.eye(3, dtype=torch.float64), 0.05, 0.3)]
    for H, eta, sigma in cases:
        A = torch.eye(len(H), dtype=torch.float64) - eta * H
        P = _lyapunov(A, eta**2 * sigma**2 * torch.eye(len(H), dtype=torch.float64))
        _close(answer(H, eta, sigma), 0.5 * torch.trace(H @ P).item(), 1e-6,
               f"for H with eigenvalues {[round(v, 3) for v in torch.linalg.eigvalsh(H).tolist()]}, eta = {eta:g}, "
               f"sigma = {sigma:g}")
    H = cases[0][0]
    _close(answer(H, 2.1 / torch.linalg.eigvalsh(H).max().item(), 1.0), math.inf, 0,
           "beyond eta * h_max = 2 SGD diverges (return float('inf'))")
    # an indefinite H: η h_max < 2, but along the eigenvector of h < 0 the factor 1 − η h exceeds 1
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    for eigenvalues in ((4.0, 1.0, -0.5), (-0.01, 2.0, 3.0)):
        H = Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T
        _close(answer(H, 0.1, 1.0), math.inf, 0,
               f"H with eigenvalues {list(eigenvalues)}, eta = 0.1 (eta * h_max < 2, but the negative eigenvalue "
               f"{min(eigenvalues):g} makes 1 - eta h > 1: x grows along it, return float('inf'))")
    return ("Matches the stationary covariance of the linear recursion (a direct solve), and inf past eta h_max = 2 "
            "and for an H with a negative eigenvalue.")


def _noise_without_replacement(answer) -> str:
    from .toys import TwoLayerRegression

    problem = TwoLayerRegression(n=7, d_in=3, hidden=4, seed=2)
    x = problem.init(torch.Generator().manual_seed(3))
    full = problem.grad(x)
    per_sample = problem.grad(x.expand(problem.n, -1), torch.arange(problem.n).unsqueeze(-1))
    for batch in (1, 3, 6, 7):
        subsets = torch.tensor(list(itertools.combinations(range(problem.n), batch)))
        exact = (per_sample[subsets].mean(1) - full).square().sum(-1).mean().item()  # every subset, equally likely
        _close(answer(problem, x, batch), exact, 1e-8, f"N = 7, B = {batch} (all {len(subsets)} subsets)", 1e-15)
    # N = 128: C(128, 32) ≈ 1e30 subsets, none of them enumerated. E‖mean_{i∈S} δ_i‖² from the probabilities that
    # one index (B/N) and that two given indices (B(B−1)/(N(N−1))) are in S, over the Gram matrix of δ_i = ∇f_i − ∇F.
    problem = TwoLayerRegression(seed=4)
    x = problem.init(torch.Generator().manual_seed(5))
    delta = problem.grad(x.expand(problem.n, -1), torch.arange(problem.n).unsqueeze(-1)) - problem.grad(x)
    gram, n = delta @ delta.T, problem.n
    for batch in (32, 64, 100):
        pairs = gram.sum() - gram.trace()
        exact = (batch / n * gram.trace() + batch * (batch - 1) / (n * (n - 1)) * pairs).item() / batch**2
        _close(answer(problem, x, batch), exact, 1e-8, f"N = 128, B = {batch} (about 1e30 subsets or more)", 1e-15)
    return ("Equals the average over every subset of B distinct samples: enumerated for N = 7, from the inclusion "
            "probabilities for N = 128 (B = 32, 64, 100), where no enumeration finishes.")


# ----------------------------------------------------------------------------------------------- notebook 02


def _affine_power(a: float, sigma: float, dim: int, t: int) -> float:
    """``E‖e_t‖²`` of ``E_s = (1−a)² E_{s−1} + a² dim σ²``, ``E_1 = dim σ²``: the affine map composed with itself
    by repeated squaring (log₂ t compositions, no loop over t), in 60-digit decimals from the exact inputs."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        a, noise = decimal.Decimal(a), decimal.Decimal(sigma) ** 2 * dim
        step, total, k = ((1 - a) ** 2, a**2 * noise), (decimal.Decimal(1), decimal.Decimal(0)), t - 1
        while k:  # maps E ↦ q E + c as pairs (q, c); (q2, c2) after (q1, c1) is (q2 q1, q2 c1 + c2)
            if k & 1:
                total = (step[0] * total[0], step[0] * total[1] + step[1])
            step, k = (step[0] * step[0], step[0] * step[1] + step[1]), k >> 1
        return float(total[0] * noise + total[1])


def _exact_storm_error_additive(answer) -> str:
    for a, dim in ((0.05, 2), (0.3, 3), (1.0, 2)):
        error = dim * 0.7**2  # E‖e_1‖² = dim σ²: d_1 = g_1
        for t in range(1, 201):
            if t > 1:
                error = (1 - a) ** 2 * error + a**2 * dim * 0.7**2  # e_t = (1−a) e_{t−1} + a σ ξ_t
            if t in (1, 2, 5, 20, 200):
                _close(answer(a, 0.7, t, dim), error, 1e-9, f"a = {a:g}, sigma = 0.7, t = {t}, dim = {dim}")
    for a, t in ((1e-6, 400_000), (2e-9, 300_000_000), (1e-9, 10**9)):  # slow decay: the closed form is needed
        # (1e-6 relative: a float64 closed form carries about t·1e-16 of rounding in (1−a)^(2(t−1)))
        _close(answer(a, 0.7, t, 2), _affine_power(a, 0.7, 2, t), 1e-6, f"a = {a:g}, sigma = 0.7, t = {t:,}, dim = 2")
    return ("Matches the error recursion step by step (t = 1 ... 200) for three values of a, and at t up to 1e9, "
            "where no loop over the steps finishes in time.")


def _gamma_doubling_noise(answer) -> str:
    from ..optimizer import MARS
    from ..pieces import storm_correction

    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for beta1 in (0.9, 0.95, 0.99):
        gamma = _number(answer(beta1), f"beta1 = {beta1:g}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise Wrong(f"beta1 = {beta1:g}: gamma = {gamma:g} solves the equation, but MARS refuses it (gamma must be "
                        ">= 0 and finite): take the other root.")
        try:
            MARS([torch.zeros(2, 2, requires_grad=True)], gamma=gamma, betas=(beta1, 0.99))
        except ValueError as e:
            raise Wrong(f"beta1 = {beta1:g}: MARS refuses gamma = {gamma:g}: {e}") from None
        # c_t = (1+k) g_t − k g_{t−1}: with independent noise of equal variance, the variance ratio is the sum of the
        # squared coefficients, read off the library's own storm_correction
        ratio = sum(storm_correction(g, g_prev, gamma, beta1).item() ** 2 for g, g_prev in ((one, zero), (zero, one)))
        _close(ratio, 2.0, 1e-9, f"beta1 = {beta1:g}: the noise ratio of c_t at your gamma = {gamma:g}")
    return ("At your gamma (one MARS accepts) the approx correction doubles the noise variance, for beta1 = 0.9, "
            "0.95, 0.99.")


# ----------------------------------------------------------------------------------------------- notebook 03


def _max_step_norm(answer) -> str:
    from ..pieces import clip_by_global_norm, clip_by_norm
    from .toys import TwoLayerRegression, run

    problem = TwoLayerRegression(n=32, d_in=4, hidden=6, batch=2)
    for clip in ("tensor", "global"):
        r = run(problem, "mars-exact", lr=0.3, steps=60, seeds=8, beta=0.5, gamma=1.0, clip=clip, max_norm=0.05,
                keep_path=True)
        longest = (r.path[1:] - r.path[:-1]).norm(dim=-1).max().item()
        bound = _number(answer(0.3, 0.05, 2, clip), f"clip = {clip!r}")
        if not longest <= bound * (1 + 1e-12):
            raise Wrong(f"clip = {clip!r}: a step of length {longest:.4g} exceeds your bound {bound:.4g}.")
    # The bound must be the least one. m_t is an average of c_1..c_t, so a constant c_t makes ‖m_t‖ → ‖c‖: the
    # supremum is η times the longest clipped c, here every tensor far above τ, clipped by the library's own rules.
    gen = torch.Generator().manual_seed(11)
    for lr, tau in ((0.3, 0.05), (0.02, 3.0)):
        for n_tensors in (1, 2, 3, 5, 8):
            parts = [torch.randn(4, 3, generator=gen, dtype=torch.float64) * 50 for _ in range(n_tensors)]
            longest = {"tensor": torch.cat([clip_by_norm(p, tau).flatten() for p in parts]).norm().item(),
                       "global": torch.cat([p.flatten() for p in clip_by_global_norm(parts, tau)]).norm().item()}
            for clip, length in longest.items():
                where = f"clip = {clip!r}, {n_tensors} tensors, lr = {lr:g}, tau = {tau:g}"
                bound = _number(answer(lr, tau, n_tensors, clip), where)
                if bound > lr * length * (1 + 1e-9):
                    raise Wrong(f"{where}: your bound {bound:.6g} holds but is not the least one: a constant c_t "
                                f"reaches {lr * length:.6g}.")
                _close(bound, lr * length, 1e-9, where)
    try:
        answer(0.3, 0.05, 2, "none")
    except _AnswerFailed as e:
        if isinstance(e.error, ValueError):
            return ("Both bounds hold on 60 steps of 8 runs and are the least ones (reached by a constant clipped c_t, "
                    "for 1 to 8 tensors, two pairs of lr and tau); clip='none' raises ValueError.")
        raise
    raise Wrong("clip = 'none' has no bound: raise ValueError.")


def _clip_cosine(answer) -> str:
    gen = torch.Generator().manual_seed(2)
    cases = [[torch.randn(3, 4, generator=gen) * 0.01, torch.randn(5, generator=gen) * 0.01],
             [torch.randn(30, generator=gen) * 10, torch.randn(4, generator=gen) * 0.1],
             [torch.randn(8, generator=gen) * 3, torch.randn(6, generator=gen) * 2, torch.randn(5, generator=gen)]]
    for tau in (1.0, 0.5, 3.0):
        for parts in cases:
            factors = [min(1.0, tau / p.double().norm().item()) for p in parts]
            u = torch.cat([f * p.double().flatten() for f, p in zip(factors, parts, strict=True)])
            v = torch.cat([p.double().flatten() for p in parts])
            _close(answer(parts, tau), (u @ v / (u.norm() * v.norm())).item(), 1e-6,
                   f"parts of norms {[round(p.norm().item(), 3) for p in parts]}, tau = {tau:g}")
    return "Right for parts that are not clipped, clipped alone, and all clipped, at tau = 1, 0.5 and 3."


# ---------------------------------------------------------------------------------------------- notebook 03b


def _storm_floor_ratio(answer) -> str:
    for a, eta, h in ((0.05, 0.1, 0.1), (0.05, 0.1, 5.0), (0.2, 0.05, 2.0), (0.5, 0.2, 9.0)):
        rho = 1 - eta * h
        A = torch.tensor([[rho, -eta], [0.0, 1 - a]], dtype=torch.float64)  # (x, e) ← A (x, e) + (0, aσξ)
        P = _lyapunov(A, torch.tensor([[0.0, 0.0], [0.0, a**2]], dtype=torch.float64))
        sgd = eta**2 / (1 - rho**2)  # Var(x) of SGD, σ = 1
        _close(answer(a, eta, h), P[0, 0].item() / sgd, 1e-6, f"a = {a:g}, eta = {eta:g}, h = {h:g}")
    return "Matches the stationary covariance of the coupled (x, e) recursion (a direct solve) in four settings."


# ----------------------------------------------------------------------------------------------- notebook 04


def _ns_singular_values(answer) -> str:
    from .. import pieces

    answer.forbidden = {"newton_schulz": pieces.newton_schulz}  # the function the exercise explains
    answer.forbidden_ops = _MATRIX_PRODUCTS | {_BROADCAST_PRODUCT}  # and the matrix products its iteration is made
    # of, with an operator or written out with broadcasting
    for shape in ((40, 40), (64, 24), (24, 64)):
        gen = torch.Generator().manual_seed(shape[0])
        M = torch.randn(*shape, generator=gen, dtype=torch.float64) @ torch.diag(
            torch.logspace(0, -3, shape[1], dtype=torch.float64))
        for steps in (1, 3, 5):
            expected = torch.linalg.svdvals(pieces.newton_schulz(M, steps, dtype=torch.float64))
            got = _tensor(answer(M, steps), f"shape {shape}, {steps} steps").flatten().sort(descending=True).values
            if answer.called:
                raise Wrong("your function calls newton_schulz, the iteration this exercise asks you to do without: "
                            "apply the scalar polynomial p(s) to the normalised singular values of M instead.")
            if answer.ops_called:
                raise Wrong(f"your function multiplies matrices ({'; '.join(sorted(answer.ops_called))}), which this "
                            "exercise asks you to do without: apply the scalar polynomial p(s) to the normalised "
                            "singular values of M (a vector) instead of iterating on the matrix.")
            limit = 64 * min(shape) * max(steps, 1)  # the polynomial on the singular values: a few vector products
            if answer.product_work[0] > limit:
                raise Wrong(f"shape {shape}, {steps} steps: your function's elementwise products of tensors make "
                            f"{answer.product_work[0]:,} elements (the polynomial on the {min(shape)} singular values "
                            f"needs a few hundred per step, at most {limit:,}): that is a matrix product computed "
                            "piece by piece, e.g. a loop over rows. Apply the scalar polynomial p(s) to the normalised "
                            "singular values of M (a vector) instead of iterating on the matrix.")
            answer.product_work[0] = 0
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-9, atol=1e-12):
                raise Wrong(f"shape {shape}, {steps} steps: expected singular values starting "
                            f"{expected[:3].tolist()}, got {got[:3].tolist()}.")
    return ("Equal to the singular values of newton_schulz(M, steps) in float64 (3 shapes x 1, 3, 5 steps), without "
            "calling it or multiplying matrices (with an operator or by broadcasting).")


def _damped_one_step_shampoo(answer) -> str:
    from ..pieces import shampoo_direction

    gen = torch.Generator().manual_seed(7)
    for shape in ((30, 30), (48, 20), (20, 48)):
        M = torch.randn(*shape, generator=gen, dtype=torch.float64)
        for eps in (1e-3, 1.0, 30.0):
            expected = shampoo_direction(M @ M.T, M.T @ M, M, eps)
            got = _tensor(answer(M, eps), f"shape {shape}, eps = {eps:g}")
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-7, atol=1e-9):
                raise Wrong(f"shape {shape}, eps = {eps:g}: differs from shampoo_direction(M Mᵀ, MᵀM, M, eps).")
    # An ill-conditioned M (singular values 1 ... 1e-9) built from known orthonormal factors, and an eps far below
    # round-off of M Mᵀ: forming M Mᵀ squares the condition number and loses the weak directions (shampoo_direction
    # is off by O(1) there), while one SVD of M keeps them.
    for shape in ((24, 24), (40, 16), (16, 40)):
        r = min(shape)
        U, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64))
        s = torch.logspace(0, -9, r, dtype=torch.float64)
        M = U @ torch.diag(s) @ V.T
        for eps in (1e-24, 1e-14):
            # the limit of (M Mᵀ + εI)^(-1/4) M (MᵀM + εI)^(-1/4) on these factors: each u_i s_i v_iᵀ scaled by
            # (s_i² + ε)^(-1/4) from both sides
            expected = (U * (s * (s**2 + eps) ** -0.5)) @ V.T
            got = _tensor(answer(M, eps), f"shape {shape}, eps = {eps:g}, singular values 1 ... 1e-9")
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=1e-6):
                gap = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
                raise Wrong(f"shape {shape}, singular values 1 ... 1e-9, eps = {eps:g}: off by up to {gap:.3g}. "
                            "Forming M Mᵀ (as shampoo_direction does) loses the weak directions to round-off; one "
                            "SVD of M keeps them.")
    return ("Equal to full Shampoo's L^-1/4 M R^-1/4 with damping (3 shapes x 3 values of eps), and accurate where "
            "forming M Mᵀ is not (singular values down to 1e-9, eps down to 1e-24).")


# ----------------------------------------------------------------------------------------------- notebook 05


def _exact_mars_adamw_by_hand(answer) -> str:
    from ..optimizer import MARS

    gen = torch.Generator().manual_seed(3)
    W1 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    data = [(torch.randn(16, 6, generator=gen, dtype=torch.float64),
             torch.randn(16, 3, generator=gen, dtype=torch.float64)) for _ in range(12)]
    # scale 0.01 shrinks every gradient 100-fold: c_1 is not clipped there, so the step-1 convention g_prev = 0
    # shows (with c_1 clipped to norm 1, any multiple of g_1 gives the same c_1)
    for lr, weight_decay, scale in ((1e-2, 0.0, 1.0), (0.3, 0.1, 1.0), (1e-2, 0.0, 0.01)):
        kw = dict(lr=lr, betas=(0.9, 0.99), gamma=0.5, eps=1e-8, weight_decay=weight_decay)
        W0, batches = W1 * scale, [(A, B * scale) for A, B in data]
        where = f"lr = {lr:g}, weight decay = {weight_decay:g}" + (f", W0 and Y times {scale:g}" if scale != 1 else "")
        W = torch.nn.Parameter(W0.clone())
        opt = MARS([W], exact=True, **kw)
        after = []  # W after each step
        for A, B in batches:
            def closure(A=A, B=B, W=W, opt=opt):
                opt.zero_grad()
                loss = ((A @ W - B) ** 2).mean()
                loss.backward()
                return loss
            opt.step(closure)
            after.append(W.detach().clone())
        for t in (*range(1, 6), 12):  # the first step at which the answer departs says which convention it misses
            got = _tensor(answer(W0.clone(), batches[:t], **kw), where)
            gap = (got - after[t - 1]).abs().max().item() if got.shape == after[t - 1].shape else float("nan")
            if not gap < 1e-12:
                raise Wrong(f"{where}: after {t} of the minibatches your W "
                            f"differs from mars_ref.MARS(exact=True) by up to {gap:.3g}. MARS's conventions: at step "
                            "1 there is no previous point, so g_prev = 0 and c_1 = (1 + gamma beta1 / (1 - beta1)) "
                            "g_1; every c_t is clipped to norm at most 1 (clip_by_norm's default max_norm = 1.0, the "
                            "authors' tau) before it enters both moments; t counts from 1 in the bias corrections.")
    return ("Equal to mars_ref.MARS(exact=True) driven by opt.step(closure), to 1e-12, after each of the first 5 "
            "steps and after 12, with and without clipping, and with c_1 too small to be clipped.")


def _paired_difference(answer) -> str:
    for a, b in (([0.987, 0.983, 0.991, 0.979], [0.990, 0.985, 0.999, 0.984]), ([1.0, 2.0, 4.0], [0.5, 2.5, 3.0])):
        d = [x - y for x, y in zip(a, b, strict=True)]
        result = answer(a, b)
        try:
            mean, std, t = (_number(v, f"the differences {d}") for v in result)
        except (TypeError, ValueError):
            raise Wrong(f"for the differences {d}: return three numbers (mean, std, t), got {result!r}.") from None
        _close(mean, statistics.fmean(d), 1e-12, f"mean of {d}", 1e-15)
        _close(std, statistics.stdev(d), 1e-9, f"sample standard deviation of {d}")
        _close(t, statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d))), 1e-9, f"paired t of {d}")
    return "Mean, sample standard deviation and paired t agree with the statistics module."


# ----------------------------------------------------------------------------------------------- notebook 06


def _noise_ratio(answer) -> str:
    from ..pieces import storm_correction

    gen = torch.Generator().manual_seed(0)
    for gamma, beta1, held in ((0.025, 0.95, None), (0.1, 0.9, 8), (0.5, 0.5, 1), (0.0, 0.95, 8)):
        full = torch.randn(4, generator=gen, dtype=torch.float64)
        g_prev, g = (full + torch.randn(200_000, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        estimate = full if held is None else full + torch.randn(200_000, held, 4, generator=gen,
                                                                dtype=torch.float64).mean(1)
        c = storm_correction(g, g_prev, gamma, beta1)  # the library's c_t, simulated
        simulated = ((c - estimate) ** 2).sum(1).mean().item() / ((g - estimate) ** 2).sum(1).mean().item()
        _close(answer(gamma, beta1, held), simulated, 0.015,
               f"gamma = {gamma:g}, beta1 = {beta1:g}, {held or 'infinitely many'} held-out batches (simulated)")
    return "Within 1.5 % of a simulation with 200,000 draws, in four settings."


def _momentum_lag(answer) -> str:
    from ..pieces import momentum, storm_correction

    for gamma in (0.0, 0.025, 0.3, 1.0):
        for beta1 in (0.9, 0.95):
            m = g_prev = torch.zeros(1, dtype=torch.float64)
            for t in range(1, 3001):  # a noiseless ramp ∇F_t = t·0.01
                g = torch.tensor([t * 0.01], dtype=torch.float64)
                m, g_prev = momentum(m, storm_correction(g, g_prev, gamma, beta1), beta1), g
            _close(answer(gamma, beta1), (30.0 - m.item()) / 0.01, 0, f"gamma = {gamma:g}, beta1 = {beta1:g}", 1e-6)
    return "Matches the lag of MARS's momentum on a simulated ramp, for 4 values of gamma and 2 of beta1."


EXERCISES: dict[str, Exercise] = {
    "01.1": Exercise("sgd_noise_floor", _sgd_noise_floor),
    "01.2": Exercise("noise_without_replacement", _noise_without_replacement, seconds=20.0),
    "02.1": Exercise("exact_storm_error_additive", _exact_storm_error_additive, seconds=20.0),
    "02.2": Exercise("gamma_doubling_noise", _gamma_doubling_noise),
    "03.1": Exercise("max_step_norm", _max_step_norm),
    "03.2": Exercise("clip_cosine", _clip_cosine),
    "03b.1": Exercise("storm_floor_ratio", _storm_floor_ratio),
    "04.1": Exercise("ns_singular_values", _ns_singular_values),
    "04.2": Exercise("damped_one_step_shampoo", _damped_one_step_shampoo),
    "05.1": Exercise("exact_mars_adamw_by_hand", _exact_mars_adamw_by_hand),
    "05.2": Exercise("paired_difference", _paired_difference),
    "06.1": Exercise("noise_ratio", _noise_ratio),
    "06.2": Exercise("momentum_lag", _momentum_lag),
}


def _within(seconds: float, run: Callable[[], str]) -> str:
    """``run()``, stopped with :class:`_TimeUp` after ``seconds``: by SIGALRM in the main thread (a notebook's
    kernel), else in a daemon thread that is then stopped by an exception raised into it (at its next Python
    line: a loop in Python stops; a long torch call finishes first), so no answer runs on in the background."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def stop(signum, frame):
            raise _TimeUp
        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = run()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_TimeUp))
        worker.join(5.0)
        raise _TimeUp
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def verify(exercise: str, answer, seconds: float | None = None) -> tuple[bool, str]:
    """``(right, verdict)`` for ``answer`` (the student's function) to ``exercise`` (e.g. ``"01.1"``).

    Never raises for a wrong or unfinished answer: a stub that raises ``NotImplementedError`` is "not
    answered yet", any other exception of the answer is reported with its message, an answer that does not
    return within the exercise's time limit (``seconds`` overrides it) is stopped and said so, and a failure
    of the check's own code is reported as the check's, not the answer's. The answer always gets copies
    of the check's inputs."""
    if exercise not in EXERCISES:
        raise KeyError(f"no exercise {exercise!r}; the exercises are {', '.join(EXERCISES)}")
    ex = EXERCISES[exercise]
    head = f"Exercise {exercise} ({ex.name})"
    limit = ex.seconds if seconds is None else seconds
    if not callable(answer):
        return False, (f"{head}: not right yet. Give the function itself, check({exercise!r}, {ex.name}), "
                       f"not {type(answer).__name__}.")
    try:
        detail = _within(limit, lambda: ex.verify(_Answer(answer)))
    except NotImplementedError:
        return False, (f"{head}: not answered yet. Write the function in the cell above (it still raises "
                       "NotImplementedError), run that cell, then this one.")
    except Wrong as e:
        return False, f"{head}: not right yet. {e}"
    except _AnswerFailed as e:  # the student's code failed: say how, do not stop the notebook
        return False, f"{head}: your function raised {e}"
    except _TimeUp:
        return False, (f"{head}: not right yet. The check did not finish within {limit:g} s and was stopped: your "
                       "function takes too long (an endless loop, or a loop or enumeration where the exercise asks "
                       "for a closed form).")
    except Exception as e:  # the check's own code failed, not the answer: say so, do not blame the student
        return False, (f"{head}: the check itself failed ({type(e).__name__}: {e}); this is not a verdict on your "
                       "answer. Please report it with your function.")
    return True, f"{head}: right. {detail}"


def check(exercise: str, answer) -> None:
    """Print whether ``answer`` is right for ``exercise``, and why not (see :func:`verify`)."""
    print(verify(exercise, answer)[1])


# ---------------------------------------------------------------------------------------------- notebook 02b


def _svrg_cases(sizes=((4, 3, 0.9), (5, 2, 0.3), (3, 4, -0.5)), seed=11):
    """Per-sample gradients ``X`` (at x) and ``Y`` (at the snapshot): correlated, with non-zero means; ``sizes``
    lists (N, dim, correlation)."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n, dim, rho in sizes:
        X = torch.randn(n, dim, generator=gen, dtype=torch.float64) + torch.randn(dim, generator=gen,
                                                                                   dtype=torch.float64)
        Y = rho * X + (1 - rho**2) ** 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + 0.5
        cases.append((X, Y))
    return cases


def _svrg_variance_enumerated(X: torch.Tensor, Y: torch.Tensor, alpha: float, batch: int) -> float:
    """``E‖v − ∇F(x)‖²`` by listing every ordered minibatch of ``batch`` indices drawn with replacement."""
    n = X.shape[0]
    full_x, full_y = X.mean(0), Y.mean(0)
    total = 0.0
    for idx in itertools.product(range(n), repeat=batch):
        idx = list(idx)
        v = X[idx].mean(0) - alpha * (Y[idx].mean(0) - full_y)
        total += (v - full_x).square().sum().item()
    return total / n**batch


def _svrg_variance_by_counts(X: torch.Tensor, Y: torch.Tensor, alpha: float, batch: int) -> float:
    """``E‖v − ∇F(x)‖²`` from the moments of how often each index is drawn, no minibatch listed: ``batch`` draws
    with replacement give counts ``n ~ Multinomial(batch, 1/N)``, ``E[n] = batch/N``, ``E[n_i n_j] = batch/N [i = j]
    + batch(batch − 1)/N²``, and ``v = (1/batch) Σ_i n_i a_i + α Ȳ`` with the uncentred ``a_i = X_i − α Y_i``."""
    n = X.shape[0]
    a = X - alpha * Y
    gram = a @ a.T
    mean_sq = (batch / n * gram.trace() + batch * (batch - 1) / n**2 * gram.sum()) / batch**2  # E‖Σ n_i a_i / B‖²
    mean = a.mean(0)  # E[Σ n_i a_i / B]
    target = X.mean(0) - alpha * Y.mean(0)  # v − ∇F(x) = Σ n_i a_i / B − target
    return (mean_sq - 2 * mean @ target + target @ target).item()


def _svrg_variance(answer) -> str:
    for X, Y in _svrg_cases():
        for alpha in (0.0, 0.5, 1.0, 1.4):
            for batch in (1, 2, 3):
                expected = _svrg_variance_enumerated(X, Y, alpha, batch)
                _close(answer(X.clone(), Y.clone(), alpha, batch), expected, 1e-9,
                       f"N = {X.shape[0]}, dim = {X.shape[1]}, alpha = {alpha:g}, batch = {batch}")
    # Sizes at which no enumeration finishes: N^B ordered minibatches (and still ~1e10 or more unordered multisets),
    # B > N included, as drawing with replacement allows; the expected value from the draw counts' moments.
    for (X, Y), batch in zip(_svrg_cases(((64, 5, 0.8), (200, 3, 0.5), (12, 4, -0.3)), seed=12), (8, 30, 40),
                             strict=True):
        for alpha in (0.3, 1.0):
            n = X.shape[0]
            _close(answer(X.clone(), Y.clone(), alpha, batch), _svrg_variance_by_counts(X, Y, alpha, batch), 1e-9,
                   f"N = {n}, dim = {X.shape[1]}, alpha = {alpha:g}, batch = {batch} ({n}^{batch} = "
                   f"{float(n) ** batch:.1e} minibatches: too many to list)")
    return ("Equals the average over every minibatch drawn with replacement: all N^B of them listed for 3 data sets, "
            "4 values of alpha and B = 1, 2, 3; and, from the moments of the draw counts, at N = 64, 200, 12 with "
            "B = 8, 30, 40, where no enumeration finishes.")


def _optimal_alpha(answer) -> str:
    for X, Y in _svrg_cases():
        v0, v1, v2 = (_svrg_variance_enumerated(X, Y, a, 1) for a in (0.0, 1.0, 2.0))
        # V(α) is a parabola: its vertex from three enumerated values, no covariance formula needed
        curvature, slope_at_0 = (v2 - 2 * v1 + v0) / 2, (4 * v1 - v2 - 3 * v0) / 2
        best = -slope_at_0 / (2 * curvature)
        got = float(answer(X.clone(), Y.clone()))
        _close(got, best, 1e-9, f"N = {X.shape[0]}, dim = {X.shape[1]}", 1e-12)
    return "Is the vertex of the enumerated variance V(alpha) (a parabola through alpha = 0, 1, 2), for 3 data sets."


EXERCISES["02b.1"] = Exercise("svrg_variance", _svrg_variance, seconds=20.0)
EXERCISES["02b.2"] = Exercise("optimal_alpha", _optimal_alpha)
