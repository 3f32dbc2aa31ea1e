r"""The functional MARS step: one signature, three implementations.

As ``torch.optim.adamw`` splits ``_single_tensor_adamw`` / ``_multi_tensor_adamw`` / ``_fused_adamw``
behind one function, a MARS step takes a parameter group's flat lists (:class:`~mars_ref.chain.Tensors`)
and its numbers (:class:`~mars_ref.chain.Settings`) and runs on one of

==============  =========================================  ===========================================
``"readable"``  :mod:`mars_ref.readable`                    one tensor at a time, the teaching text
``"foreach"``   :mod:`mars_ref.foreach`                     grouped ``torch._foreach_*`` kernels
``"fused"``     :mod:`mars_ref.fused` and ``fused.c``       one C loop per tensor and pass (CPU float32)
==============  =========================================  ===========================================

All three compute the same numbers (the readable one is the reference the others are tested
against) and keep the same state, so a checkpoint moves between them. None sees an optimizer.

A step is two calls because the clip needs every ``‖c_t‖`` before any momentum may change:
:func:`correction_norms` (pass 1), then :func:`step` (pass 2) with the clip factors that
:func:`mars_ref.chain.group_clip_factors` makes of those norms, with :func:`check` before both.
``MARS.step`` runs the checks and pass 1 of *every* group before pass 2 of any, so a refused step
changes nothing.
"""

from __future__ import annotations

from torch import Tensor

from . import chain, foreach, fused, readable
from .chain import Settings, Tensors

IMPLEMENTATIONS = {"readable": readable, "foreach": foreach, "fused": fused}


def _implementation(impl: str):
    try:
        return IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"MARS: unknown implementation {impl!r}; choose one of {tuple(IMPLEMENTATIONS)}") from None


def check(t: Tensors, s: Settings, state: list[dict], impl: str, where: str = "") -> None:
    """Everything that can refuse a step before the gradients are read: sparse gradients, state that does
    not fit its parameter, and (fused) tensors the C loop cannot take."""
    chain.check_tensors(t, state, s.exact, where)
    if impl == "fused":
        fused.check_tensors(t, where)


def correction_norms(t: Tensors, s: Settings, impl: str, where: str = "") -> list[Tensor]:
    """Pass 1: ``‖c_t‖`` per tensor (``‖g_t‖`` off the MARS path), known finite (else ``FloatingPointError``)."""
    return chain.checked_norms(_implementation(impl).correction_norms(t, s), t, s, where)


def step(t: Tensors, s: Settings, norms: list[Tensor], impl: str) -> None:
    """Pass 2: clip factors from the norms, then the step of every tensor, in place."""
    _implementation(impl).step(t, s, chain.group_clip_factors(norms, t, s))

