"""Tests of ``mars_ref.MARS`` against an independent, deliberately naive transcription of
`docs/algorithm.md` §2–§6 written below (plain elementwise tensor math; it never calls
``mars_ref.pieces``), plus exact mode, checkpoints, state layout and input checking.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.func import grad as func_grad

from mars_ref import MARS

F64 = torch.float64
N_SAMPLES, BATCH = 40, 8

# ---------------------------------------------------------------------------- fixed problem


def _data(dtype=F64):
    g = torch.Generator().manual_seed(1234)
    X = torch.randn(N_SAMPLES, 5, generator=g, dtype=F64)
    Y = torch.randn(N_SAMPLES, 3, generator=g, dtype=F64)
    # a different, fixed minibatch (index set) at every step
    batches = [torch.randperm(N_SAMPLES, generator=g)[:BATCH] for _ in range(64)]
    return X.to(dtype), Y.to(dtype), batches


X_DATA, Y_DATA, BATCHES = _data()


class TinyNet(nn.Module):
    """2-D weights (one tall 8×5, one wide 3×8), biases and a LayerNorm (1-D tensors)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(self.norm(torch.tanh(self.fc1(x)))))


def make_model(seed=0, dtype=F64, dropout=0.0):
    torch.manual_seed(seed)
    model = TinyNet(dropout).to(dtype)
    with torch.no_grad():  # LayerNorm starts at (1, 0): move it off so its gradients are generic
        model.norm.weight.add_(0.1 * torch.randn(8, dtype=dtype))
        model.norm.bias.add_(0.1 * torch.randn(8, dtype=dtype))
    return model


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def make_closure(model, opt, t, set_to_none=True, X=None, Y=None):
    X = X_DATA if X is None else X
    Y = Y_DATA if Y is None else Y
    idx = BATCHES[t]

    dtype = next(model.parameters()).dtype

    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = loss_fn(model(X[idx].to(dtype)), Y[idx].to(dtype))
        loss.backward()
        return loss

    return closure


def grads_at(model, params: dict, t: int) -> dict:
    """∇f(params, ξ_t), computed functionally (no .grad, no optimizer involved)."""
    idx = BATCHES[t]
    return func_grad(lambda p: loss_fn(functional_call(model, p, (X_DATA[idx],)), Y_DATA[idx]))(params)


def run_mars(model, opt, steps, exact, sched=None, set_to_none=True, start=0):
    for t in range(start, start + steps):
        closure = make_closure(model, opt, t, set_to_none)
        if exact:
            opt.step(closure)
        else:
            closure()
            opt.step()
        if sched is not None:
            sched.step()


# ---------------------------------------------------------------------------- naive transcription


