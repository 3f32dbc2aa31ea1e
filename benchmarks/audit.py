r"""Audit other MARS implementations against mars_ref:  ``python benchmarks/audit.py [--out DIR]``.

For every implementation it can import (timm's ``Mars``, pytorch-optimizer's ``MARS`` on both of its
code paths, HeavyBall's ``AdamW(mars=True)``; ``pip install -e .[audit]`` installs the pinned versions),
the audit

1. maps the paper's hyperparameters (the GPT-2 small recipe, :class:`Hyper`) onto the implementation's
   arguments, feeds it and ``mars_ref.MARS`` the same gradients of the same small model in float64 and
   reports the parameter deviation after 1, 10 and 100 steps, relative to the size of the update
   (``‖x_impl − x_ref‖ / ‖x_ref − x_0‖``);
2. diagnoses each link of the chain by a small experiment that isolates it (:data:`LINKS`). Numbers are
   *read off the parameters*: with ``x_0 = 0``, no weight decay and a huge ε, an AdamW step is linear in
   the momentum, so the corrected gradient ``c_t`` of every step can be recovered from ``x_t − x_{t−1}``
   (:func:`readout`): that gives the correction coefficient ``k``, the first-step convention, the clip rule
   and threshold, whether ``g_prev`` survives ``zero_grad(set_to_none=False)`` (copy or reference) and what
   the step does to the ``.grad`` tensor. The other links are categorical: the implementation is run beside
   :class:`Emulation` (the chain rebuilt from :mod:`mars_ref.pieces`, each link switchable, :class:`Chain`)
   in one setting per link that isolates it (a tiny gradient for ε, a 1-D/3-D/4-D tensor for the
   fallback, a skipped step for the step count, …), and the variant it reproduces to float64 rounding is
   the finding;
3. checks the diagnosis is complete (the emulation of the diagnosed chain reproduces the implementation
   on the model: column "explained") and whether, once each difference that is a documented choice is
   configured away (mars_ref's own options: ``clip``, ``optimize_1d`` per group, γ = 0 at the first step;
   ε = 0 on both sides where the ε placements have no mapping), the deviation left is zero (then the
   implementation is "MARS with these choices") or not (then the differing link, by how much, and why it
   looks like a defect; where the defect can be compensated, the deviation left after compensating it).

Emulations of the authors' code paths that are not on PyPI (``MARS/optimizers/mars.py`` and
``mars_fused.py``, read, not run: ``docs/algorithm.md`` §12.2) are audited the same way. An implementation
that is not installed is skipped with a message; nothing here needs the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

from mars_ref import MARS, pieces  # noqa: E402

DTYPE = torch.float64
#: two results agree when they differ by less than this, relative to the update (float64 rounding is ~1e-15)
TOL = 1e-9
#: a deviation left after configuring away the documented choices counts as zero below this
TOL_ZERO = 1e-9
STEPS = (1, 10, 100)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Hyper:
    """The paper's hyperparameters (the authors' GPT-2 small recipe, ``docs/algorithm.md`` §11), to be mapped
    onto each implementation's arguments."""

    lr: float = 6e-3
    betas: tuple[float, float] = (0.95, 0.99)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    gamma: float = 0.025
    lr_1d: float = 3e-3
    betas_1d: tuple[float, float] = (0.9, 0.95)
    weight_decay_1d: float = 0.1

    @property
    def k(self) -> float:
        """The paper's correction coefficient ``γ·β1/(1−β1)``."""
        return pieces.correction_scale(self.gamma, self.betas[0])


@dataclass(frozen=True)
class Chain:
    """One MARS-AdamW chain, link by link: the default is mars_ref's (and the authors' ``mars.py``), every
    other value of a field is a variant some implementation computes. :class:`Emulation` runs any of them."""

    k: str | None = None  # the correction coefficient's form (K_FORMS); None: the paper's γ·β1/(1−β1)
    k_scale: float = 1.0  # times this (an unknown form, measured relative to the paper's)
    first_ratio: float | None = None  # c_1 = first_ratio·g_1; None: g_prev = 0, c_1 = (1+k)·g_1
    clip: str = "tensor"  # "tensor" | "global" | "none"
    tau: float = 1.0
    clip_first: bool = True  # is step 1 clipped
    g_prev: str = "copy"  # "copy" | "reference" (to the .grad tensor)
    path: str = "ndim==2"  # which tensors take MARS: "ndim==2" | "ndim>=2" | "all" | "none"
    fallback: str = "standard"  # "standard" (lr_1d, betas_1d, wd_1d) | "lr" | "group betas" | "group wd"
    v_input: str = "c"  # the second moment of the clipped c_t ("c") or of the raw g_t ("g")
    eps: str = "after"  # "after" | "before" | "before+floor" | "clamp"
    bias: str = "both"  # "both" | "none" | "frozen" (t stays 1, √ missing on 1−β2^t)
    decay: str = "decoupled"  # "decoupled" (η·λ·x_t) | "after" (η·λ·x_{t+1}) | "fixed" (λ·x_t) | "coupled" (L2)
    steps: str = "tensor"  # step count "tensor" | "group"
    grad: str = "kept"  # what the step leaves in the .grad tensor: "kept" | "consumed" (p.grad = None, holds c_t)


#: the forms of the correction coefficient k(γ, β1) met so far; each vanishes at γ = 0, as the readout assumes
K_FORMS = {None: ("γ·β1/(1−β1)", lambda g, b1: pieces.correction_scale(g, b1)),
           "swapped": ("β1·γ/(1−γ): γ and β1 swapped", lambda g, b1: b1 * g / (1 - g)),
           "gamma": ("γ", lambda g, b1: g),
           "zero": ("0", lambda g, b1: 0.0)}


def k_of(ch: Chain, h: Hyper) -> float:
    """The correction coefficient a chain applies with hyperparameters ``h``."""
    return ch.k_scale * K_FORMS[ch.k][1](h.gamma, h.betas[0])


# ---------------------------------------------------------------------------------------------- the emulation


class Emulation(torch.optim.Optimizer):
    """MARS-AdamW made of :mod:`mars_ref.pieces`, one tensor at a time, with every link switchable (:class:`Chain`).

    With ``Chain()`` it computes what ``mars_ref.MARS`` computes, bit for bit (a test checks it); each other
    field value emulates what another implementation does, so the audit can ask which variant an
    implementation reproduces, and a test can show what a variant does (e.g. ``g_prev`` by reference).
    """

    def __init__(self, params, hyper: Hyper = Hyper(), chain_: Chain = Chain()):
        super().__init__(params, dict(hyper=hyper, chain=chain_))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            h, ch = group["hyper"], group["chain"]
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            group["step"] = group.get("step", 0) + 1
            cs = [self._corrected(p, h, ch) for p in live]
            factors = _clip_factors(cs, [self.state[p]["step"] == 1 for p in live], ch)
            for p, c, f in zip(live, cs, factors, strict=True):
                st = self.state[p]
                t = group["step"] if ch.steps == "group" else st["step"]
                if c is None:
                    self._fallback(p, st, t, h, ch)
                else:
                    self._mars(p, st, t, c if f is None else c * f, h, ch)
        return None

    def _corrected(self, p: Tensor, h: Hyper, ch: Chain) -> Tensor | None:
        """``c_t`` before the clip (None for a tensor on the fallback); makes the state at a tensor's first step."""
        st = self.state[p]
        if not st:
            st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), g_prev=torch.zeros_like(p))
        st["step"] += 1
        g = p.grad + h.weight_decay * p if ch.decay == "coupled" and _on_path(p, ch) else p.grad
        st["g_eff"] = g
        if not _on_path(p, ch):
            return None
        k = k_of(ch, h)
        if st["step"] == 1 and ch.first_ratio is not None:
            return g * ch.first_ratio
        #   c_t = g_t + k·(g_t − g_prev)
        return torch.add(g, g - st["g_prev"], alpha=k)

    def _mars(self, p: Tensor, st: dict, t: int, c: Tensor, h: Hyper, ch: Chain) -> None:
        g = st.pop("g_eff")
        (b1, b2), lam = h.betas, (0.0 if ch.decay == "coupled" else h.weight_decay)
        if ch.g_prev == "reference":
            st["g_prev"] = p.grad
        else:
            st["g_prev"].copy_(g)
        st["m"].copy_(pieces.momentum(st["m"], c, b1))
        st["v"].copy_(pieces.second_moment(st["v"], c if ch.v_input == "c" else g, b2))
        u = _direction(st["m"], st["v"], t, b1, b2, h.eps, ch)
        p.copy_(_decayed(p, u, h.lr, lam, ch.decay))
        if ch.grad == "consumed":
            p.grad.copy_(c)
            p.grad = None

    def _fallback(self, p: Tensor, st: dict, t: int, h: Hyper, ch: Chain) -> None:
        g = st.pop("g_eff")
        b1, b2 = h.betas if ch.fallback == "group betas" else h.betas_1d
        lam = h.weight_decay if ch.fallback == "group wd" else h.weight_decay_1d
        lr = pieces.fallback_lr(h.lr, h.lr_1d, h.lr)
        st["m"].copy_(pieces.momentum(st["m"], g, b1))
        st["v"].copy_(pieces.second_moment(st["v"], g, b2))
        u = _direction(st["m"], st["v"], t, b1, b2, h.eps, ch)
        if ch.fallback == "lr":  # mars_fused.py's _single_tensor_mars: decay at lr_1d, the step at lr
            p.mul_(1 - lr * lam).add_(u, alpha=-h.lr)
        else:
            p.copy_(_decayed(p, u, lr, lam, ch.decay))
        if ch.grad == "consumed":
            p.grad = None


