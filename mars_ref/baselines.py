r"""Baselines for fair comparisons: Lion, and Muon with an AdamW fallback.

AdamW is ``torch.optim.AdamW``. Lion is written here (no well-kept package fits a
reference project's dependency list). Muon is written here too, as one optimizer that
also steps the non-2-D tensors with AdamW (as everyone trains it), so a single object
works with ``torch.optim.lr_scheduler`` and checkpoints; on its 2-D tensors it is
tested equal to ``torch.optim.Muon`` where torch has it (2.9+).

Both keep the contract of :class:`mars_ref.MARS`: every setting is checked when a group is added
and again at every step (a group may be edited), naming the setting and what would be valid;
complex and integer parameters are refused; a loaded state dict that does not fit the parameters is
refused and leaves the optimizer as it was; and a step that cannot be taken (a sparse or non-finite
gradient, a new value that overflows the parameter's dtype) raises before any tensor changes: each
step computes every new value into temporaries first, checks them, then writes them. Empty tensors
are skipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import is_real as _is_real
from .pieces import adamw_direction, decoupled_step, fallback_lr, momentum, newton_schulz, second_moment

# ---------------------------------------------------------------------------------------------- the checks

#: a rule per setting: ("number", ">= 0"), ("unit",) = a number in [0, 1), ("betas",), ("bool",),
#: ("steps",) = an integer >= 1, ("dtype",) = a floating torch.dtype or None
_NONNEGATIVE = ("number", ">= 0")
LION_SETTINGS = {"lr": _NONNEGATIVE, "betas": ("betas",), "weight_decay": _NONNEGATIVE}
MUON_SETTINGS = {"lr": _NONNEGATIVE, "momentum": ("unit",), "weight_decay": _NONNEGATIVE, "nesterov": ("bool",),
                 "ns_steps": ("steps",), "ns_dtype": ("dtype",), "eps": _NONNEGATIVE, "lr_1d": _NONNEGATIVE,
                 "betas_1d": ("betas",), "eps_1d": _NONNEGATIVE, "weight_decay_1d": _NONNEGATIVE}


def _check_settings(owner: str, group: dict, rules: dict, where: str) -> None:
    """Refuse a group whose settings ``owner`` cannot run: ``ValueError`` naming the setting, the group and
    what would be valid."""
    for name, rule in rules.items():
        if name not in group:
            raise ValueError(f"{owner}: parameter group{where} has no setting {name!r} (it needs {sorted(rules)})")
        valid = _invalid(group[name], rule)
        if valid:
            raise ValueError(f"{owner}: invalid {name}={group[name]!r}{where}: {valid}")


def _invalid(value, rule: tuple) -> str | None:
    """What ``value`` must be under ``rule``, if it is not; else None."""
    kind = rule[0]
    if kind == "number":
        if not _is_real(value) or not math.isfinite(value) or not value >= 0:
            return f"must be a finite real number {rule[1]}"
    elif kind == "unit":
        if not _is_real(value) or not 0.0 <= value < 1.0:
            return "must be a real number in [0, 1)"
    elif kind == "betas":
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(_is_real(b) and 0.0 <= b < 1.0 for b in value)):
            return "must be two real numbers in [0, 1)"
    elif kind == "bool":
        if not isinstance(value, bool):
            return "must be True or False"
    elif kind == "steps":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return "must be an integer >= 1"
    elif kind == "dtype":
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            return "must be a floating torch.dtype (e.g. torch.bfloat16) or None (the parameter's dtype)"
    return None


def _check_parameters(owner: str, group: dict, where: str) -> None:
    """Refuse complex and integer parameters (a real-valued step would drop the imaginary part)."""
    for j, p in enumerate(group["params"]):
        if not p.is_floating_point():
            hint = " (split a complex parameter into its real and imaginary parts)" if p.is_complex() else ""
            raise ValueError(f"{owner} takes real floating-point parameters (float16, bfloat16, float32, float64); "
                             f"parameter {j}{where} is a {p.dtype} tensor of shape {tuple(p.shape)}{hint}")


def _tuple(value):
    """``betas`` as a tuple when it is a sequence (anything else is refused by the check, not by ``tuple()``)."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _check_state(owner: str, p: Tensor, state: dict, keys: tuple[str, ...], name: str, where: str) -> None:
    """The state of one tensor has exactly the tensors ``keys``, each of its parameter's shape, dtype, device."""
    extra = sorted(set(state) - set(keys) - {"step"})
    for key in keys:
        value = state.get(key)
        if not torch.is_tensor(value):
            raise ValueError(f"{owner}: the state of {name}{where} has no tensor {key!r} (it has {sorted(state)}); "
                             f"this tensor keeps {keys}: was the state dict saved by another optimizer?")
        if value.shape != p.shape or value.dtype != p.dtype or value.device != p.device:
            raise ValueError(f"{owner}: state {key!r} of {name}{where} is a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)} on {value.device}, but the parameter is {p.dtype} of shape "
                             f"{tuple(p.shape)} on {p.device}: the state dict does not belong to these parameters")
    if extra:
        raise ValueError(f"{owner}: the state of {name}{where} has {extra}, which {owner} does not keep (it keeps "
                         f"{keys}): was the state dict saved by another optimizer?")