def naive_newton_schulz(M, steps, eps):
    """§4: X ← M/(‖M‖_F+ε), transposed if tall; 5× A = XXᵀ, B = AX, X ← aX + bB + cAB."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M / (torch.sqrt((M * M).sum()) + eps)
    tall = M.shape[0] > M.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = A @ X
        X = a * X + b * B + c * (A @ B)
    return X.T if tall else X


class NaiveMARS:
    """`docs/algorithm.md` §2–§6, one line per equation, for named tensors and per-group settings.

    ``groups``: list of dicts with "names" and every hyperparameter (as given to MARS).
    ``step(params, grads, lrs, g_prev_exact)`` returns the new parameters (a new dict).
    """

    def __init__(self, groups, params):
        self.groups = groups
        self.state = {n: {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                          "g_prev": torch.zeros_like(p)} for n, p in params.items()}
        self.clip_events = {"clipped": 0, "not clipped": 0}

    def _clip_factor(self, norm, max_norm):
        if norm > max_norm:
            self.clip_events["clipped"] += 1
            return max_norm / norm
        self.clip_events["not clipped"] += 1
        return 1.0

    def step(self, params, grads, lrs, g_prev_exact=None):
        new = dict(params)
        for grp, lr in zip(self.groups, lrs, strict=True):
            beta1, beta2 = grp["betas"]
            eps, gamma = grp["eps"], grp["gamma"]
            c = {}
            for n in grp["names"]:
                x, g, st = params[n], grads[n], self.state[n]
                st["t"] += 1
                t = st["t"]
                if not (grp["optimize_1d"] or x.ndim == 2):
                    # §5: plain AdamW on the raw gradient, lr · lr_1d / lr_at_construction
                    b1, b2 = grp["betas_1d"]
                    st["m"] = b1 * st["m"] + (1 - b1) * g
                    st["v"] = b2 * st["v"] + (1 - b2) * g * g
                    denom = (torch.sqrt(st["v"]) / math.sqrt(1 - b2**t) + eps) * (1 - b1**t)
                    lr_1d = lr * grp["lr_1d"] / grp["lr"]
                    new[n] = x - lr_1d * (grp["weight_decay_1d"] * x + st["m"] / denom)
                    continue
                # §1: c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)
                g_prev = g_prev_exact[n] if grp["exact"] else st["g_prev"]
                c[n] = g + gamma * beta1 / (1 - beta1) * (g - g_prev)
            # §2: clipping
            if grp["clip"] == "tensor":
                for n in c:
                    c[n] = c[n] * self._clip_factor(torch.sqrt((c[n] * c[n]).sum()), grp["max_norm"])
            elif grp["clip"] == "global":
                norm = torch.sqrt(sum((c[n] * c[n]).sum() for n in c))
                factor = self._clip_factor(norm, grp["max_norm"])
                c = {n: c[n] * factor for n in c}
            for n in c:
                x, st, t = params[n], self.state[n], self.state[n]["t"]
                # §3: m_t = β1·m_{t−1} + (1−β1)·c_t
                st["m"] = beta1 * st["m"] + (1 - beta1) * c[n]
                # §4
                if grp["preconditioner"] == "lion":
                    u = torch.sign(st["m"])
                elif grp["preconditioner"] == "shampoo" and x.ndim == 2:
                    u = naive_newton_schulz(st["m"] / (1 - beta1), grp["ns_steps"], eps)
                    u = u * math.sqrt(max(1.0, x.shape[0] / x.shape[1]))
                else:
                    st["v"] = beta2 * st["v"] + (1 - beta2) * c[n] * c[n]
                    denom = (torch.sqrt(st["v"]) / math.sqrt(1 - beta2**t) + eps) * (1 - beta1**t)
                    u = st["m"] / denom
                new[n] = x - lr * (grp["weight_decay"] * x + u)
                st["g_prev"] = grads[n].clone()
        return new


# Three groups with every hyperparameter different.
#   group 0  fc1.weight (tall) + fc1.bias     optimize_1d=True,  clip global (over 2 tensors)
#   group 1  norm.weight/bias + fc2.weight    optimize_1d=False, clip per tensor; the norm takes the 1-D AdamW
#   group 2  fc2.bias                         optimize_1d=True,  no clipping
GROUP_NAMES = [["fc1.weight", "fc1.bias"], ["norm.weight", "norm.bias", "fc2.weight"], ["fc2.bias"]]
GROUP_SETTINGS = [
    dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, gamma=0.5, clip="global", max_norm=4.0,
         optimize_1d=True, lr_1d=1e-2, betas_1d=(0.8, 0.9), weight_decay_1d=0.3, ns_steps=5),
    dict(lr=1e-2, betas=(0.95, 0.98), eps=1e-6, weight_decay=0.1, gamma=0.1, clip="tensor", max_norm=3.0,
         optimize_1d=False, lr_1d=3e-2, betas_1d=(0.85, 0.97), weight_decay_1d=0.2, ns_steps=7),
    dict(lr=5e-3, betas=(0.85, 0.95), eps=1e-7, weight_decay=0.02, gamma=0.025, clip="none", max_norm=1.0,
         optimize_1d=True, lr_1d=1e-3, betas_1d=(0.9, 0.95), weight_decay_1d=0.1, ns_steps=5),
]
LR_LAMBDAS = [lambda k: 1.0 / (1.0 + 0.05 * k), lambda k: 0.97**k, lambda k: min(1.0, (k + 1) / 5)]
PRECONDITIONER_SETS = {
    "adamw": ["adamw"] * 3, "lion": ["lion"] * 3, "shampoo": ["shampoo"] * 3,
    "mixed": ["shampoo", "lion", "adamw"],
}


def _groups(preconds, exact):
    return [dict(settings, names=names, preconditioner=pc, exact=exact)
            for names, settings, pc in zip(GROUP_NAMES, GROUP_SETTINGS, preconds, strict=True)]


# If MARS grows a ``foreach`` option (a faster multi-tensor path), it must pass the same test.
FOREACH = [None, True] if "foreach" in inspect.signature(MARS).parameters else [None]


def _mars_for(model, groups, **kwargs):
    named = dict(model.named_parameters())
    param_groups = [dict({k: v for k, v in g.items() if k != "names"}, params=[named[n] for n in g["names"]])
                    for g in groups]
    return MARS(param_groups, ns_dtype=F64, **kwargs)


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


def _max_diff(model, params):
    return max((p.detach() - params[n]).abs().max().item() for n, p in model.named_parameters())


@pytest.mark.parametrize("foreach", FOREACH, ids=lambda f: "foreach" if f else "default")
@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
@pytest.mark.parametrize("precond", list(PRECONDITIONER_SETS))
def test_matches_naive_transcription(precond, exact, foreach):
    """50 float64 steps, 3 groups with all-different settings, LambdaLR per group: equal to 1e-12."""
    groups = _groups(PRECONDITIONER_SETS[precond], exact)
    model = make_model()
    opt = _mars_for(model, groups, **({} if foreach is None else {"foreach": foreach}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LR_LAMBDAS)
    x = _snapshot(dict(model.named_parameters()))
    naive = NaiveMARS(groups, x)
    x_prev = None
    for t in range(50):
        lrs = [g["lr"] * lam(t) for g, lam in zip(groups, LR_LAMBDAS, strict=True)]
        g_t = grads_at(model, x, t)
        g_prev_exact = None
        if exact:  # ∇f(x_{t−1}, ξ_t): all parameters at the previous point, same minibatch; 0 at step 1
            g_prev_exact = ({n: torch.zeros_like(v) for n, v in x.items()} if x_prev is None
                            else grads_at(model, x_prev, t))
        x_prev, x = x, naive.step(x, g_t, lrs, g_prev_exact)
        run_mars(model, opt, 1, exact, sched, start=t)
        assert _max_diff(model, x) < 1e-12, f"step {t + 1}"
    # the run exercised clipping both ways, and the parameters really moved
    assert naive.clip_events["clipped"] > 0 and naive.clip_events["not clipped"] > 0
    x0 = dict(make_model().named_parameters())
    assert all((x[n] - x0[n]).abs().max() > 1e-3 for n in x)


def test_lr_scheduler_scales_the_1d_fallback():
    """The fallback learning rate is lr · lr_1d / base_lr: LambdaLR(0) freezes every tensor, and
    a factor-2 schedule gives exactly the update of lr_1d doubled."""
    model = make_model()
    opt = MARS(model.parameters(), lr=1e-2, lr_1d=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0)
    before = copy.deepcopy(model.state_dict())
    run_mars(model, opt, 2, False, sched)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def one_step(lr_1d, factor):
        model = make_model()
        opt = MARS(model.parameters(), lr=1e-2, lr_1d=lr_1d)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factor)
        run_mars(model, opt, 1, False, sched)
        return model.norm.bias.detach().clone(), model.fc1.weight.detach().clone()

    b_sched, w_sched = one_step(3e-3, 2.0)
    b_ref, _ = one_step(6e-3, 1.0)
    _, w_unscaled = one_step(3e-3, 1.0)
    assert (b_sched - b_ref).abs().max() < 1e-15  # 1-D tensor follows the schedule
    assert not torch.equal(w_sched, w_unscaled)  # (and so does the 2-D one)


# ---------------------------------------------------------------------------- exact mode


def _lsq_problem():
    g = torch.Generator().manual_seed(99)
    A = torch.randn(N_SAMPLES, 6, generator=g, dtype=F64)
    B = torch.randn(N_SAMPLES, 3, generator=g, dtype=F64)
    return A, B


def _lsq_grads(W, b, A, B, idx):
    """Closed form ∇ of f(W, b; ξ) = ½·mean_i ‖W a_i + b − y_i‖² over i ∈ ξ."""
    R = A[idx] @ W.T + b - B[idx]
    return R.T @ A[idx] / len(idx), R.sum(0) / len(idx)


def test_exact_mode_uses_gradient_at_previous_point_same_minibatch():
    """Least squares over fixed samples, minibatch = index set. From the optimizer's own state,
    c_t = (m_t − β1 m_{t−1})/(1−β1), hence g_prev = ((1+s) g_t − c_t)/s with s = γβ1/(1−β1).
    It must be the closed-form ∇_W f(W_{t−1}, b_{t−1}; ξ_t) (0 at step 1), not g_{t−1}."""
    A, B = _lsq_problem()
    lin = nn.Linear(6, 3).to(F64)
    gamma, beta1 = 0.5, 0.9
    s = gamma * beta1 / (1 - beta1)
    opt = MARS(lin.parameters(), lr=0.05, betas=(beta1, 0.99), gamma=gamma, exact=True, clip="none",
               weight_decay=0.01)

    prev_point, prev_grad, discriminated = None, None, False
    for t in range(8):
        idx = BATCHES[t]

        def closure(idx=idx):
            opt.zero_grad()
            loss = 0.5 * ((lin(A[idx]) - B[idx]) ** 2).sum(1).mean()
            loss.backward()
            return loss

        W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        gW, gb = _lsq_grads(W, b, A, B, idx)
        m_before = opt.state[lin.weight]["m"].clone() if t else torch.zeros_like(W)
        opt.step(closure)
        # after step, p.grad holds g_t, the gradient at the current point
        assert torch.allclose(lin.weight.grad, gW, rtol=0, atol=1e-14)
        assert torch.allclose(lin.bias.grad, gb, rtol=0, atol=1e-14)
        c_t = (opt.state[lin.weight]["m"] - beta1 * m_before) / (1 - beta1)
        g_prev_used = ((1 + s) * gW - c_t) / s
        expected = torch.zeros_like(W) if prev_point is None else _lsq_grads(*prev_point, A, B, idx)[0]
        assert (g_prev_used - expected).abs().max() < 1e-11, f"step {t + 1}"
        if prev_grad is not None and (prev_grad - expected).abs().max() > 1e-3:
            discriminated = True  # the approx choice g_{t−1} would have failed here
        prev_point, prev_grad = (W, b), gW
    assert discriminated


@pytest.mark.parametrize("precond", ["adamw", "shampoo"])
def test_exact_mode_equals_authors_loop_protocol(precond):
    """The authors' loop (doc §8): each iteration computes ∇f(x_t, ξ_{t+1}) into previous_grad
    (update_previous_grad), steps with last_grad as g_prev, then last_grad ← previous_grad
    (update_last_grad); last_grad = 0 at the first step. On top of the naive transcription this
    gives the same trajectory as MARS(exact=True).step(closure)."""
    groups = _groups([precond] * 3, exact=True)
    model = make_model()
    opt = _mars_for(model, groups)
    x = _snapshot(dict(model.named_parameters()))
    naive = NaiveMARS(groups, x)
    last_grad = {n: torch.zeros_like(v) for n, v in x.items()}
    lr0 = [g["lr"] for g in groups]
    for t in range(20):
        g_t = grads_at(model, x, t)
        previous_grad = grads_at(model, x, t + 1)  # next minibatch, current point
        x = naive.step(x, g_t, lr0, g_prev_exact=last_grad)
        last_grad = previous_grad
        run_mars(model, opt, 1, exact=True, start=t)
        assert _max_diff(model, x) < 1e-12, f"step {t + 1}"


def test_exact_mode_dropout_masks_and_rng_stream():
    """Both closure calls of an exact step see the same dropout masks, and the global RNG stream
    after the step is the stream after one closure call."""
    model = make_model(dropout=0.5)
    opt = MARS(model.parameters(), lr=1e-2, exact=True)
    masks = []
    model.drop.register_forward_hook(lambda mod, inp, out: masks.append(out != 0))
    torch.manual_seed(5)
    for t in range(3):
        closure = make_closure(model, opt, t)
        rng_before = torch.get_rng_state()
        opt.step(closure)
        rng_after = torch.get_rng_state()
        if t == 2:
            n_masks = len(masks)
            torch.set_rng_state(rng_before)
            closure()
            assert torch.equal(torch.get_rng_state(), rng_after)
            assert not torch.equal(rng_before, rng_after)  # the closure does draw random numbers
    # calls: step 1 once (no previous point), steps 2 and 3 twice each
    assert n_masks == 5
    assert torch.equal(masks[1], masks[2]) and torch.equal(masks[3], masks[4])
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])


def test_exact_mode_requires_closure():
    model = make_model()
    opt = MARS(model.parameters(), exact=True)
    make_closure(model, opt, 0)()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# ---------------------------------------------------------------------------- g_prev by value


class _ByReferenceMARS(MARS):
    """The authors' bug, reproduced on purpose: g_prev stored as a reference to p.grad."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if "g_prev" in self.state[p]:
                    self.state[p]["g_prev"] = p.grad
        return loss


