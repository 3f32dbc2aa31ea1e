"""Check every GPU path of mars_ref on one machine in at most 10 minutes: ``python scripts/gpu_check.py``.

Also ``make gpu-check``. Each part below has a time budget (seconds, on one A100-class GPU); a part whose budget
would take the run past the total (``--budget``, default 600 s) is skipped and says so. The parts, in order:

* ``environment``: GPU name, compute capability, bf16 native or only emulated, TF32 settings, torch/CUDA versions.
* ``cuda-tests``: the CUDA cases of tests/test_optimizer.py, tests/test_foreach.py and tests/test_fused.py
  (``pytest -k cuda``) in a subprocess with ``MARS_REF_TEST_CUDA=1`` (the repository's conftest.py hides CUDA
  from the tests unless that variable is set).
* ``step-equivalence``: the readable, foreach and compiled foreach MARS steps after the same steps, on float32 and
  bfloat16 parameters: the largest difference against a tolerance (``TOLERANCES``).
* ``compiled-step-graphs``: the compiled foreach step under a ``LambdaLR`` schedule for 20 steps: graphs compiled,
  recompilations after step 3, graph breaks; host synchronisations per step (``torch.cuda.set_sync_debug_mode``)
  of the compiled foreach, eager foreach and eager readable steps.
* ``bf16-autocast``: a small GPT trained on one fixed batch under bfloat16 autocast: the loss is finite and falls.
* ``gpt2-small-throughput``: GPT-2 small (``mars_ref.gpt.model`` preset ``gpt2-small``), eager and compiled, 15 ×
  1024 tokens per micro-batch under bf16 autocast: ms per micro-batch (forward + backward), tokens/s, peak memory
  (``torch.cuda.max_memory_allocated``, MARS's state included), and the eager foreach optimizer step in ms.
* ``trainer-gpu-lab`` and the other ``trainer-*`` parts call ``python -m mars_ref.gpt.train`` as a subprocess on a
  synthetic corpus of GPT-2 token ids (vocabulary 50,257) written to a temporary directory, so no download is
  needed: ``--preset gpu-lab`` for 200 steps (tokens/s, peak memory); the readable and exact steps for 20 steps
  beside the same run's foreach losses; ``--step-impl fused`` on CUDA refused before training (exit status 2);
  3 steps of ``--preset gpt2-small`` at the paper's 480 sequences per step (15 × 32 accumulated micro-batches);
  SIGINT during a run, then ``--resume`` to the end (final loss against the uninterrupted run); ``--compile`` with
  ``TORCH_LOGS=recompiles`` (recompilations counted).
* ``torchrun-2gpu``: two processes under ``torch.distributed.run`` (NCCL) when two GPUs are present.

It prints one table (part, status ok/fail/skipped, numbers, seconds) and writes it as Markdown and JSON to
``benchmarks/results/gpu_check_<gpu-name>_<date>.md`` / ``.json`` (``--out`` chooses another place). Exit status: 0
when no part failed, 1 when one did, 2 for bad arguments.

Without CUDA (or with ``--dry-run``) it runs the same parts on the CPU at toy size (a tiny model, a few steps):
the parts that need CUDA are listed as skipped ("no CUDA"), the others check the plumbing, and the table is
written all the same. A dry run verifies nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOTAL_BUDGET = 600.0  # seconds: the whole check on one GPU
CORPUS = "synthetic-gpt2"
VOCAB = 50257  # GPT-2's vocabulary; the model pads it to 50304
#: largest allowed difference between two step implementations after ``EQUIV_STEPS`` steps: float32 in absolute
#: terms (parameters of order 1), bfloat16 in units in the last place (ULP) of bfloat16 at the value
TOLERANCES = {"float32": 1e-5, "bfloat16_ulps": 4}
EQUIV_STEPS = 10
#: trainer losses: readable against foreach over the first steps, and a resumed run against the uninterrupted one
#: (float32 on the CPU reproduces to the bit; bf16 autocast and CUDA's atomics do not)
LOSS_TOL = {"cpu": 1e-5, "cuda": 2e-2}
MB = 2**20
#: trainer --compile: the optimizer step's frames recompile once each at the first change of step count and lr (4
#: on the CPU at toy size), the model perhaps once; a recompilation per step would be dozens, or hit dynamo's limit
MAX_RECOMPILES = 6


# ----------------------------------------------------------------------------- parts, outcomes and the budget


class Skip(Exception):
    """A part (or the rest of one) cannot run here; ``reason`` is a short code: no-cuda, needs-2-gpus, budget."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail


class Failed(Exception):
    """A part ran and its check did not hold; ``numbers`` are what it measured before it stopped."""

    def __init__(self, detail: str, numbers: dict | None = None):
        super().__init__(detail)
        self.numbers = numbers or {}


@dataclass
class Outcome:
    part: str
    status: str  # "ok", "fail" or "skipped"
    numbers: dict = field(default_factory=dict)
    detail: str = ""
    reason: str = ""  # why skipped: no-cuda, needs-2-gpus, budget, not-selected
    seconds: float = 0.0


@dataclass
class Part:
    name: str
    budget: float  # seconds it may take on one GPU
    dry_budget: float  # seconds it may take in the dry run
    run: Callable  # run(ctx) -> numbers dict; raises Skip or Failed


def budget_decision(elapsed: float, budget: float, total: float) -> str | None:
    """None when a part of ``budget`` seconds, started ``elapsed`` seconds into the run, ends within ``total``;
    otherwise the sentence that says why it is skipped."""
    if elapsed + budget <= total:
        return None
    return (f"would run past the total budget: {elapsed:.0f} s elapsed + {budget:.0f} s for this part > "
            f"{total:.0f} s")


