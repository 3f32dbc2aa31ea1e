"""Train a GPT-2 with MARS or a baseline optimizer:  ``python -m mars_ref.gpt.train [--flags]``.

With no flags this trains the ``cpu-tiny`` preset (4 layers × 128, character-level Shakespeare, prepared offline on
first use) with MARS-AdamW on the CPU for about two minutes. ``--preset gpt2-small`` is the paper's GPT-2 small
recipe on OpenWebText ("The paper's numbers" in ``docs/algorithm.md``); under ``torchrun`` it trains with
DistributedDataParallel.

The recipe, for every optimizer:

* linear warm-up for ``warmup_iters`` steps, then cosine decay to ``min_lr`` at ``lr_decay_iters`` (a ``LambdaLR``
  that scales every group's lr, so MARS's and Muon's 1-D learning rates follow the same schedule);
* the gradient of one step is the mean over ``grad_accum`` micro-batches of ``batch_size`` sequences (over all
  processes together), clipped by its global norm (``clip_grad_norm_``, 1.0) *before* the optimizer sees it;
* ``--exact`` (MARS only) calls ``optimizer.step(closure)``: the closure zeroes the gradients, runs the same
  micro-batches, clips, and returns the loss; MARS calls it a second time at the previous point. ``grad_evals`` in
  the metrics counts closure calls (one full-batch gradient each).

This file is the run, top to bottom: ``setup_run`` (processes, config, run directory, data, model, optimizer,
resumed state), then for each step ``train_step`` (which calls ``closure``), ``log_train``, ``log_eval`` and
``write_checkpoint``, then ``sample_text``; ``main`` is the command line. The run's live objects travel in one
``Run``. What is not the loop lives beside it: ``config`` (the flags, presets, recipes, ranges and exit statuses),
``checkpoint`` (checksummed checkpoints and the rules of a resume), ``run_dir`` (the run directory's lock and
files), ``signals`` (Ctrl-C), ``devices`` (processes, devices, precision, memory), ``batches`` (the data a run
reads), ``optim`` (the optimizer and its schedule).

A resumed run is bit-identical to an uninterrupted one (tested): batches are a pure function of (seed, step), and the
checkpoint holds the model, optimizer, scheduler, the step, every process's RNG states and the config. Every setting
is checked before any data is read or file written; a non-finite loss or weights stop the run with a
``TrainingError`` naming the step, keeping the last good checkpoint. Outputs in ``--out-dir``
(``runs/<preset>-<optimizer>`` by default): ``config.json``, ``metrics.jsonl`` (one JSON object per log, evaluation
or variance measurement) and ``ckpt.pt``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .._io import storage
from ..course.variance import VarianceProbe
from . import checkpoint, config, optim, run_dir
from .batches import HELDOUT_STREAM, TRAIN_STREAM, VAL_STREAM, Batches, prepare_data
from .checkpoint import CHECKPOINT_FORMAT, restore, resume_config, rng_states, save_checkpoint
from .config import CheckpointError, ConfigError, Interrupted, TrainConfig, TrainingError, model_config, resolve
from .data import DataError
from .devices import Dist, all_mean, autocast_context, check_memory, gather, setup_device, setup_distributed
from .model import GPT
from .optim import compile_step, lr_factor, make_optimizer
from .run_dir import check_out_dir, lock_run_dir, write_run_files
from .signals import stop_requested, stop_signals


def __getattr__(name: str):
    """The names other code imports from here (``TrainConfig``, ``resolve``, ``TRAIN_PRESETS``, ``OPTIM_RECIPES``,
    ``load_checkpoint``, ``load_model``, ``read_metrics``, ...), defined in the modules beside this one."""
    for module in (config, checkpoint, run_dir, optim):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


NEVER = 2**62  # Run.first_bad when every loss so far was finite


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
    eval_model: torch.nn.Module  # what evaluation calls: raw_model, compiled with --compile (no DDP)
    optimizer: torch.optim.Optimizer
    optimizer_step: Callable  # optimizer.step, compiled with --compile where it can be (see compile_step)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Batches
    autocast: AbstractContextManager  # torch.autocast, or a nullcontext for float32
    my_micro: list[int]  # this process's share of each global batch
    start_step: int  # steps done before this process started (the checkpoint's step; 0 for a new run)
    elapsed: float  # seconds the run took before this process started (from the checkpoint)
    grad_evals: int  # closure calls so far, over all resumptions: one full-batch gradient each
    first_bad: torch.Tensor  # the first step (1-based) with a non-finite loss (NEVER: none), kept on the device
    ckpt_step: int | None = None  # the step of the last checkpoint (None: none yet)
    kept: tuple = ()  # a resumed run's metrics records up to its checkpoint
    variance: VarianceProbe | None = None  # rank 0's probe, with --variance-every
    bar: tqdm | None = None
    t_start: float = 0.0  # time.perf_counter() when this process started training
    variance_seconds: float = 0.0  # spent in the probe since t_start: kept off the clock
    step: int = 0  # the step in progress (0-based)
    calls: int = 0  # closure calls in this step: 1, or 2 for exact MARS after the first step
    loss: torch.Tensor | None = None  # this process's mean loss over its micro-batches at x_t
    norm: torch.Tensor | None = None  # the global gradient norm at x_t, before clipping (None: no clipping)
    window_step: int = 0  # tokens/s on the progress bar: since this step and time
    window_t: float = 0.0
    stop_signal: int | None = None  # the signal that asked the run to stop

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all micro-batches of all processes)."""
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    def clock(self) -> float:
        """Wall-clock seconds of the run so far, over all resumptions: training, evaluations and checkpoints, not
        the variance probe."""
        return self.elapsed + time.perf_counter() - self.t_start - self.variance_seconds

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        if self.d.master:
            path = self.out_dir / "metrics.jsonl"
            with storage(path, "appending to metrics.jsonl", "choose another --out-dir"), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- set-up