def _on_path(p: Tensor, ch: Chain) -> bool:
    return {"ndim==2": p.ndim == 2, "ndim>=2": p.ndim >= 2, "all": True, "none": False}[ch.path]


def _clip_factors(cs: list[Tensor | None], first: list[bool], ch: Chain) -> list[Tensor | None]:
    """The clip factor of each ``c_t`` (None: not clipped), as :func:`mars_ref.pieces.clip_factors` makes them;
    ``first[i]``: it is tensor i's first step."""
    clipped = [i for i, c in enumerate(cs) if c is not None and (ch.clip_first or not first[i])]
    factors: list[Tensor | None] = [None] * len(cs)
    if ch.clip == "none" or not clipped:
        return factors
    norms = [torch.linalg.vector_norm(cs[i]) for i in clipped]
    for i, f in zip(clipped, pieces.clip_factors(norms, ch.clip, ch.tau), strict=True):
        factors[i] = f.to(cs[i].dtype)
    return factors


def _direction(m: Tensor, v: Tensor, t: int, b1: float, b2: float, eps: float, ch: Chain) -> Tensor:
    r"""``u_t`` from ``m_t``, ``v_t`` with the chain's ε placement and bias corrections."""
    if ch.eps == "after" and ch.bias == "both":
        return pieces.adamw_direction(m, v, t, b1, b2, eps)  # mars_ref's own expression, bit for bit
    bc1, root2 = {"both": (1 - b1**t, math.sqrt(1 - b2**t)), "none": (1.0, 1.0),
                  "frozen": (1 - b1, 1 - b2)}[ch.bias]
    if ch.eps == "after":  # m̂ / (√v̂ + ε)
        return m / ((v.sqrt() / root2 + eps) * bc1)
    if ch.eps == "clamp":  # m̂ / max(√v̂, ε)
        return (m / bc1) / (v.sqrt() / root2).clamp(min=eps)
    root = (v + 1e-15).sqrt() if ch.eps == "before+floor" else v.sqrt()
    return (m / bc1) / ((root + eps) / root2)  # ε added before the √(1−β2^t) correction


def _decayed(x: Tensor, u: Tensor, lr: float, lam: float, decay: str) -> Tensor:
    if decay in ("decoupled", "coupled"):
        return pieces.decoupled_step(x, u, lr, lam if decay == "decoupled" else 0.0)
    if decay == "after":
        return (x - lr * u) * (1 - lr * lam)
    return x - lam * x - lr * u  # "fixed": not scaled by the learning rate


# ---------------------------------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class RefOptions:
    """mars_ref's own options that configure a documented choice of another implementation away."""

    clip: str = "tensor"
    optimize_1d: bool = False
    ndim_ge_2: bool = False  # tensors with ndim > 2 on the MARS path too (their own group, optimize_1d=True)
    first_gamma0: bool = False  # γ = 0 at the first step: c_1 = g_1
    gamma: float | None = None  # another γ (to compensate another correction coefficient)
    foreach: bool = False


@dataclass(frozen=True)
class Setup:
    """What is configured away on both sides: ``text`` says what, one line each, ``links`` which links that removes;
    ``hyper`` changes the hyperparameters of both; ``extra(hyper)`` gives extra arguments of the implementation;
    ``ref`` mars_ref's options."""

    text: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # the links this removes completely (the others may leave a deviation)
    hyper: dict = field(default_factory=dict)
    extra: Callable[[Hyper], dict] | None = None
    ref: RefOptions = RefOptions()


@dataclass
class Implementation:
    """One implementation under audit: ``build(params, hyper, **extra)`` maps the paper's hyperparameters onto
    its arguments (``mapping`` says how). ``notes[link]`` classifies an expected difference as ``("choice", why)``
    or ``("defect", why)``; ``residual`` configures its choices away, ``compensation`` its defects too."""

    name: str
    version: str
    build: Callable[..., torch.optim.Optimizer]
    mapping: str
    notes: dict[str, tuple[str, str]] = field(default_factory=dict)
    residual: Setup = Setup()
    compensation: Setup | None = None
    kind: str = "package"  # "reference" | "package" | "emulation"
    module: str | None = None  # what must be importable (a package's import name), and its distribution:
    dist: str | None = None


def build_mars_ref(params: Sequence[Tensor], h: Hyper, opts: RefOptions = RefOptions()) -> MARS:
    """``mars_ref.MARS`` with the paper's hyperparameters and ``opts``."""
    wide = [p for p in params if opts.ndim_ge_2 and p.ndim > 2]
    rest = [p for p in params if not any(p is q for q in wide)]
    groups = [dict(params=ps, optimize_1d=o) for ps, o in ((wide, True), (rest, opts.optimize_1d)) if ps]
    cls = _MARSPlainFirstStep if opts.first_gamma0 else MARS
    return cls(groups, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay,
               gamma=h.gamma if opts.gamma is None else opts.gamma, clip=opts.clip, lr_1d=h.lr_1d,
               betas_1d=h.betas_1d, weight_decay_1d=h.weight_decay_1d, foreach=opts.foreach)


class _MARSPlainFirstStep(MARS):
    """``MARS`` with γ = 0 at its first step (``c_1 = g_1``, timm's convention), the groups' γ afterwards.
    γ is read per group at every step, so this is mars_ref configured, not changed."""

    _done_first = False

    def step(self, closure=None):
        if self._done_first:
            return super().step(closure)
        gammas = [group["gamma"] for group in self.param_groups]
        for group in self.param_groups:
            group["gamma"] = 0.0
        try:
            return super().step(closure)
        finally:
            for group, gamma in zip(self.param_groups, gammas, strict=True):
                group["gamma"] = gamma
            self._done_first = True


def reference() -> Implementation:
    return Implementation("mars_ref", _version("mars_ref"), lambda params, h, **_: build_mars_ref(params, h),
                          "the paper's hyperparameters as they are", kind="reference")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------- timm (loaded by path: see load_timm_mars)

PINNED = {"timm": "1.0.31", "pytorch-optimizer": "4.1.0", "heavyball": "3.2.1"}