def run_parts(parts: list[Part], ctx, total: float, selected: set[str] | None = None,
              clock: Callable[[], float] = time.perf_counter, say: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``parts`` in order, each only if its budget fits in what is left of ``total``; one ``Outcome`` each."""
    start = clock()
    outcomes = []
    interrupted = False
    for part in parts:
        budget = part.dry_budget if getattr(ctx, "dry", False) else part.budget
        elapsed = clock() - start
        if interrupted:
            outcomes.append(Outcome(part.name, "skipped", reason="interrupted", detail="after Ctrl-C"))
            continue
        if selected is not None and part.name not in selected:
            outcomes.append(Outcome(part.name, "skipped", reason="not-selected", detail="not in --only / in --skip"))
            continue
        why = budget_decision(elapsed, budget, total)
        if why:
            say(f"-- {part.name}: skipped, {why}")
            outcomes.append(Outcome(part.name, "skipped", reason="budget", detail=why))
            continue
        say(f"-- {part.name} (budget {budget:.0f} s, {elapsed:.0f} s elapsed)")
        if ctx is not None:
            ctx.part_deadline = start + min(total, elapsed + 2 * budget)
        t0 = clock()
        try:
            out = Outcome(part.name, "ok", numbers=part.run(ctx) or {})
        except Skip as e:
            out = Outcome(part.name, "skipped", reason=e.reason, detail=e.detail)
        except Failed as e:
            out = Outcome(part.name, "fail", numbers=e.numbers, detail=str(e))
        except KeyboardInterrupt:  # Ctrl-C: this part failed, the rest are skipped, the table is still written
            out = Outcome(part.name, "fail", detail="interrupted (Ctrl-C)")
            interrupted = True
        except Exception as e:  # a part that breaks is a failed part; the others still run
            traceback.print_exc()
            out = Outcome(part.name, "fail", detail=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        out.seconds = round(clock() - t0, 1)
        say(f"   {status_text(out)}  {numbers_text(out.numbers)}" + (f"  ({out.detail})" if out.detail else ""))
        outcomes.append(out)
    return outcomes


SKIP_TEXT = {"no-cuda": "no CUDA", "needs-2-gpus": "needs 2 GPUs", "not-selected": "not selected"}


def status_text(o: Outcome) -> str:
    if o.status != "skipped":
        return o.status
    return f"skipped: {SKIP_TEXT.get(o.reason, o.reason)}"


def numbers_text(numbers: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e5) and v != 0 else f"{v:,.2f}".rstrip("0").rstrip(".")
        return str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in numbers.items())


# ----------------------------------------------------------------------------- the run's context


class Ctx:
    """What the parts share: the mode (GPU or dry run), the device, the scratch directory, earlier results."""

    def __init__(self, dry: bool, workdir: Path, n_gpus: int):
        self.dry, self.workdir, self.n_gpus = dry, workdir, n_gpus
        self.device = "cpu" if dry else "cuda"
        self.part_deadline = math.inf
        self.shared: dict = {}
        self._data_dir: Path | None = None
        # sizes: the real ones on a GPU, toy ones in the dry run
        self.lab_steps, self.short_steps, self.log_interval = (12, 4, 1) if dry else (200, 20, 10)

    def need_cuda(self, what: str = "") -> None:
        if self.dry:
            raise Skip("no-cuda", what)

    def time_left(self) -> float:
        return max(5.0, self.part_deadline - time.perf_counter())

    def data_dir(self) -> Path:
        """The synthetic corpus's ``--data-dir`` (written on first use)."""
        if self._data_dir is None:
            self._data_dir = self.workdir / "data"
            n_train, n_val = (200_000, 20_000) if self.dry else (4_000_000, 200_000)
            write_synthetic_corpus(self._data_dir / CORPUS, n_train, n_val)
        return self._data_dir


def write_synthetic_corpus(folder: Path, n_train: int, n_val: int, vocab: int = VOCAB, seed: int = 0) -> dict:
    """A prepared corpus as ``mars_ref.gpt.data`` writes one (``train.bin``, ``val.bin`` as uint16, ``meta.json``
    last) with GPT-2's tokenizer and vocabulary, made of random ids: 512 fixed 8-token phrases over 2,048 ids drawn
    from the whole vocabulary (its last id among them), concatenated in random order, so that a model has something
    to learn (the loss falls from ln 50,304 ≈ 10.8 towards about ln(512)/8)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab, 2048, replace=False)
    ids[0] = vocab - 1
    phrases = ids[rng.integers(0, len(ids), size=(512, 8))]
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = phrases[rng.integers(0, len(phrases), size=-(-n // 8))].reshape(-1)[:n].astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        counts[split] = int(tokens.size)
    meta = {"name": folder.name, "tokenizer": "gpt2", "vocab_size": vocab, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "source": "synthetic: random GPT-2 token ids (scripts/gpu_check.py)",
            "licence": "none (generated)", "dtype": "uint16"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------- in-process parts


def part_environment(ctx: Ctx) -> dict:
    import torch

    env = environment()
    ctx.shared["env"] = env
    for k, v in env.items():
        print(f"   {k}: {v}")
    if not env["cuda_available"]:
        print("   no CUDA: this is a dry run on the CPU at toy size; it verifies no GPU path")
    elif not env.get("bf16_native"):
        print("   warning: bf16 is emulated on this GPU (compute capability below 8.0): bf16 autocast is slow here")
    numbers = {"torch": torch.__version__, "cuda": env["cuda_version"] or "none", "gpus": env["gpu_count"]}
    if env["cuda_available"]:
        numbers.update({"gpu": env["gpu_name"], "compute capability": env["compute_capability"],
                        "bf16": "native" if env["bf16_native"] else "emulated only",
                        "tf32 matmul": env["tf32_matmul"], "memory GB": env["gpu_memory_gb"]})
    return numbers


def environment() -> dict:
    import torch

    env = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count() if
           torch.cuda.is_available() else 0, "python": sys.version.split()[0],
           "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
           "tf32_matmul": _read(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
           "tf32_cudnn": _read(lambda: bool(torch.backends.cudnn.allow_tf32))}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), compute_capability=".".join(
            map(str, torch.cuda.get_device_capability(0))), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   cudnn_version=torch.backends.cudnn.version())
    return env


def _read(get):
    """A setting as torch reports it, or the error's name if this version of torch does not (quietly)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get()
    except Exception as e:  # a setting this version of torch does not have
        return type(e).__name__


def _equiv_params(device, dtype, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    shapes = [(256, 128), (128,), (384, 96), (77, 33)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _run_steps(ctx: Ctx, dtype, impl: str, steps: int, backend) -> list:
    """Parameters after ``steps`` MARS steps (readable, foreach or compiled foreach) with fixed gradients and a
    ``LambdaLR`` schedule, as float32 CPU tensors."""
    import torch

    from mars_ref import MARS

    params = _equiv_params(ctx.device, dtype)
    opt = MARS(params, lr=1e-2, weight_decay=0.1, foreach=impl != "readable")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + 0.1 * i))
    step = torch.compile(opt.step, backend=backend) if impl == "compiled" else opt.step
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (3.0 if t % 2 else 0.01)).to(ctx.device, dtype)
        step()
        sched.step()
    return [p.detach().float().cpu() for p in params]


