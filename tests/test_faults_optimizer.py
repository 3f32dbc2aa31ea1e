"""``MARS`` under hostile input: every invalid input class gets a clear error naming what is wrong (and nothing
changes), the three implementations agree near the float32 limits, and the optimizer keeps the torch.optim
contract (torch's own generic error inputs, hooks, deepcopy, weights_only loading, later groups, mixed dtypes,
``maximize``, a tensor learning rate)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import get_error_inputs_for_all_optims

from mars_ref import MARS

IMPLS = {"readable": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def params(seed=0, shapes=((6, 5), (5,), (4, 6)), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def set_grads(ps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in ps})


def unchanged(opt, ps, snap):
    values, state = snap
    same_params = all(torch.equal(p, q) for p, q in zip(ps, values, strict=True))
    now = {id(p): opt.state[p] for p in ps}
    same_state = all(now[k].keys() == state[k].keys() and all(
        torch.equal(now[k][n], v) if torch.is_tensor(v) else now[k][n] == v for n, v in state[k].items())
        for k in state)
    return same_params and same_state


# ------------------------------------------------------------------------------------ hyperparameters

BAD_SETTINGS = [
    ("lr", math.inf, "must be finite"), ("lr", math.nan, "must be a real number|must be finite|>= 0"),
    ("gamma", math.inf, "must be finite"), ("weight_decay", math.inf, "must be finite"),
    ("eps", -math.inf, "must be finite"), ("lr_1d", math.inf, "must be finite"),
    ("weight_decay_1d", math.nan, "finite|>= 0"), ("max_norm", math.inf, "must be finite"),
    ("lr", "0.1", "must be a real number"), ("lr", True, "must be a real number"), ("gamma", None, "real number"),
    ("betas", 0.9, "two numbers"), ("betas", (0.9, "x"), "two numbers"), ("betas", (0.9,), "two numbers"),
    ("betas_1d", (0.9, 0.99, 0.5), "two numbers"), ("ns_steps", True, "integer"), ("ns_steps", 2.0, "integer"),
    ("ns_dtype", torch.int32, "floating"), ("maximize", 1, "True or False"), ("exact", "yes", "True or False"),
    ("preconditioner", "Adam", "one of"), ("clip", None, "one of"),
]


@pytest.mark.parametrize("name,value,message", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_bad_settings_are_named_at_construction_and_in_groups(name, value, message):
    with pytest.raises(ValueError, match=rf"invalid {name}.*({message})"):
        MARS(params(), **{name: value})
    ps = params()
    opt = MARS(ps[:1])
    with pytest.raises(ValueError, match=rf"invalid {name}.*parameter group 1.*({message})"):
        opt.add_param_group({"params": ps[1:], name: value})
    assert len(opt.param_groups) == 1  # the refused group is not kept, so it is never stepped


@pytest.mark.parametrize("name,value", [("lr", 1e308), ("weight_decay", 1e308), ("gamma", 1e308),
                                        ("lr_1d", 1e39)])
def test_settings_beyond_the_parameter_dtype_are_refused_before_anything_changes(name, value):
    """Finite but beyond float32 (a step would be inf): refused at the step, naming the setting and the dtype."""
    ps = params()
    opt = MARS(ps, **{name: value})
    set_grads(ps, 1)
    snap = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"larger than the largest torch.float32 value"):
        opt.step()
    assert unchanged(opt, ps, snap)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_group_edited_after_construction_is_checked_again(impl):
    ps = params()
    opt = MARS(ps, **IMPLS[impl])
    set_grads(ps, 1)
    opt.step()
    snap = snapshot(opt, ps)
    for key, value, message in [("lr", math.inf, "invalid lr"), ("betas", (1.5, 0.9), "invalid betas"),
                                ("clip", "max", "invalid clip"), ("exact", True, "exact must be the same")]:
        saved = opt.param_groups[0][key]
        opt.param_groups[0][key] = value  # exact=True: the step now needs a closure, and says so
        with pytest.raises((ValueError, RuntimeError), match=message if key != "exact" else "needs step\\(closure\\)"):
            opt.step()
        opt.param_groups[0][key] = saved
        assert unchanged(opt, ps, snap)
    del opt.param_groups[0]["gamma"]
    with pytest.raises(ValueError, match="no setting 'gamma'"):
        opt.step()


def test_groups_that_disagree_on_exact_after_an_edit_are_refused():
    a, b = params()[:2]
    opt = MARS([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["exact"] = True
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    with pytest.raises(ValueError, match="exact must be the same for every parameter group"):
        opt.step()


# ------------------------------------------------------------------------------------ parameters and state


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_parameters_that_are_not_real_floats_are_refused(dtype):
    p = torch.zeros(3, 3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"real floating-point parameters.*parameter 0.*{dtype}"):
        MARS([p])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("damage", ["shape", "exact state", "missing key", "other optimizer", "step"])
def test_a_state_dict_that_does_not_fit_is_refused_on_load(impl, damage):
    """Includes the memory-safety case: a state of other sizes loaded into MARS(fused=True) would reach the C loop,
    which trusts numel; load_state_dict refuses it and leaves the optimizer as it was."""
    ps = params()
    opt = MARS(ps, **IMPLS[impl])
    set_grads(ps, 1)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state tensors and dicts
    first = sd["state"][0]
    if damage == "shape":
        first["m"] = torch.zeros(3, 3)
    elif damage == "exact state":  # x_prev (exact mode) where approx mode keeps g_prev
        first["x_prev"] = first.pop("g_prev")
    elif damage == "missing key":
        del first["g_prev"]
    elif damage == "other optimizer":
        sd["state"][0] = {"step": torch.tensor(1.0), "exp_avg": first["m"], "exp_avg_sq": first["v"]}
    else:
        first["step"] = -3
    snap = snapshot(opt, ps)
    fresh = MARS(params(), **IMPLS[impl])
    with pytest.raises(ValueError, match=r"parameter group 0, parameter 0"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0  # left as it was
    with pytest.raises(ValueError, match=r"parameter group 0, parameter 0"):
        opt.load_state_dict(sd)
    assert unchanged(opt, ps, snap)
    set_grads(ps, 2)
    opt.step()  # and it still steps


def test_state_that_stops_fitting_after_loading_is_refused_at_the_step():
    """The step checks too (state edited by hand after loading): never a C loop over a wrong-sized buffer."""
    ps = params()
    opt = MARS(ps, fused=True)
    set_grads(ps, 1)
    opt.step()
    opt.state[ps[0]]["g_prev"] = torch.zeros(2)
    snap = snapshot(opt, ps[1:])
    with pytest.raises(ValueError, match=r"state 'g_prev' of parameter group 0, parameter 0.*shape \(2,\)"):
        opt.step()
    assert unchanged(opt, ps[1:], snap)


def test_state_of_a_torch_optimizer_with_tensor_steps_loads():
    """torch's optimizers keep ``step`` as a tensor; a MARS state dict edited that way still loads (as an int)."""
    ps = params()
    opt = MARS(ps)
    set_grads(ps, 1)
    opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = torch.tensor(float(st["step"]))
    other = MARS(params())
    other.load_state_dict(sd)
    assert all(isinstance(st["step"], int) and st["step"] == 1 for st in other.state.values())


