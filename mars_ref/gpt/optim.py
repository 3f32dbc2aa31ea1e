"""The optimizer of a run and its learning-rate schedule: ``make_optimizer`` (the recipe's optimizer, with nanoGPT's
parameter groups for AdamW and Lion), ``lr_factor`` (linear warm-up, cosine decay to ``min_lr``) and
``compile_step`` (``optimizer.step``, compiled with ``--compile`` where it can be)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..baselines import Lion, Muon
from ..optimizer import MARS
from .config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` with the recipe's hyperparameters.

    AdamW and Lion decay only the ≥2-D tensors (nanoGPT's two groups). MARS and Muon take
    every tensor in one group: they send the non-2-D ones to their own AdamW fallback
    (``lr_1d``, betas (0.9, 0.95), weight decay 0.1, as the authors' code).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer in ("adamw", "lion"):
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        if cfg.optimizer == "adamw":
            fused = device.split(":")[0] in ("cuda", "cpu")
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=1e-8, fused=fused)
        return Lion(groups, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "muon":
        return Muon(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay, lr_1d=cfg.lr_1d)
    if cfg.optimizer == "mars-m":
        # as the authors' MARS-M script: the embeddings (wte, tied with the head, and wpe) on the AdamW part too,
        # which decays with the same weight decay
        embeddings = {id(p) for name, p in model.named_parameters() if name.endswith(("wte.weight", "wpe.weight"))}
        groups = [{"params": [p for p in params if id(p) not in embeddings]},
                  {"params": [p for p in params if id(p) in embeddings], "fallback": True}]
        return MARS(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, gamma=cfg.gamma,
                    preconditioner="muon", exact=cfg.exact, lr_1d=cfg.lr_1d, weight_decay_1d=cfg.weight_decay,
                    foreach=_foreach(cfg))
    return MARS(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, gamma=cfg.gamma,
                preconditioner=cfg.optimizer.removeprefix("mars-"), exact=cfg.exact, lr_1d=cfg.lr_1d,
                foreach=_foreach(cfg), fused=cfg.step_impl == "fused")


def _foreach(cfg: TrainConfig) -> bool | None:
    """MARS's ``foreach`` for ``--step-impl``: None (auto: foreach on CUDA, readable elsewhere), True or False."""
    return None if cfg.step_impl == "auto" else cfg.step_impl == "foreach"


def lr_factor(cfg: TrainConfig):
    """Multiplier of the peak lr for the step with 0-based index ``it``: linear warm-up to 1 over
    ``warmup_iters`` steps, then by ``cfg.schedule``: cosine decay to ``min_lr / lr`` at ``lr_decay_iters`` (flat
    after); wsd: 1 until the last ``decay_frac`` of the steps after the warm-up, then linear to ``min_lr / lr`` at
    ``lr_decay_iters``; constant: 1."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    decay_start = cfg.lr_decay_iters - round(cfg.decay_frac * max(0, cfg.lr_decay_iters - cfg.warmup_iters))

    def factor(it: int) -> float:
        """The multiplier for step ``it``."""
        if it < cfg.warmup_iters:
            return (it + 1) / cfg.warmup_iters
        if cfg.schedule == "constant":
            return 1.0
        if it >= cfg.lr_decay_iters:
            return floor
        if cfg.schedule == "wsd":
            if it < decay_start:
                return 1.0
            return 1.0 - (1.0 - floor) * (it - decay_start) / max(1, cfg.lr_decay_iters - decay_start)
        progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)

    return factor


def compile_step(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Callable:
    """``optimizer.step``, compiled with --compile for MARS's readable and foreach steps in approx mode (one graph,
    no recompilation after the first steps: tests/test_compile.py); as it is otherwise (the fused step is C,
    exact mode calls a closure with a backward pass, the baselines' steps are torch's or short loops)."""
    if cfg.compile and isinstance(optimizer, MARS) and cfg.step_impl != "fused" and not cfg.exact:
        return torch.compile(optimizer.step)
    return optimizer.step