def bf16_ulps(a, b) -> float:
    """``max |a − b|`` in units in the last place of bfloat16 at the tensor's largest magnitude (7 stored mantissa
    bits): a scale-aware measure, where near-zero entries do not count a rounding of their larger operands as
    hundreds of their own ULPs."""
    import torch

    big = float(torch.maximum(a.abs().max(), b.abs().max()))
    if big == 0.0:
        return 0.0
    ulp = 2.0 ** (math.floor(math.log2(big)) - 7)
    return float((a - b).abs().max()) / ulp


def part_step_equivalence(ctx: Ctx) -> dict:
    import torch

    backend = "eager" if ctx.dry else "inductor"
    numbers, bad = {}, []
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
        torch._dynamo.reset()
        runs = {impl: _run_steps(ctx, dtype, impl, EQUIV_STEPS, backend) for impl in ("readable", "foreach",
                                                                                       "compiled")}
        for other in ("foreach", "compiled"):
            pairs = list(zip(runs["readable"], runs[other], strict=True))
            if name == "float32":
                diff = max(float((a - b).abs().max()) for a, b in pairs)
                numbers[f"{name} {other} Δmax"] = diff
                ok = diff <= TOLERANCES["float32"]
            else:
                diff = max(bf16_ulps(a, b) for a, b in pairs)
                numbers[f"{name} {other} ULPs"] = diff
                ok = diff <= TOLERANCES["bfloat16_ulps"]
            if not ok:
                bad.append(f"{name}: readable vs {other} differ by {diff:.3g}")
    if ctx.dry:
        numbers["compile backend"] = "eager (dry run)"
    if bad:
        raise Failed("; ".join(bad) + f" (tolerances {TOLERANCES}, {EQUIV_STEPS} steps)", numbers)
    return numbers


def part_compiled_step_graphs(ctx: Ctx) -> dict:
    import torch
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from mars_ref import MARS

    torch._dynamo.reset()
    counters.clear()
    params = _equiv_params(ctx.device, torch.float32)
    opt = MARS(params, lr=1e-2, weight_decay=0.1, foreach=True)
    warm, decay = 5, 20

    def factor(i):  # the trainer's shape of schedule: linear warm-up, then cosine
        return (i + 1) / warm if i < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / (decay - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    counter = CompileCounter() if ctx.dry else CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter)
    frames, breaks = [], []
    for _ in range(20):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
        sched.step()
        frames.append(counter.frame_count)
        breaks.append(sum(counters["graph_break"].values()))
    numbers = {"graphs": frames[-1], "recompiles after step 3": frames[-1] - frames[2],
               "graph breaks steps 1-3": breaks[2], "graph breaks after": breaks[-1] - breaks[2]}
    if ctx.dry:
        numbers["host syncs"] = "skipped: no CUDA"
    else:
        numbers.update(host_syncs(ctx, step, params))
    if frames[-1] != frames[2] or breaks[-1] != breaks[2]:
        raise Failed(f"graphs after each step {frames}, graph breaks {breaks}: the step recompiles or breaks under "
                     "the schedule after step 3", numbers)
    if not ctx.dry and numbers["syncs/step compiled foreach"] > 0:
        raise Failed("the compiled foreach step synchronises with the host", numbers)
    return numbers


def host_syncs(ctx: Ctx, compiled_step, params) -> dict:
    """Host synchronisations per step (``torch.cuda.set_sync_debug_mode("warn")``, 3 steps after warm-up)."""
    import torch

    from mars_ref import MARS

    def count(step, ps, n=3):
        for p in ps:
            p.grad = torch.randn_like(p)
        step()  # warm-up: the state exists
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught) / n

    out = {"syncs/step compiled foreach": count(compiled_step, params)}
    for impl in ("foreach", "readable"):
        ps = _equiv_params(ctx.device, torch.float32)
        out[f"syncs/step eager {impl}"] = count(MARS(ps, lr=1e-2, foreach=impl == "foreach").step, ps)
    return out