def _first_nonfinite(tensors: list[Tensor]) -> int | None:
    """The index of the first tensor with a NaN or inf, else None (one host synchronisation per device)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next(i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all()))


class _Checked(torch.optim.Optimizer):
    """What Lion and Muon share: the checks of settings, parameters and loaded state, and a step in two
    phases (every new value computed and checked, then written)."""

    SETTINGS: dict = {}

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        """The state tensors ``p`` keeps."""
        raise NotImplementedError

    def _check_group(self, group: dict, where: str) -> None:
        _check_settings(type(self).__name__, group, self.SETTINGS, where)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (parameter group {len(self.param_groups) - 1})"
        try:
            self._check_group(group, where)
            _check_parameters(type(self).__name__, group, where)
        except ValueError:
            self.param_groups.pop()  # a refused group is not kept (nor stepped)
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then checked: a state dict that does not fit these
        parameters (another optimizer's, other shapes or dtypes, invalid settings) is refused with
        ``ValueError`` and this optimizer is left as it was."""
        before = (self.__getstate__()["state"], [dict(g) for g in self.param_groups])
        super().load_state_dict(state_dict)
        try:
            for i, group in enumerate(self.param_groups):
                where = f" (parameter group {i}, as loaded)"
                self._check_group(group, where)
                for j, p in enumerate(group["params"]):
                    state = self.state.get(p)
                    if state:
                        self._check_loaded_state(p, state, f"parameter group {i}, parameter {j}")
        except ValueError:
            self.state, self.param_groups[:] = before[0], before[1]
            raise

    def _check_loaded_state(self, p: Tensor, state: dict, name: str) -> None:
        _check_state(type(self).__name__, p, state, self._keys(p), name, " (in the loaded state dict)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owner = type(self).__name__
        todo = []  # (group, p, name)
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f" (parameter group {i})")  # again: a group may have been edited
            for j, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to step
                    continue
                name = f"parameter group {i}, parameter {j}"
                if p.grad.is_sparse:
                    raise RuntimeError(f"{owner} does not support sparse gradients ({name})")
                if p.grad.shape != p.shape:
                    raise ValueError(f"{owner}: the gradient of {name} has shape {tuple(p.grad.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
                state = self.state.get(p)
                if state:
                    _check_state(owner, p, state, self._keys(p), name, "")
                todo.append((group, p, name))
        bad = _first_nonfinite([p.grad for _, p, _ in todo])
        if bad is not None:
            _, p, name = todo[bad]
            raise FloatingPointError(
                f"{owner}: the gradient of {name} ({p.dtype}, shape {tuple(p.shape)}) has NaN or inf values; "
                "nothing was changed. A step needs a finite gradient: skip this step (torch.amp.GradScaler does), "
                "or lower the learning rate or the loss scale.")
        new = [self._new_values(group, p, self.state.get(p) or {}) for group, p, _ in todo]
        checked = [(k, what, v) for k, (updates, extra) in enumerate(new)
                   for what, v in (*updates.items(), *extra.items()) if torch.is_tensor(v)]
        bad = _first_nonfinite([v for _, _, v in checked])
        if bad is not None:
            k, what, _ = checked[bad]
            _, p, name = todo[k]
            largest = torch.finfo(p.dtype).max
            cause = ("the parameter holds NaN or inf already" if not bool(torch.isfinite(p).all()) else
                     f"a value overflows {p.dtype} (largest {largest:.3g}) or is 0/0, although the gradient is "
                     "finite")
            raise FloatingPointError(
                f"{owner}: the step of {name} ({p.dtype}, shape {tuple(p.shape)}) would make {what} NaN or inf: "
                f"{cause}; nothing was changed. A valid step keeps every value finite: scale the loss or "
                f"gradient down, use a smaller learning rate, or float64 parameters.")
        for (_, p, _), (updates, _) in zip(todo, new, strict=True):  # nothing was refused: the step
            state = self.state[p]
            for key, value in updates.items():
                if key == "the parameter":
                    p.copy_(value)
                elif torch.is_tensor(value) and torch.is_tensor(state.get(key)):
                    state[key].copy_(value)
                else:
                    state[key] = value
        return loss

    def _new_values(self, group: dict, p: Tensor, state: dict) -> tuple[dict, dict]:
        """This step's new state and parameter (``"the parameter"``) of ``p``, and the intermediate values that
        must be finite too, by name; computed without changing anything."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- Lion


class Lion(_Checked):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math::
        u_t = \mathrm{sign}(β_1 m_{t-1} + (1-β_1) g_t), \qquad
        m_t = β_2 m_{t-1} + (1-β_2) g_t, \qquad
        x_{t+1} = x_t - η(λ x_t + u_t)

    With ``β1 = β2`` the interpolation and the stored average coincide and Lion is
    MARS-Lion at ``γ = 0`` without clipping.
    """

    SETTINGS = LION_SETTINGS

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=_tuple(betas), weight_decay=weight_decay)
        _check_settings("Lion", defaults, LION_SETTINGS, "")
        super().__init__(params, defaults)

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("m",)

    def _new_values(self, group: dict, p: Tensor, state: dict) -> tuple[dict, dict]:
        beta1, beta2 = group["betas"]
        m = state.get("m")
        if m is None:
            m = torch.zeros_like(p)
        #   c_t = β1·m_{t−1} + (1−β1)·g_t  (checked finite: its sign is the update)
        c = torch.lerp(p.grad, m, beta1)
        #   m_t = β2·m_{t−1} + (1−β2)·g_t
        m_new = momentum(m, p.grad, beta2)
        #   x_{t+1} = x_t − η·(λ·x_t + sign(c_t))
        x_new = decoupled_step(p, torch.sign(c), group["lr"], group["weight_decay"])
        return {"m": m_new, "the parameter": x_new}, {"β1·m + (1−β1)·g (whose sign is the update)": c}


