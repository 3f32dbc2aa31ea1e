"""Solutions to the exercises of notebook 03 (scaling and clipping). Checked by tests/test_exercises_01_03.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mars_ref.pieces import clip_by_norm


def max_step_norm(lr: float, tau: float, n_tensors: int, clip: str) -> float:
    r"""Largest possible ``‖x_{t+1} − x_t‖ = η ‖m_t‖`` for an SGD-style step on clipped ``c_t``.

    ``m_t`` is a convex combination of ``c_1..c_t`` (and ``m_0 = 0``), so ``‖m_t‖ ≤ max_s ‖c_s‖``.
    Global clipping gives ``‖c_s‖ ≤ τ``; per-tensor clipping gives each of the ``n`` tensors
    ``≤ τ``, so ``‖c_s‖ ≤ τ √n``. Hence ``η τ`` (global) and ``η τ √n`` (per tensor).
    """
    if clip == "global":
        return lr * tau
    if clip == "tensor":
        return lr * tau * math.sqrt(n_tensors)
    raise ValueError("clip must be 'tensor' or 'global': without clipping there is no bound")


def clip_cosine(parts: Sequence[torch.Tensor], tau: float = 1.0) -> float:
    r"""Cosine between the per-tensor-clipped tensors (concatenated) and the unclipped ones.

    It is 1 when no tensor is clipped, or when every clipped tensor's scale factor is the same
    (e.g. all tensors clipped and of equal norm); otherwise per-tensor clipping tilts the update
    towards the tensors with small norms. Global clipping multiplies everything by one factor, so
    its cosine is always 1.
    """
    clipped = torch.cat([clip_by_norm(p, tau).flatten() for p in parts]).double()
    original = torch.cat([p.flatten() for p in parts]).double()
    return (clipped @ original / (clipped.norm() * original.norm())).item()