def part_bf16_autocast(ctx: Ctx) -> dict:
    import torch

    from mars_ref import MARS
    from mars_ref.gpt.model import GPT, preset

    torch.manual_seed(0)
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=16) if ctx.dry else dict(n_layer=4, n_head=4,
                                                                                      n_embd=256, block_size=128)
    model = GPT(preset("gpt2-small", **shape)).to(ctx.device)
    opt = MARS(model.parameters(), lr=3e-3, foreach=True)
    gen = torch.Generator().manual_seed(0)
    xy = torch.randint(0, VOCAB, (8, shape["block_size"] + 1), generator=gen).to(ctx.device)
    x, y = xy[:, :-1], xy[:, 1:]
    losses, dtypes = [], set()
    for _ in range(10 if ctx.dry else 30):
        with torch.autocast(device_type=ctx.device, dtype=torch.bfloat16):
            logits, loss = model(x, y)
        dtypes.add(str(logits.dtype).removeprefix("torch."))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    numbers = {"first loss": losses[0], "last loss": losses[-1], "logits dtype": "/".join(sorted(dtypes)),
               "device": ctx.device}
    if not all(math.isfinite(v) for v in losses):
        raise Failed(f"a loss is not finite: {losses}", numbers)
    if not losses[-1] < 0.9 * losses[0]:
        raise Failed(f"the loss on one fixed batch did not fall by 10%: {losses[0]:.3f} -> {losses[-1]:.3f}", numbers)
    return numbers


def part_gpt2_small_throughput(ctx: Ctx) -> dict:
    import torch

    numbers = {}
    variants = ["eager", "compiled"]
    for variant in variants:
        if variant == "compiled" and ctx.dry:
            numbers["compiled"] = "skipped: no CUDA"
            continue
        for batch in (15, 8) if not ctx.dry else (2,):
            try:
                numbers.update(time_gpt2_small(ctx, variant, batch))
                break
            except torch.cuda.OutOfMemoryError:
                numbers[f"{variant} OOM at batch"] = batch
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
    if any("OOM" in k for k in numbers) and not any(k.endswith("tokens/s") for k in numbers):
        raise Failed("out of memory at batch 15 and 8", numbers)
    return numbers


def time_gpt2_small(ctx: Ctx, variant: str, batch: int) -> dict:
    """ms per micro-batch (forward + backward) and the peak memory of GPT-2 small with MARS's state."""
    import torch

    from mars_ref import MARS
    from mars_ref.gpt.model import GPT, preset

    cuda = ctx.device == "cuda"
    shape = dict(n_layer=1, n_head=2, n_embd=64, block_size=64) if ctx.dry else {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    raw = GPT(preset("gpt2-small", **shape)).to(ctx.device)
    model = torch.compile(raw) if variant == "compiled" else raw
    opt = MARS(raw.parameters(), lr=6e-3, foreach=True)
    block = raw.config.block_size
    x = torch.randint(0, VOCAB, (batch, block), device=ctx.device)
    y = torch.randint(0, VOCAB, (batch, block), device=ctx.device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu",
                                                                                                     enabled=False)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def micro():
        with autocast:
            _, loss = model(x, y)
        loss.backward()

    for _ in range(2 if ctx.dry else 3):  # warm-up (compilation), and one optimizer step: the state exists
        micro()
    opt.step()
    sync()
    n = 2 if ctx.dry else 10
    t0 = time.perf_counter()
    for _ in range(n):
        micro()
    sync()
    ms = (time.perf_counter() - t0) / n * 1e3
    step_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    out = {f"{variant} ms/micro-batch": ms, f"{variant} tokens/s": batch * block / ms * 1e3}
    if variant == "eager":
        out["params M"] = raw.num_params() / 1e6
        out["optimizer step ms (eager foreach)"] = statistics.median(step_ms)
    if cuda:
        out[f"{variant} peak GB"] = torch.cuda.max_memory_allocated() / 2**30
    out[f"{variant} batch"] = f"{batch}x{block}"
    return out


# ----------------------------------------------------------------------------- the trainer, through its CLI


# Runs the trainer's command line as ``python -m mars_ref.gpt.train`` does, and at exit writes the process's peak
# CUDA memory and peak resident memory to $MARS_REF_GPU_CHECK_STATS.
TRAINER = r"""
import atexit, json, os, resource, runpy, sys
def _stats():
    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    with open(os.environ["MARS_REF_GPU_CHECK_STATS"], "w") as f:
        json.dump(out, f)
atexit.register(_stats)
sys.argv[0] = "mars_ref.gpt.train"
runpy.run_module("mars_ref.gpt.train", run_name="__main__", alter_sys=True)
"""
# Flags the checks can do without: if the trainer does not know one, it is left out and the run retried.
OPTIONAL_FLAGS = {"--sample-tokens", "--log-interval", "--eval-iters", "--ckpt-interval", "--seed",
                  "--lr-decay-iters", "--warmup-iters"}


@dataclass
class TrainerRun:
    returncode: int
    out_dir: Path
    stderr: str
    stdout: str
    seconds: float
    records: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    interrupted: bool = False
    flags: dict = field(default_factory=dict)
    name: str = ""
    options: dict = field(default_factory=dict)

    def train(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "train"]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r.get("train_loss") for r in self.train() if "step" in r}

    def tail(self, n: int = 3) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return " | ".join(lines[-n:])[-400:]