# ---------------------------------------------------------------------------------------------- Muon


class Muon(_Checked):
    r"""Muon (Jordan et al., 2024) on 2-D tensors, AdamW on the others.

    For 2-D tensors, as ``torch.optim.Muon`` with ``adjust_lr_fn="original"``:

    .. math::
        b_t = μ b_{t-1} + (1-μ) g_t, \quad
        M_t = (1-μ) g_t + μ b_t \;(\text{Nesterov}), \quad
        x_{t+1} = x_t(1-ηλ) - η\sqrt{\max(1, r/c)}\,\mathrm{NS}_5(M_t)

    Other tensors: AdamW with ``lr_1d``, ``betas_1d``, ``weight_decay_1d`` (as MARS), at the learning rate
    ``lr · lr_1d / base_lr`` where ``base_lr`` is the group's ``lr`` when it was added.
    """

    SETTINGS = MUON_SETTINGS

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype=torch.bfloat16, eps: float = 1e-7,
                 lr_1d: float = 3e-3, betas_1d=(0.9, 0.95), eps_1d: float = 1e-8, weight_decay_1d: float = 0.1):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, eps=eps, lr_1d=lr_1d,
                        betas_1d=_tuple(betas_1d), eps_1d=eps_1d, weight_decay_1d=weight_decay_1d)
        _check_settings("Muon", defaults, MUON_SETTINGS, "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # The lr the 1-D fallback's ratio lr_1d / lr refers to: the group's lr when it is added.
        if isinstance(param_group, dict):
            param_group.setdefault("base_lr", param_group.get("lr", self.defaults["lr"]))
        super().add_param_group(param_group)
        self.param_groups[-1]["base_lr"] = float(self.param_groups[-1]["base_lr"])

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        _check_settings("Muon", group, {"base_lr": _NONNEGATIVE}, where)

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list):  # a state dict without base_lr: the loaded lr, as add_param_group does
            state_dict = {**state_dict, "param_groups": [
                {**g, "base_lr": g.get("base_lr", g.get("lr"))} if isinstance(g, dict) else g for g in groups]}
        super().load_state_dict(state_dict)

    def _keys(self, p: Tensor) -> tuple[str, ...]:
        return ("momentum_buffer",) if p.ndim == 2 else ("m", "v")

    def _check_loaded_state(self, p: Tensor, state: dict, name: str) -> None:
        super()._check_loaded_state(p, state, name)
        if p.ndim != 2:
            step = state.get("step")
            if torch.is_tensor(step) and step.numel() == 1:  # torch's AdamW keeps a tensor: accept its value
                state["step"] = step = int(step.item())
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise ValueError(f"Muon: the loaded state of {name} has step={step!r}; expected a count >= 0")

    def _new_values(self, group: dict, p: Tensor, state: dict) -> tuple[dict, dict]:
        g = p.grad
        if p.ndim == 2:
            mu = group["momentum"]
            b = state.get("momentum_buffer")
            if b is None:
                b = torch.zeros_like(p)
            #   b_t = μ·b_{t−1} + (1−μ)·g_t
            b = momentum(b, g, mu)
            #   M_t = (1−μ)·g_t + μ·b_t  (Nesterov)   or   M_t = b_t
            M = torch.lerp(g, b, mu) if group["nesterov"] else b
            dtype = group["ns_dtype"] or M.dtype
            #   ‖M_t‖_F in the Newton–Schulz dtype (it normalises by it): finite, or the update would be 0 or NaN
            norm = torch.linalg.norm(M.to(dtype))
            u = newton_schulz(M, group["ns_steps"], group["eps"], group["ns_dtype"])
            lr = group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5
            #   x ← x(1 − ηλ) − η'·NS(M)
            x_new = p.mul(1.0 - group["lr"] * group["weight_decay"]).add_(u, alpha=-lr)
            return ({"momentum_buffer": b, "the parameter": x_new},
                    {"the Nesterov momentum M": M, f"the Frobenius norm of M in {dtype}": norm})
        #   the AdamW fallback, as MARS's (mars_ref.optimizer.adamw_update): lr · lr_1d / base_lr
        beta1, beta2 = group["betas_1d"]
        step = state.get("step", 0) + 1
        m, v = state.get("m"), state.get("v")
        m = momentum(torch.zeros_like(p) if m is None else m, g, beta1)
        v = second_moment(torch.zeros_like(p) if v is None else v, g, beta2)
        lr = fallback_lr(group["lr"], group["lr_1d"], group["base_lr"])
        direction = adamw_direction(m, v, step, beta1, beta2, group["eps_1d"])
        x_new = decoupled_step(p, direction, lr, group["weight_decay_1d"])
        return {"step": step, "m": m, "v": v, "the parameter": x_new}, {}
