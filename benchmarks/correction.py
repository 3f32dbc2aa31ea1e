"""Does the correction pay off? MARS's recipe and its variance reduction, measured apart.

    python benchmarks/correction.py --workers 2    # run what is missing (resumable; cached like the study)
    python benchmarks/correction.py --status       # runs done and missing, by part
    python benchmarks/correction.py --report       # tables, figures and summary JSON from the caches only

``MARS-AdamW − AdamW`` (the study, ``benchmarks/study.py``) compares two recipes that differ in more than the
correction: betas (0.95, 0.99) against (0.9, 0.95), weight decay 0.01 against 0.1 on the 2-D tensors, the 1-D
tensors (MARS: an AdamW fallback at lr_1d = lr/2 with decay 0.1; AdamW: decay 0 at the full lr), a per-tensor clip
of c_t at norm 1 on top of the global gradient clip both share, and each its own tuned lr. This script splits the
gap into two steps, at the same lr and on the same seeds:

    AdamW  →  MARS at γ = 0 (the recipe, no correction)  →  MARS at γ = 0.025 (the recipe + the correction)

Design, fixed before any run of it
----------------------------------
* **Points.** The study's model M (2 × 64, 108,096 parameters) at 20, 80, 160 tokens/parameter (batch 32) and at
  batch 8 and 128 (80 tokens/parameter), and ``T``: cpu-tiny (4 × 128, 814,720 parameters) at the full
  reproduction's 900 steps of 16 × 128 (``benchmarks/reproduce.py``'s full mode).
* **Held-out lr.** Each learning rate is chosen on seed 0 and seed 0 is never in an estimate: the study's seed-0
  grid (×{1/4, 1/2, 1, 2} of the base, widened at an edge) for M, the full reproduction's seed-0 grid
  (×{1/4, …, 4}) for T. AdamW runs at AdamW's choice, both MARS arms at MARS-AdamW's (γ = 0.025) choice: the
  primary estimand compares γ = 0 and γ = 0.025 at one lr.
* **Seeds 1–5** (five paired replicates). A seed fixes the initial weights, the training batches and the
  validation batches, so arms on one seed differ only in the optimizer.
* **Primary estimand**: final validation loss of γ = 0.025 minus γ = 0, same lr, same seed, at each of the 6
  points. Secondary: the same at the best validation loss of a run and at the evaluation nearest half of the
  steps (the mid-run fraction, fixed in advance at 1/2); the recipe step (γ = 0 − AdamW) and the whole gap.
* **Intervals**: the mean of the 5 paired differences with its two-sided 95% t interval (t(0.975, 4) = 2.776).
  Across the 6 points, Holm's step-down correction of the paired-t p-values (family-wise error 5%), and
  simultaneous Bonferroni intervals (t(1 − 0.025/6, 4)). Pooled: the mean over the points' means with a t
  interval over points (the points as replicates), and a sign test of the points' means.
* **The recipe, piece by piece** (middle point M-80-b32, AdamW's lr, seeds 1–5): AdamW with MARS's betas, then
  also MARS's 2-D weight decay. What stays between that and γ = 0 is the 1-D handling, the per-tensor clip and
  the lr (the trainer offers no switch for the first two).
* **γ × lr** (middle point): γ ∈ {0, 0.025, 0.1} at ×{1/4, 1/2, 1, 2, 4} of MARS's base lr, seeds 0, 1, 2 (no lr
  is chosen here, so seed 0 is in): does the correction widen the range of stable learning rates?
* **Schedule control** (M at 80 and 160 tokens/parameter): AdamW and both MARS arms with warmup-stable-decay
  (``--schedule wsd``: the peak lr until the last 20% of the steps after the warm-up, then linear to min_lr) at
  the lrs chosen under the cosine, seeds 1–3: the gaps just before the decay (the evaluation at 80% of the
  steps) and at the end.
* **γ = 0 at its own lr** (not fixed in advance, so exploratory: chosen after the primary results showed γ = 0 at
  MARS's lr staying on the early plateau on most seeds at T and at M-t1-b32): γ = 0's own seed-0 grid ×{1/4, …, 4}
  of MARS's base, its best rerun on seeds 1–5; the correction again with each arm at its own lr.
* **β2's half-life in tokens** (batch 8 and 128): AdamW and both MARS arms with β2 set so that its half-life in
  tokens is the one at batch 32 (β2' = β2^(B/32), as Marek et al. 2025 hold it), at the lr chosen with the
  default β2, seeds 1–3 (as the schedule control: the budget).

Every run is ``mars_ref.gpt.train`` as the study runs it (``study.run_job``: one torch thread, float32, the readable
step) and is cached under the SHA-256 of its fully resolved config in ``benchmarks/results/correction/``; runs that
the study already made (same config, same key) are read from ``benchmarks/results/study/``. A kill loses only the
runs in flight; the same command goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(1, str(p))

import study as S  # noqa: E402  the study's runner, cache and statistics: one definition of each

HELD_OUT_SEED = 0
SEEDS = [1, 2, 3, 4, 5]
GAMMA = S.RECIPE_GAMMA  # 0.025
MID_FRACTION = 0.5  # the mid-run evaluation: the one nearest this fraction of the steps, fixed in advance
M_POINTS = [("M", 1, 32), ("M", 4, 32), ("M", 8, 32), ("M", 4, 8), ("M", 4, 128)]
MIDDLE = ("M", 4, 32)
T_POINT = "T-900-b16"
# the full reproduction's run shape (benchmarks/reproduce.py MODES["full"]), lr bases as there
T_SHAPE = dict(preset="cpu-tiny", max_iters=900, warmup_iters=50, eval_interval=50, eval_iters=20)
T_BASE_LR = {"adamw": (6e-3, 6e-3, 6e-5), "mars-adamw": (1e-2, 5e-3, 1e-4)}
GAMMA_LR_FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]
GAMMA_LR_GAMMAS = [0.0, GAMMA, 0.1]
GAMMA_LR_SEEDS = [0, 1, 2]
MARS_BETAS, ADAMW_BETAS = (0.95, 0.99), (0.9, 0.95)
SCHEDULE_POINTS = [("M", 4, 32), ("M", 8, 32)]
SCHEDULE_SEEDS = [1, 2, 3]
BETA2_SEEDS = [1, 2, 3]
WSD = (("decay_frac", 0.2), ("schedule", "wsd"))
OWN_LR_POINTS = [("M", 1, 32), None]  # None: T. Where γ = 0 at MARS's lr stays on the plateau on most seeds
OWN_LR_FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]
MARS_WD = 0.01

#: the arms: (label, the study variant whose lr it takes, γ or None, extra TrainConfig fields)
ARMS = {
    "adamw": ("AdamW", "adamw", None, {}),
    "recipe": ("MARS recipe, γ = 0", "mars-adamw", 0.0, {}),
    "mars": (f"MARS-AdamW, γ = {GAMMA:g}", "mars-adamw", GAMMA, {}),
    "adamw+betas": ("AdamW + MARS's betas", "adamw", None, {"beta1": MARS_BETAS[0], "beta2": MARS_BETAS[1]}),
    "adamw+betas+wd": ("AdamW + MARS's betas and 2-D decay", "adamw", None,
                       {"beta1": MARS_BETAS[0], "beta2": MARS_BETAS[1], "weight_decay": MARS_WD}),
}


def gamma_arm(gamma: float) -> str:
    """The arm of MARS-AdamW at ``gamma`` (γ = 0 is the recipe arm, γ = 0.025 the MARS arm)."""
    return "recipe" if gamma == 0 else "mars" if gamma == GAMMA else f"g{gamma:g}"


for _g in GAMMA_LR_GAMMAS:
    ARMS.setdefault(gamma_arm(_g), (f"MARS-AdamW, γ = {_g:g}", "mars-adamw", _g, {}))


@dataclass(frozen=True)
class Run:
    """One training run of this study: a part, a point, an arm, an lr factor, a seed and extra config fields."""

    part: str  # "tune", "primary", "recipe", "beta2", "schedule", "gamma-lr", "own-lr"
    point: str
    arm: str
    factor: float
    seed: int
    overrides: tuple = ()  # sorted (field, value) pairs

    @property
    def name(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.overrides)
        return f"{self.part}/{self.point}/{self.arm}{extra} lr×{self.factor:g} seed {self.seed}"


@dataclass
class Plan:
    """Every run the design asks for that can be named now (an lr must be chosen first), and what blocks the rest."""

    runs: list[Run] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # what must finish before more runs can be named
    factors: dict = field(default_factory=dict)  # (point, study variant) -> the lr factor chosen on seed 0


# ----------------------------------------------------------------------------- the runs


class Correction:
    """The design above on the study's machinery: jobs, keys, cache."""

    def __init__(self, data_dir: str | Path, study_cache: Path, reproduce_results: Path):
        with contextlib.redirect_stdout(io.StringIO()):
            self.study = S.Study(S.MODES["full"], data_dir)
        self.data_dir = self.study.data_dir
        self.data_id = self.study.data_id
        self.study_cache_dir = study_cache
        self.reproduce_results = reproduce_results
        self._jobs: dict[Run, S.Job] = {}
        self.calibration: dict = {}

    # which lr -------------------------------------------------------------------------------------------
    def chosen_factor(self, point: str, base: str, cache: dict) -> tuple[float | None, list[S.Job]]:
        """The lr factor chosen on the held-out seed 0 for the study variant ``base`` at ``point``, or None and the
        seed-0 runs still needed to choose it."""
        if point == T_POINT:
            return self._t_factor(base), []
        size, tpp, batch = _parse_point(point)
        st = self.study.state(S.Cell(size, float(tpp), int(batch), base), cache)
        if st.best is not None:
            return st.best, []
        return None, [j for j in st.ready if j.seed == HELD_OUT_SEED]

    def _t_factor(self, base: str) -> float:
        """T's factor: the lowest final validation loss of seed 0 in the full reproduction's grid."""
        try:
            runs = json.loads(self.reproduce_results.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: cannot read the full reproduction's grid from {self.reproduce_results} "
                             f"({type(e).__name__}: {e}); it chooses T's learning rates") from None
        grid = [r for r in runs if isinstance(r, dict) and r.get("key") == base and r.get("seed") == HELD_OUT_SEED
                and r.get("phase") == "tune"]
        if not grid:
            raise SystemExit(f"error: {self.reproduce_results} has no seed-0 grid for {base!r}")
        return min(grid, key=lambda r: (_loss(r.get("final_val_loss")), r["factor"]))["factor"]

    # jobs -----------------------------------------------------------------------------------------------
    def job(self, run: Run) -> S.Job:
        if run in self._jobs:
            return self._jobs[run]
        label, base, gamma, extra = ARMS[run.arm]
        over = dict(run.overrides)
        if run.point == T_POINT:
            lr, lr_1d, min_lr = (S._round(x * run.factor) for x in T_BASE_LR[base])
            kwargs = dict(**T_SHAPE, dataset="shakespeare", optimizer=base, exact=False, step_impl="readable",
                          log_interval=T_SHAPE["eval_interval"], ckpt_interval=0, sample_tokens=0, seed=run.seed,
                          lr=lr, min_lr=min_lr, lr_1d=lr_1d, gamma=gamma, device="cpu", dtype="float32")
            cell = S.Cell("T", 0.0, 16, run.arm)
            est = 150.0
        else:
            size, tpp, batch = _parse_point(run.point)
            variant = base if gamma is None else S.gamma_variant(gamma).key
            cell = S.Cell(size, float(tpp), int(batch), variant)
            kwargs = dict(self.study.job(cell, run.factor, run.seed).kwargs)
            est = self.study.estimate(cell)
        kwargs.update(extra)
        kwargs.update(over)
        job = S.Job(S.run_key(kwargs, self.data_id), S.Cell(cell.size, cell.tpp, cell.batch, run.arm), run.factor,
                    run.seed, kwargs, est)
        job.run = run  # what _spec and the report read back
        self._jobs[run] = job
        return job

    # the plan -------------------------------------------------------------------------------------------
    def plan_runs(self, cache: dict) -> Plan:
        """Every run of the design that can be named with the results in ``cache``, in priority order."""
        plan = Plan()
        points = [_point(*p) for p in M_POINTS] + [T_POINT]
        for point in points:
            for base in ("adamw", "mars-adamw"):
                f, tuning = self.chosen_factor(point, base, cache)
                if f is None:
                    plan.waiting.append(f"{point}/{base}: the seed-0 lr grid")
                    plan.runs.extend(Run("tune", point, "adamw" if base == "adamw" else
                                         ("mars" if base == "mars-adamw" else base), j.factor, j.seed)
                                     for j in tuning)
                else:
                    plan.factors[(point, base)] = f
        # 1. the primary pairs (γ = 0 and γ = 0.025 at MARS's lr), then AdamW at its own lr
        for arms in (("recipe", "mars"), ("adamw",)):
            for point in points:
                for arm in arms:
                    f = plan.factors.get((point, ARMS[arm][1]))
                    if f is not None:
                        plan.runs.extend(Run("primary", point, arm, f, s) for s in SEEDS)
        # 2. γ = 0 at its own lr (a seed-0 grid, then seeds 1–5 at its best), where it stalls at MARS's
        for p in OWN_LR_POINTS:
            point = T_POINT if p is None else _point(*p)
            grid = [Run("own-lr", point, "recipe", f, HELD_OUT_SEED) for f in OWN_LR_FACTORS]
            plan.runs.extend(grid)
            losses = {r.factor: _loss(cache[self.job(r).key]["result"].get("final_val_loss"))
                      for r in grid if self.job(r).key in cache}
            if len(losses) < len(grid):
                plan.waiting.append(f"{point}/γ = 0: its own seed-0 lr grid")
                continue
            f = min(losses, key=lambda k: (losses[k], k))
            plan.factors[(point, "recipe-own-lr")] = f
            plan.runs.extend(Run("own-lr", point, "recipe", f, s) for s in SEEDS)
        mid = _point(*MIDDLE)
        # 3. the recipe piece by piece at the middle point
        f = plan.factors.get((mid, "adamw"))
        if f is not None:
            plan.runs.extend(Run("recipe", mid, arm, f, s) for arm in ("adamw+betas", "adamw+betas+wd") for s in SEEDS)
        # 4. β2's half-life in tokens fixed at batch 32's
        for size, tpp, batch in M_POINTS:
            if batch == 32:
                continue
            point = _point(size, tpp, batch)
            for arm in ("adamw", "recipe", "mars"):
                f = plan.factors.get((point, ARMS[arm][1]))
                if f is None:
                    continue
                beta2 = (ADAMW_BETAS if arm == "adamw" else MARS_BETAS)[1] ** (batch / 32)
                plan.runs.extend(Run("beta2", point, arm, f, s, (("beta2", round(beta2, 6)),)) for s in BETA2_SEEDS)
        # 5. the schedule control: warmup-stable-decay at the cosine's lrs
        for size, tpp, batch in SCHEDULE_POINTS:
            point = _point(size, tpp, batch)
            for arm in ("adamw", "recipe", "mars"):
                f = plan.factors.get((point, ARMS[arm][1]))
                if f is not None:
                    plan.runs.extend(Run("schedule", point, arm, f, s, WSD) for s in SCHEDULE_SEEDS)
        # 6. γ × lr at the middle point
        for s in GAMMA_LR_SEEDS:  # seed by seed: every γ's whole curve on one seed before the next seed
            plan.runs.extend(Run("gamma-lr", mid, gamma_arm(g), f, s)
                             for g in GAMMA_LR_GAMMAS for f in GAMMA_LR_FACTORS)
        return plan

    # what study.run_study asks of a study -----------------------------------------------------------------
    def plan(self, cache: dict):
        merged = {**self._study_cache(), **cache}
        p = self.plan_runs(merged)
        ready: dict[str, S.Job] = {}
        for run in p.runs:
            j = self.job(run)
            if j.key not in merged:
                ready.setdefault(j.key, j)
        return list(ready.values()), p

    def calibrate(self, cache: dict) -> None:
        """The study's cost model as it is (the estimates only order nothing here)."""

    def _study_cache(self) -> dict:
        if not hasattr(self, "_study_cache_memo"):
            self._study_cache_memo = S.load_cache(self.study_cache_dir, warn=lambda m: None)
        return self._study_cache_memo