def trainer_env(ctx: Ctx, **extra) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **extra}
    if ctx.dry:  # tiny models on a shared CPU: one thread is far faster than two contending ones
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def flags_list(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(k)
        elif v is not None and v is not False:
            out += [k, str(v)]
    return out


def run_trainer(ctx: Ctx, name: str, flags: dict, **kw) -> TrainerRun:
    """``python -m mars_ref.gpt.train FLAGS`` with ``--out-dir`` in the scratch directory (see ``run_trainers``)."""
    return run_trainers(ctx, [(name, flags, kw)])[0]


def run_trainers(ctx: Ctx, jobs: list[tuple[str, dict, dict]]) -> list[TrainerRun]:
    """Trainer runs side by side, each ``(name, flags, options)``; options: ``prefix`` (a launcher before ``-m
    mars_ref.gpt.train``, e.g. torchrun), ``env``, ``interrupt_at`` (send SIGINT once metrics.jsonl has a train
    record of that step or later), ``fresh`` (False: keep the run directory, to resume). A flag of
    ``OPTIONAL_FLAGS`` the trainer does not know is dropped (and noted) and that run retried once."""
    _free_cuda_cache()  # what this process's earlier parts left cached is the trainers' to use
    runs = []
    for name, flags, kw in jobs:
        out_dir = ctx.workdir / "runs" / name
        if kw.get("fresh", True) and out_dir.exists():
            shutil.rmtree(out_dir)
        runs.append(TrainerRun(-1, out_dir, "", "", 0.0, flags={**flags, "--out-dir": str(out_dir)}, name=name,
                               options=kw))
    pending = runs
    for _ in range(2):
        _wait(ctx, [_start(ctx, run) for run in pending])
        retry = []
        for run in pending:
            unknown = re.findall(r"--[\w-]+", "".join(re.findall(r"unrecognized arguments:(.*)", run.stderr)))
            if run.returncode != 2 or not unknown:
                continue
            required = [f for f in unknown if f not in OPTIONAL_FLAGS]
            if required:
                raise Failed(f"the trainer does not know {', '.join(required)} (python -m mars_ref.gpt.train --help)")
            run.dropped += unknown
            run.flags = {k: v for k, v in run.flags.items() if k not in unknown}
            retry.append(run)
        pending = retry
    return runs


def _free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def _start(ctx: Ctx, run: TrainerRun):
    logs = ctx.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run.stats_path = logs / f"{run.name}.stats.json"
    run.stats_path.unlink(missing_ok=True)
    prefix = run.options.get("prefix")
    if prefix is None:
        cmd = [sys.executable, "-c", TRAINER, *flags_list(run.flags)]
    else:
        cmd = [*prefix, "-m", "mars_ref.gpt.train", *flags_list(run.flags)]
    env = trainer_env(ctx, MARS_REF_GPU_CHECK_STATS=str(run.stats_path), **run.options.get("env", {}))
    run.logs = (open(logs / f"{run.name}.out", "w+"), open(logs / f"{run.name}.err", "w+"))
    run.t0 = time.perf_counter()
    # SIGINT at its default in the child, even when this process runs with it ignored
    # (and in a session of its own: on a timeout its whole process group, torchrun's workers included, is stopped)
    run.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=run.logs[0], stderr=run.logs[1],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                start_new_session=True)
    run.interrupted = False
    return run


def _stop(proc: subprocess.Popen) -> None:
    """Wait for a child started by ``_start``; if it still runs, SIGTERM its process group (torchrun's workers get
    the chance to checkpoint), then SIGKILL it after 15 s."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    proc.wait()


def _wait(ctx: Ctx, runs: list[TrainerRun]) -> None:
    deadline = time.perf_counter() + ctx.time_left()
    try:
        while any(r.proc.poll() is None for r in runs):
            if time.perf_counter() > deadline:
                raise Failed(f"the trainer ({', '.join(r.name for r in runs)}) ran past the part's time and "
                             f"is stopped (logs in {ctx.workdir / 'logs'})")
            for r in runs:
                at = r.options.get("interrupt_at")
                if at is not None and not r.interrupted and r.proc.poll() is None and any(
                        x.get("step", 0) >= at for x in read_records(r.out_dir) if x.get("kind") == "train"):
                    r.proc.send_signal(signal.SIGINT)
                    r.interrupted = True
            time.sleep(0.02)
    finally:
        for r in runs:
            _stop(r.proc)
            r.returncode, r.seconds = r.proc.returncode, time.perf_counter() - r.t0
            for f in r.logs:
                f.seek(0)
            r.stdout, r.stderr = r.logs[0].read(), r.logs[1].read()
            for f in r.logs:
                f.close()
            r.records = read_records(r.out_dir)
            r.stats = json.loads(r.stats_path.read_text()) if r.stats_path.exists() else {}


def read_records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    return records


def lab_flags(ctx: Ctx, steps: int, impl: str = "foreach", **extra) -> dict:
    """The gpu-lab run's flags: every run of the same prefix of steps follows the same schedule and batches."""
    flags = {"--preset": "gpu-lab", "--dataset": CORPUS, "--data-dir": ctx.data_dir(), "--device": ctx.device,
             "--step-impl": impl, "--max-iters": steps, "--lr-decay-iters": ctx.lab_steps,
             "--warmup-iters": 2 if ctx.dry else 20, "--log-interval": ctx.log_interval,
             "--eval-interval": ctx.lab_steps, "--eval-iters": 2 if ctx.dry else 10, "--ckpt-interval": 0,
             "--sample-tokens": 0, "--seed": 1337}
    if ctx.dry:
        flags.update({"--n-layer": 1, "--n-head": 2, "--n-embd": 32, "--block-size": 32, "--batch-size": 2})
    flags.update(extra)
    return flags