# ------------------------------------------------------------------------------------ numerics near the limits


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
@pytest.mark.parametrize("clip", ["tensor", "global"])
def test_the_three_implementations_agree_where_float32_squares_overflow(scale, clip):
    """‖c_t‖² overflows float32 above ~1.8e19; such a norm is taken again in float64 by every implementation, so
    a gradient of 1e20 moves the parameters as it should (and the same on every path), not by 0 or by lr. Every
    tensor is on the MARS path (clipped): the fallback's unclipped squares are the next test's."""
    results = {}
    for impl, flags in IMPLS.items():
        ps = params()
        opt = MARS(ps, lr=1e-2, clip=clip, optimize_1d=True, **flags)
        for t in range(3):
            set_grads(ps, t, scale)
            opt.step()
        results[impl] = ps
        assert all(torch.isfinite(p).all() for p in ps)
    for impl in ("foreach", "fused"):
        for a, b in zip(results["readable"], results[impl], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # against float64: the float32 step is the float64 one to rounding.
    runs = []
    for dtype in (torch.float32, torch.float64):
        ps = params(dtype=dtype)
        opt = MARS(ps, lr=1e-2, clip=clip, optimize_1d=True)
        for t in range(3):
            set_grads(ps, t, scale)
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", ["fallback", "clip none", "first step", "c overflows"])
def test_what_overflows_the_parameters_dtype_is_refused_changing_nothing(impl, case):
    """A finite float32 gradient whose step would overflow float32 is refused before anything changes: the
    fallback squares its raw g_t into v_t (|g| > 1.8e19 makes v_t inf for good), so does the AdamW branch with
    clip="none", and c_t = g_t + k·(g_t − g_prev) itself overflows for g_t near the float32 maximum (a zero
    gradient, then 3e38; or −3.3e38 at the first step)."""
    ps = params()
    kw = dict(clip="none") if case == "clip none" else {}
    opt = MARS(ps, lr=1e-2, **kw, **IMPLS[impl])
    if case in ("fallback", "clip none"):
        set_grads(ps, 0, 1.0)
        opt.step()
        big = 3e19
    else:
        big = -3.3e38 if case == "first step" else 3e38
        if case == "c overflows":
            for p in ps:
                p.grad = torch.zeros_like(p)
            opt.step()
    which = 1 if case == "fallback" else 0  # params(): tensor 0 is 2-D (the MARS path), tensor 1 is 1-D
    for i, p in enumerate(ps):
        p.grad = torch.full_like(p, big if i == which else 0.5)
    before = snapshot(opt, ps)
    match = "overflows torch.float32" if case in ("first step", "c overflows") else "v_t would become inf"
    with pytest.raises(FloatingPointError, match=rf"parameter group 0, parameter {which}.*{match}|{match}.*"):
        opt.step()
    assert unchanged(opt, ps, before)


def test_a_gradient_beyond_float64_is_refused():
    ps = params(dtype=torch.float64)
    opt = MARS(ps, gamma=1.0)
    set_grads(ps, 1)
    ps[0].grad[0, 0] = 1e306
    opt.step()  # c = 20·g is finite here
    snap = snapshot(opt, ps)
    set_grads(ps, 2)
    ps[0].grad[0, 0] = -1e308  # c = g + 19·(g − g_prev) = −3.9e309: not a float64
    with pytest.raises(FloatingPointError, match="parameter group 0, parameter 0"):
        opt.step()
    assert unchanged(opt, ps, snap)


@pytest.mark.parametrize("impl", ["readable", "foreach"])
def test_float16_parameters(impl):
    """float16 holds numbers up to 65504 and down to 6e-8: the default ε = 1e-8 is 0 there (an element whose v_t
    underflows would divide by 0), so it is refused, naming ε; with ε = 1e-4 large gradients step finitely (a norm
    that overflows float16 is taken in float64)."""
    ps = params(dtype=torch.float16)
    opt = MARS(ps, lr=1e-2, **IMPLS[impl])
    set_grads(ps, 0, 300.0)
    with pytest.raises(ValueError, match=r"eps = 1e-08.*is 0 in torch.float16.*use eps >= 6.1"):
        opt.step()
    opt = MARS(ps, lr=1e-2, eps=1e-4, optimize_1d=True, **IMPLS[impl])
    for t in range(3):
        set_grads(ps, t, 1e4)  # ‖c‖ ≈ 1.475·1e4·√30 ≈ 8e4: beyond float16
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    opt = MARS(ps, lr=1e-2, eps=1e-4, **IMPLS[impl])  # the 1-D tensors on the fallback square 1e4 unclipped
    set_grads(ps, 0, 1e4)
    with pytest.raises(FloatingPointError, match="past 256.*the largest torch.float16 whose square is finite"):
        opt.step()


# ------------------------------------------------------------------------------------ the torch.optim contract


@pytest.mark.parametrize("case", get_error_inputs_for_all_optims("cpu", torch.float32),
                         ids=lambda c: c.optimizer_error_input.desc)
def test_torch_generic_error_inputs(case):
    """The error inputs torch feeds every one of its optimizers give MARS torch's own error types and messages."""
    inp = case.optimizer_error_input
    ps = inp.params if inp.params is not None else params()
    if case.error_type is UserWarning:
        with pytest.warns(UserWarning, match=case.error_regex):
            MARS(ps, **inp.kwargs)
        return
    with pytest.raises(case.error_type, match=case.error_regex):
        MARS(ps, **inp.kwargs)


@pytest.mark.parametrize("impl", ["readable", "foreach"])
def test_a_tensor_learning_rate_equals_the_float(impl):
    pa, pb = params(), params()
    a = MARS(pa, lr=1e-2, **IMPLS[impl])
    b = MARS(pb, lr=torch.tensor(1e-2), **IMPLS[impl])
    for t in range(3):
        set_grads(pa, t)
        set_grads(pb, t)
        a.step()
        b.step()
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("exact", [False, True])
def test_maximize_is_minimizing_the_negative(impl, exact):
    torch.manual_seed(0)
    X, Y = torch.randn(16, 5), torch.randn(16, 3)
    nets = []
    for maximize in (False, True):
        torch.manual_seed(1)
        net = torch.nn.Linear(5, 3)
        opt = MARS(net.parameters(), lr=1e-2, maximize=maximize, exact=exact, **IMPLS[impl])
        sign = -1.0 if maximize else 1.0

        def closure(net=net, opt=opt, sign=sign):
            opt.zero_grad()
            loss = sign * torch.nn.functional.mse_loss(net(X), Y)
            loss.backward()
            return loss

        for _ in range(4):
            if exact:
                opt.step(closure)
            else:
                closure()
                opt.step()
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_hooks_run_as_for_torch_optimizers():
    ps = params()
    opt = MARS(ps)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    set_grads(ps, 1)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


@pytest.mark.parametrize("impl", IMPLS)
def test_deepcopy_is_independent_and_steps_alike(impl):
    ps = params()
    opt = MARS(ps, **IMPLS[impl])
    set_grads(ps, 1)
    opt.step()
    twin_params, twin = copy.deepcopy((ps, opt))  # one memo: the copy steps the copied parameters
    assert twin.param_groups[0]["params"][0] is twin_params[0]
    assert all(twin.state[q]["m"].data_ptr() != opt.state[p]["m"].data_ptr() for p, q in zip(ps, twin_params,
                                                                                               strict=True))
    for t in range(2, 4):
        set_grads(ps, t)
        set_grads(twin_params, t)
        opt.step()
        twin.step()
    for a, b in zip(ps, twin_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_state_dict_loads_with_weights_only_and_resumes_alike(exact):
    torch.manual_seed(0)
    X, Y = torch.randn(16, 5), torch.randn(16, 3)

    def run(net, opt, steps):
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(X), Y)
                loss.backward()
                return loss
            if exact:
                opt.step(closure)
            else:
                closure()
                opt.step()

    torch.manual_seed(1)
    net = torch.nn.Linear(5, 3)
    opt = MARS(net.parameters(), lr=1e-2, exact=exact)
    run(net, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(saved["model"])
    twin_opt = MARS(twin.parameters(), lr=1e-2, exact=exact)
    twin_opt.load_state_dict(saved["opt"])
    run(net, opt, 3)
    run(twin, twin_opt, 3)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["readable", "foreach"])
def test_a_group_added_later_and_mixed_dtypes(impl):
    """A group added after some steps starts its own state; float32, float64 and bfloat16 parameters in one
    group each keep state of their own dtype (the fused step takes float32 only, and says so)."""
    p32, p64, p16 = (torch.randn(4, 3, dtype=d).requires_grad_() for d in (torch.float32, torch.float64,
                                                                           torch.bfloat16))
    opt = MARS([p32, p64], **IMPLS[impl])
    for _ in range(2):
        for p in (p32, p64):
            p.grad = torch.ones_like(p)
        opt.step()
    opt.add_param_group({"params": [p16], "lr": 1e-3})
    for p in (p32, p64, p16):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p16]["step"] == 1 and opt.state[p32]["step"] == 3
    assert all(v.dtype == p.dtype for p in (p32, p64, p16) for v in opt.state[p].values() if torch.is_tensor(v))
    with pytest.raises(ValueError, match="CPU float32 tensors.*torch.float64 tensor: use foreach=True"):
        MARS([p64], fused=True)