def setup_run(cfg: TrainConfig, given: dict, stack: ExitStack) -> Run:
    """Everything before the first step: processes, config, run directory (locked for the run's lifetime, through
    ``stack``), data, model, optimizer, resumed state, output files."""
    cfg = resolve(cfg)
    d = setup_distributed(cfg.device)
    # This command line's run directory: a resumed run continues here, wherever its config says it started.
    out_dir = Path(cfg.out_dir)
    if not cfg.resume:
        check_out_dir(out_dir)  # created, and writable
    refused = None
    if d.master and out_dir.is_dir():  # one training per run directory, before anything in it is read
        try:
            stack.enter_context(lock_run_dir(out_dir))
        except ConfigError as e:
            refused = str(e)
    refused = gather(refused, d)[0]
    if refused:
        raise ConfigError(refused)
    cfg, ckpt = resume_config(cfg, given, out_dir, d.master)
    if cfg.resume:
        check_out_dir(out_dir)
    device = setup_device(cfg, d)
    if cfg.grad_accum % d.world:
        raise ConfigError(f"--grad-accum {cfg.grad_accum} must be a multiple of the world size ({d.world})")

    data_path, meta = prepare_data(cfg, d)
    batches = Batches(data_path, cfg.seed, cfg.block_size, cfg.batch_size, device)
    autocast = autocast_context(device, cfg.dtype, d.master)
    check_memory(cfg, model_config(cfg, meta), device, autocast_bf16=not isinstance(autocast, nullcontext))

    # Same initial weights on every process (DDP also broadcasts rank 0's), then one dropout stream each.
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_config(cfg, meta)).to(device)
    torch.manual_seed(cfg.seed + 1 + d.rank)
    optimizer = make_optimizer(raw_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start_step, elapsed, grad_evals = 0, 0.0, 0
    if ckpt is not None:
        start_step, elapsed, grad_evals = restore(ckpt, raw_model, optimizer, scheduler, d.rank, d.world, device,
                                                  out_dir / "ckpt.pt", meta)
        del ckpt  # free its copy of the weights and optimizer state before training

    model = eval_model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.world > 1:
        # MARS copies g_prev out of .grad, so DDP may reuse its buckets as the .grad tensors.
        model = DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None,
                    gradient_as_bucket_view=True)
    run = Run(cfg=cfg, d=d, device=device, out_dir=out_dir, meta=meta, raw_model=raw_model, model=model,
              eval_model=eval_model, optimizer=optimizer, optimizer_step=compile_step(optimizer, cfg),
              scheduler=scheduler,
              batches=batches, autocast=autocast, my_micro=list(range(d.rank, cfg.grad_accum, d.world)),
              start_step=start_step, elapsed=elapsed, grad_evals=grad_evals,
              first_bad=torch.full((), NEVER, dtype=torch.int64, device=device),
              ckpt_step=start_step if start_step > 0 else None)
    if d.master:
        run.kept = tuple(write_run_files(out_dir, start_step, {
            **asdict(cfg), "world_size": d.world, "device": device, "vocab_size": raw_model.config.vocab_size,
            "n_params": raw_model.num_params(), "tokens_per_step": run.tokens_per_step}))
    if cfg.variance_every > 0 and d.master:
        held_out = [batches.get("train", HELDOUT_STREAM, 0, k) for k in range(cfg.variance_batches)]
        run.variance = VarianceProbe(raw_model, optimizer, cfg, held_out, autocast)
    run.bar = progress_bar(cfg, start_step, d)
    stack.callback(run.bar.close)
    run.t_start = time.perf_counter()
    return run


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
                loss = run.model(x, y)[1]  # the logits (batch × block × vocab) are freed before the backward
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
    global_batch = lambda: [run.batches.get("train", TRAIN_STREAM, step, j) for j in range(run.cfg.grad_accum)]
    record = run.variance.measure(done, norm, run.cfg.grad_clip, global_batch)
    run.variance_seconds += time.perf_counter() - t0
    run.log({"kind": "variance", "step": done, "tokens": done * run.tokens_per_step, "time": run.clock(),
             **record})