def load_timm_mars() -> type:
    """timm's ``Mars`` class from ``timm/optim/mars.py``, loaded by path without importing the ``timm`` package
    (whose import pulls torchvision, which does not import beside the CPU build of torch 2.13). The file imports
    only torch and its sibling ``_types.py``, which a stand-in parent package provides."""
    if "_mars_audit_timm_optim.mars" in sys.modules:
        return sys.modules["_mars_audit_timm_optim.mars"].Mars
    spec = importlib.util.find_spec("timm")  # a top-level spec: timm/__init__.py is not run
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (pip install -e .[audit])")
    folder = Path(list(spec.submodule_search_locations)[0]) / "optim"
    package = types.ModuleType("_mars_audit_timm_optim")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    file_spec = importlib.util.spec_from_file_location(f"{package.__name__}.mars", folder / "mars.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module
    file_spec.loader.exec_module(module)
    return module.Mars


def _timm_build(params, h: Hyper, **extra):
    # timm has no weight_decay_1d: the tensors off its MARS path (ndim < 2) get a group of their own with it
    on = [p for p in params if p.ndim >= 2]
    off = [p for p in params if p.ndim < 2]
    groups = [dict(params=ps, weight_decay=wd) for ps, wd in ((on, h.weight_decay), (off, h.weight_decay_1d)) if ps]
    return load_timm_mars()(groups, lr=h.lr, betas=h.betas, eps=h.eps, gamma=h.gamma, mars_type="adamw",
                            optimize_1d=False, lr_1d_factor=h.lr_1d / h.lr, betas_1d=h.betas_1d, **extra)


def timm() -> Implementation:
    return Implementation(
        "timm Mars", _version("timm"), _timm_build, module="timm", dist="timm", mapping=
        "lr, betas, eps, gamma; lr_1d_factor = lr_1d/lr, betas_1d; weight_decay_1d through a second parameter "
        "group (the tensors with ndim < 2) with weight_decay = weight_decay_1d; timm/optim/mars.py loaded by path",
        notes={"first step": ("choice", "its source calls c_1 = g_1 'a timm addition'"),
               "path": ("choice", "ndim >= 2: conv kernels take MARS (its documented rule)")},
        residual=Setup(("first step: mars_ref with γ = 0 at step 1 (c_1 = g_1)",
                        "path: mars_ref puts tensors with ndim > 2 in a group with optimize_1d=True"),
                       links=("first step", "path"), ref=RefOptions(ndim_ge_2=True, first_gamma0=True)))


# ----------------------------------------------------------------------- pytorch-optimizer


def _po_build(params, h: Hyper, foreach: bool | None = None, **extra):
    from pytorch_optimizer import MARS as PO

    return PO(params, lr=h.lr, betas=h.betas, gamma=h.gamma, mars_type="adamw", optimize_1d=False, lr_1d=h.lr_1d,
              betas_1d=h.betas_1d, weight_decay=h.weight_decay, weight_decay_1d=h.weight_decay_1d, eps=h.eps,
              foreach=foreach, **extra)


def pytorch_optimizer(foreach: bool | None) -> Implementation:
    path = "foreach path (its default)" if foreach is None else "per-tensor path (foreach=False)"
    eps_away = ("ε: eps = 0 on both sides (ε before the bias correction has no constant mapping; the 1e-15 under "
                "the root stays)")
    return Implementation(
        f"pytorch-optimizer MARS, {path}", _version("pytorch-optimizer"),
        lambda params, h, **extra: _po_build(params, h, foreach=foreach, **extra),
        module="pytorch_optimizer", dist="pytorch-optimizer",
        mapping="every argument by name (lr, betas, eps, weight_decay, gamma, lr_1d, betas_1d, weight_decay_1d)",
        notes={"ε": ("choice", "the library's AdamW convention: √(v + 1e-15) + ε, then the bias correction"),
               "path": ("choice", "ndim >= 2: conv kernels take MARS (its documented rule)"),
               "step count": ("choice", "one count per parameter group (as most of its optimizers)")},
        residual=Setup((eps_away, "path: mars_ref puts tensors with ndim > 2 in a group with optimize_1d=True",
                        "step count: no effect here (every tensor has a gradient at every step)"),
                       links=("path", "step count"), hyper=dict(eps=0.0), ref=RefOptions(ndim_ge_2=True)))


# ----------------------------------------------------------------------- HeavyBall


def _heavyball_build(params, h: Hyper, **extra):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # eager kernels: no torch.compile in a CPU audit (same math)
    kw = dict(lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, mars=True, mars_gamma=h.gamma,
              storage_dtype="float64" if params[0].dtype == torch.float64 else "float32")
    return heavyball.AdamW(list(params), **{**kw, **extra})


def heavyball_gamma_for(h: Hyper) -> float:
    """The ``mars_gamma`` that makes HeavyBall's coefficient β1·γ'/(1−γ') equal the paper's k = γ·β1/(1−β1)."""
    return h.k / (h.betas[0] + h.k)


def heavyball() -> Implementation:
    configured = ("ε: eps = 0 on both sides (its ε is a floor, max(√v̂, ε): no mapping)",
                  "clip: mars_ref clip='none'", "path: mars_ref optimize_1d=True (HeavyBall has no fallback)",
                  "step count: no effect here (every tensor has a gradient at every step)",
                  ".grad after step: no effect on the parameters")
    away = ("clip", "path", "ε", "step count", ".grad after step")
    return Implementation(
        "HeavyBall AdamW(mars=True)", _version("heavyball"), _heavyball_build, module="heavyball", dist="heavyball",
        mapping="lr, betas, eps, weight_decay, mars=True, mars_gamma = gamma (storage_dtype float64; eager, without "
        "torch.compile; torch's default dtype float64 while it runs, as it computes its lr in that dtype); no clip, "
        "no fallback, no lr_1d/betas_1d/weight_decay_1d to map",
        notes={"correction": ("defect", "k = β1·γ/(1−γ), not γ·β1/(1−β1): chainable.mars passes (γ, β1) to "
                                        "utils.mars_correction(g, old_g, beta1, gamma), i.e. swapped; at its "
                                        "defaults (γ 0.0025, β1 0.9) k is 10× smaller than intended, at the "
                                        "paper's (γ 0.025, β1 0.95) 19.5× smaller"),
               "clip": ("choice", "its mars is a gradient transform without MARS's clip"),
               "path": ("choice", "one chain for every tensor"),
               "ε": ("choice", "its default division: max(√v̂, ε) ('eps_clamp')"),
               "step count": ("choice", "one count per parameter group"),
               ".grad after step": ("choice", "it consumes gradients: p.grad = None, the tensor reused as scratch "
                                              "(it holds c_t afterwards: code that keeps a reference sees c_t)")},
        residual=Setup(configured, away, hyper=dict(eps=0.0), ref=RefOptions(clip="none", optimize_1d=True)),
        compensation=Setup(configured + ("correction: mars_gamma = k/(β1 + k), so β1·γ'/(1−γ') = k",),
                           away + ("correction",), hyper=dict(eps=0.0),
                           extra=lambda h: dict(mars_gamma=heavyball_gamma_for(h)),
                           ref=RefOptions(clip="none", optimize_1d=True)))


# ----------------------------------------------------------------------- emulations of code that is not on PyPI


def emulation(name: str, chain_: Chain, notes: dict[str, tuple[str, str]], mapping: str = "",
              residual: Setup = Setup()) -> Implementation:
    """An :class:`Emulation` audited like an implementation (``version`` says it is one)."""
    return Implementation(name, "emulated", lambda params, h, **_: Emulation(params, h, chain_),
                          mapping or "the paper's hyperparameters as they are", notes=notes, residual=residual,
                          kind="emulation")


REFERENCE_NOTE = ("defect", "a reference to p.grad: with zero_grad(set_to_none=False) (or DDP's "
                            "gradient_as_bucket_view) g_prev is the new gradient, the correction vanishes "
                            "(docs/algorithm.md §10.1)")


def authors_emulations() -> list[Implementation]:
    """The authors' code paths as read at the commits of ``docs/algorithm.md`` §12.2, rebuilt from the pieces."""
    return [
        emulation("authors' mars.py", Chain(g_prev="reference"), {"g_prev": REFERENCE_NOTE}),
        emulation("authors' mars_fused.py, _single_tensor_mars", Chain(g_prev="reference", fallback="lr"),
                  {"g_prev": REFERENCE_NOTE,
                   "fallback": ("defect", "the AdamW step of the tensors off the MARS path uses lr, not lr·lr_1d/lr "
                                          "(its weight decay does use lr_1d)")}),
        emulation("authors' mars_fused.py, _multi_tensor_mars",
                  Chain(g_prev="reference", v_input="g", path="all"),
                  {"g_prev": REFERENCE_NOTE, "path": ("choice", "the path is only reached with optimize_1d=True"),
                   "second moment": ("defect", "v accumulates the raw g_t² where mars.py uses the clipped c_t²")},
                  mapping="the paper's hyperparameters with optimize_1d=True (the only way to reach this path)",
                  residual=Setup(("path: mars_ref optimize_1d=True",), ("path",), ref=RefOptions(optimize_1d=True))),
        emulation("authors' mars_fused.py, fused CUDA single-tensor path",
                  Chain(g_prev="reference", bias="frozen"),
                  {"g_prev": REFERENCE_NOTE,
                   "bias correction": ("defect", "state['step'] never advances (a new tensor is stored in a local "
                                                 "list), so t = 1 forever; the kernel divides √v by 1−β2^t, not "
                                                 "its root")}),
    ]


def implementations(emulations: bool = True) -> list[Implementation]:
    """Every implementation the audit knows, reference first."""
    found = [reference(), timm(), pytorch_optimizer(None), pytorch_optimizer(False), heavyball()]
    return found + (authors_emulations() if emulations else [])


def missing(impl: Implementation) -> str | None:
    """Why ``impl`` cannot be audited here (not installed), or None."""
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        return (f"{impl.name}: skipped, {impl.dist} is not installed (pip install -e .[audit] installs "
                f"{impl.dist} {PINNED[impl.dist]})")
    return None


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Trace:
    """A run: ``xs[t][i]`` is tensor i after t steps; ``after[t][i]`` is (what the tensor handed in as tensor
    i's gradient at step t+1 holds after the step, whether ``p.grad`` was then None); None where no gradient."""

    xs: list[list[Tensor]]
    after: list[list[tuple[Tensor, bool] | None]]


def run(build: Callable[[list[Tensor]], torch.optim.Optimizer], x0: Sequence[Tensor],
        grads: Sequence[Sequence[Tensor | None]], reuse: bool = False) -> Trace:
    """Step an optimizer over given gradients. ``reuse``: the ``.grad`` tensors are reused in place, as
    ``zero_grad(set_to_none=False)`` then ``backward()`` do; else each step gets fresh tensors (torch's default)."""
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    with warnings.catch_warnings(), float64_default():
        warnings.simplefilter("ignore")
        opt = build(params)
        xs, after = [[p.detach().clone() for p in params]], []
        for gs in grads:
            given = []
            for p, g in zip(params, gs, strict=True):
                if g is None:
                    p.grad = None
                elif reuse and p.grad is not None:
                    p.grad.zero_()
                    p.grad.add_(g)
                else:
                    p.grad = g.clone()
                given.append(p.grad)
            opt.step()
            after.append([None if t is None else (t.detach().clone(), p.grad is None)
                          for t, p in zip(given, params, strict=True)])
            xs.append([p.detach().clone() for p in params])
    return Trace(xs, after)


@contextmanager
def float64_default():
    """torch's default dtype float64 while an optimizer runs: HeavyBall computes its learning rate as
    ``base_lr * step_tensor``, which lands in the default dtype (float32 would round η by ~1e-8)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _flat(xs: Sequence[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def deviation(a: Trace, b: Trace) -> list[float]:
    """``‖x_a(t) − x_b(t)‖ / ‖x_b(t) − x_b(0)‖`` for t = 1 … T: the deviation relative to the update."""
    x0 = _flat(b.xs[0])
    out = []
    for xa, xb in zip(a.xs[1:], b.xs[1:], strict=True):
        size = float(torch.linalg.vector_norm(_flat(xb) - x0))
        out.append(float(torch.linalg.vector_norm(_flat(xa) - _flat(xb))) / size if size > 0 else 0.0)
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, scale=1.0) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=DTYPE) * scale


def _builder(impl: Implementation, h: Hyper, **extra) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: impl.build(params, h, **extra)


# ---------------------------------------------------------------------------------------------- the readout

READ_SHAPES = ((3, 4), (2, 5))  # two 2-D tensors: A (made large in the clip run) and B (kept small)
READ_STEPS = 3
BIG = 40.0  # A's gradients ×BIG in the clip run: ‖c_A‖ ≈ 4, well above τ = 1
READ_EPS = 1e12  # ε ≫ √v̂: the AdamW step is m̂/ε to ~1e-12 (x_0 = 0 keeps every digit of the tiny steps)


def _readout_grads() -> list[list[Tensor]]:
    gen = _gen(11)
    return [[_randn(s, gen, 0.02) for s in READ_SHAPES] for _ in range(READ_STEPS)]


def _recover(trace: Trace, scales: list[float], beta1: float) -> list[list[Tensor]]:
    r"""``c_t`` of each tensor from a readout run: ``x_{t−1} − x_t = s_t·m̂_t`` (ε dominates the denominator),
    ``m_t = m̂_t·(1−β1^t)``, ``c_t = (m_t − β1·m_{t−1})/(1−β1)``."""
    cs, m_prev = [], [torch.zeros_like(x) for x in trace.xs[0]]
    for t in range(1, len(trace.xs)):
        m = [(a - b) / scales[t - 1] * (1 - beta1**t) for a, b in zip(trace.xs[t - 1], trace.xs[t], strict=True)]
        cs.append([(mi - beta1 * mp) / (1 - beta1) for mi, mp in zip(m, m_prev, strict=True)])
        m_prev = m
    return cs


def _scales(trace: Trace, grads: list[list[Tensor]], beta1: float) -> list[float]:
    """The per-step factor of a calibration run (γ = 0, small gradients: ``c_t = g_t``): ``x_{t−1} − x_t = s_t·m̂_t``."""
    scales, m = [], [torch.zeros_like(x) for x in trace.xs[0]]
    for t in range(1, len(trace.xs)):
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads[t - 1], strict=True)]
        mhat = _flat(m) / (1 - beta1**t)
        step = _flat(trace.xs[t - 1]) - _flat(trace.xs[t])
        scales.append(float(step @ mhat / (mhat @ mhat)))
    return scales


def _fit_k(cs: list[list[Tensor]], grads: list[list[Tensor]]) -> tuple[float, float]:
    """Least squares ``c_t − g_t = k·(g_t − g_{t−1})`` over t ≥ 2 and every tensor: (k, the residual relative to
    ‖c_t‖: large if g_prev is not g_{t−1})."""
    y = _flat([c - g for t in range(1, len(cs)) for c, g in zip(cs[t], grads[t], strict=True)])
    d = _flat([g - gp for t in range(1, len(cs)) for g, gp in zip(grads[t], grads[t - 1], strict=True)])
    k = float(y @ d / (d @ d))
    size = float(torch.linalg.vector_norm(_flat([c for t in range(1, len(cs)) for c in cs[t]])))
    return k, float(torch.linalg.vector_norm(y - k * d)) / size


def readout(impl: Implementation, h: Hyper) -> dict:
    """The links read off the parameters of readout runs (x_0 = 0, λ = 0, lr = 1, ε = 1e12, two 2-D tensors):
    the correction coefficient, the first step, the clip, copy or reference, and the ``.grad`` tensor."""
    hr = replace(h, lr=1.0, eps=READ_EPS, weight_decay=0.0, weight_decay_1d=0.0)
    grads, x0 = _readout_grads(), [torch.zeros(s, dtype=DTYPE) for s in READ_SHAPES]
    beta1 = h.betas[0]
    scales = _scales(run(_builder(impl, replace(hr, gamma=0.0)), x0, grads), grads, beta1)
    probe = run(_builder(impl, hr), x0, grads)
    cs = _recover(probe, scales, beta1)
    k, fit = _fit_k(cs, grads)
    first = float(_flat(cs[0]) @ _flat(grads[0]) / (_flat(grads[0]) @ _flat(grads[0])))
    big_grads = [[g * BIG, gb] for g, gb in grads]
    big = _recover(run(_builder(impl, hr), x0, big_grads), scales, beta1)
    reused = _recover(run(_builder(impl, hr), x0, grads, reuse=True), scales, beta1)
    k_reused, _ = _fit_k(reused, grads)
    return dict(k=k, k_fit_residual=fit, first_ratio=first, clip=_clip_of(cs, big), k_reused=k_reused,
                grad=_grad_after(probe, cs))


def _clip_of(cs: list[list[Tensor]], big: list[list[Tensor]]) -> dict:
    """The clip rule from the unclipped ``c_t`` (small run) and the big run's ``c_t`` (A's gradients ×BIG)."""
    def norm(x):
        return float(torch.linalg.vector_norm(x))

    f_a = [norm(b[0]) / (BIG * norm(c[0])) for c, b in zip(cs, big, strict=True)]
    f_b = [norm(b[1]) / norm(c[1]) for c, b in zip(cs, big, strict=True)]
    clipped = [t for t, f in enumerate(f_a) if f < 1 - 1e-4]
    if not clipped:
        mode, taus = "none", []
    elif all(abs(f - 1) < 1e-4 for f in f_b):
        mode, taus = "tensor", [norm(big[t][0]) for t in clipped]
    elif all(abs(fa - fb) < 1e-4 for fa, fb in zip(f_a, f_b, strict=True) if fa < 1 - 1e-4):
        mode, taus = "global", [math.hypot(norm(big[t][0]), norm(big[t][1])) for t in clipped]
    else:
        mode, taus = "other", []
    tau = sum(taus) / len(taus) if taus else None
    if tau is not None and abs(tau - round(tau, 3)) < 1e-5 * tau:
        tau = round(tau, 3)
    return dict(mode=mode, tau=tau, first=0 in clipped, factors_A=f_a, factors_B=f_b,
                before_A=[BIG * norm(c[0]) for c in cs], norms_A=[norm(b[0]) for b in big])


def _grad_after(probe: Trace, cs: list[list[Tensor]]) -> str:
    """What the step did to the tensor handed in as ``.grad``: "kept", "consumed" (p.grad set to None, the tensor
    holds c_t), "unset" (p.grad None, tensor unchanged) or "overwritten"."""
    grads = _readout_grads()
    seen = set()
    for t, row in enumerate(probe.after):
        for i, (value, unset) in enumerate(row):
            if torch.equal(value, grads[t][i]):
                seen.add("unset" if unset else "kept")
            elif unset and torch.allclose(value, cs[t][i], rtol=1e-6, atol=0):
                seen.add("consumed")
            else:
                seen.add("overwritten")
    return "/".join(sorted(seen))


# ---------------------------------------------------------------------------------------------- the categorical links


def compare(impl: Implementation, h: Hyper, x0: Sequence[Tensor], grads, variants: dict[str, Chain]) -> dict:
    """Run ``impl`` and an :class:`Emulation` of each variant on the same gradients: the distance of each (the
    largest deviation over the steps, relative to the update) and the variant the implementation reproduces."""
    mine = run(_builder(impl, h), x0, grads)
    dist = {name: max(deviation(mine, run(lambda ps, ch=ch: Emulation(ps, h, ch), x0, grads)))
            for name, ch in variants.items()}
    best = min(dist, key=dist.get)
    return dict(found=best if dist[best] < TOL else None, closest=best, distances=dist)


def _grads(shapes, steps: int, seed: int, scale: float = 0.3, skip: dict | None = None) -> list[list[Tensor | None]]:
    """Random gradients; ``skip = {step: tensor index}`` leaves that tensor without a gradient at that step."""
    gen = _gen(seed)
    out = [[_randn(s, gen, scale) for s in shapes] for _ in range(steps)]
    for t, i in (skip or {}).items():
        out[t][i] = None
    return out


def _x0(shapes, seed: int) -> list[Tensor]:
    gen = _gen(seed)
    return [_randn(s, gen) for s in shapes]


def link_bias(impl, h, ch: Chain) -> dict:
    """Bias corrections: ε = 0 (so its placement cannot matter), λ = 0, 4 steps on a 2-D tensor."""
    variants = {b: replace(ch, bias=b) for b in ("both", "none", "frozen")}
    return compare(impl, replace(h, eps=0.0, weight_decay=0.0), _x0([(3, 4)], 1), _grads([(3, 4)], 4, 2, 0.05),
                   variants)


def link_eps(impl, h, ch: Chain) -> dict:
    """ε placement: a tiny gradient (|g| ≈ ε), so ε is of the size of √v̂."""
    variants = {e: replace(ch, eps=e) for e in ("after", "before", "before+floor", "clamp")}
    return compare(impl, replace(h, weight_decay=0.0), _x0([(3, 4)], 3), _grads([(3, 4)], 4, 4, h.eps), variants)


def link_second_moment(impl, h, ch: Chain) -> dict:
    """What v averages: ε = 0, γ > 0 and a clipped step, so c_t differs from g_t."""
    variants = {v: replace(ch, v_input=v) for v in ("c", "g")}
    grads = _grads([(3, 4)], 4, 5, 0.2)
    grads[2] = [g * 10 for g in grads[2]]
    return compare(impl, replace(h, eps=0.0, weight_decay=0.0), _x0([(3, 4)], 5), grads, variants)


def link_decay(impl, h, ch: Chain) -> dict:
    """Weight decay form: ε = 0, a large η·λ (0.05·0.5), x_0 of order 1."""
    variants = {d: replace(ch, decay=d) for d in ("decoupled", "after", "fixed", "coupled")}
    return compare(impl, replace(h, eps=0.0, lr=0.05, weight_decay=0.5), _x0([(3, 4)], 6),
                   _grads([(3, 4)], 3, 7, 0.05), variants)


def link_steps(impl, h, ch: Chain) -> dict:
    """Step count: the second tensor has no gradient at step 1, so per tensor its t is one less than per group."""
    shapes = [(3, 4), (2, 5)]
    variants = {s: replace(ch, steps=s) for s in ("tensor", "group")}
    return compare(impl, replace(h, eps=0.0, weight_decay=0.0), _x0(shapes, 8),
                   _grads(shapes, 3, 9, 0.05, skip={0: 1}), variants)


PATH_SHAPES = {1: (6,), 2: (3, 4), 3: (2, 3, 2), 4: (2, 2, 2, 2)}
FALLBACKS = ("standard", "lr", "group betas", "group wd")


def link_path(impl, h, ch: Chain) -> dict:
    """Which tensors take the MARS path and what the fallback is: one tensor of each ndim alone, ε = 0, λ ≠ λ_1d,
    lr ≠ lr_1d, betas ≠ betas_1d; the variants: the MARS path, or the fallback in each known form."""
    variants = {"MARS": replace(ch, path="all")} | {f"fallback {f}": replace(ch, path="none", fallback=f)
                                                     for f in FALLBACKS}
    per_ndim = {n: compare(impl, replace(h, eps=0.0), _x0([s], 10 + n), _grads([s], 4, 20 + n, 0.3), variants)
                for n, s in PATH_SHAPES.items()}
    on = {n for n, r in per_ndim.items() if r["found"] == "MARS"}
    complete = all(r["found"] for r in per_ndim.values())
    rule = {frozenset({2}): "ndim==2", frozenset({2, 3, 4}): "ndim>=2", frozenset({1, 2, 3, 4}): "all",
            frozenset(): "none"}.get(frozenset(on), "other") if complete else "other"
    fallbacks = {r["found"].removeprefix("fallback ") for r in per_ndim.values()
                 if r["found"] and r["found"].startswith("fallback")}
    fallback = fallbacks.pop() if len(fallbacks) == 1 else ("n/a" if not fallbacks and rule == "all" else "other")
    return dict(path=rule, fallback=fallback, per_ndim=per_ndim, complete=complete)


# ---------------------------------------------------------------------------------------------- the diagnosis

LINKS = ("correction", "first step", "clip", "g_prev", "path", "fallback", "second moment", "ε", "bias correction",
         "weight decay", "step count", ".grad after step")

TEXT = {
    "first_ratio": {None: "g_prev = 0: c₁ = (1+k)·g₁", 1.0: "c₁ = g₁ (no correction at step 1)"},
    "clip": {"tensor": "per tensor", "global": "global norm", "none": "none", "other": "other"},
    "g_prev": {"copy": "a copy of g_{t−1}", "reference": "a reference to .grad (with zero_grad(set_to_none=False) "
                                                         "the correction vanishes)", "other": "other"},
    "path": {"ndim==2": "ndim == 2", "ndim>=2": "ndim ≥ 2", "all": "every tensor", "none": "no tensor",
             "other": "other"},
    "fallback": {"standard": "AdamW with lr_1d, betas_1d, weight_decay_1d", "lr": "AdamW whose step uses lr, not "
                 "lr_1d", "group betas": "AdamW with the MARS betas", "group wd": "AdamW with the MARS weight decay",
                 "n/a": "none (every tensor takes MARS)", "other": "other"},
    "v_input": {"c": "the clipped c_t", "g": "the raw g_t"},
    "eps": {"after": "after the bias correction: m̂/(√v̂ + ε)", "before": "before it: m̂/(√v̂ + ε/√(1−β2^t))",
            "before+floor": "before it, with √(v + 1e-15): m̂/(√(v̂ + 1e-15/bc2) + ε/√bc2)",
            "clamp": "a floor: m̂/max(√v̂, ε)"},
    "bias": {"both": "1−β1^t and √(1−β2^t)", "none": "none", "frozen": "frozen at t = 1, 1−β2 without its root"},
    "decay": {"decoupled": "decoupled, on the pre-step x: x − η·λ·x_t", "after": "after the step: ×(1 − η·λ)",
              "fixed": "not scaled by η: x − λ·x_t", "coupled": "coupled: λ·x added to g_t"},
    "steps": {"tensor": "per tensor", "group": "per group"},
    "grad": {"kept": "left as given", "consumed": "p.grad set to None; the tensor handed in holds c_t"},
}


@dataclass
class Finding:
    """What one link of an implementation is: ``value`` (comparable across implementations), ``text`` (for a
    reader), ``evidence`` (the experiment's numbers), ``clear`` (the experiment matched a known variant)."""

    value: object
    text: str
    evidence: str
    clear: bool = True


def _k_form(k: float, h: Hyper) -> tuple[str | None, float, str]:
    """(the form of k, its scale, the finding's text) for a measured k."""
    for form, (text, fn) in K_FORMS.items():
        value = fn(h.gamma, h.betas[0])
        if abs(k - value) <= 1e-8 + 1e-7 * abs(value):
            return form, 1.0, f"k = {value:.6g} = {text}"
    scale = float(f"{k / h.k:.9g}")  # the readout is good to ~1e-12: 9 digits are exact
    return None, scale, f"k = {k:.6g} = {scale:.6g} × γ·β1/(1−β1) (no known form)"


def _readout_findings(r: dict, h: Hyper) -> tuple[Chain, dict[str, Finding]]:
    form, scale, k_text = _k_form(r["k"], h)
    k = k_of(Chain(k=form, k_scale=scale), h)
    ratio = r["first_ratio"]
    first = None if abs(ratio - (1 + k)) < 1e-7 else (1.0 if abs(ratio - 1) < 1e-7 else float(f"{ratio:.9g}"))
    clip = r["clip"]
    clip_text = TEXT["clip"][clip["mode"]] + ("" if clip["tau"] is None else f", τ = {clip['tau']:g}")
    clip_text += "" if clip["mode"] == "none" or clip["first"] else ", not at step 1"
    g_prev = ("copy" if abs(r["k_reused"] - r["k"]) <= 1e-7 * max(1.0, abs(r["k"])) else
              "reference" if abs(r["k_reused"]) < 1e-7 else "other")
    ch = Chain(k=form, k_scale=scale, first_ratio=first, clip=clip["mode"], tau=clip["tau"] or 1.0,
               clip_first=clip["first"] or clip["mode"] == "none", g_prev=g_prev,
               grad=r["grad"] if r["grad"] in ("kept", "consumed") else "kept")
    norms = ", ".join(f"{a:.3g} → {n:.6f}" for a, n in zip(clip["before_A"], clip["norms_A"], strict=True))
    found = {
        "correction": Finding((form, scale), k_text, f"k = {r['k']:.9g} read off c_t − g_t (fit residual "
                                               f"{r['k_fit_residual']:.0e})", r["k_fit_residual"] < 1e-6),
        "first step": Finding(first, TEXT["first_ratio"].get(first, f"c₁ = {ratio:.6g}·g₁"), f"c₁ = {ratio:.9g}·g₁"),
        "clip": Finding((ch.clip, ch.tau, ch.clip_first), clip_text,
                        f"‖c_t‖ of a large tensor, steps 1-3, unclipped → as stepped: {norms}; a small tensor's "
                        f"c_t scaled by {', '.join(f'{f:.6f}' for f in clip['factors_B'])}", clip["mode"] != "other"),
        "g_prev": Finding(g_prev, TEXT["g_prev"][g_prev], f"k = {r['k_reused']:.3g} with the .grad tensor reused "
                                                          f"in place, {r['k']:.3g} with fresh ones",
                          g_prev != "other"),
        ".grad after step": Finding(r["grad"], TEXT["grad"].get(r["grad"], r["grad"]), f"observed: {r['grad']}",
                                    r["grad"] in TEXT["grad"]),
    }
    return ch, found


def _categorical(name: str, result: dict, key: str) -> Finding:
    dist = sorted(result["distances"].items(), key=lambda kv: kv[1])
    evidence = "; ".join(f"{n}: {d:.0e}" for n, d in dist)
    value = result["found"] if result["found"] is not None else "other"
    text = TEXT[key].get(value, value) if result["found"] else f"none of the known variants (closest: {dist[0][0]})"
    return Finding(value, text, f"distance to each variant: {evidence}", result["found"] is not None)


CATEGORICAL = (("second moment", "v_input", link_second_moment), ("bias correction", "bias", link_bias),
               ("ε", "eps", link_eps), ("weight decay", "decay", link_decay), ("step count", "steps", link_steps))


def diagnose(impl: Implementation, h: Hyper) -> tuple[Chain, dict[str, Finding]]:
    """Every link of ``impl``, each from its own experiment, and the chain they make (:class:`Chain`)."""
    ch, found = _readout_findings(readout(impl, h), h)
    for _ in range(2):  # the second pass sees every link the first found (v and the bias corrections interact)
        for link, key, experiment in CATEGORICAL:
            result = experiment(impl, h, ch)
            found[link] = _categorical(link, result, key)
            if result["found"] is not None:
                ch = replace(ch, **{key: result["found"]})
    p = link_path(impl, h, ch)
    per = "; ".join(f"{n}-D: {r['found'] or 'none (closest ' + r['closest'] + ')'}" for n, r in p["per_ndim"].items())
    found["path"] = Finding(p["path"], TEXT["path"][p["path"]], per, p["complete"] and p["path"] != "other")
    found["fallback"] = Finding(p["fallback"], TEXT["fallback"][p["fallback"]], per, p["fallback"] != "other")
    ch = replace(ch, path=p["path"] if p["path"] != "other" else ch.path,
                 fallback=p["fallback"] if p["fallback"] in FALLBACKS else ch.fallback)
    return ch, {link: found[link] for link in LINKS}


def differs(mine: Finding, ref: Finding) -> bool:
    return mine.value != ref.value and mine.value != "n/a"


# ---------------------------------------------------------------------------------------------- the model


def _net(x: Sequence[Tensor], inputs: Tensor) -> Tensor:
    conv_w, conv_b, norm_w, norm_b, mix_w, head_w, head_b = x
    h = torch.nn.functional.conv2d(inputs, conv_w, conv_b).relu().flatten(1)
    h = torch.nn.functional.layer_norm(h, (h.shape[1],), norm_w, norm_b)
    return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(h, mix_w)), head_w, head_b)