def throughput(run: TrainerRun) -> dict:
    """tokens/s between the first and the last train record (the first window holds start-up and compilation),
    the peak memory, the last loss."""
    train = [r for r in run.train() if "tokens" in r and "time" in r]
    out = {}
    if len(train) >= 2 and train[-1]["time"] > train[0]["time"]:
        out["tokens/s"] = (train[-1]["tokens"] - train[0]["tokens"]) / (train[-1]["time"] - train[0]["time"])
    if train:
        out["last loss"] = train[-1].get("train_loss")
    if "peak_cuda_bytes" in run.stats:
        out["peak GB"] = run.stats["peak_cuda_bytes"] / 2**30
    elif "max_rss_bytes" in run.stats:
        out["peak RSS MB"] = run.stats["max_rss_bytes"] / MB
    if run.dropped:
        out["flags dropped"] = " ".join(run.dropped)
    return out


def check_finished(run: TrainerRun, steps: int, what: str) -> None:
    if run.returncode != 0:
        raise Failed(f"{what}: exit status {run.returncode}: {run.tail()}")
    losses = run.losses()
    if not losses or max(losses) != steps:
        raise Failed(f"{what}: metrics.jsonl ends at step {max(losses) if losses else None}, not {steps}")
    if not all(v is not None and math.isfinite(v) for v in losses.values()):
        raise Failed(f"{what}: a training loss is not finite: {losses}")


def part_trainer_gpu_lab(ctx: Ctx) -> dict:
    run = run_trainer(ctx, "gpu-lab", lab_flags(ctx, ctx.lab_steps))
    check_finished(run, ctx.lab_steps, "--preset gpu-lab")
    ctx.shared["lab"] = run
    losses = run.losses()
    numbers = {"steps": ctx.lab_steps, "first loss": losses[min(losses)], **throughput(run),
               "seconds in trainer": run.seconds}
    if not losses[max(losses)] < losses[min(losses)]:
        raise Failed("the training loss did not fall", numbers)
    return numbers


def part_trainer_step_impls(ctx: Ctx) -> dict:
    lab = ctx.shared.get("lab")
    n = ctx.short_steps
    numbers = {"steps": n}
    tol = LOSS_TOL[ctx.device]
    readable, exact = run_trainers(ctx, [("readable", lab_flags(ctx, n, impl="readable"), {}),
                                         ("exact", lab_flags(ctx, n, impl="foreach", **{"--exact": True}), {})])
    check_finished(readable, n, "--step-impl readable")
    check_finished(exact, n, "--exact")
    evals = exact.train()[-1].get("grad_evals")
    numbers.update({"exact last loss": exact.train()[-1]["train_loss"], "exact grad evals": evals})
    if evals is not None and evals != 2 * n - 1:
        raise Failed(f"--exact counted {evals} gradient evaluations in {n} steps, not {2 * n - 1}", numbers)
    if lab is None:
        numbers["readable vs foreach"] = "no foreach run (trainer-gpu-lab did not run)"
        return numbers
    ours, theirs = readable.losses(), lab.losses()
    common = [s for s in ours if s in theirs]
    diff = max(abs(ours[s] - theirs[s]) for s in common)
    numbers["readable vs foreach Δloss max"] = diff
    if diff > tol:
        raise Failed(f"readable and foreach runs differ by {diff:.3g} in the loss over {len(common)} logged steps "
                     f"(tolerance {tol})", numbers)
    return numbers


def part_trainer_fused_refused(ctx: Ctx) -> dict:
    ctx.need_cuda("--step-impl fused is valid on the CPU")
    run = run_trainer(ctx, "fused", lab_flags(ctx, 5, impl="fused", **{"--optimizer": "mars-adamw"}))
    numbers = {"exit status": run.returncode, "train records": len(run.train())}
    if run.returncode == 0:
        raise Failed("--step-impl fused trained on CUDA (the fused step is a CPU kernel)", numbers)
    if run.train() or run.returncode != 2 or "fused" not in run.stderr:
        raise Failed("--step-impl fused on CUDA is not refused before training with a message and exit status 2: "
                     + run.tail(), numbers)
    return numbers


def part_trainer_gpt2_small(ctx: Ctx) -> dict:
    flags = {"--preset": "gpt2-small", "--dataset": CORPUS, "--data-dir": ctx.data_dir(), "--device": ctx.device,
             "--step-impl": "foreach", "--max-iters": 3, "--warmup-iters": 1, "--log-interval": 1,
             "--eval-interval": 3, "--eval-iters": 2, "--ckpt-interval": 0, "--sample-tokens": 0}
    batches = [(15, 32), (8, 60)]  # 480 sequences per step; the second if the first runs out of memory
    if ctx.dry:
        flags.update({"--n-layer": 1, "--n-head": 2, "--n-embd": 32, "--block-size": 32})
        batches = [(2, 4)]
    numbers = {}
    for batch, accum in batches:
        run = run_trainer(ctx, "gpt2-small", {**flags, "--batch-size": batch, "--grad-accum": accum})
        numbers["batch"] = f"{batch}x{accum}"
        if "out of memory" not in run.stderr.lower():
            break
    check_finished(run, 3, "--preset gpt2-small")
    ckpt = run.out_dir / "ckpt.pt"
    numbers.update(throughput(run))
    numbers["ckpt GB"] = ckpt.stat().st_size / 2**30 if ckpt.exists() else 0.0
    numbers["tokens/step"] = run.train()[-1]["tokens"] // run.train()[-1]["step"]
    shutil.rmtree(run.out_dir, ignore_errors=True)  # ~2 GB
    return numbers