def test_no_warning_and_no_error_for_parameters_without_gradients():
    ps = params()
    opt = MARS(ps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_state_dict_after_loading_is_the_state_dict_loaded(impl):
    """torch's test_state_dict_deterministic: ``load_state_dict(sd)`` then ``state_dict()`` gives ``sd`` back, the
    same keys in every parameter group (no setting added on one side only) and the same state."""
    ps = params()
    opt = MARS(ps, lr=1e-2, **IMPLS[impl])
    for t in range(2):
        set_grads(ps, t)
        opt.step()
    saved = opt.state_dict()
    other = MARS(params(), lr=3e-2, **IMPLS[impl])
    other.load_state_dict(saved)
    again = other.state_dict()
    assert [sorted(g) for g in again["param_groups"]] == [sorted(g) for g in saved["param_groups"]]
    assert again["param_groups"] == saved["param_groups"]
    for k, st in saved["state"].items():
        assert st.keys() == again["state"][k].keys()
        assert all(torch.equal(v, again["state"][k][n]) if torch.is_tensor(v) else v == again["state"][k][n]
                   for n, v in st.items())


@pytest.mark.parametrize("key, value, match", [("m", float("nan"), "'m' of .* NaN or inf"),
                                               ("v", -1.0, "'v' of .* negative values")])
def test_a_loaded_state_with_nan_or_negative_values_is_refused(key, value, match):
    ps = params()
    opt = MARS(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0][key] = torch.full_like(saved["state"][0][key], value)
    other = MARS(params(), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(saved)
    assert len(other.state) == 0  # left as it was


@pytest.mark.parametrize("cls", ["MARS", "Lion", "Muon"])
def test_an_integer_beyond_float_is_refused_naming_the_setting(cls):
    import mars_ref

    with pytest.raises(ValueError, match=r"invalid lr=1000000000000.*must be a .*real number"):
        getattr(mars_ref, cls)(params(), lr=10**309)


@pytest.mark.parametrize("preconditioner", ["adamw", "lion", "shampoo", "muon"])
@pytest.mark.parametrize("impl", ["readable", "foreach"])
def test_an_empty_tensor_is_skipped_and_the_others_step_as_without_it(preconditioner, impl):
    """A 5×0 parameter (MARS-Shampoo's shape factor would divide by 0 columns) has nothing to step: the other
    parameters take exactly the step they take without it, and it keeps no state."""
    with_empty, without = params(), params()
    empty = torch.zeros(5, 0, requires_grad=True)
    a = MARS([*with_empty, empty], lr=1e-2, preconditioner=preconditioner, **IMPLS[impl])
    b = MARS(without, lr=1e-2, preconditioner=preconditioner, **IMPLS[impl])
    for t in range(3):
        set_grads(with_empty, t)
        set_grads(without, t)
        empty.grad = torch.zeros_like(empty)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(with_empty, without, strict=True))
    assert len(a.state[empty]) == 0
