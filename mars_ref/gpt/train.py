"""Train a GPT-2 with MARS or a baseline optimizer:  ``python -m mars_ref.gpt.train [--flags]``.

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

Safety (``tests/test_faults_train.py``, ``scripts/fault_injection.py``):

* Every setting is checked before any data is read or file written (``resolve``, ``check_out_dir``):
  a number out of range, an unknown name, an ``--out-dir`` that is a file or cannot be written is a
  ``ConfigError`` naming the flag and what would be valid. ``--max-iters 0`` is valid: nothing is trained (the untrained
  model is evaluated and sampled) and no checkpoint is written.
* ``ckpt.pt`` is ``torch.save``'s zip followed by a 48-byte trailer, ``CHECKSUM_MAGIC`` and the
  sha256 of the zip (``torch.load`` still reads the file). It is written to ``ckpt.pt.tmp``, synced
  and renamed: a killed run leaves the previous checkpoint or the new one, whole; a full disk leaves
  the previous one and no ``.tmp``. ``load_checkpoint`` checks the sha256 first: a changed byte
  anywhere is a ``CheckpointError``. Checkpoints of format ``mars_ref.gpt.train/1`` (before checksums)
  still load, with a note that they could not be verified.
* ``--resume`` continues the same run: the flags given may change only ``RESUMABLE`` settings (when
  to log, evaluate, checkpoint, sample and stop; where and how fast to compute). Any other setting
  that differs from the checkpoint's (model, data, batch, optimizer, schedule, seed...) is a
  ``ConfigError`` listing each one with its saved and given values: start a new run to change it.
  ``config.json`` is what runs.
* A new run (no ``--resume``) in a directory that holds an earlier run's ``metrics.jsonl`` or
  ``ckpt.pt`` is refused unless ``--overwrite`` (which deletes them once the new run is set up).
* Ctrl-C (SIGINT) or SIGTERM: the step in progress finishes, a checkpoint of it is written, and the
  run exits with status 128 + the signal (130, 143); ``--resume`` then continues on the identical
  trajectory. A second signal stops at once. A signal the parent process ignores (a shell's
  background job ignores SIGINT) stays ignored.
* A non-finite training or validation loss, weights that are no longer finite, or a non-finite
  gradient refused by MARS (``FloatingPointError``) stop the run with a ``TrainingError`` naming
  the step; no checkpoint is written after the last good one.

Exit status of ``python -m mars_ref.gpt.train``: 0 done; 2 the command line or an input cannot be used
(``ConfigError``, ``CheckpointError``, ``mars_ref.gpt.data.DataError``, and argparse's own errors);
1 the run failed (``TrainingError``; ``OSError``s such as a full or read-only disk,
``mars_ref.gpt.data.StorageError``); 130 / 143 stopped by SIGINT / SIGTERM. Errors are one line
``error: ...`` on stderr, without a traceback.

``train`` (at the end of this file) is the whole run, in order: ``setup_run``, then for each step
``train_step`` (which calls ``closure``), ``log_train``, ``log_eval`` and ``write_checkpoint``, then
``sample_text``. The run's live objects travel between them in one ``Run``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import numbers
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..baselines import Lion, Muon
from ..course.variance import VarianceProbe
from ..optimizer import MARS
from .data import DataError, StorageError
from .model import GPT, GPTConfig
from .model import preset as model_preset

OPTIMIZERS = ("adamw", "lion", "muon", "mars-adamw", "mars-lion", "mars-shampoo", "mars-m")
STEP_IMPLS = ("readable", "foreach", "fused")  # MARS(foreach=...) / MARS(fused=...)
CHECKPOINT_FORMAT = "mars_ref.gpt.train/2"  # torch.save's zip + CHECKSUM_MAGIC + sha256 of the zip
LEGACY_FORMATS = ("mars_ref.gpt.train/1",)  # no checksum: loaded unverified, with a note
CHECKSUM_MAGIC = b"\nMARS_REF_SHA256"  # 16 bytes; then the 32-byte digest ends the file
TRAILER_BYTES = len(CHECKSUM_MAGIC) + 32

# Random streams of the data sampler: one per use, so adding evaluations never shifts training batches.
TRAIN_STREAM, VAL_STREAM, HELDOUT_STREAM = 0, 1, 2
NEVER = 2**62  # Run.first_bad when every loss so far was finite


# ----------------------------------------------------------------------------- configuration


class ConfigError(ValueError):
    """The command line asks for something impossible (reported without a traceback)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, not one of ours or not of this run."""


class TrainingError(RuntimeError):
    """The run failed while training (a non-finite loss or weights): the message names the step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a step, with a checkpoint of it; ``status`` is 128 + the signal."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "take it from the preset and optimizer recipe"."""

    preset: str = field(default="cpu-tiny", metadata={"help": "training preset: " + ", ".join(
        ["cpu-tiny", "cpu-mini", "gpu-lab", "gpt2-small", "gpt2-medium", "gpt2-large"])})
    optimizer: str = field(default="mars-adamw", metadata={"help": "one of " + ", ".join(OPTIMIZERS)})
    exact: bool = field(default=False, metadata={"help": "exact MARS: 2 gradient evaluations per step"})
    step_impl: str = field(default="readable", metadata={"help": "how MARS computes its step (same math, same "
        "state): readable, foreach (grouped torch kernels: use on CUDA), fused (one C loop per tensor: use on CPU)"})
    # model
    model: str | None = field(default=None, metadata={"help": "model preset (mars_ref.gpt.model.PRESETS)"})
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    # data
    dataset: str | None = field(default=None, metadata={"help": "data set name for mars_ref.gpt.data.prepare"})
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
    overwrite: bool = field(default=False, metadata={"help": "start a new run in an OUT_DIR that holds an earlier "
                                                     "run's metrics.jsonl or ckpt.pt, deleting them"})
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
    # A lab of about an hour on one GPU: a GPT-2-shaped model (6 × 384, ~30M parameters, GPT-2's vocabulary)
    # on Shakespeare in GPT-2 tokens (offline), 1,500 steps of 16 × 256 tokens (6.1M, ~3.9 epochs of 1.57M);
    # AdamW, MARS-AdamW and exact MARS with the variance probe fit the hour (see notebooks/README.md).
    "gpu-lab": dict(model="gpu-lab", dataset="shakespeare-gpt2", batch_size=16, grad_accum=1, max_iters=1500,
                    warmup_iters=100, eval_interval=150, eval_iters=20, log_interval=10, ckpt_interval=500,
                    sample_tokens=200),
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
# CPU presets, on character-level Shakespeare (cpu-tiny: 4 × 128, 900 steps of 16 × 128). These rates are the ×1
# column of the lr grid ×{1/4, 1/2, 1, 2, 4} of `python benchmarks/reproduce.py --workers 2` (final validation
# loss on seed 0: benchmarks/results/reproduce_full.md). They are that grid's best for AdamW, exact MARS,
# MARS-Lion and Muon; approx MARS-AdamW was 0.015 better at ×2 and MARS-Shampoo 0.008 better at ×1/2 (both
# inside the seed spread), and Lion's best was ×4, the grid's edge.
_CPU = {
    "mars-adamw": dict(_MARS, lr=1e-2, lr_1d=5e-3, min_lr=1e-4),
    "mars-lion": dict(_MARS, lr=1e-3, lr_1d=5e-3, min_lr=1e-5, weight_decay=0.1),
    "mars-shampoo": dict(_MARS, lr=3e-2, lr_1d=5e-3, min_lr=3e-4, weight_decay=0.0),
    "adamw": dict(_ADAMW, lr=6e-3, lr_1d=6e-3, min_lr=6e-5),
    "lion": dict(_LION, lr=5e-4, lr_1d=5e-4, min_lr=5e-6, weight_decay=0.3),
    "muon": dict(_MUON, lr=3e-2, lr_1d=5e-3, min_lr=3e-4),
    # untuned: the authors' GPT-2 small lr, which is also the CPU AdamW recipe's (the AdamW part runs at it)
    "mars-m": dict(_MARS_M, lr=6e-3, lr_1d=6e-3, min_lr=6e-5),
}
OPTIM_RECIPES["cpu-tiny"] = OPTIM_RECIPES["cpu-mini"] = _CPU
OPTIM_RECIPES["gpu-lab"] = OPTIM_RECIPES["gpt2-small"]  # the paper's GPT-2 small rates: untuned at this size


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
    try:
        mc = model_preset(cfg.model)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from e
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
    check_config(cfg)
    return cfg