MODEL = (("conv.weight", (4, 2, 3, 3)), ("conv.bias", (4,)), ("norm.weight", (64,)), ("norm.bias", (64,)),
         ("mix.weight", (32, 64)), ("head.weight", (10, 32)), ("head.bias", (10,)))
#: the loss weighted ×0.3 and ×1 on alternate steps (as a varying batch would): the 2-D tensors' c_t is clipped on
#: some steps, not on others, and not at step 1 (so the first-step convention shows)
LOSS_SCALES = (0.3, 1.0)


def model_stream(steps: int = max(STEPS), seed: int = 0) -> tuple[list[Tensor], list[list[Tensor]]]:
    """The same model for every implementation: a small conv net (a 4-D kernel, 1-D biases and norm, 2-D
    matrices) in float64, and its gradients on a fresh minibatch at every step, taken along mars_ref's own
    trajectory with the paper's hyperparameters. Every implementation is fed these gradients."""
    gen = _gen(seed)
    x0 = [_randn(s, gen, 0.3) if n.endswith("weight") and n != "norm.weight" else
          (torch.ones(s, dtype=DTYPE) if n == "norm.weight" else torch.zeros(s, dtype=DTYPE)) for n, s in MODEL]
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = build_mars_ref(params, Hyper())
    stream = []
    for t in range(steps):
        inputs, labels = _randn((16, 2, 6, 6), gen), torch.randint(0, 10, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(_net(params, inputs), labels) * LOSS_SCALES[t % len(LOSS_SCALES)]
        grads = torch.autograd.grad(loss, params)
        stream.append([g.detach().clone() for g in grads])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return x0, stream


# ---------------------------------------------------------------------------------------------- one implementation


@dataclass
class Result:
    """The audit of one implementation. Deviations are lists over steps 1 … T (relative to the update)."""

    impl: Implementation
    chain: Chain
    links: dict[str, Finding]
    deviation: list[float]  # as mapped, beside mars_ref with the paper's hyperparameters
    reused: list[float]  # the same with the .grad tensors reused in place (zero_grad(set_to_none=False))
    residual: list[float]  # after configuring its documented choices away (impl.residual)
    compensated: list[float] | None  # after compensating its suspected defects too (impl.compensation)
    explained: list[float]  # beside the Emulation of its diagnosed chain
    differing: list[str] = field(default_factory=list)
    alone: dict[str, float] = field(default_factory=dict)  # link -> deviation after T steps of that link alone
    verdict: str = ""
    seconds: float = 0.0


@dataclass
class Baseline:
    """mars_ref's own audit: the findings every other implementation is compared with, its runs on the model."""

    links: dict[str, Finding]
    x0: list[Tensor]
    grads: list[list[Tensor]]
    primary: Trace
    reused: Trace


def baseline(h: Hyper = Hyper(), steps: int = max(STEPS)) -> Baseline:
    _, links = diagnose(reference(), h)
    x0, grads = model_stream(steps)
    mars_ref = _builder(reference(), h)
    return Baseline(links, x0, grads, run(mars_ref, x0, grads), run(mars_ref, x0, grads, reuse=True))


def _setup_deviation(impl: Implementation, h: Hyper, setup: Setup, base: Baseline) -> list[float]:
    hs = replace(h, **setup.hyper)
    extra = setup.extra(hs) if setup.extra else {}
    mine = run(_builder(impl, hs, **extra), base.x0, base.grads)
    return deviation(mine, run(lambda ps: build_mars_ref(ps, hs, setup.ref), base.x0, base.grads))


def audit(impl: Implementation, base: Baseline, h: Hyper = Hyper()) -> Result:
    """Diagnose ``impl`` link by link, run it beside mars_ref on the model, and say what it is."""
    start = time.perf_counter()
    ch, links = diagnose(impl, h)
    mine = run(_builder(impl, h), base.x0, base.grads)
    result = Result(
        impl, ch, links, deviation(mine, base.primary),
        deviation(run(_builder(impl, h), base.x0, base.grads, reuse=True), base.reused),
        _setup_deviation(impl, h, impl.residual, base),
        _setup_deviation(impl, h, impl.compensation, base) if impl.compensation else None,
        deviation(mine, run(lambda ps: Emulation(ps, h, ch), base.x0, base.grads)))
    result.differing = [link for link in LINKS if differs(links[link], base.links[link])]
    result.alone = {link: link_alone(link, ch, base, h) for link in result.differing}
    result.verdict = verdict(result)
    result.seconds = time.perf_counter() - start
    return result


LINK_FIELDS = {"correction": ("k", "k_scale"), "first step": ("first_ratio",), "clip": ("clip", "tau", "clip_first"),
               "g_prev": ("g_prev",), "path": ("path",), "fallback": ("fallback",), "second moment": ("v_input",),
               "ε": ("eps",), "bias correction": ("bias",), "weight decay": ("decay",), "step count": ("steps",),
               ".grad after step": ("grad",)}


def link_alone(link: str, ch: Chain, base: Baseline, h: Hyper) -> float:
    """How far that link alone moves the parameters: mars_ref's chain with only this link set to ``ch``'s, beside
    mars_ref on the model (``g_prev`` with the .grad tensors reused in place, where a reference shows)."""
    only = replace(Chain(), **{f: getattr(ch, f) for f in LINK_FIELDS[link]})
    reuse = link == "g_prev"
    mine = run(lambda ps: Emulation(ps, h, only), base.x0, base.grads, reuse=reuse)
    return deviation(mine, base.reused if reuse else base.primary)[-1]


HIDDEN_WHEN_FRESH = ("g_prev", ".grad after step")


def verdict(r: Result) -> str:
    """What the implementation is: its differing links, each a documented choice or a defect (``impl.notes``), what
    configuring the choices away leaves, and whether the diagnosis accounts for everything."""
    kind = {link: r.impl.notes.get(link, ("unexplained", ""))[0] for link in r.differing}
    choices = [link for link in r.differing if kind[link] == "choice"]
    defects = [link for link in r.differing if kind[link] == "defect"]
    # the links left after configuring the choices away; a reference and what is left in .grad cannot move the
    # parameters when every step gets fresh .grad tensors (the protocol of these runs)
    left = [link for link in r.differing if link not in r.impl.residual.links and link not in HIDDEN_WHEN_FRESH]
    n, res = len(r.residual), max(r.residual)  # the largest over the steps
    parts = [] if r.differing else ["the same chain as mars_ref, link for link"]
    if choices:
        parts.append(("MARS with these choices: " if not defects else "choices: ")
                     + "; ".join(f"{link}: {r.links[link].text}" for link in choices))
    for link in defects:
        effect = f"alone it moves the parameters by {r.alone[link]:.1e} after {n} steps"
        if link == "g_prev":
            effect += " with .grad reused in place (0 with fresh .grad tensors)"
        parts.append(f"DEFECT in '{link}': {r.links[link].text} ({r.impl.notes[link][1]}; {effect})")
    if res > TOL_ZERO:
        parts.append(f"configuring the choices away leaves up to {res:.1e} over {n} steps, from "
                     + ", ".join(f"'{link}'" + (" (no mapping onto mars_ref's options)" if kind[link] == "choice"
                                                else "") for link in left)
                     + ("" if r.compensated is None else
                        f"; up to {max(r.compensated):.1e} once the defect is compensated"))
    elif r.differing:
        parts.append(f"configuring the choices away leaves up to {res:.0e} over {n} steps")
    unexplained = [link for link in r.differing if kind[link] == "unexplained"]
    if unexplained:
        parts.append("UNEXPLAINED differences (no note): " + ", ".join(unexplained))
    if max(r.explained) > TOL_ZERO:
        parts.append(f"INCOMPLETE diagnosis: the emulation of the diagnosed chain is {max(r.explained):.1e} away")
    elif r.differing:
        parts.append(f"the diagnosed chain reproduces it to {max(r.explained):.0e}: nothing else differs")
    unclear = [link for link, f in r.links.items() if not f.clear]
    if unclear:
        parts.append("no known variant matched: " + ", ".join(unclear))
    return ". ".join(p[0].upper() + p[1:] for p in parts) + "."


# ---------------------------------------------------------------------------------------------- the report


def _e(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def _at(series: list[float], step: int) -> float | None:
    return series[step - 1] if step <= len(series) else None


def summary_table(results: list[Result]) -> list[str]:
    steps = [s for s in STEPS if s <= len(results[0].deviation)]
    last = steps[-1]
    head = (["implementation", "version"] + [f"dev. {s}" for s in steps]
            + [f".grad reused, {last}", f"choices away, {last}", f"+ defects compensated, {last}",
               "explained by the diagnosis", "links that differ"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = ([r.impl.name, r.impl.version] + [_e(_at(r.deviation, s)) for s in steps]
                 + [_e(_at(r.reused, last)), _e(_at(r.residual, last)),
                    _e(None if r.compensated is None else _at(r.compensated, last)), _e(max(r.explained)),
                    ", ".join(r.differing) or "none"])
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def links_table(results: list[Result]) -> list[str]:
    names = [r.impl.name + (" (emulated)" if r.impl.kind == "emulation" else "") for r in results]
    rows = ["| link | " + " | ".join(names) + " |", "|" + "---|" * (len(results) + 1)]
    ref = results[0].links
    for link in LINKS:
        cells = [("**" + r.links[link].text + "**") if differs(r.links[link], ref[link]) else r.links[link].text
                 for r in results]
        rows.append(f"| {link} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def report(results: list[Result], skipped: list[str], h: Hyper, seconds: float) -> str:
    """The audit as Markdown: what was run, the deviations, the links, and a verdict per implementation."""
    lines = ["# MARS implementations audited against mars_ref (`python benchmarks/audit.py`)", "",
             f"Paper hyperparameters mapped onto each implementation (GPT-2 small recipe): {_hyper_text(h)}. "
             f"Float64 throughout. Model: a small conv net ({', '.join(f'{n} {tuple(s)}' for n, s in MODEL)}), "
             f"{len(results[0].deviation)} steps of gradients on fresh minibatches taken along mars_ref's trajectory; "
             "every implementation gets exactly these gradients. Deviation = ‖x_impl − x_mars_ref‖ / "
             "‖x_mars_ref − x_0‖ over all tensors.", ""]
    lines += summary_table(results) + [""]
    lines += ["Columns: *dev. t*: the deviation after t steps, as mapped; *.grad reused*: the same with the `.grad` "
              "tensors reused in place (`zero_grad(set_to_none=False)`) on both sides; *choices away*: after "
              "configuring each documented choice away (listed per implementation below); *+ defects compensated*: "
              "after compensating the suspected defect too; *explained by the diagnosis*: the largest deviation "
              "from the emulation (`audit.Emulation`) of the chain the link experiments diagnosed, 0 "
              "when the diagnosis accounts for everything.", ""]
    lines += ["Links (bold: differs from mars_ref). Each is established by its own experiment; the evidence is "
              "in audit.json and below.", ""] + links_table(results) + [""]
    for r in results:
        lines += [f"## {r.impl.name} ({r.impl.version})", "", f"- mapping: {r.impl.mapping}"]
        if r.impl.residual.text:
            lines.append("- configured away: " + "; ".join(r.impl.residual.text))
        if r.impl.compensation is not None:
            lines.append("- compensated: " + r.impl.compensation.text[-1])
        lines.append(f"- **verdict**: {r.verdict}")
        lines += [f"- {link}: {r.links[link].text} — alone {r.alone[link]:.1e} after {len(r.deviation)} steps — "
                  f"{r.links[link].evidence}" for link in r.differing]
        lines.append("")
    if skipped:
        lines += ["Skipped:", ""] + [f"- {s}" for s in skipped] + [""]
    lines.append(f"Versions: torch {torch.__version__}, " + ", ".join(f"{d} {_version(d)}" for d in PINNED)
                 + f". The audit took {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _hyper_text(h: Hyper) -> str:
    return ", ".join(f"{f.name} {getattr(h, f.name)}" for f in dataclasses.fields(h))


def to_json(results: list[Result], skipped: list[str], h: Hyper) -> dict:
    def one(r: Result) -> dict:
        return dict(version=r.impl.version, kind=r.impl.kind, mapping=r.impl.mapping, verdict=r.verdict,
                    differing=r.differing, alone=r.alone, chain=dataclasses.asdict(r.chain),
                    configured_away=list(r.impl.residual.text),
                    links={k: dict(value=str(f.value), text=f.text, evidence=f.evidence, clear=f.clear,
                                   note=list(r.impl.notes.get(k, ()))) for k, f in r.links.items()},
                    deviation=r.deviation, reused=r.reused, residual=r.residual, compensated=r.compensated,
                    explained=r.explained, seconds=round(r.seconds, 2))

    return dict(hyper=dataclasses.asdict(h), torch=torch.__version__, pinned=PINNED,
                versions={d: _version(d) for d in PINNED}, skipped=skipped,
                implementations={r.impl.name: one(r) for r in results})


def plot(results: list[Result], path: Path) -> None:
    """The deviation over the steps: solid as mapped, dashed with the documented choices configured away, dotted with
    the defects compensated too (packages) or with the .grad tensors reused in place (the authors' code)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    floor = 1e-17  # zero, drawn at the bottom of the log scale
    panels = ((axes[0], "package", "packages on PyPI", "compensated", "defect compensated too"),
              (axes[1], "emulation", "the authors' code paths (emulated)", "reused", ".grad reused in place"))
    for ax, kind, title, third, third_label in panels:
        for n, r in enumerate(r for r in results if r.impl.kind == kind):
            steps = range(1, len(r.deviation) + 1)
            marks = dict(marker="o^sv"[n % 4], markevery=(n, 9), markersize=4)
            line, = ax.plot(steps, [max(d, floor) for d in r.deviation], label=r.impl.name, **marks)
            ax.plot(steps, [max(d, floor) for d in r.residual], "--", color=line.get_color(), **marks)
            if getattr(r, third) is not None:
                ax.plot(steps, [max(d, floor) for d in getattr(r, third)], ":", color=line.get_color(), **marks)
        ax.plot([], [], "k-", label="as mapped")
        ax.plot([], [], "k--", label="documented choices configured away")
        ax.plot([], [], "k:", label=third_label)
        ax.set(xscale="log", yscale="log", xlabel="step", title=title, ylim=(floor / 2, 10))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    axes[0].set_ylabel("‖x − x_mars_ref‖ / ‖x_mars_ref − x_0‖  (0 drawn at 1e-17)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the command


def _steps(text: str) -> int:
    """An argparse type: a step count >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (the steps each implementation takes on the "
                                         f"model), not {text!r}")
    return n


def _writable(directory: Path) -> str | None:
    """None if files can be created in ``directory`` (made if missing); else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".audit-probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/audit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write audit.md, audit.json and audit.png into this folder")
    parser.add_argument("--steps", type=_steps, default=max(STEPS), help="steps on the model (default %(default)s)")
    parser.add_argument("--no-emulations", action="store_true", help="leave out the emulations of the authors' code")
    args = parser.parse_args(argv)
    if args.out is not None:
        why = _writable(args.out)
        if why:
            parser.error(f"--out: cannot write in {args.out} ({why}); give a writable directory")
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
    start, h = time.perf_counter(), Hyper()
    base = baseline(h, args.steps)
    results, skipped = [], []
    for impl in implementations(not args.no_emulations):
        reason = missing(impl)
        if reason:
            skipped.append(reason)
            print(reason, file=sys.stderr)
            continue
        if impl.dist and impl.version != PINNED[impl.dist]:
            print(f"{impl.name}: {impl.dist} {impl.version} installed, the findings are pinned for "
                  f"{PINNED[impl.dist]}", file=sys.stderr)
        results.append(audit(impl, base, h))
    text = report(results, skipped, h, time.perf_counter() - start)
    print(text)
    if args.out:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "audit.md").write_text(text)
            (args.out / "audit.json").write_text(json.dumps(to_json(results, skipped, h), indent=1) + "\n")
            plot(results, args.out / "audit.png")
        except OSError as e:
            print(f"error: cannot write the audit into {args.out} ({type(e).__name__}: {e.strerror or e}"
                  f"{': ' + str(e.filename) if e.filename else ''}); the report is printed above", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
