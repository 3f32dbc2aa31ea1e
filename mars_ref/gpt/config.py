"""What a training run is: ``TrainConfig`` (one field per ``--flag``), the presets and optimizer recipes that fill
what the command line leaves out (``resolve``), the valid range of every setting (``check_config``), what a resumed
run may change (``RESUMABLE``), the network a config describes (``model_config``), the errors and the exit status
each one gives.

Exit status of ``python -m mars_ref.gpt.train``: ``EXIT_OK`` (0) done; ``EXIT_USAGE`` (2) the command line or an
input cannot be used (``ConfigError``, ``CheckpointError``, ``mars_ref.gpt.data.DataError`` and argparse's own
errors); ``EXIT_FAILED`` (1) the run failed (``TrainingError``; an ``OSError`` such as a full or read-only disk);
128 + the signal (130 for SIGINT, 143 for SIGTERM) stopped by a signal, after a checkpoint (``Interrupted``).
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .model import GPTConfig
from .model import preset as model_preset

OPTIMIZERS = ("adamw", "lion", "muon", "mars-adamw", "mars-lion", "mars-shampoo", "mars-m")
STEP_IMPLS = ("auto", "readable", "foreach", "fused")  # MARS(foreach=None / False / True) / MARS(fused=True)
SCHEDULES = ("cosine", "wsd", "constant")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    step_impl: str = field(default="auto", metadata={"help": "how MARS computes its step (same math, same "
        "state): auto (foreach on CUDA, readable elsewhere), readable (each line under its equation), foreach "
        "(grouped torch kernels), fused (one C loop per tensor: CPU only)"})
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
    lr_decay_iters: int | None = field(default=None, metadata={"help": "end of the decay (= max_iters)"})
    schedule: str = field(default="cosine", metadata={"help": "lr after the warm-up: cosine (to min_lr at "
        "lr_decay_iters), wsd (warmup-stable-decay: the peak lr, then a linear decay to min_lr over the last "
        "decay_frac of the steps), constant (the peak lr)"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: the fraction of the steps after the warm-up "
                                                              "that decays, in (0, 1]"})
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
    tf32: bool = field(default=True, metadata={"help": "on CUDA, float32 matrix products in TensorFloat-32 "
                                               "(torch.set_float32_matmul_precision('high')); --no-tf32: full float32"})




# The run shapes. CPU presets train character-level Shakespeare in about two minutes.
TRAIN_PRESETS: dict[str, dict] = {
    "cpu-tiny": dict(model="cpu-tiny", dataset="shakespeare", batch_size=16, grad_accum=1,
                     max_iters=900, warmup_iters=50, eval_interval=150, eval_iters=20, log_interval=10,
                     ckpt_interval=300, sample_tokens=300),
    "cpu-mini": dict(model="cpu-mini", dataset="shakespeare", batch_size=32, grad_accum=1,
                     max_iters=2000, warmup_iters=50, eval_interval=250, eval_iters=20, log_interval=10,
                     ckpt_interval=500, sample_tokens=300),
    # A one-GPU lab: a GPT-2-shaped model (6 × 384, ~30M parameters, GPT-2's vocabulary) on Shakespeare in GPT-2
    # tokens (offline), 1,500 steps of 16 × 256 tokens (6.1M, ~3.9 epochs of 1.57M): estimated at 0.5–1 minute per
    # run on an A100 and 5–10 on a T4, unmeasured (docs/gpu.md derives it).
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
    if cfg.gamma not in (None, 0) and not cfg.optimizer.startswith("mars"):
        raise ConfigError(f"--gamma is a MARS option; optimizer {cfg.optimizer!r} has no variance-reduction scale "
                          "(leave --gamma out, or choose a mars-* optimizer)")
    if cfg.step_impl not in STEP_IMPLS:
        raise ConfigError(f"unknown --step-impl {cfg.step_impl!r}; choose one of {STEP_IMPLS}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown --schedule {cfg.schedule!r}; choose one of {SCHEDULES}")
    if not (isinstance(cfg.decay_frac, (int, float)) and 0 < cfg.decay_frac <= 1):
        raise ConfigError(f"--decay-frac must be a number in (0, 1], not {cfg.decay_frac!r}")
    if cfg.step_impl not in ("auto", "readable") and not cfg.optimizer.startswith("mars"):
        raise ConfigError(f"--step-impl is a MARS option; optimizer {cfg.optimizer!r} has its own step")
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
    if not str(cfg.out_dir).strip():
        raise ConfigError(f"--out-dir {cfg.out_dir!r} is empty: give the run's directory (created if missing; "
                          "--out-dir . for the current one)")
    check_fused_device(cfg.step_impl, cfg.device)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --out-dir and --overwrite replaces it: give one of them")


def check_fused_device(step_impl: str, device: str) -> None:
    """``--step-impl fused`` is C loops over CPU memory: refuse it on a GPU (``ConfigError``)."""
    if step_impl == "fused" and not device.startswith(("cpu", "auto")):
        raise ConfigError(f"--step-impl fused runs MARS's step as C loops on the CPU; on --device {device} use "
                          "--step-impl foreach (grouped torch kernels: the same step on any device)")


# What a resumed run may change: when it logs, evaluates, checkpoints, samples and stops, and where and how fast it
# computes (the same math on the same state; another device or dtype rounds differently). Everything else (the
# model, the data and its batches, the optimizer and its schedule, the seed, what an evaluation or a variance
# measurement averages over) is the run itself: a resumed run follows the trajectory the uninterrupted one would.
RESUMABLE = frozenset({"max_iters", "eval_interval", "log_interval", "ckpt_interval", "variance_every",
                       "sample_tokens", "out_dir", "data_dir", "device", "dtype", "compile", "step_impl", "tf32"})


def model_config(cfg: TrainConfig, meta: dict) -> GPTConfig:
    """The network a (resolved) run trains on a data set with this ``meta.json``."""
    vocab_size = meta["vocab_size"]
    if meta.get("tokenizer") == "gpt2":
        vocab_size = 64 * math.ceil(vocab_size / 64)  # 50257 -> 50304: faster matmuls
    model_cfg = model_preset(cfg.model, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, block_size=cfg.block_size, dropout=cfg.dropout)
    return replace(model_cfg, bias=cfg.bias)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per ``TrainConfig`` field (defaults suppressed, so we can
    tell which flags were given)."""
    parser = argparse.ArgumentParser(prog="python -m mars_ref.gpt.train",
                                     description="Train a GPT-2 with MARS or a baseline optimizer.",
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