# The valid range of every number of a run (checked by ``check_config``): ("int", lowest) is an integer
# >= lowest, ("float", 0) a finite number >= 0, "unit" a number in [0, 1).
NUMBER_RANGES: dict[str, tuple | str] = {
    **{k: ("int", 1) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                               "log_interval", "eval_iters", "variance_batches")},
    **{k: ("int", 0) for k in ("max_iters", "warmup_iters", "lr_decay_iters", "eval_interval", "ckpt_interval",
                               "variance_every", "sample_tokens", "seed")},
    **{k: ("float", 0) for k in ("lr", "min_lr", "lr_1d", "weight_decay", "gamma", "grad_clip")},
    **{k: "unit" for k in ("beta1", "beta2", "dropout")},
}
# What 0 means where it is allowed and special.
ZERO_MEANS = {"max_iters": "train nothing", "warmup_iters": "no warm-up", "eval_interval": "no evaluation",
              "ckpt_interval": "a checkpoint at the end only", "variance_every": "no variance probe",
              "sample_tokens": "no sample", "grad_clip": "no clipping"}
DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16")
MAX_SEED = 2**63 - 1


def flag(name: str) -> str:
    """The command-line flag of a ``TrainConfig`` field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def range_error(name: str, value) -> str | None:
    """Why ``value`` is not valid for the number ``name`` (``None`` if it is)."""
    rule = NUMBER_RANGES[name]
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_number = (is_int or isinstance(value, float)) and math.isfinite(value)
    if rule == "unit":
        ok, valid = is_number and 0 <= value < 1, "a number in [0, 1)"
    elif rule[0] == "float":
        ok, valid = is_number and value >= 0, "a finite number >= 0"
    else:
        top = MAX_SEED if name == "seed" else None
        ok = is_int and value >= rule[1] and (top is None or value <= top)
        valid = f"an integer >= {rule[1]}" + (" and <= 2**63 - 1" if top else "")
    if ok:
        return None
    zero = f" (0: {ZERO_MEANS[name]})" if name in ZERO_MEANS else ""
    return f"{flag(name)} must be {valid}{zero}, not {value!r}"


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` naming the flag and its valid values for anything a run cannot use."""
    problems = [p for p in (range_error(k, getattr(cfg, k)) for k in NUMBER_RANGES) if p]
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.n_embd % cfg.n_head:
        near = cfg.n_head * max(1, round(cfg.n_embd / cfg.n_head))
        raise ConfigError(f"--n-embd {cfg.n_embd} is not a multiple of --n-head {cfg.n_head}: the embedding is "
                          f"split into n_head heads of equal size (e.g. --n-embd {near})")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}: the schedule decays from lr down to min_lr; "
                          "give a --min-lr <= --lr")
    if not isinstance(cfg.device, str) or not DEVICES.fullmatch(cfg.device):
        raise ConfigError(f"--device {cfg.device!r} is not a device: choose auto, cpu, cuda, cuda:N or mps")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r} is not a dtype: choose one of {', '.join(DTYPES)}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --out-dir and --overwrite replaces it: give one of them")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per ``TrainConfig`` field (defaults suppressed, so we can
    tell which flags were given)."""
    parser = argparse.ArgumentParser(prog="python -m mars_ref.gpt.train", description=__doc__.split("\n\n")[0],
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, no GPU visible): "
                          "use --device cpu, or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError("--device mps: Apple's MPS is not available here: use --device cpu, or auto")
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
                                  f"--block-size {block_size} (give one below {len(tokens) - 1})")
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

    def prepare() -> Path:
        try:
            return Path(data.prepare(cfg.dataset, data_dir=cfg.data_dir))
        except DataError:
            raise
        except ValueError as e:  # a request mars_ref.gpt.data cannot serve, e.g. an unknown corpus without a source
            raise ConfigError(f"--dataset {cfg.dataset!r} (--data-dir {cfg.data_dir}): {e}; a corpus of your own is "
                              f"prepared first with: python -m mars_ref.gpt.data {cfg.dataset} --source PATH "
                              f"--data-dir {cfg.data_dir}") from e

    if d.master:
        path = prepare()
    if d.world > 1:
        dist.barrier()
    if not d.master:
        path = prepare()
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


def os_error_text(e: OSError, where: Path, action: str) -> str:
    """A one-line explanation of an ``OSError`` met while ``action`` in ``where``, with what to do."""
    full = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file is too large for this file system"}
    if e.errno in full:
        return f"{where}: {full[e.errno]} while {action}: free some space, or choose another --out-dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return f"{where}: cannot write ({why}) while {action}: make it writable, or choose another --out-dir"
    return f"{where}: {action} failed: {e.strerror or e}"


@contextmanager
def storage(where: Path, action: str, after: str = "") -> Iterator[None]:
    """Turn an ``OSError`` of the file system into a ``StorageError`` that says what happened and what to do."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(os_error_text(e, where, action) + after, e.errno) from e


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` whole or not at all: a temporary file beside it, synced, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_of(f, n_bytes: int) -> bytes:
    """The sha256 of the first ``n_bytes`` of the open binary file ``f``, read from its start."""
    f.seek(0)
    digest = hashlib.sha256()
    while n_bytes > 0:
        chunk = f.read(min(n_bytes, 1 << 20))
        if not chunk:
            break
        digest.update(chunk)
        n_bytes -= len(chunk)
    return digest.digest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``torch.save(state)`` and its checksum trailer atomically: a temporary file in the same directory,
    fsync, then ``os.replace``.

    A run killed at any moment leaves either the previous checkpoint or the new one, whole; any error (a full disk)
    removes the temporary file and leaves the previous checkpoint as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    after = (". The previous checkpoint is intact and the partial file was removed; continue with --resume once "
             "that is fixed")
    with storage(path, "writing a checkpoint", after):
        try:
            with open(tmp, "w+b") as f:
                torch.save(state, f)
                f.flush()
                size = f.seek(0, os.SEEK_END)
                digest = sha256_of(f, size)
                f.seek(size)
                f.write(CHECKSUM_MAGIC + digest)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)  # make the rename itself durable


def verify_checksum(path: Path) -> bool:
    """True if ``path`` ends with a checksum trailer that matches its contents; False if it has no trailer (a
    format 1 checkpoint, or a damaged trailer); ``CheckpointError`` if the checksum does not match."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < TRAILER_BYTES:
                return False
            f.seek(size - TRAILER_BYTES)
            trailer = f.read(TRAILER_BYTES)
            if not trailer.startswith(CHECKSUM_MAGIC):
                return False
            ok = sha256_of(f, size - TRAILER_BYTES) == trailer[len(CHECKSUM_MAGIC):]
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e
    if not ok:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match their sha256 checksum (a "
                              f"changed or damaged byte). {CORRUPT_FIX}")
    return True


CORRUPT_FIX = ("Restore a good copy, or start a new run in its directory (--overwrite) or in another --out-dir, "
               "without --resume.")


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
    path = Path(run_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    cfg = saved_config(ckpt, path)
    vocab_size = json.loads((Path(run_dir) / "config.json").read_text())["vocab_size"]
    model = GPT(model_config(cfg, {"vocab_size": vocab_size}))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint, or raise ``CheckpointError`` naming the file: never start afresh silently.

    The sha256 trailer is checked before the file is unpickled. A format 1 checkpoint (written before checksums)
    is read unverified, with a note on stderr."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path} (run without --resume to start a new run; "
                              "--overwrite if the directory holds an earlier run's files)")
    verified = verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}: {e}). {CORRUPT_FIX}"
        ) from e
    required = {"format", "step", "config", "model", "optimizer", "scheduler", "rng", "metrics"}
    formats = (CHECKPOINT_FORMAT, *LEGACY_FORMATS)
    if not isinstance(state, dict) or state.get("format") not in formats or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else "everything"
        raise CheckpointError(f"checkpoint {path} is not a {' or '.join(formats)} checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else None!r}, "
                              f"missing {missing})")
    if state["format"] == CHECKPOINT_FORMAT and not verified:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum trailer is missing or damaged. "
                              f"{CORRUPT_FIX}")
    if not verified:
        print(f"note: {path} is a {state['format']} checkpoint, written before checkpoints carried a checksum: "
              "read without verifying it (this run's next checkpoint will carry one)", file=sys.stderr)
    return state


def saved_config(ckpt: dict, path: Path) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint was written with (``CheckpointError`` if it is not one)."""
    try:
        return TrainConfig(**ckpt["config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read ({e}): it was "
                              "written by another version of mars_ref") from e


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
    # Failure and stopping: the first step (1-based) whose loss was not finite (NEVER: none; a tensor on the
    # device, so that watching it costs no synchronisation), the step of the last checkpoint (None: none yet),
    # and the signal that asked the run to stop.
    first_bad: torch.Tensor | None = None
    ckpt_step: int | None = None
    stop_signal: int | None = None

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
            with storage(self.metrics_path, "appending to metrics.jsonl"), open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- set-up


def setup_run(cfg: TrainConfig, given: dict) -> Run:
    """Everything before the first step: processes, config, data, model, optimizer, resumed state, output files."""
    cfg = resolve(cfg)
    d = setup_distributed(pick_device(cfg.device, Dist()))
    # This command line's run directory: a resumed run continues here, wherever its config says it started.
    out_dir = Path(cfg.out_dir)
    cfg, ckpt = resume_config(cfg, given, out_dir, d)
    check_out_dir(out_dir)
    device = pick_device(cfg.device, d)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # NCCL collectives (and all_gather_object) use the current device
    if cfg.grad_accum % d.world:
        raise ConfigError(f"--grad-accum {cfg.grad_accum} must be a multiple of the world size ({d.world})")

    data_path, meta = prepare_data(cfg, d)
    raw_model, optimizer, scheduler = build_model(cfg, meta, d, device)
    start_step, elapsed, grad_evals = 0, 0.0, 0
    if ckpt is not None:
        start_step, elapsed, grad_evals = restore(ckpt, raw_model, optimizer, scheduler, d, device,
                                                  out_dir / "ckpt.pt", meta)
        del ckpt  # free its copy of the weights and optimizer state before training

    model = wrap_model(raw_model, cfg, d, device)
    batches = Batches(data_path, cfg.seed, cfg.block_size, cfg.batch_size, device)
    autocast = autocast_context(device, cfg.dtype)
    run = Run(cfg=cfg, d=d, device=device, out_dir=out_dir, meta=meta, raw_model=raw_model, model=model,
              optimizer=optimizer, optimizer_step=compile_step(optimizer, cfg), scheduler=scheduler,
              batches=batches, autocast=autocast,
              my_micro=list(range(d.rank, cfg.grad_accum, d.world)), start_step=start_step, elapsed=elapsed,
              grad_evals=grad_evals, first_bad=torch.full((), NEVER, dtype=torch.int64, device=device),
              ckpt_step=start_step if start_step > 0 else None)
    if d.master:
        write_run_files(run)
    if cfg.variance_every > 0 and d.master:
        run.variance = make_variance_probe(run)
    run.bar = progress_bar(cfg, start_step, d)
    run.t_start = time.perf_counter()
    return run


# What a resumed run may change: when it logs, evaluates, checkpoints, samples and stops, and where and how fast
# it computes (the same math on the same state; another device or dtype rounds differently). Everything else (the
# model, the data and its batches, the optimizer and its schedule, the seed, what an evaluation or a variance
# measurement averages over) is the run itself: a resumed run follows the trajectory the uninterrupted one would.
RESUMABLE = frozenset({"max_iters", "eval_interval", "log_interval", "ckpt_interval", "variance_every",
                       "sample_tokens", "out_dir", "data_dir", "device", "dtype", "compile", "step_impl"})


def resume_config(cfg: TrainConfig, given: dict, out_dir: Path, d: Dist) -> tuple[TrainConfig, dict | None]:
    """The run's config and, with --resume, its checkpoint: the checkpoint's config, with the ``RESUMABLE``
    settings given on this command line (``ConfigError`` for any other that differs)."""
    if not cfg.resume:
        check_new_run_dir(out_dir, cfg.overwrite, d)
        return cfg, None
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path)
    saved = saved_config(ckpt, ckpt_path)
    changes = {k: v for k, v in given.items() if k not in ("resume", "overwrite") and getattr(saved, k) != v}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"{flag(k)} (checkpoint: {getattr(saved, k)!r}, given: {v!r})" for k, v in fixed.items())
        raise ConfigError(f"--resume continues the run in {ckpt_path}, and these settings cannot change during a "
                          f"run: {listed}. A resumed run may change only "
                          f"{', '.join(flag(k) for k in sorted(RESUMABLE))}; to train with other settings start "
                          "a new run (another --out-dir, or --overwrite)")
    if changes.get("max_iters", ckpt["step"]) < ckpt["step"]:
        raise ConfigError(f"--max-iters {changes['max_iters']} is below the checkpoint's step {ckpt['step']}: "
                          f"a run cannot be shortened (give --max-iters >= {ckpt['step']})")
    if changes and d.master:
        print(f"resume: changing {changes} (every other setting from the checkpoint)")
    if changes.get("max_iters", 0) > saved.lr_decay_iters and d.master:
        print(f"note: --max-iters {changes['max_iters']} goes past the end of the run's lr schedule "
              f"(--lr-decay-iters {saved.lr_decay_iters}): the lr stays at min_lr = {saved.min_lr} from there")
    merged = {**asdict(saved), **changes, "out_dir": str(out_dir), "resume": True, "overwrite": False}
    return resolve(TrainConfig(**merged)), ckpt


RUN_FILES = ("metrics.jsonl", "ckpt.pt")  # what a new run refuses to replace without --overwrite


def check_new_run_dir(out_dir: Path, overwrite: bool, d: Dist) -> None:
    """A new run may not replace an earlier run's files in ``out_dir`` unless ``overwrite``."""
    found = [n for n in RUN_FILES if (out_dir / n).is_file() and (out_dir / n).stat().st_size > 0]
    if found and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                          "start it again with --overwrite (which deletes them), or choose another --out-dir")
    if found and d.master:
        print(f"note: --overwrite: deleting the earlier run's {' and '.join(found)} in {out_dir}")


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure files can be written there (``ConfigError`` naming it otherwise)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a directory: give a directory (created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise ConfigError(f"--out-dir {out_dir} cannot be written ({why}): make it writable, or give another "
                          "--out-dir") from e


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


def restore(ckpt: dict, model: GPT, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
            d: Dist, device: str, path: Path, meta: dict) -> tuple[int, float, int]:
    """Load a checkpoint into the run's objects and this process's RNGs: (step, elapsed seconds, grad_evals).
    ``CheckpointError`` if it does not fit them (another run's checkpoint, another corpus)."""
    corpus = ckpt.get("data", {}).get("corpus", {})
    differ = {k: (v, meta.get(k)) for k, v in corpus.items() if meta.get(k) != v}
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained on another corpus than the one in --data-dir "
                              f"--dataset (checkpoint vs now: {differ}): give the run's data")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(f"checkpoint {path} does not fit the model and optimizer its config describes "
                              f"({type(e).__name__}: {detail}): it was written by another run or version; "
                              f"{CORRUPT_FIX}") from e
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
    """Start metrics.jsonl (keeping a resumed run's records up to its checkpoint) and write config.json, each
    replaced whole or not at all. A new run first deletes an earlier run's checkpoint (``--overwrite``)."""
    with storage(run.out_dir, "writing config.json and metrics.jsonl"):
        (run.out_dir / "ckpt.pt.tmp").unlink(missing_ok=True)  # what a killed checkpoint write left
        if run.start_step == 0:
            run.ckpt_path.unlink(missing_ok=True)
        # A resumed run rewrites what the killed run logged after its last checkpoint.
        kept = read_metrics(run.metrics_path, up_to_step=run.start_step) if run.start_step > 0 else []
        write_atomic(run.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        write_atomic(run.out_dir / "config.json", json.dumps(
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
    try:
        if run.cfg.exact:
            run.optimizer.step(lambda: closure(run))  # MARS calls it at x_t, then again at x_{t-1}
        else:
            closure(run)
            run.optimizer_step()
    except FloatingPointError as e:  # MARS refuses a non-finite gradient before it changes anything
        loss = f" (the training loss was {run.loss.item()})" if run.loss is not None and run.calls else ""
        reason = str(e).rstrip(".")
        raise diverged(run, step + 1, f"the optimizer refused a non-finite gradient{loss}: {reason}") from e
    # Remember the first step with a non-finite loss, without waiting for the device.
    run.first_bad.masked_fill_(~torch.isfinite(run.loss) & (run.first_bad == NEVER), step + 1)
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


def diverged(run: Run, step: int, what: str) -> TrainingError:
    """The error that stops a run whose step ``step`` went wrong: what happened and which checkpoint is kept."""
    if run.ckpt_step is None:
        kept = "no checkpoint was written"
    else:
        kept = f"the last good checkpoint, of step {run.ckpt_step}, is kept in {run.ckpt_path}"
    return TrainingError(f"step {step}: {what}. Training stopped; {kept}. Try a lower --lr, a longer "
                         "--warmup-iters or --grad-clip, in a new run")


def check_finite(run: Run) -> None:
    """Raise ``TrainingError`` if a step so far had a non-finite training loss (on any process)."""
    first = run.first_bad
    if run.d.world > 1:
        first = first.clone()
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    step = int(first.item())
    if step != NEVER:
        raise diverged(run, step, "the training loss is not finite")


def check_weights(run: Run, done: int) -> None:
    """Raise ``TrainingError`` if a weight is not finite after ``done`` steps (the same on every process)."""
    finite = torch.stack([torch.isfinite(p).all() for p in run.raw_model.parameters()]).all()
    if not finite.item():
        raise diverged(run, done, "the weights are no longer finite after the optimizer's update")


def log_train(run: Run, done: int, lr: float) -> float:
    """Log a "train" record after ``done`` steps and show loss and tokens/s on the bar; returns the loss."""
    check_finite(run)
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
    if not math.isfinite(val_loss):
        raise diverged(run, done, f"the validation loss is {val_loss}")
    run.log({"kind": "eval", "step": done, "tokens": done * run.tokens_per_step, "time": run.clock(),
             "train_loss": train_loss, "val_loss": val_loss, "lr": lr, "grad_evals": run.grad_evals})
    if done > 0 and run.d.master:
        run.bar.write(f"step {done}: val loss {val_loss:.4f}, train loss {train_loss:.4f}, {run.clock():.1f} s")
    return val_loss


def write_checkpoint(run: Run, done: int) -> None:
    """Checkpoint the run after ``done`` steps (every process's RNG states; rank 0 writes the file), if its losses
    and weights are finite: a run that went wrong keeps its last good checkpoint."""
    check_finite(run)
    check_weights(run, done)
    corpus = {k: run.meta.get(k) for k in ("name", "tokenizer", "vocab_size", "train_tokens", "val_tokens")}
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "step": done, "config": asdict(run.cfg),
        "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "data": {"sampler": "numpy default_rng((seed, stream, step, micro-batch))", "seed": run.cfg.seed,
                 "next_step": done, "corpus": corpus},
        "rng": gather(rng_states(run.device), run.d),
        "metrics": {"elapsed": run.clock(), "grad_evals": run.grad_evals, "tokens": done * run.tokens_per_step},
    }
    if run.d.master:
        save_checkpoint(run.ckpt_path, checkpoint)
    run.ckpt_step = done


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
    """Run (or resume) one training run. Returns a summary dict (last losses, steps, seconds).

    ``given``: the settings given explicitly (``parse_args``'s second value); with ``cfg.resume`` only these may
    differ from the checkpoint's config (``None``: the checkpoint's config, ``cfg.out_dir`` apart)."""
    run = setup_run(cfg, given or {})
    cfg, d = run.cfg, run.d
    try:
        if run.start_step >= cfg.max_iters and d.master:
            print(f"{run.out_dir}: already at step {run.start_step} of {cfg.max_iters}; raise --max-iters to "
                  "train on")
        if run.start_step == 0 and cfg.eval_interval > 0:
            log_eval(run, 0, run.optimizer.param_groups[0]["lr"], train_loss=None)  # the untrained model
        with stop_signals(run):
            train_loss, val_loss = train_steps(run)
    finally:
        run.bar.close()

    summary = {"steps": cfg.max_iters, "val_loss": val_loss, "train_loss": train_loss, "seconds": run.clock(),
               "grad_evals": run.grad_evals, "out_dir": str(run.out_dir)}
    if d.master and cfg.sample_tokens > 0:
        summary["sample"] = sample_text(run)
        print("---- sample ----\n" + summary["sample"] + "\n----------------")
    if d.master:
        print(f"done: {cfg.max_iters} steps, val loss {val_loss}, {summary['seconds']:.1f} s, in {run.out_dir}")
    return summary


def train_steps(run: Run) -> tuple[float | None, float | None]:
    """The steps from the run's start to ``max_iters``, with their logs, evaluations and checkpoints; stops
    after a step when a signal asked (``stop_signals``). Returns the last (train loss, val loss)."""
    cfg, d = run.cfg, run.d
    val_loss, train_loss = None, None
    run.window_step, run.window_t = run.start_step, time.perf_counter()
    for step in range(run.start_step, cfg.max_iters):
        lr = run.optimizer.param_groups[0]["lr"]  # this step's: the scheduler moves it at the end of the step
        train_step(run, step)
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            train_loss = log_train(run, done, lr)
        if cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
            check_finite(run)
            train_loss = all_mean(run.loss, d)
            val_loss = log_eval(run, done, lr, train_loss)
        if (cfg.ckpt_interval > 0 and done % cfg.ckpt_interval == 0) or done == cfg.max_iters:
            write_checkpoint(run, done)
        run.bar.update(1)
        if stop_requested(run):
            stop(run, done)
    return train_loss, val_loss


@contextmanager
def stop_signals(run: Run) -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the run to stop after the step in progress (``stop``);
    a second signal stops it at once (``KeyboardInterrupt``). Signals ignored by the parent stay ignored."""
    def ask(signum, frame):
        if run.stop_signal is not None:
            raise KeyboardInterrupt
        run.stop_signal = signum
        if run.d.master:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after step {run.step + 1} with a "
                             "checkpoint (again to stop at once)\n")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, ask)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_requested(run: Run) -> bool:
    """Whether a signal asked this run (any of its processes) to stop."""
    asked = run.stop_signal is not None
    if run.d.world > 1:
        flag_ = torch.tensor([int(asked)], device=run.device)
        dist.all_reduce(flag_, op=dist.ReduceOp.MAX)
        asked = bool(flag_.item())
    return asked


def stop(run: Run, done: int) -> None:
    """Checkpoint step ``done`` (unless it just was) and raise ``Interrupted``."""
    if run.ckpt_step != done:
        write_checkpoint(run, done)
    signum = run.stop_signal or signal.SIGINT
    raise Interrupted(f"{signal.Signals(signum).name} after step {done} of {run.cfg.max_iters}: checkpoint of step "
                      f"{done} in {run.ckpt_path}; continue with --resume --out-dir {run.out_dir}", 128 + signum)


def main(argv: list[str] | None = None) -> int:
    """The command line: train, and report an error without a traceback. Exit status: 0 done; 2 the command
    line or an input cannot be used (config, checkpoint, corpus); 1 the run failed (a non-finite loss, a full or
    read-only disk, another ``OSError``); 130 / 143 stopped by SIGINT / SIGTERM (after a checkpoint)."""
    cfg, given = parse_args(argv)
    try:
        train(cfg, given)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:  # StorageError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("interrupted: stopped at once, without a checkpoint of the step in progress (--resume continues "
              "from the last one, if any)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