def _zero_grad_trajectories(cls, exact):
    out = []
    for set_to_none in (True, False):
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2, gamma=0.5, exact=exact)
        run_mars(model, opt, 10, exact, set_to_none=set_to_none)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
def test_zero_grad_set_to_none_false_gives_same_trajectory(exact):
    a, b = _zero_grad_trajectories(MARS, exact)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_zero_grad_check_catches_storing_g_prev_by_reference():
    """The check above is sensitive: the by-reference bug makes the two trajectories differ."""
    a, b = _zero_grad_trajectories(_ByReferenceMARS, exact=False)
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_g_prev_is_a_copy():
    model = make_model()
    opt = MARS(model.parameters())
    run_mars(model, opt, 2, False)
    w = model.fc1.weight
    g_prev = opt.state[w]["g_prev"]
    assert g_prev.data_ptr() != w.grad.data_ptr()
    assert torch.equal(g_prev, w.grad)
    saved = g_prev.clone()
    w.grad.mul_(3.0)
    assert torch.equal(opt.state[w]["g_prev"], saved)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
@pytest.mark.parametrize("precond", ["adamw", "lion", "shampoo"])
def test_state_dict_round_trip_is_bit_identical(precond, exact, tmp_path):
    def fresh(seed):
        model = make_model(seed=seed, dtype=torch.float32)
        opt = MARS(model.parameters(), lr=1e-2, gamma=0.3, preconditioner=precond, exact=exact,
                   weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.1 * k))
        return model, opt, sched

    def run(model, opt, sched, start, steps):
        for t in range(start, start + steps):
            closure = make_closure(model, opt, t)
            if exact:
                opt.step(closure)
            else:
                closure()
                opt.step()
            sched.step()

    ref_model, ref_opt, ref_sched = fresh(0)
    run(ref_model, ref_opt, ref_sched, 0, 20)

    model, opt, sched = fresh(0)
    run(model, opt, sched, 0, 10)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    in_memory = copy.deepcopy(ckpt)
    del model, opt, sched

    for source in (in_memory, torch.load(tmp_path / "ckpt.pt")):
        model, opt, sched = fresh(1)  # different initial weights: everything must come from the checkpoint
        model.load_state_dict(source["model"])
        opt.load_state_dict(source["opt"])
        sched.load_state_dict(source["sched"])
        run(model, opt, sched, 10, 10)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, q)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            s, r = opt.state[p], ref_opt.state[q]
            assert s.keys() == r.keys()
            assert all(_same_entry(s[k], r[k]) for k in s)