# ----------------------------------------------------------------------------- evaluation, logs, checkpoints


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss on the same ``eval_iters`` validation micro-batches every time (split over processes)."""
    run.raw_model.eval()
    total = torch.zeros((), device=run.device)
    for k in range(run.d.rank, run.cfg.eval_iters, run.d.world):
        x, y = run.batches.get("val", VAL_STREAM, 0, k)
        with run.autocast:
            total += run.eval_model(x, y)[1].float()
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
    finite = torch.stack([torch.isfinite(p).all() for p in run.raw_model.parameters()]).all()
    if not finite.item():
        raise diverged(run, done, "the weights are no longer finite after the optimizer's update")
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
    if run.d.world > 1:  # no process leaves before the file is whole (torchrun stops the others when one exits)
        dist.barrier()
    run.ckpt_step = done


def sample_text(run: Run) -> str:
    """``sample_tokens`` characters or tokens from the trained model, prompted with a newline."""
    from .tokenizers import get_tokenizer

    tokenizer = get_tokenizer(run.meta)
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
    with ExitStack() as stack:
        run = setup_run(cfg, given or {}, stack)
        cfg, d = run.cfg, run.d
        if run.start_step >= cfg.max_iters and d.master:
            print(f"{run.out_dir}: already at step {run.start_step} of {cfg.max_iters}; raise --max-iters to "
                  "train on")
        if run.start_step == 0 and cfg.eval_interval > 0:
            log_eval(run, 0, run.optimizer.param_groups[0]["lr"], train_loss=None)  # the untrained model
        with stop_signals(run):
            train_loss, val_loss = train_steps(run)
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
    """The steps from the run's start to ``max_iters``, with their logs, evaluations and checkpoints; stops after
    a step when a signal asked (``stop_signals``). Returns the last (train loss, val loss): those of the metrics at
    the checkpoint's step when there is no step left to train."""
    cfg, d = run.cfg, run.d
    at_start = [r for r in run.kept if r.get("step") == run.start_step]
    train_loss = next((r["train_loss"] for r in reversed(at_start) if r.get("kind") == "train"), None)
    val_loss = next((r["val_loss"] for r in reversed(at_start) if r.get("kind") == "eval"), None)
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
        if stop_requested(run, done):
            if run.ckpt_step != done:
                write_checkpoint(run, done)
            signum = run.stop_signal or signal.SIGINT
            raise Interrupted(f"{signal.Signals(signum).name} after step {done} of {cfg.max_iters}: checkpoint of "
                              f"step {done} in {run.ckpt_path}; continue with --resume --out-dir {run.out_dir}",
                              128 + signum)
    return train_loss, val_loss


def main(argv: list[str] | None = None) -> int:
    """The command line: train, and report an error as one line ``error: ...`` on stderr, without a traceback.
    Exit status (``config``): 0 done; 2 the command line or an input cannot be used (config, checkpoint, corpus,
    a run directory another process is training in); 1 the run failed (a non-finite loss, a full or read-only
    disk, another ``OSError``); 130 / 143 stopped by SIGINT / SIGTERM (after a checkpoint)."""
    cfg, given = config.parse_args(argv)
    try:
        train(cfg, given)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return config.EXIT_USAGE
    except (TrainingError, OSError) as e:  # StorageError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return config.EXIT_FAILED
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
    return config.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