def part_trainer_sigint_resume(ctx: Ctx) -> dict:
    flags = lab_flags(ctx, ctx.lab_steps)
    first = run_trainer(ctx, "sigint", flags, interrupt_at=ctx.log_interval)
    if first.returncode == 0:  # all steps done before the signal landed (a busy machine, a fast GPU): once more
        first = run_trainer(ctx, "sigint", flags, interrupt_at=ctx.log_interval)
    numbers = {"exit status after SIGINT": first.returncode}
    if first.returncode != 128 + signal.SIGINT:
        raise Failed(f"SIGINT: exit status {first.returncode}, not 130 (finished before the signal: "
                     f"{first.returncode == 0}): {first.tail()}", numbers)
    stopped = max(first.losses(), default=0)
    ckpt = first.out_dir / "ckpt.pt"
    if not ckpt.exists():
        raise Failed("SIGINT: no checkpoint written", numbers)
    numbers["stopped after step"] = stopped
    resumed = run_trainer(ctx, "sigint", {**flags, "--resume": True}, fresh=False)
    check_finished(resumed, ctx.lab_steps, "--resume")
    lab = ctx.shared.get("lab")
    if lab is not None:
        diff = abs(resumed.losses()[ctx.lab_steps] - lab.losses()[ctx.lab_steps])
        numbers["final Δloss vs uninterrupted"] = diff
        if diff > LOSS_TOL[ctx.device]:
            raise Failed(f"the resumed run ends {diff:.3g} away from the uninterrupted one "
                         f"(tolerance {LOSS_TOL[ctx.device]})", numbers)
    return numbers


def part_trainer_compile(ctx: Ctx) -> dict:
    ctx.need_cuda("compiling on the CPU takes minutes")
    steps = 2 * ctx.short_steps
    run = run_trainer(ctx, "compile", lab_flags(ctx, steps, **{"--compile": True}),
                      env={"TORCH_LOGS": "recompiles"})
    check_finished(run, steps, "--compile")
    recompiled = re.findall(r"Recompiling function (\S+)", run.stderr)
    numbers = {"steps": steps, "recompilations": len(recompiled), **throughput(run), "seconds in trainer": run.seconds}
    if recompiled:
        numbers["recompiled"] = " ".join(sorted(set(recompiled)))
    reasons = sorted(set(re.findall(r"guard failure\(s\):\s*\n[^\n]*?- (.*)", run.stderr)))
    if reasons:
        numbers["first guard failures"] = "; ".join(r.strip()[:80] for r in reasons[:2])
    limit = re.search(r"(cache_size_limit|recompile_limit)", run.stderr)
    if len(recompiled) > MAX_RECOMPILES or limit:
        raise Failed(f"{len(recompiled)} recompilations in {steps} steps (at most {MAX_RECOMPILES} expected)"
                     + (f"; dynamo's {limit.group(1)} reached: a function falls back to eager" if limit else ""),
                     numbers)
    return numbers


def part_torchrun(ctx: Ctx) -> dict:
    ctx.need_cuda()
    if ctx.n_gpus < 2:
        raise Skip("needs-2-gpus", f"{ctx.n_gpus} GPU present")
    steps = ctx.short_steps
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = run_trainer(ctx, "torchrun", lab_flags(ctx, steps, **{"--grad-accum": 2}), prefix=prefix)
    check_finished(run, steps, "torchrun, 2 processes")
    return {"steps": steps, **throughput(run)}


PARTS = [
    Part("environment", 5, 5, part_environment),
    Part("cuda-tests", 45, 2, None),  # set below: it needs the argument parser's pytest options
    Part("step-equivalence", 90, 10, part_step_equivalence),
    Part("compiled-step-graphs", 45, 10, part_compiled_step_graphs),
    Part("bf16-autocast", 15, 10, part_bf16_autocast),
    Part("gpt2-small-throughput", 140, 15, part_gpt2_small_throughput),
    Part("trainer-gpu-lab", 45, 20, part_trainer_gpu_lab),
    Part("trainer-step-impls", 45, 25, part_trainer_step_impls),
    Part("trainer-fused-refused", 15, 10, part_trainer_fused_refused),
    Part("trainer-gpt2-small", 75, 15, part_trainer_gpt2_small),
    Part("trainer-sigint-resume", 45, 25, part_trainer_sigint_resume),
    Part("trainer-compile", 120, 10, part_trainer_compile),
    Part("torchrun-2gpu", 60, 10, part_torchrun),
]
PART_NAMES = [p.name for p in PARTS]
TEST_FILES = ["tests/test_optimizer.py", "tests/test_foreach.py", "tests/test_fused.py"]


