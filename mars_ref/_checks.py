"""What ``MARS`` refuses, and the messages that say why: hyperparameters, parameters, loaded state, and the
gradients of a step. Every check of a step runs for every parameter group before any tensor changes
(``docs/algorithm.md`` §9.13), so a refused step leaves parameters and state as they were."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .pieces import correction_scale

PRECONDITIONERS = ("adamw", "lion", "shampoo", "muon")  # "muon": MARS-M (Liu, Yuan, Gu, arXiv 2510.21800)
CLIP_MODES = ("tensor", "global", "none")
FUSED_PRECONDITIONERS = ("adamw", "lion")  # the C loop's; the AdamW fallback too

#: the hyperparameters that are real numbers (``lr`` may also be a 1-element tensor, as in torch.optim)
NUMBERS = {"lr": ">= 0", "eps": ">= 0", "weight_decay": ">= 0", "gamma": ">= 0", "lr_1d": ">= 0",
           "weight_decay_1d": ">= 0", "max_norm": "> 0"}
FLAGS = ("exact", "optimize_1d", "fallback", "maximize")


def is_real(value) -> bool:
    """A real number a float can hold (an integer beyond float's range, e.g. 10**309, is not)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def hyperparameters(group: dict, where: str) -> None:
    """Refuse a group whose settings MARS cannot run, naming the setting, the group and what would be valid.
    Reads Python numbers only (a tensor ``lr`` is read once, on the host, when it is on the CPU)."""
    def bad(name, rule):
        raise ValueError(f"MARS: invalid {name}={group.get(name)!r}{where}: {rule}")

    for name in (*NUMBERS, "betas", "betas_1d", "preconditioner", "clip", "ns_steps", "ns_dtype", *FLAGS,
                 "foreach", "fused"):
        if name not in group:
            raise ValueError(f"MARS: parameter group{where} has no setting {name!r}; every group needs it "
                             "(a group's settings may be edited, not removed)")
    for name, rule in NUMBERS.items():
        value = group[name]
        if torch.is_tensor(value) and name == "lr":
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"MARS: invalid lr{where}: Tensor lr must be 1-element (a floating tensor), got "
                                 f"{value.dtype} of shape {tuple(value.shape)}")
            if value.device.type != "cpu":
                continue  # read on the device by the step: reading it here would wait for the device each step
            value = float(value)
        if not is_real(value):
            bad(name, f"must be a real number {rule}")
        if not math.isfinite(value):
            bad(name, f"must be finite (a number {rule})")
        if not (value > 0 if rule == "> 0" else value >= 0):
            bad(name, f"must be a number {rule}")
    for name in ("betas", "betas_1d"):
        betas = group[name]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            bad(name, "must be two numbers in [0, 1)")
    if group["preconditioner"] not in PRECONDITIONERS:
        bad("preconditioner", f"must be one of {PRECONDITIONERS}")
    if group["clip"] not in CLIP_MODES:
        bad("clip", f"must be one of {CLIP_MODES}")
    if not isinstance(group["ns_steps"], int) or isinstance(group["ns_steps"], bool) or group["ns_steps"] < 1:
        bad("ns_steps", "must be an integer >= 1")
    if group["ns_dtype"] is not None and not (
            isinstance(group["ns_dtype"], torch.dtype) and group["ns_dtype"].is_floating_point):
        bad("ns_dtype", "must be a floating torch.dtype or None")
    for name in FLAGS + ("fused",):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        bad("foreach", "must be True, False or None (None: foreach on CUDA, the readable step elsewhere)")
    if group["fused"]:
        if group["foreach"]:
            raise ValueError(f"MARS: fused=True and foreach=True{where}: choose one (as torch.optim.AdamW)")
        if group["preconditioner"] not in FUSED_PRECONDITIONERS:
            raise ValueError(
                f"MARS: fused=True{where} takes preconditioner 'adamw' or 'lion', not {group['preconditioner']!r}: "
                "the steps of MARS-Shampoo and MARS-M are Newton–Schulz matrix products; use foreach=True.")


def parameters(group: dict, where: str) -> None:
    """Refuse parameters MARS cannot step: complex or integer tensors, and (fused) anything but CPU float32
    (torch.optim's own checks refuse the rest: non-tensors, non-leaves, duplicates across groups)."""
    for j, p in enumerate(group["params"]):
        if not p.is_floating_point():
            hint = " (split a complex parameter into its real and imaginary parts)" if p.is_complex() else ""
            raise ValueError(f"MARS takes real floating-point parameters (float16, bfloat16, float32, float64); "
                             f"parameter {j}{where} is a {p.dtype} tensor of shape {tuple(p.shape)}{hint}")
        if group["fused"] and (p.device.type != "cpu" or p.dtype != torch.float32):
            raise ValueError(f"MARS(fused=True) runs a C loop on CPU float32 tensors; parameter {j}{where} is a "
                             f"{p.device.type} {p.dtype} tensor: use foreach=True (the step for CUDA) or foreach=None")