# ---------------------------------------------------------------------------- state layout


def _state_bytes(opt, p):
    return sum(v.nbytes for v in opt.state[p].values() if torch.is_tensor(v))


@pytest.mark.parametrize(
    "precond, exact, bytes_2d, keys_2d, keys_1d_on_path",
    [
        ("adamw", False, 12, {"m", "v", "g_prev"}, {"m", "v", "g_prev"}),
        ("lion", False, 8, {"m", "g_prev"}, {"m", "g_prev"}),
        ("shampoo", False, 8, {"m", "g_prev"}, {"m", "v", "g_prev"}),  # 1-D Shampoo tensors run AdamW
        ("adamw", True, 12, {"m", "v", "x_prev"}, {"m", "v", "x_prev"}),
    ],
)
def test_state_layout(precond, exact, bytes_2d, keys_2d, keys_1d_on_path):
    w = nn.Parameter(torch.randn(8, 5))  # float32, 2-D
    b = nn.Parameter(torch.randn(8))  # 1-D, on the MARS path (optimize_1d=True)
    c = nn.Parameter(torch.randn(8))  # 1-D, AdamW fallback
    opt = MARS([{"params": [w, b], "optimize_1d": True}, {"params": [c]}],
               preconditioner=precond, exact=exact)

    def closure():
        opt.zero_grad()
        loss = (w.sum(1) * b).square().sum() + c.square().sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    tensors = lambda p: {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert tensors(w) == keys_2d
    assert tensors(b) == keys_1d_on_path
    assert tensors(c) == {"m", "v"} | ({"x_prev"} if exact else set())
    assert _state_bytes(opt, w) == bytes_2d * w.numel()
    if not exact:
        assert opt.state[w]["g_prev"].data_ptr() != w.grad.data_ptr()


# ---------------------------------------------------------------------------- robustness


def test_parameters_without_gradients_are_untouched():
    model = make_model()
    unused = nn.Parameter(torch.randn(4, 4, dtype=F64))
    frozen = nn.Parameter(torch.randn(3, dtype=F64), requires_grad=False)
    before = (unused.detach().clone(), frozen.detach().clone())
    opt = MARS([{"params": list(model.parameters()) + [unused]}, {"params": [frozen], "lr": 0.1}],
               weight_decay=0.1, weight_decay_1d=0.1)
    run_mars(model, opt, 3, False)
    assert torch.equal(unused, before[0]) and torch.equal(frozen, before[1])
    assert len(opt.state[unused]) == 0 and len(opt.state[frozen]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precond", ["adamw", "lion", "shampoo"])
@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
def test_low_precision_parameters(dtype, precond, exact):
    model = make_model(dtype=dtype)
    opt = MARS(model.parameters(), lr=1e-2, preconditioner=precond, exact=exact, optimize_1d=exact)
    before = [p.detach().clone() for p in model.parameters()]
    X, Y = X_DATA.to(dtype), Y_DATA.to(dtype)
    for t in range(3):
        closure = make_closure(model, opt, t, X=X, Y=Y)
        if exact:
            opt.step(closure)
        else:
            closure()
            opt.step()
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, p0)
        assert all(v.dtype == dtype for v in opt.state[p].values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(1.0, 0.99)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(gamma=-0.025), "gamma"),
        (dict(preconditioner="sgd"), "preconditioner"),
        (dict(clip="max"), "clip"),
        (dict(lr_1d=-1.0), "lr_1d"),
        (dict(betas_1d=(0.9, 1.0)), "betas_1d"),
        (dict(weight_decay_1d=-1.0), "weight_decay_1d"),
        (dict(max_norm=0.0), "max_norm"),
        (dict(ns_steps=0), "ns_steps"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"invalid {match}="):
        MARS(make_model().parameters(), **kwargs)
    # the same value in a parameter group (constructor defaults valid) names the group
    model = make_model()
    with pytest.raises(ValueError, match=rf"invalid {match}=.*parameter group 1"):
        MARS([{"params": model.fc1.parameters()}, {"params": model.fc2.parameters(), name: value}])
    opt = MARS(model.fc1.parameters())
    with pytest.raises(ValueError, match=rf"invalid {match}=.*parameter group 1"):
        opt.add_param_group({"params": model.fc2.parameters(), name: value})


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = MARS(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*parameter group 0, parameter 0"):
        opt.step()


def _state_copy(opt):
    return {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in opt.state.items()}


def _same_entry(u, v):
    return torch.equal(u, v) if torch.is_tensor(u) else u == v


def _same_state(a, b):
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(_same_entry(a[p][k], b[p][k]) for k in a[p]) for p in a
    )


@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_updates_nothing(exact, bad):
    model = make_model()
    opt = MARS(model.parameters(), lr=1e-2, exact=exact)
    run_mars(model, opt, 3, exact)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = _state_copy(opt)

    closure = make_closure(model, opt, 3)

    def poisoned():  # fc1.bias is parameter 1 of group 0
        loss = closure()
        model.fc1.bias.grad[2] = bad
        return loss

    with pytest.raises(FloatingPointError, match=r"parameter group 0, parameter 1\b"):
        if exact:
            opt.step(poisoned)
        else:
            poisoned()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before, strict=True))
    assert _same_state(_state_copy(opt), state_before)