def cuda_test_command() -> tuple[list[str], dict]:
    """The pytest command of the CUDA cases and its environment: MARS_REF_TEST_CUDA=1 asks the repository's
    conftest.py to leave CUDA visible to the tests."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TEST_FILES, "-k", "cuda"]
    return cmd, {**os.environ, "MARS_REF_TEST_CUDA": "1"}


def part_cuda_tests(ctx: Ctx) -> dict:
    """The CUDA test cases in a subprocess, with CUDA visible to them."""
    cmd, env = cuda_test_command()
    ctx.need_cuda("MARS_REF_TEST_CUDA=1 " + " ".join(["pytest", *cmd[3:]]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.time_left())
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    numbers = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped")}
    if proc.returncode != 0 or numbers["failed"] or counts.get("error") or counts.get("errors"):
        raise Failed(f"pytest exit status {proc.returncode}: {summary or proc.stderr.strip()[-300:]}", numbers)
    if numbers["skipped"] or not numbers["passed"]:
        reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)))
        raise Failed("CUDA cases were skipped with a GPU present (conftest.py must keep CUDA visible when "
                     f"MARS_REF_TEST_CUDA=1 is set): {'; '.join(reasons)}", numbers)
    return numbers


PARTS[1].run = part_cuda_tests


# ----------------------------------------------------------------------------- the table and the files


def table(outcomes: list[Outcome]) -> str:
    rows = ["| part | status | numbers | s |", "|---|---|---|---|"]
    for o in outcomes:
        text = numbers_text(o.numbers)
        if o.status != "ok" and o.detail:
            text = f"{text}; {o.detail}" if text else o.detail
        rows.append(f"| {o.part} | {status_text(o)} | {text.replace('|', '/')} | {o.seconds:.1f} |")
    return "\n".join(rows)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(env: dict, dry: bool) -> Path:
    name = slug(env.get("gpu_name", "no-cuda")) if env.get("cuda_available") else "no-cuda"
    date = datetime.date.today().isoformat()
    return RESULTS / f"gpu_check_{name}_{date}{'_dry-run' if dry else ''}.md"


def write_results(out: Path, env: dict, outcomes: list[Outcome], meta: dict) -> tuple[Path, Path]:
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    head = [f"# gpu_check: {env.get('gpu_name', 'no CUDA')} ({meta['mode']})", "",
            f"`python scripts/gpu_check.py {' '.join(meta['argv'])}`, {meta['date']}, {meta['seconds']:.0f} s of a "
            f"{meta['total_budget']:.0f} s budget.", "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    if meta["mode"] == "dry run":
        head += ["A dry run on the CPU at toy size: it checks this script's plumbing, not a GPU.", ""]
    md.write_text("\n".join(head) + table(outcomes) + "\n")
    js.write_text(json.dumps({**meta, "environment": env, "parts": [asdict(o) for o in outcomes]}, indent=2,
                             default=str) + "\n")
    return md, js


# ----------------------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run every part's plumbing on the CPU at toy size (automatic without CUDA)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET,
                    help=f"total seconds; a part that would run past it is skipped (default {TOTAL_BUDGET:.0f})")
    ap.add_argument("--out", type=Path, help="results file (.md; the .json beside it); default "
                                             "benchmarks/results/gpu_check_<gpu-name>_<date>.md")
    ap.add_argument("--only", help="comma-separated parts to run (the others are listed as skipped)")
    ap.add_argument("--skip", help="comma-separated parts not to run")
    ap.add_argument("--workdir", type=Path, help="scratch directory for the corpus, runs and logs (default: a new "
                                                 "temporary directory, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--list", action="store_true", help="list the parts with their budgets and exit")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.budget) and args.budget > 0):
        ap.error(f"--budget {args.budget:g}: give a positive number of seconds (the default is {TOTAL_BUDGET:.0f})")
    for opt in ("only", "skip"):
        value = getattr(args, opt)
        if value is not None:
            names = [n.strip() for n in value.split(",") if n.strip()]
            unknown = [n for n in names if n not in PART_NAMES]
            if unknown or not names:
                ap.error(f"--{opt} {value!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; the parts are "
                         + ", ".join(PART_NAMES))
            setattr(args, opt, set(names))
    if args.out is not None and args.out.exists() and args.out.is_dir():
        ap.error(f"--out {args.out} is a directory: give a file name (its .md and .json are written)")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        ap.error(f"--workdir {args.workdir} is a file: give a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for p in PARTS:
            print(f"{p.name:24} {p.budget:5.0f} s on a GPU, {p.dry_budget:4.0f} s in the dry run")
        print(f"{'total':24} {sum(p.budget for p in PARTS):5.0f} s (budget {args.budget:.0f} s)")
        return 0
    import torch

    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    if not cuda:
        print(f"no CUDA: torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda or 'none'}). Running "
              "the dry run on the CPU at toy size; it verifies no GPU path.")
    elif dry:
        print("--dry-run: every part on the CPU at toy size (the GPU is not used)")
    if dry:
        torch.set_num_threads(1)
    selected = set(PART_NAMES) if args.only is None else args.only
    selected -= args.skip or set()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mars_ref_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(dry, workdir, torch.cuda.device_count() if cuda else 0)
    t0 = time.perf_counter()
    try:
        outcomes = run_parts(PARTS, ctx, args.budget, selected)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    env = ctx.shared.get("env") or environment()
    meta = {"mode": "dry run" if dry else "GPU", "argv": sys.argv[1:] if argv is None else argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1), "total_budget": args.budget}
    md, js = write_results(args.out or default_out(env, dry), env, outcomes, meta)
    print()
    print(table(outcomes))
    print(f"\n{meta['mode']}{'' if cuda else ' (no CUDA here: nothing above ran on a GPU)'}: {meta['seconds']:.0f} s; "
          f"written to {md} and {js}")
    if args.keep or args.workdir:
        print(f"scratch directory (logs, runs): {workdir}")
    return 1 if any(o.status == "fail" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