def magnitudes(group: dict, lr: float | None, fallback_lr: float | None, dtypes: set[torch.dtype], where: str) -> None:
    """Refuse settings the parameters' dtype cannot hold: a step computed with them would be inf (e.g. lr=1e308
    on float32 parameters), which would turn the parameters into inf or NaN without an error. ``lr`` None: a
    tensor lr on a device, not read here."""
    beta1 = group["betas"][0]
    rates = () if lr is None else (("lr", lr), ("lr_1d", fallback_lr),
                                   ("lr * weight_decay", lr * group["weight_decay"]),
                                   ("lr_1d * weight_decay_1d", fallback_lr * group["weight_decay_1d"]))
    for dtype in dtypes:
        largest = torch.finfo(dtype).max
        for name, value in (*rates, ("weight_decay", group["weight_decay"]),
                            ("weight_decay_1d", group["weight_decay_1d"]), ("eps", group["eps"]),
                            ("gamma * beta1 / (1 - beta1)", correction_scale(group["gamma"], beta1)),
                            ("max_norm squared",
                             group["max_norm"] * group["max_norm"] if group["clip"] != "none" else 0.0)):
            if not value <= largest:
                raise ValueError(f"MARS: {name} = {value:g}{where} is larger than the largest {dtype} value "
                                 f"({largest:g}) of the parameters: a step would overflow to inf; use a smaller value")
        eps, info = group["eps"], torch.finfo(dtype)
        if 0 < eps <= info.tiny * info.eps / 2:  # rounds to 0 in the dtype (half its smallest subnormal, or less)
            raise ValueError(f"MARS: eps = {eps:g}{where} is 0 in {dtype} (the parameters' dtype): an element whose "
                             f"v_t underflows to 0 would divide by 0; use eps >= {torch.finfo(dtype).tiny:g} or "
                             "float32 parameters")


def state(p: Tensor, st: dict, keys: Sequence[str], branch: str, exact: bool, name: str, where: str = "") -> None:
    """One tensor's state has every tensor its branch keeps, each of its parameter's shape, dtype and device;
    else ``ValueError`` naming the tensor and what was found."""
    for key in keys:
        value = st.get(key)
        if not torch.is_tensor(value):
            raise ValueError(f"MARS: the state of {name}{where} has no tensor {key!r} (it has {sorted(st)}): a "
                             f"{branch!r} tensor in {'exact' if exact else 'approx'} mode keeps {('step', *keys)}; "
                             "was the state dict saved by another optimizer, preconditioner or mode?")
        if value.shape != p.shape or value.dtype != p.dtype or value.device != p.device:
            raise ValueError(
                f"MARS: state {key!r} of {name}{where} is a {value.dtype} tensor of shape {tuple(value.shape)} "
                f"on {value.device}, but the parameter is {p.dtype} of shape {tuple(p.shape)} on {p.device}: "
                "the state dict does not belong to these parameters.")


def loaded_values(st: dict, name: str) -> None:
    """A loaded state's numbers can be stepped from: finite tensors, ``v`` ≥ 0, a step count ≥ 0 (torch's
    optimizers keep the count as a tensor: its value is taken)."""
    for key, value in st.items():
        if torch.is_tensor(value) and key != "step" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"MARS: the loaded state {key!r} of {name} has NaN or inf values; a step from it would "
                             "poison the parameters. Load a checkpoint from before the fault.")
    if torch.is_tensor(st.get("v")) and bool((st["v"] < 0).any()):
        raise ValueError(f"MARS: the loaded state 'v' of {name} has negative values; a second moment is >= 0, so "
                         "the state dict is damaged or not MARS's")
    step = st.get("step")
    if torch.is_tensor(step) and step.numel() == 1:
        st["step"] = step = int(step.item())
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"MARS: the loaded state of {name} has step={step!r}; expected a count >= 0")


def gradients(params: Sequence[Tensor], grads: Sequence[Tensor], names: Sequence[str]) -> None:
    """Sparse gradients are refused (the step is dense)."""
    for p, g, name in zip(params, grads, names, strict=True):
        if g.is_sparse:
            raise RuntimeError(f"MARS does not support sparse gradients ({name}, shape {tuple(p.shape)}); "
                               "use dense gradients (e.g. nn.Embedding(sparse=False)).")


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True if every element of every tensor is finite: one host synchronisation per device, for all groups."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for x in tensors:
        by_device.setdefault(x.device, []).append(x)
    return all(bool(torch.isfinite(torch.cat([x.reshape(-1) for x in xs])).all()) for xs in by_device.values())


