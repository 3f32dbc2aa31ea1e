"""Lion and Muon under hostile input: the contract of MARS (settings checked at construction and at every step,
real floating parameters only, loaded state checked, a refused step changes nothing, empty tensors skipped)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mars_ref import MARS, Lion, Muon

F32 = torch.float32


def _params(shapes=((4, 3), (3,)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _snapshot(opt, params):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, snap):
    values, state = snap
    for p, before in zip(params, values, strict=True):
        assert torch.equal(p.detach(), before)
    now = {id(p): dict(opt.state[p]) for p in params if p in opt.state and opt.state[p]}
    assert set(now) == set(state)
    for key, entries in state.items():
        assert set(now[key]) == set(entries)
        for k, v in entries.items():
            assert torch.equal(now[key][k], v) if torch.is_tensor(v) else now[key][k] == v


MAKERS = {"Lion": lambda ps, **kw: Lion(ps, lr=1e-2, **kw), "Muon": lambda ps, **kw: Muon(ps, ns_dtype=None, **kw)}


# ---------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("make, kwargs, match", [
    (Muon, dict(lr=-1), r"Muon: invalid lr=-1: must be a finite real number >= 0"),
    (Muon, dict(ns_steps=-1), r"Muon: invalid ns_steps=-1: must be an integer >= 1"),
    (Muon, dict(ns_steps=2.5), r"invalid ns_steps=2\.5: must be an integer >= 1"),
    (Muon, dict(momentum=1.0), r"invalid momentum=1\.0: must be a real number in \[0, 1\)"),
    (Muon, dict(nesterov="yes"), r"invalid nesterov='yes': must be True or False"),
    (Muon, dict(ns_dtype=torch.int32), r"invalid ns_dtype=torch\.int32: must be a floating torch\.dtype"),
    (Muon, dict(eps_1d=math.inf), r"invalid eps_1d=inf: must be a finite real number >= 0"),
    (Lion, dict(lr=math.nan), r"Lion: invalid lr=nan: must be a finite real number >= 0"),
    (Lion, dict(betas=(2, 3)), r"Lion: invalid betas=\(2, 3\): must be two real numbers in \[0, 1\)"),
    (Lion, dict(betas=0.9), r"Lion: invalid betas=0\.9: must be two real numbers in \[0, 1\)"),
    (Lion, dict(lr="0.1"), r"Lion: invalid lr='0\.1': must be a finite real number >= 0"),
    (Lion, dict(weight_decay=True), r"invalid weight_decay=True: must be a finite real number >= 0"),
])
def test_invalid_settings_are_refused_at_construction_naming_the_setting(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(_params(), **kwargs)


@pytest.mark.parametrize("name", ["Lion", "Muon"])
def test_a_group_added_with_an_invalid_setting_is_refused_and_not_kept(name):
    ps = _params()
    opt = MAKERS[name](ps[:1])
    with pytest.raises(ValueError, match=r"invalid lr=-0\.5 \(parameter group 1\): must be a finite real number"):
        opt.add_param_group({"params": ps[1:], "lr": -0.5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name, setting, value", [("Lion", "lr", -1.0), ("Lion", "betas", (0.9, 1.5)),
                                                  ("Muon", "lr", math.nan), ("Muon", "ns_steps", 0),
                                                  ("Muon", "momentum", -0.1)])
def test_a_group_edited_to_an_invalid_setting_is_refused_at_the_step_and_nothing_changes(name, setting, value):
    ps = _params(((4, 3), (3,), (2, 2)))
    opt = MAKERS[name](ps[:2])
    opt.add_param_group({"params": ps[2:]})
    _grads(ps)
    opt.step()
    _grads(ps, seed=2)
    opt.param_groups[1][setting] = value  # the second group: the first one's tensors must not move either
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=rf"{name}: invalid {setting}=.* \(parameter group 1\): must be"):
        opt.step()
    _assert_unchanged(opt, ps, snap)


def test_muon_group_added_later_steps_its_1d_tensors_at_its_own_lr():
    """add_param_group sets base_lr (the reference of lr_1d / lr), so the new group's fallback is AdamW at lr_1d."""
    w, b = _params(((4, 3), (3,)))
    b_ref = nn.Parameter(b.detach().clone())
    opt = Muon([w], lr=0.02)
    opt.add_param_group({"params": [b], "lr": 0.05, "lr_1d": 1e-2})
    assert opt.param_groups[1]["base_lr"] == 0.05
    adamw = torch.optim.AdamW([b_ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(3):
        _grads([w, b], seed=t)
        b_ref.grad = b.grad.clone()
        opt.step()
        adamw.step()
        assert (b - b_ref).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["Lion", "Muon"])
@pytest.mark.parametrize("dtype, hint", [(torch.complex64, "complex64.*split a complex parameter"),
                                         (torch.int64, "int64")])
def test_complex_and_integer_parameters_are_refused_at_construction(name, dtype, hint):
    bad = nn.Parameter(torch.zeros(3, 3, dtype=dtype), requires_grad=dtype.is_complex)
    with pytest.raises(ValueError, match=rf"{name} takes real floating-point parameters .*parameter 1 "
                                         rf"\(parameter group 0\) is a torch\.{hint}"):
        MAKERS[name]([_params()[0], bad])


@pytest.mark.parametrize("name", ["Lion", "Muon"])
def test_empty_tensors_are_skipped_and_the_others_step_as_without_them(name):
    ps, ref = _params(((4, 3), (3,))), _params(((4, 3), (3,)))
    empty = [nn.Parameter(torch.zeros(5, 0, dtype=torch.float64)), nn.Parameter(torch.zeros(0, dtype=torch.float64))]
    opt, opt_ref = MAKERS[name]([empty[0], *ps, empty[1]]), MAKERS[name](ref)
    for t in range(3):
        _grads(ps, seed=t)
        _grads(ref, seed=t)
        for e in empty:
            e.grad = torch.zeros_like(e)
        opt.step()
        opt_ref.step()
    for p, q in zip(ps, ref, strict=True):
        assert torch.equal(p, q)
    assert all(e.shape[-1] == 0 for e in empty)


# ---------------------------------------------------------------------------------------- refused steps


@pytest.mark.parametrize("name", ["Lion", "Muon"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("after_a_step", [False, True])
def test_a_non_finite_gradient_is_refused_naming_the_parameter_and_nothing_changes(name, bad_value, after_a_step):
    ps = _params(((4, 3), (3,), (3, 3)))
    opt = MAKERS[name](ps)
    if after_a_step:
        _grads(ps)
        opt.step()
    _grads(ps, seed=5)
    ps[2].grad[1, 1] = bad_value
    snap = _snapshot(opt, ps)
    with pytest.raises(FloatingPointError, match=rf"{name}: the gradient of parameter group 0, parameter 2 "
                                                 r"\(torch\.float64, shape \(3, 3\)\) has NaN or inf values; "
                                                 r"nothing was changed.*needs a finite gradient"):
        opt.step()
    _assert_unchanged(opt, ps, snap)
    ps[2].grad[1, 1] = 0.0  # the next (finite) step goes on as if the refused one had not been called
    opt.step()
    assert all(torch.isfinite(p).all() for p in ps) and all(torch.isfinite(opt.state[p][k]).all()
                                                          for p in ps for k in opt.state[p] if k != "step")


def _overflow_case(name):
    """A step whose inputs are finite float32 values near the float32 max (3e38) but whose results overflow."""
    if name == "Lion":  # β2 = 0: m = g = 3e38, then g = −3e38: β1·m + (1−β1)·g overflows in lerp (m − g = 6e38)
        p = nn.Parameter(torch.ones(4, dtype=F32))
        opt = Lion([p], lr=1e-3, betas=(0.9, 0.0))
        p.grad = torch.full((4,), 3e38)
        opt.step()
        p.grad = torch.full((4,), -3e38)
        return [p], opt, "β1·m"
    if name == "Muon-1d":  # the AdamW fallback: v = β2·v + (1−β2)·g² overflows
        p = nn.Parameter(torch.ones(4, dtype=F32))
        opt = Muon([p])
        p.grad = torch.full((4,), 3e38)
        return [p], opt, "v"
    # a 2-D tensor: ‖M‖_F of a 32 × 32 momentum of 3e38-sized entries overflows float32
    p = nn.Parameter(torch.ones(32, 32, dtype=F32))
    opt = Muon([p], ns_dtype=None)
    p.grad = torch.full((32, 32), 3e38)
    return [p], opt, "the Frobenius norm of M in torch.float32"


@pytest.mark.parametrize("name", ["Lion", "Muon-1d", "Muon-2d"])
def test_a_finite_gradient_near_the_float32_max_that_would_overflow_is_refused_and_nothing_changes(name):
    ps, opt, what = _overflow_case(name)
    snap = _snapshot(opt, ps)
    with pytest.raises(FloatingPointError, match=rf"the step of parameter group 0, parameter 0 \(torch\.float32.*"
                                                 rf"would make {what}.* NaN or inf: a value overflows torch\.float32 "
                                                 r"\(largest 3\.4e\+38\).*nothing was changed"):
        opt.step()
    _assert_unchanged(opt, ps, snap)


def test_a_huge_lr_that_would_overflow_the_weights_is_refused():
    p = nn.Parameter(torch.full((3,), 3e38, dtype=F32))
    opt = Lion([p], lr=1.0, weight_decay=0.5)  # x − lr·(λx + u) is finite ...
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = 1e38  # ... but not with lr = 1e38
    snap = _snapshot(opt, [p])
    with pytest.raises(FloatingPointError, match=r"would make the parameter NaN or inf"):
        opt.step()
    _assert_unchanged(opt, [p], snap)


# ---------------------------------------------------------------------------------------- loaded state


def test_muon_refuses_the_state_dict_of_mars_and_stays_as_it_was():
    ps = _params()
    mars = MARS(ps)
    _grads(ps)
    mars.step()
    muon = Muon(ps)
    _grads(ps, seed=3)
    muon.step()
    before = muon.state_dict()
    with pytest.raises(ValueError, match=r"Muon: .*parameter group 0.*as loaded.* has no setting 'momentum'"):
        muon.load_state_dict(mars.state_dict())
    after = muon.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items() if torch.is_tensor(v))
    muon.step()  # still usable


@pytest.mark.parametrize("name", ["Lion", "Muon"])
def test_a_state_dict_of_other_shapes_or_keys_is_refused_and_the_optimizer_stays_as_it_was(name):
    ps, others = _params(), _params(((3, 4), (3,)))
    opt, other = MAKERS[name](ps), MAKERS[name](others)
    _grads(ps)
    _grads(others)
    opt.step()
    other.step()
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=rf"{name}: state '\w+' of parameter group 0, parameter 0 \(in the loaded "
                                         r"state dict\) is a torch\.float64 tensor of shape \(3, 4\).*shape \(4, 3\)"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(opt, ps, snap)
    sd = opt.state_dict()
    key = next(iter(sd["state"][0]))
    sd["state"][0] = {"momentum": sd["state"][0][key]}  # another optimizer's key
    with pytest.raises(ValueError, match=rf"{name}: the state of parameter group 0, parameter 0 .* has no tensor"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, ps, snap)
    opt.step()


@pytest.mark.parametrize("name", ["Lion", "Muon"])
def test_a_checkpoint_round_trip_gives_the_same_steps(name):
    ps, qs = _params(), _params()
    a = MAKERS[name](ps)
    _grads(ps)
    a.step()
    b = MAKERS[name](qs)
    with torch.no_grad():
        for p, q in zip(ps, qs, strict=True):
            q.copy_(p)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # a state dict holds a's own tensors
    for opt, xs in ((a, ps), (b, qs)):
        _grads(xs, seed=9)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


def test_muon_refuses_a_group_without_base_lr_at_the_step_and_nothing_changes():
    ps = _params()
    opt = Muon(ps)
    _grads(ps)
    opt.step()
    del opt.param_groups[0]["base_lr"]
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"Muon: parameter group \(parameter group 0\) has no setting 'base_lr'"):
        opt.step()
    _assert_unchanged(opt, ps, snap)