def test_non_finite_gradient_at_previous_point_raises_and_updates_nothing():
    """Exact mode: a non-finite ∇f(x_{t−1}, ξ_t) (second closure call) is a non-finite gradient too."""
    model = make_model()
    opt = MARS(model.parameters(), lr=1e-2, exact=True)
    run_mars(model, opt, 3, exact=True)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = _state_copy(opt)
    closure = make_closure(model, opt, 3)
    calls = []

    def poisoned_on_second_call():
        loss = closure()
        calls.append(1)
        if len(calls) == 2:
            model.fc2.weight.grad[0, 0] = float("nan")  # fc2.weight is parameter 4 of group 0
        return loss

    with pytest.raises(FloatingPointError, match=r"parameter group 0, parameter 4\b"):
        opt.step(poisoned_on_second_call)
    assert len(calls) == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before, strict=True))
    assert _same_state(_state_copy(opt), state_before)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("precond", ["adamw", "lion", "shampoo"])
def test_cuda_matches_cpu(precond):
    results = []
    for device in ("cpu", "cuda"):
        model = make_model().to(device)
        opt = MARS(model.parameters(), lr=1e-2, preconditioner=precond, ns_dtype=F64, optimize_1d=True)
        X, Y = X_DATA.to(device), Y_DATA.to(device)
        for t in range(5):
            make_closure(model, opt, t, X=X, Y=Y)()
            opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        assert (p - q).abs().max() < 1e-10


def test_exact_must_be_the_same_for_every_group():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"invalid exact=False \(parameter group 1\).*every parameter group"):
        MARS([{"params": [a], "exact": True}, {"params": [b], "exact": False}])