def diagnose(norm: Tensor, g: Tensor, g_prev: Tensor | None, c: Tensor | None, k: float, fallback: bool,
             exact: bool, name: str) -> Tensor:
    """A non-finite norm of one tensor: raise ``FloatingPointError`` naming what is not finite (the gradient, the
    previous gradient, or ``c_t``, which overflows the parameters' dtype), or return the norm taken again in float64
    and scaled when only the sum of squares overflowed (float32 squares overflow above ~1.8e19)."""
    if not bool(torch.isfinite(g).all()):
        raise FloatingPointError(f"MARS: non-finite gradient (nan or inf) in {name}, shape {tuple(g.shape)}; nothing "
                                 "was updated. Skip this step or lower the learning rate.")
    if g_prev is not None and not bool(torch.isfinite(g_prev).all()):
        which = "gradient at the previous point (exact mode)" if exact else "previous gradient g_prev (state)"
        raise FloatingPointError(f"MARS: non-finite {which} (nan or inf) in {name}, shape {tuple(g.shape)}; nothing "
                                 "was updated.")
    gd = g.double()
    c64 = gd if fallback else torch.add(gd, gd - (0.0 if g_prev is None else g_prev.double()), alpha=k)
    if not bool(torch.isfinite(c64).all()):
        raise FloatingPointError(f"MARS: the corrected gradient of {name} overflows even float64; nothing was "
                                 "updated.")
    if c is not None and not bool(torch.isfinite(c).all()) or c64.abs().max() > torch.finfo(g.dtype).max:
        raise FloatingPointError(
            f"MARS: the corrected gradient c_t = g_t + {k:g}·(g_t − g_prev) of {name} overflows {g.dtype} (|c_t| "
            f"reaches {float(c64.abs().max()):.3g}, the largest {g.dtype} is {torch.finfo(g.dtype).max:.3g}); "
            "nothing was updated. Skip this step, scale the loss down, or train in a wider dtype.")
    largest = c64.abs().max()
    return largest * torch.linalg.vector_norm(c64 / largest) if largest > 0 else largest


def square_limit(dtype: torch.dtype) -> float:
    """The largest value whose square the dtype holds: the second moment squares the clipped ``c_t`` (or the
    fallback's raw ``g_t``), so a larger one would make ``v`` inf for good."""
    return math.sqrt(torch.finfo(dtype).max)


def squares_overflow(norm: float, dtype: torch.dtype, name: str) -> FloatingPointError:
    return FloatingPointError(
        f"MARS: the step of {name} would square values up to {norm:.3g} (the norm of what enters the second moment), "
        f"past {square_limit(dtype):.3g}, the largest {dtype} whose square is finite: v_t would become inf. Nothing "
        "was updated; clip (clip='tensor'), lower the loss scale, or skip this step.")


def exact_message(value, where: str) -> str:
    return (f"MARS: invalid exact={value!r}{where}: exact must be the same for every parameter group "
            "(the previous point x_{t-1} is the whole model)")


@torch.compiler.disable
def read_mode(groups: list[dict]) -> bool:
    modes = {group["exact"] for group in groups}
    if len(modes) > 1:
        raise ValueError(exact_message(False, " (parameter groups changed after construction)"))
    return modes == {True}


def squared_unclipped(branch: str, clip: str) -> bool:
    """Whether a tensor's second moment squares values no clip bounds: the fallback's raw ``g_t``, and ``c_t``
    of the AdamW branch under ``clip="none"`` (a clip bounds them by ``max_norm``, checked with the settings)."""
    return branch == "fallback" or (branch == "adamw" and clip == "none")


def name_the_culprit(groups, norms_of: list[list[Tensor]], unclipped) -> None:
    """Pass 1 found a norm that is not finite, or an unclipped square past the dtype: raise ``FloatingPointError``
    naming the tensor and what is wrong, or (a sum of squares that overflowed from finite values) replace the norm
    by the one taken in float64."""
    for g, norms in zip(groups, norms_of, strict=True):
        h, lists = g.hyper, g.lists
        for idx, n in enumerate(norms):
            grad, b = lists.grads[idx], lists.branches[idx]
            if not bool(torch.isfinite(n)):
                c = g.cs[idx] if g.cs is not None else None  # None: not kept (a large tensor)
                norms[idx] = diagnose(n, grad, lists.g_prevs[idx], c, 0.0 if b == "fallback" else h.k,
                                      b == "fallback", h.exact, lists.names[idx]).to(n.dtype)
            if squared_unclipped(b, h.clip):
                big = float(torch.linalg.vector_norm(unclipped(g, idx), ord=math.inf))
                if big > square_limit(grad.dtype):
                    raise squares_overflow(big, grad.dtype, lists.names[idx])