def _point(size: str, tpp: float, batch: int) -> str:
    return f"{size}-t{tpp:g}-b{batch}"


def _parse_point(point: str) -> tuple[str, float, int]:
    size, t, b = point.split("-")
    return size, float(t[1:]), int(b[1:])


def _loss(x) -> float:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.inf


def spec(job: S.Job) -> dict:
    r = job.run
    return {"part": r.part, "point": r.point, "arm": r.arm, "factor": r.factor, "seed": r.seed,
            "overrides": dict(r.overrides), "cell": f"{r.point}/{r.arm}", "variant": r.arm}


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print the runs done and missing, by part")
    what.add_argument("--report", action="store_true", help="write the tables, figures and summary from the caches")
    parser.add_argument("--workers", type=_positive, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--max-runs", type=_positive, help="stop after starting this many new runs (resume later)")
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "correction"),
                        help="this study's result cache (default benchmarks/results/correction)")
    parser.add_argument("--study-cache", default=str(ROOT / "benchmarks" / "results" / "study"),
                        help="the study's cache, read for the seed-0 grids and shared runs")
    parser.add_argument("--reproduce-results", default=str(ROOT / "benchmarks" / "results" / "reproduce_full.json"),
                        help="the full reproduction's results, read for T's seed-0 grid")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                        help="where the report goes (default benchmarks/results)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="prepared data sets (default data/)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    cache_dir = Path(args.cache)
    c = Correction(args.data_dir, Path(args.study_cache), Path(args.reproduce_results))
    if args.status:
        print(status_text(c, S.load_cache(cache_dir, warn=lambda m: None)))
        return 0
    if args.report:
        from correction_report import write_report

        paths = write_report(c, cache_dir, Path(args.results_dir))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    with S.cache_lock(cache_dir):
        print(status_text(c, S.load_cache(cache_dir, warn=lambda m: None)), flush=True)
        t0 = time.perf_counter()
        try:
            counts = S.run_study(c, cache_dir, args.workers, args.max_runs, spec_of=spec)
        except KeyboardInterrupt:
            return 130
        print(f"{counts['finished']} new runs in {time.perf_counter() - t0:.0f} s; {counts['failed']} failed")
    return 1 if counts["failed"] else 0


def status_text(c: Correction, cache: dict) -> str:
    ready, plan = c.plan(cache)
    merged = {**c._study_cache(), **cache}
    lines, by_part = [], {}
    for run in plan.runs:
        done = c.job(run).key in merged
        d = by_part.setdefault(run.part, [0, 0, 0.0])
        d[0 if done else 1] += 1
        if not done:
            d[2] += c.job(run).est_seconds
    for part, (done, missing, secs) in by_part.items():
        lines.append(f"{part:9s} {done:4d} done, {missing:4d} to run (~{secs / 3600:.1f} core-hours)")
    if plan.waiting:
        lines.append("waiting for: " + "; ".join(plan.waiting))
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {n}")
    return n


if __name__ == "__main__":
    sys.exit(main())
