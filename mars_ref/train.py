"""Train a GPT-2 with MARS or a baseline optimizer:  ``python -m mars_ref.train [--flags]``.

With no flags this trains the ``cpu-tiny`` preset (4 layers × 128, character-level
Shakespeare, prepared offline on first use) with MARS-AdamW on the CPU for about two
minutes. ``--preset gpt2-small`` is the paper's GPT-2 small recipe on OpenWebText ("The paper's
numbers" in ``docs/algorithm.md``); under ``torchrun`` it trains with DistributedDataParallel.

The recipe, for every optimizer:

* linear warm-up for ``warmup_iters`` steps, then cosine decay to ``min_lr`` at
  ``lr_decay_iters`` (a ``LambdaLR`` that scales every group's lr, so MARS's and Muon's
  1-D learning rates follow the same schedule);
* the gradient of one step is the mean over ``grad_accum`` micro-batches of
  ``batch_size`` sequences (over all processes together), clipped by its global norm
  (``clip_grad_norm_``, 1.0) *before* the optimizer sees it;
* ``--exact`` (MARS only) calls ``optimizer.step(closure)``: the closure zeroes the
  gradients, runs the same micro-batches, clips, and returns the loss; MARS calls it a
  second time at the previous point. ``grad_evals`` in the metrics counts closure calls
  (one full-batch gradient each).

Data sampling is a pure function: micro-batch ``j`` of step ``s`` is drawn by
``numpy.random.default_rng((seed, stream, s, j))``. So a resumed run reads exactly the
batches the uninterrupted run would have, whatever the number of processes (process
``r`` of ``W`` takes micro-batches ``j ≡ r (mod W)``), and the loss trajectory of a
resumed run is bit-identical to an uninterrupted one (tested). The checkpoint holds the
model, optimizer, scheduler, the data position (the step), every process's RNG states
and the config.

Outputs in ``--out-dir`` (``runs/<preset>-<optimizer>`` by default): ``config.json``,
``metrics.jsonl`` (one JSON object per log / eval / variance measurement) and ``ckpt.pt``.

``train`` (at the end of this file) is the whole run, in order: ``setup_run``, then for each step
``train_step`` (which calls ``closure``), ``log_train``, ``log_eval`` and ``write_checkpoint``, then
``sample_text``. The run's live objects travel between them in one ``Run``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .baselines import Lion, Muon
from .model import GPT, GPTConfig
from .model import preset as model_preset
from .optimizer import MARS
from .variance import VarianceProbe

OPTIMIZERS = ("adamw", "lion", "muon", "mars-adamw", "mars-lion", "mars-shampoo", "mars-m")
STEP_IMPLS = ("readable", "foreach", "fused")  # MARS(foreach=...) / MARS(fused=...)
CHECKPOINT_FORMAT = "mars_ref.train/1"

# Random streams of the data sampler: one per use, so adding evaluations never shifts training batches.
TRAIN_STREAM, VAL_STREAM, HELDOUT_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------- configuration


class ConfigError(ValueError):
    """The command line asks for something impossible (reported without a traceback)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not one of ours."""


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "take it from the preset and optimizer recipe"."""

    preset: str = field(default="cpu-tiny", metadata={"help": "training preset: " + ", ".join(
        ["cpu-tiny", "cpu-mini", "gpt2-small", "gpt2-medium", "gpt2-large"])})
    optimizer: str = field(default="mars-adamw", metadata={"help": "one of " + ", ".join(OPTIMIZERS)})
    exact: bool = field(default=False, metadata={"help": "exact MARS: 2 gradient evaluations per step"})
    step_impl: str = field(default="readable", metadata={"help": "how MARS computes its step (same math, same "
        "state): readable, foreach (grouped torch kernels: use on CUDA), fused (one C loop per tensor: use on CPU)"})
    # model
    model: str | None = field(default=None, metadata={"help": "model preset (mars_ref.model.PRESETS)"})
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    # data
    dataset: str | None = field(default=None, metadata={"help": "data set name for mars_ref.data.prepare"})
    data_dir: str = "data"
    batch_size: int | None = field(default=None, metadata={"help": "sequences per micro-batch"})
    grad_accum: int | None = field(default=None, metadata={
        "help": "micro-batches per optimizer step, over all processes (a multiple of the world size)"})
    # schedule and optimizer (None: the recipe for this preset and optimizer)
    max_iters: int | None = None
    warmup_iters: int | None = None
    lr_decay_iters: int | None = field(default=None, metadata={"help": "end of the cosine (= max_iters)"})
    lr: float | None = None
    min_lr: float | None = None
    lr_1d: float | None = field(default=None, metadata={"help": "lr of the AdamW fallback (MARS, Muon)"})
    beta1: float | None = field(default=None, metadata={"help": "β1 (Muon: its momentum)"})
    beta2: float | None = None
    weight_decay: float | None = None
    gamma: float | None = field(default=None, metadata={"help": "MARS variance-reduction scale γ"})
    grad_clip: float | None = field(default=None, metadata={"help": "global gradient-norm clip (0 = off)"})
    # logging, evaluation, checkpoints
    eval_interval: int | None = None
    eval_iters: int | None = field(default=None, metadata={"help": "validation micro-batches per evaluation"})
    log_interval: int | None = None
    ckpt_interval: int | None = field(default=None, metadata={"help": "checkpoint period (0: at the end)"})
    variance_every: int = field(default=0, metadata={"help": "measure gradient variance every K steps"})
    variance_batches: int | None = field(default=None, metadata={
        "help": "held-out micro-batches for ∇F (max(32, 8·grad_accum))"})
    sample_tokens: int | None = field(default=None, metadata={"help": "tokens to sample at the end"})
    out_dir: str | None = field(default=None, metadata={"help": "run directory (runs/<preset>-<opt>)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT_DIR/ckpt.pt"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (and MARS's readable or "
                                                   "foreach step in approx mode)"})


# The run shapes. CPU presets train character-level Shakespeare in about two minutes.
TRAIN_PRESETS: dict[str, dict] = {
    "cpu-tiny": dict(model="cpu-tiny", dataset="shakespeare", batch_size=16, grad_accum=1,
                     max_iters=900, warmup_iters=50, eval_interval=150, eval_iters=20, log_interval=10,
                     ckpt_interval=300, sample_tokens=300),
    "cpu-mini": dict(model="cpu-mini", dataset="shakespeare", batch_size=32, grad_accum=1,
                     max_iters=2000, warmup_iters=50, eval_interval=250, eval_iters=20, log_interval=10,
                     ckpt_interval=500, sample_tokens=300),
    # The paper's runs: 100k steps of 480 × 1024 tokens (15 sequences × 32 micro-batches).
    **{name: dict(model=name, dataset="openwebtext", batch_size=15, grad_accum=32, max_iters=100_000,
                  warmup_iters=2000, eval_interval=1000, eval_iters=200, log_interval=10,
                  ckpt_interval=1000, sample_tokens=0)
       for name in ("gpt2-small", "gpt2-medium", "gpt2-large")},
}

_MARS = dict(beta1=0.95, beta2=0.99, weight_decay=1e-2, gamma=0.025, grad_clip=1.0)
_ADAMW = dict(beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)
# Not from the paper (no Lion runs there): Chen et al.'s advice, lr 3-10× below AdamW's, λ 3-10× above.
_LION = dict(beta1=0.9, beta2=0.99, weight_decay=1.0, grad_clip=1.0)
# The authors' Muon configs: Muon lr 2e-2 (small), 1e-2 (medium), no decay on the Muon tensors.
_MUON = dict(beta1=0.95, beta2=0.95, weight_decay=0.0, grad_clip=1.0)


# MARS-M, the authors' MARS_M/train_mars_m.py: β1 0.95, γ 0.025, weight decay 0.1 on every tensor, the AdamW part
# at the same lr with betas (0.9, 0.95); their README's OpenWebText lr: 6e-3 (small), 5e-3 (medium, large); min_lr
# is their script's default 6e-5 (their config files are not in their repository).
_MARS_M = dict(beta1=0.95, beta2=0.99, weight_decay=0.1, gamma=0.025, grad_clip=1.0)


def _gpt2_recipe(mars_lr, lr_1d, adamw_lr, min_lr, muon_lr, mars_m_lr):
    """The six optimizers' hyperparameters for one GPT-2 size, from its MARS, AdamW and Muon learning rates."""
    return {
        "mars-adamw": dict(_MARS, lr=mars_lr, lr_1d=lr_1d, min_lr=min_lr),
        # MARS-Lion and MARS-Shampoo at GPT-2 scale: not in the paper's table; set like Lion and Muon.
        "mars-lion": dict(_MARS, lr=adamw_lr / 6, lr_1d=lr_1d, min_lr=min_lr / 10, weight_decay=1.0),
        "mars-shampoo": dict(_MARS, lr=muon_lr, lr_1d=lr_1d, min_lr=muon_lr / 100, weight_decay=0.0),
        "adamw": dict(_ADAMW, lr=adamw_lr, lr_1d=adamw_lr, min_lr=min_lr),
        "lion": dict(_LION, lr=adamw_lr / 6, lr_1d=adamw_lr / 6, min_lr=min_lr / 10),
        "muon": dict(_MUON, lr=muon_lr, lr_1d=lr_1d, min_lr=muon_lr * min_lr / lr_1d),
        "mars-m": dict(_MARS_M, lr=mars_m_lr, lr_1d=mars_m_lr, min_lr=6e-5),
    }


# (preset, optimizer) -> optimizer hyperparameters. GPT-2 rows: "The paper's numbers" in docs/algorithm.md.
OPTIM_RECIPES: dict[str, dict[str, dict]] = {
    "gpt2-small": _gpt2_recipe(mars_lr=6e-3, lr_1d=3e-3, adamw_lr=6e-4, min_lr=3e-5, muon_lr=2e-2, mars_m_lr=6e-3),
    "gpt2-medium": _gpt2_recipe(mars_lr=3e-3, lr_1d=1.5e-3, adamw_lr=3e-4, min_lr=6e-5, muon_lr=1e-2,
                                mars_m_lr=5e-3),
    "gpt2-large": _gpt2_recipe(mars_lr=2e-3, lr_1d=1e-3, adamw_lr=2e-4, min_lr=1e-5, muon_lr=6.7e-3,
                               mars_m_lr=5e-3),
}
# CPU presets, on character-level Shakespeare (cpu-tiny: 4 × 128, 900 steps of 16 × 128). Validation
# loss at step 900 of the learning rates tried here: MARS-AdamW 5e-3: 1.92, 1e-2: 1.83, 2e-2: 1.82,
# 3e-2: unstable (2.69 at step 300); AdamW 1e-3: 2.19, 3e-3: 1.92, 6e-3: 1.88. One value each, untuned:
# Lion 5e-4: 2.09, MARS-Lion 1e-3: 1.94, Muon 3e-2: 1.65, MARS-Shampoo 3e-2: 1.65.
_CPU = {
    "mars-adamw": dict(_MARS, lr=1e-2, lr_1d=5e-3, min_lr=1e-4),
    "mars-lion": dict(_MARS, lr=1e-3, lr_1d=5e-3, min_lr=1e-5, weight_decay=0.1),
    "mars-shampoo": dict(_MARS, lr=3e-2, lr_1d=5e-3, min_lr=3e-4, weight_decay=0.0),
    "adamw": dict(_ADAMW, lr=6e-3, lr_1d=6e-3, min_lr=6e-5),  # best of 1e-3 / 3e-3 / 6e-3 at 900 steps
    "lion": dict(_LION, lr=5e-4, lr_1d=5e-4, min_lr=5e-6, weight_decay=0.3),
    "muon": dict(_MUON, lr=3e-2, lr_1d=5e-3, min_lr=3e-4),
    # untuned: the authors' GPT-2 small lr, which is also the CPU AdamW recipe's (the AdamW part runs at it)
    "mars-m": dict(_MARS_M, lr=6e-3, lr_1d=6e-3, min_lr=6e-5),
}
OPTIM_RECIPES["cpu-tiny"] = OPTIM_RECIPES["cpu-mini"] = _CPU


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` field: from the training preset, then from the optimizer recipe."""
    if cfg.preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")
    if cfg.exact and not cfg.optimizer.startswith("mars"):
        raise ConfigError(f"--exact is a MARS option; optimizer {cfg.optimizer!r} has no exact mode")
    if cfg.step_impl not in STEP_IMPLS:
        raise ConfigError(f"unknown step_impl {cfg.step_impl!r}; choose one of {STEP_IMPLS}")
    if cfg.step_impl != "readable" and not cfg.optimizer.startswith("mars"):
        raise ConfigError(f"--step_impl is a MARS option; optimizer {cfg.optimizer!r} has its own step")
    if cfg.step_impl == "fused" and cfg.optimizer in ("mars-shampoo", "mars-m"):
        raise ConfigError(f"--step-impl fused computes MARS-AdamW and MARS-Lion; {cfg.optimizer}'s step is "
                          "Newton–Schulz matrix products: use --step-impl foreach (or readable)")
    defaults = {**TRAIN_PRESETS[cfg.preset], "gamma": 0.0,  # γ: MARS only
                **OPTIM_RECIPES[cfg.preset][cfg.optimizer]}
    filled = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    cfg = replace(cfg, **filled)
    mc = model_preset(cfg.model)
    cfg = replace(cfg, **{k: getattr(mc, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout",
                                                        "bias") if getattr(cfg, k) is None})
    if cfg.lr_decay_iters is None:
        cfg = replace(cfg, lr_decay_iters=cfg.max_iters)
    if cfg.variance_batches is None:
        cfg = replace(cfg, variance_batches=max(32, 8 * cfg.grad_accum))
    if cfg.out_dir is None:
        name = f"{cfg.preset}-{cfg.optimizer}{'-exact' if cfg.exact else ''}"
        cfg = replace(cfg, out_dir=str(Path("runs") / name))
    missing = [f.name for f in fields(cfg) if getattr(cfg, f.name) is None]
    assert not missing, f"unresolved config fields {missing}"
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per ``TrainConfig`` field (defaults suppressed, so we can
    tell which flags were given)."""
    parser = argparse.ArgumentParser(prog="python -m mars_ref.train", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_text = f.metadata.get("help", "")
        default = f.default
        help_text += f" (default: {'from preset' if default is None else default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = OPTIMIZERS if f.name == "optimizer" else (sorted(TRAIN_PRESETS) if f.name == "preset"
                                                                else None)
            parser.add_argument(flag, type=base, choices=choices, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """The config from the command line, and the dict of flags that were given explicitly."""
    given = vars(build_parser().parse_args(argv))
    return TrainConfig(**given), given


# ----------------------------------------------------------------------------- processes and devices


@dataclass
class Dist:
    """This process's place in the job: rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def pick_device(name: str, d: Dist) -> str:
    """``auto``: CUDA, then Apple's MPS, then the CPU. Under torchrun one GPU per local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and "RANK" in os.environ:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


def gather(obj, d: Dist) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (a collective under torchrun)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_mean(x: torch.Tensor, d: Dist) -> float:
    """The mean over all processes of a scalar tensor (a collective under torchrun)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x.item()


def autocast_context(device: str, dtype: str):
    """bfloat16 autocast on CUDA when ``dtype`` is auto or bfloat16; plain float32 elsewhere."""
    kind = device.split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext()
    if dtype != "bfloat16":
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- data


class Batches:
    """Micro-batches as a pure function of (seed, stream, step, index): no sampler state to lose."""

    def __init__(self, data_path: Path, seed: int, block_size: int, batch_size: int, device: str):
        """Memory-map the train and val splits of a prepared data set (each must hold one window at least)."""
        self.splits = {s: np.memmap(data_path / f"{s}.bin", dtype=np.uint16, mode="r")
                       for s in ("train", "val")}
        for s, tokens in self.splits.items():
            if len(tokens) <= block_size + 1:
                raise ConfigError(f"{data_path / (s + '.bin')} has {len(tokens)} tokens: too few for "
                                 f"block_size={block_size}")
        self.seed, self.block_size, self.batch_size, self.device = seed, block_size, batch_size, device

    def get(self, split: str, stream: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``block_size + 1`` tokens: inputs and next-token targets."""
        tokens = self.splits[split]
        rng = np.random.default_rng((self.seed, stream, step, index))
        starts = rng.integers(0, len(tokens) - self.block_size - 1, size=self.batch_size)
        xy = torch.from_numpy(np.stack([tokens[i:i + self.block_size + 1] for i in starts]).astype(np.int64))
        if self.device.startswith("cuda"):
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]


def prepare_data(cfg: TrainConfig, d: Dist) -> tuple[Path, dict]:
    """Prepare the data set (rank 0 first, the others wait) and read its meta.json."""
    from . import data

    if d.master:
        path = Path(data.prepare(cfg.dataset, data_dir=cfg.data_dir))
    if d.world > 1:
        dist.barrier()
    if not d.master:
        path = Path(data.prepare(cfg.dataset, data_dir=cfg.data_dir))
    return path, data.load_meta(path)


# ----------------------------------------------------------------------------- optimizers and schedule


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
                    foreach=cfg.step_impl == "foreach")
    return MARS(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, gamma=cfg.gamma,
                preconditioner=cfg.optimizer.removeprefix("mars-"), exact=cfg.exact, lr_1d=cfg.lr_1d,
                foreach=cfg.step_impl == "foreach", fused=cfg.step_impl == "fused")


def lr_factor(cfg: TrainConfig):
    """Multiplier of the peak lr for the step with 0-based index ``it``: linear warm-up to 1 over
    ``warmup_iters`` steps, then cosine decay to ``min_lr / lr`` at ``lr_decay_iters``, flat after."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(it: int) -> float:
        """The multiplier for step ``it``."""
        if it < cfg.warmup_iters:
            return (it + 1) / cfg.warmup_iters
        if it >= cfg.lr_decay_iters:
            return floor
        progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)

    return factor


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then ``os.replace``.

    A run killed at any moment leaves either the previous checkpoint or the new one, whole.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def model_config(cfg: TrainConfig, meta: dict) -> GPTConfig:
    """The network a (resolved) run trains on a data set with this ``meta.json``."""
    vocab_size = meta["vocab_size"]
    if meta.get("tokenizer") == "gpt2":
        vocab_size = 64 * math.ceil(vocab_size / 64)  # 50257 -> 50304: faster matmuls
    model_cfg = model_preset(cfg.model, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, block_size=cfg.block_size, dropout=cfg.dropout)
    return replace(model_cfg, bias=cfg.bias)


def load_model(run_dir: str | Path) -> GPT:
    """The model of a run's last checkpoint (``RUN_DIR/ckpt.pt``), on the CPU, in eval mode."""
    ckpt = load_checkpoint(Path(run_dir) / "ckpt.pt")
    cfg = TrainConfig(**ckpt["config"])
    vocab_size = json.loads((Path(run_dir) / "config.json").read_text())["vocab_size"]
    model = GPT(model_config(cfg, {"vocab_size": vocab_size}))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint, or raise ``CheckpointError`` naming the file: never start afresh silently."""
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path} (run without --resume to start a new run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}: {e}). "
            f"Restore a good copy, or delete it and start again without --resume."
        ) from e
    required = {"format", "step", "config", "model", "optimizer", "scheduler", "rng", "metrics"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else "everything"
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint "
                              f"(missing {missing})")
    return state


def rng_states(device: str) -> dict:
    """Every random state this process uses (torch CPU and CUDA for dropout; numpy and random for luck)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict, device: str) -> None:
    """Restore what ``rng_states`` returned (the CUDA state only on a CUDA device)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(states["cuda"], device)
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line is skipped), optionally only up to a step."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_step is None or record.get("step", 0) <= up_to_step:
                records.append(record)
    return records


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The live objects of one training run, shared by the set-up, the step, evaluation and checkpoints."""

    cfg: TrainConfig
    d: Dist
    device: str
    out_dir: Path
    meta: dict  # the data set's meta.json (vocabulary, tokenizer)
    raw_model: GPT  # the bare model: evaluation, sampling, checkpoints, clipping
    model: torch.nn.Module  # what the training step calls: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    optimizer_step: Callable  # optimizer.step, compiled with --compile where it can be (see compile_step)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Batches
    autocast: AbstractContextManager  # torch.autocast, or a nullcontext for float32
    my_micro: list[int]  # this process's share of each global batch
    start_step: int  # steps done before this process started (the checkpoint's step; 0 for a new run)
    elapsed: float  # seconds the run took before this process started (from the checkpoint)
    grad_evals: int  # closure calls so far, over all resumptions: one full-batch gradient each
    variance: VarianceProbe | None = None  # rank 0's probe, with --variance-every
    bar: tqdm | None = None
    t_start: float = 0.0  # time.perf_counter() when this process started training
    variance_seconds: float = 0.0  # spent in the probe since t_start: kept off the clock
    # The step in progress (0-based), and what its first closure call found.
    step: int = 0
    calls: int = 0  # closure calls in this step: 1, or 2 for exact MARS after the first step
    loss: torch.Tensor | None = None  # this process's mean loss over its micro-batches at x_t
    norm: torch.Tensor | None = None  # the global gradient norm at x_t, before clipping (None: no clipping)
    # Throughput for the progress bar: tokens/s since the last "train" record.
    window_step: int = 0
    window_t: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all micro-batches of all processes)."""
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum

    @property
    def ckpt_path(self) -> Path:
        """Where the run's checkpoint is written (and read from on --resume)."""
        return self.out_dir / "ckpt.pt"

    @property
    def metrics_path(self) -> Path:
        """The run's metrics.jsonl."""
        return self.out_dir / "metrics.jsonl"

    def clock(self) -> float:
        """Wall-clock seconds of the run so far, over all resumptions: training, evaluations and
        checkpoints, not the variance probe."""
        return self.elapsed + time.perf_counter() - self.t_start - self.variance_seconds

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        if self.d.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- set-up


def setup_run(cfg: TrainConfig, given: dict) -> Run:
    """Everything before the first step: processes, config, data, model, optimizer, resumed state, output files."""
    d = setup_distributed(pick_device(cfg.device, Dist()))
    cfg = resolve(cfg)
    # This command line's run directory: a resumed run continues here, wherever its config says it started.
    out_dir = Path(cfg.out_dir)
    cfg, ckpt = resume_config(cfg, given, out_dir, d)
    device = pick_device(cfg.device, d)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # NCCL collectives (and all_gather_object) use the current device
    if cfg.grad_accum % d.world:
        raise ConfigError(f"grad_accum={cfg.grad_accum} must be a multiple of the world size ({d.world})")

    data_path, meta = prepare_data(cfg, d)
    raw_model, optimizer, scheduler = build_model(cfg, meta, d, device)
    start_step, elapsed, grad_evals = 0, 0.0, 0
    if ckpt is not None:
        start_step, elapsed, grad_evals = restore(ckpt, raw_model, optimizer, scheduler, d, device)
        del ckpt  # free its copy of the weights and optimizer state before training

    model = wrap_model(raw_model, cfg, d, device)
    batches = Batches(data_path, cfg.seed, cfg.block_size, cfg.batch_size, device)
    autocast = autocast_context(device, cfg.dtype)
    run = Run(cfg=cfg, d=d, device=device, out_dir=out_dir, meta=meta, raw_model=raw_model, model=model,
              optimizer=optimizer, optimizer_step=compile_step(optimizer, cfg), scheduler=scheduler,
              batches=batches, autocast=autocast,
              my_micro=list(range(d.rank, cfg.grad_accum, d.world)), start_step=start_step, elapsed=elapsed,
              grad_evals=grad_evals)
    if d.master:
        write_run_files(run)
    if cfg.variance_every > 0 and d.master:
        run.variance = make_variance_probe(run)
    run.bar = progress_bar(cfg, start_step, d)
    run.t_start = time.perf_counter()
    return run


def resume_config(cfg: TrainConfig, given: dict, out_dir: Path, d: Dist) -> tuple[TrainConfig, dict | None]:
    """The run's config and, with --resume, its checkpoint (whose config the given flags override)."""
    ckpt_path = out_dir / "ckpt.pt"
    if not cfg.resume:
        if ckpt_path.exists() and d.master:
            print(f"note: starting a new run in {out_dir}; its checkpoint will be overwritten "
                  "(--resume continues it instead)")
        return cfg, None
    ckpt = load_checkpoint(ckpt_path)
    saved = TrainConfig(**ckpt["config"])
    # The saved config, with the flags given on this command line on top (say what changed).
    overrides = {k: v for k, v in given.items() if k != "resume" and getattr(saved, k) != v}
    if overrides and d.master:
        print(f"resume: overriding the checkpoint's config with {overrides}")
    return replace(saved, **overrides, resume=True), ckpt


def build_model(cfg: TrainConfig, meta: dict, d: Dist, device: str
                ) -> tuple[GPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A freshly initialised model on ``device``, its optimizer and the lr schedule."""
    # Same initial weights on every process (DDP also broadcasts rank 0's), then one dropout stream each.
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, meta)).to(device)
    torch.manual_seed(cfg.seed + 1 + d.rank)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    return model, optimizer, scheduler


def restore(ckpt: dict, model: GPT, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, d: Dist, device: str) -> tuple[int, float, int]:
    """Load a checkpoint into the run's objects and this process's RNGs: (step, elapsed seconds, grad_evals)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    per_rank = ckpt["rng"]
    if len(per_rank) == d.world:
        set_rng_states(per_rank[d.rank], device)
    elif d.master:
        print(f"resume: checkpoint written by {len(per_rank)} processes, now {d.world}: "
              "dropout random streams start afresh")
    return ckpt["step"], ckpt["metrics"]["elapsed"], ckpt["metrics"]["grad_evals"]


def wrap_model(model: GPT, cfg: TrainConfig, d: Dist, device: str) -> torch.nn.Module:
    """The model the training step calls: compiled with --compile, in DistributedDataParallel under torchrun."""
    if cfg.compile:
        model = torch.compile(model)
    if d.world > 1:
        # MARS copies g_prev out of .grad, so DDP may reuse its buckets as the .grad tensors.
        model = DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None,
                    gradient_as_bucket_view=True)
    return model


def compile_step(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Callable:
    """``optimizer.step``, compiled with --compile for MARS's readable and foreach steps in approx mode (one graph,
    no recompilation after the first steps: tests/test_compile.py); as it is otherwise (the fused step is C,
    exact mode calls a closure with a backward pass, the baselines' steps are torch's or short loops)."""
    if cfg.compile and isinstance(optimizer, MARS) and cfg.step_impl != "fused" and not cfg.exact:
        return torch.compile(optimizer.step)
    return optimizer.step


def write_run_files(run: Run) -> None:
    """Create the run directory, start metrics.jsonl (keeping a resumed run's records) and write config.json."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run rewrites what the killed run logged after its last checkpoint.
    kept = read_metrics(run.metrics_path, up_to_step=run.start_step) if run.start_step > 0 else []
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    (run.out_dir / "config.json").write_text(json.dumps(
        {**asdict(run.cfg), "world_size": run.d.world, "device": run.device,
         "vocab_size": run.raw_model.config.vocab_size, "n_params": run.raw_model.num_params(),
         "tokens_per_step": run.tokens_per_step}, indent=2) + "\n")


def make_variance_probe(run: Run) -> VarianceProbe:
    """The variance probe, with its fixed held-out micro-batches (a random stream of their own)."""
    held_out = [run.batches.get("train", HELDOUT_STREAM, 0, k) for k in range(run.cfg.variance_batches)]
    return VarianceProbe(run.raw_model, run.optimizer, run.cfg, held_out, run.autocast)


def progress_bar(cfg: TrainConfig, start_step: int, d: Dist) -> tqdm:
    """A tqdm bar over the run's steps, on rank 0, unless TQDM_DISABLE is set."""
    # tqdm reads TQDM_* variables when it is imported; read TQDM_DISABLE now, so setting it later works too.
    quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(total=cfg.max_iters, initial=start_step, desc=f"{cfg.preset} {cfg.optimizer}", unit="step",
                dynamic_ncols=True, disable=quiet or not d.master)


# ----------------------------------------------------------------------------- the step


def train_step(run: Run, step: int) -> None:
    """Step ``step`` (0-based): the gradient of its global batch, the optimizer's update, the schedule's."""
    run.step, run.calls = step, 0
    if run.cfg.exact:
        run.optimizer.step(lambda: closure(run))  # MARS calls it at x_t, then again at x_{t-1}
    else:
        closure(run)
        run.optimizer_step()
    run.scheduler.step()


def closure(run: Run) -> torch.Tensor:
    """Gradient of the step's global batch at the current parameters: zero, accumulate, clip. Returns the loss."""
    cfg, n_micro = run.cfg, len(run.my_micro)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=run.device)
    for i, j in enumerate(run.my_micro):
        x, y = run.batches.get("train", TRAIN_STREAM, run.step, j)
        # Under DDP, all-reduce the gradients once: on the backward of the last micro-batch.
        sync = run.model.no_sync() if run.d.world > 1 and i < n_micro - 1 else nullcontext()
        with sync:
            with run.autocast:
                _, loss = run.model(x, y)
            (loss / n_micro).backward()
        loss_sum += loss.detach().float()
    norm = None
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    run.grad_evals += 1
    run.calls += 1
    loss = loss_sum / n_micro
    if run.calls == 1:  # the gradient at x_t: what we log and what the variance probe measures
        run.loss, run.norm = loss, norm
        if run.variance is not None and (run.step + 1) % cfg.variance_every == 0:
            probe_variance(run, norm)
    return loss


def probe_variance(run: Run, norm: torch.Tensor | None) -> None:
    """Measure the gradient estimates' errors at this step and log them; the time taken is kept off the clock."""
    t0 = time.perf_counter()
    step, done = run.step, run.step + 1
    record = run.variance.measure(done, norm, run.cfg.grad_clip, lambda: global_batch(run, step))
    run.variance_seconds += time.perf_counter() - t0
    run.log({"kind": "variance", "step": done, "tokens": done * run.tokens_per_step, "time": run.clock(),
             **record})


def global_batch(run: Run, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All micro-batches of step ``step``, every process's share."""
    return [run.batches.get("train", TRAIN_STREAM, step, j) for j in range(run.cfg.grad_accum)]


# ----------------------------------------------------------------------------- evaluation, logs, checkpoints


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss on the same ``eval_iters`` validation micro-batches every time (split over processes)."""
    run.raw_model.eval()
    total = torch.zeros((), device=run.device)
    for k in range(run.d.rank, run.cfg.eval_iters, run.d.world):
        x, y = run.batches.get("val", VAL_STREAM, 0, k)
        with run.autocast:
            total += run.raw_model(x, y)[1].float()
    run.raw_model.train()
    if run.d.world > 1:
        dist.all_reduce(total)
    return total.item() / run.cfg.eval_iters


def log_train(run: Run, done: int, lr: float) -> float:
    """Log a "train" record after ``done`` steps and show loss and tokens/s on the bar; returns the loss."""
    loss = all_mean(run.loss, run.d)
    now = time.perf_counter()
    tok_s = (done - run.window_step) * run.tokens_per_step / max(now - run.window_t, 1e-9)
    run.window_step, run.window_t = done, now
    norm = run.norm.item() if run.norm is not None else None
    run.log({"kind": "train", "step": done, "tokens": done * run.tokens_per_step, "time": run.clock(),
             "train_loss": loss, "lr": lr, "grad_norm": norm, "grad_evals": run.grad_evals})
    run.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
    return loss


def log_eval(run: Run, done: int, lr: float, train_loss: float | None) -> float:
    """Evaluate after ``done`` steps, log an "eval" record and print it (not at step 0); returns the val loss."""
    val_loss = evaluate(run)
    run.log({"kind": "eval", "step": done, "tokens": done * run.tokens_per_step, "time": run.clock(),
             "train_loss": train_loss, "val_loss": val_loss, "lr": lr, "grad_evals": run.grad_evals})
    if done > 0 and run.d.master:
        run.bar.write(f"step {done}: val loss {val_loss:.4f}, train loss {train_loss:.4f}, {run.clock():.1f} s")
    return val_loss


def write_checkpoint(run: Run, done: int) -> None:
    """Checkpoint the run after ``done`` steps (every process's RNG states; rank 0 writes the file)."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "step": done, "config": asdict(run.cfg),
        "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "data": {"sampler": "numpy default_rng((seed, stream, step, micro-batch))", "seed": run.cfg.seed,
                 "next_step": done},
        "rng": gather(rng_states(run.device), run.d),
        "metrics": {"elapsed": run.clock(), "grad_evals": run.grad_evals, "tokens": done * run.tokens_per_step},
    }
    if run.d.master:
        save_checkpoint(run.ckpt_path, checkpoint)


def sample_text(run: Run) -> str:
    """``sample_tokens`` characters or tokens from the trained model, prompted with a newline."""
    from . import data

    tokenizer = data.get_tokenizer(run.meta)
    try:
        prompt = tokenizer.encode("\n")
    except (KeyError, ValueError):  # a character vocabulary without a newline
        prompt = [0]
    start = torch.tensor([prompt], dtype=torch.long, device=run.device)
    out = run.raw_model.generate(start, run.cfg.sample_tokens, temperature=0.8, top_k=50,
                                 generator=torch.Generator(run.device).manual_seed(run.cfg.seed))
    return tokenizer.decode(out[0].tolist())


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, given: dict | None = None) -> dict:
    """Run (or resume) one training run. Returns a summary dict (last losses, steps, seconds)."""
    run = setup_run(cfg, given or {})
    cfg, d = run.cfg, run.d
    if run.start_step >= cfg.max_iters and d.master:
        print(f"{run.out_dir}: already at step {run.start_step} of {cfg.max_iters}; raise --max-iters to train on")
    if run.start_step == 0 and cfg.eval_interval > 0:
        log_eval(run, 0, run.optimizer.param_groups[0]["lr"], train_loss=None)  # the untrained model

    val_loss, train_loss = None, None
    run.window_step, run.window_t = run.start_step, time.perf_counter()
    for step in range(run.start_step, cfg.max_iters):
        lr = run.optimizer.param_groups[0]["lr"]  # this step's: the scheduler moves it at the end of the step
        train_step(run, step)
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            train_loss = log_train(run, done, lr)
        if cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
            train_loss = all_mean(run.loss, d)
            val_loss = log_eval(run, done, lr, train_loss)
        if (cfg.ckpt_interval > 0 and done % cfg.ckpt_interval == 0) or done == cfg.max_iters:
            write_checkpoint(run, done)
        run.bar.update(1)
    run.bar.close()

    summary = {"steps": cfg.max_iters, "val_loss": val_loss, "train_loss": train_loss, "seconds": run.clock(),
               "grad_evals": run.grad_evals, "out_dir": str(run.out_dir)}
    if d.master and cfg.sample_tokens > 0:
        summary["sample"] = sample_text(run)
        print("---- sample ----\n" + summary["sample"] + "\n----------------")
    if d.master:
        print(f"done: {cfg.max_iters} steps, val loss {val_loss}, {summary['seconds']:.1f} s, in {run.out_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line: train, and report a config or checkpoint error without a traceback (exit status 2)."""
    cfg, given = parse_args(argv)
    try:
        train(cfg, given)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
