"""A small-scale rerun of the paper's GPT-2 comparison (MARS vs AdamW, Lion, Muon), with equal tuning effort.

    python benchmarks/reproduce.py --quick            # 2 × 64 char-level GPT, 400 steps: ~10 min on 2 cores
    python benchmarks/reproduce.py --workers 2        # full: 4 × 128 (cpu-tiny), 900 steps, 5-point lr grid
    python benchmarks/reproduce.py --from-results benchmarks/results/reproduce_quick.json   # table + plot only

Protocol, the same for every optimizer (AdamW, Lion, Muon, MARS-AdamW approx, MARS-AdamW exact, MARS-Lion,
MARS-Shampoo), each trained in-process by ``mars_ref.gpt.train.train`` on character-level ``shakespeare``:

1. **Tune**: seed 0, a fixed token budget (``max_iters`` steps of the preset's batch), the learning rate of
   the ``mars_ref.gpt.train`` CPU recipe (pinned in ``BASE_LR``) times each factor of a small grid
   (quick ×{1/3, 1, 3}; full
   ×{1/4, 1/2, 1, 2, 4}). One knob per optimizer: the factor scales ``lr``, ``min_lr`` and ``lr_1d``
   (the AdamW fallback of MARS and Muon) together; every other setting is the recipe's.
2. **Seeds**: the factor with the lowest final validation loss on seed 0 is run again with seeds 1 and 2
   (seed 0 is reused), so each optimizer gets ``len(grid) + 2`` runs of the same length.
3. **Exact MARS at equal gradient evaluations**: exact MARS evaluates two gradients per step. It is
   compared at equal steps (rows above), and once more with half the steps (its own full warm-up + cosine
   schedule over ``max_iters // 2`` steps, best factor of step 1, not re-tuned, 3 seeds), which uses the
   same number of gradient evaluations as everyone else's full runs.

The seed sets both the initial weights and the data order (``mars_ref.gpt.train`` draws batches from
``(seed, step)``). Validation loss is the mean over the same ``eval_iters`` validation micro-batches at
every evaluation, so curves of different runs are measured on identical data.

Table columns: best lr (the factor in brackets); final validation loss, mean ± sample standard deviation
(ddof = 1) over the 3 seeds; steps (and gradient evaluations) until the *seed-mean* validation curve first
reaches AdamW's mean final validation loss (first evaluation at or below it; "—" if never; resolution
``eval_interval``); gradient evaluations of a whole run; wall-clock seconds of a run (training and
evaluations, mean over seeds; measured on a shared machine, see the results file's header).

Raw results (every run's validation curve, final loss, seconds) go to ``<results>/reproduce_<mode>.json``,
written after each run; rerunning the same command skips the runs already in it. ``--from-results`` redraws
the table (``.md``) and the figure (``.png``) from such a file without training.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # for study.py's interval, however this file was loaded
    sys.path.insert(0, str(ROOT / "benchmarks"))

from study import interval  # noqa: E402  one definition for both benchmark scripts

from mars_ref._io import write_atomic  # noqa: E402  the project's one atomic writer

# (key, label in tables, mars_ref.gpt.train optimizer, exact)
OPTIMIZERS = [
    ("adamw", "AdamW", "adamw", False),
    ("lion", "Lion", "lion", False),
    ("muon", "Muon", "muon", False),
    ("mars-adamw", "MARS-AdamW (approx)", "mars-adamw", False),
    ("mars-adamw-exact", "MARS-AdamW (exact)", "mars-adamw", True),
    ("mars-lion", "MARS-Lion", "mars-lion", False),
    ("mars-shampoo", "MARS-Shampoo", "mars-shampoo", False),
]
LABELS = {key: label for key, label, _, _ in OPTIMIZERS}
HALF_KEY = "mars-adamw-exact-half"
LABELS[HALF_KEY] = "MARS-AdamW (exact), ½ steps"
EXACT_KEY = "mars-adamw-exact"

# Centre of each lr grid: (lr, lr_1d, min_lr), the mars_ref.gpt.train CPU recipe (``OPTIM_RECIPES["cpu-tiny"]``),
# pinned here so that a later recipe change does not move the grid. Every other setting (betas, weight decay, γ,
# clipping) is the recipe's. Not shared with study.py's BASE_LR, whose Muon and MARS-Shampoo bases are these × 2:
# each table is what its experiment ran.
BASE_LR = {
    "adamw": (6e-3, 6e-3, 6e-5),
    "lion": (5e-4, 5e-4, 5e-6),
    "muon": (3e-2, 5e-3, 3e-4),
    "mars-adamw": (1e-2, 5e-3, 1e-4),
    "mars-adamw-exact": (1e-2, 5e-3, 1e-4),
    "mars-lion": (1e-3, 5e-3, 1e-5),
    "mars-shampoo": (3e-2, 5e-3, 3e-4),
}
BASE_LR[HALF_KEY] = BASE_LR[EXACT_KEY]

MODES = {
    # 2 layers × 64 (cpu-mini model: ~0.1M parameters + embeddings), 32 × 64 tokens per step.
    "quick": dict(preset="cpu-mini", max_iters=400, warmup_iters=20, eval_interval=25, eval_iters=10,
                  grid=[1 / 3, 1.0, 3.0], seeds=[0, 1, 2]),
    # 4 layers × 128 (cpu-tiny: 0.8M parameters), 16 × 128 tokens per step; not run in CI.
    "full": dict(preset="cpu-tiny", max_iters=900, warmup_iters=50, eval_interval=50, eval_iters=20,
                 grid=[1 / 4, 1 / 2, 1.0, 2.0, 4.0], seeds=[0, 1, 2]),
}


# ----------------------------------------------------------------------------- training


def run_one(key: str, factor: float, seed: int, settings: dict, runs_dir: Path, phase: str,
            max_iters: int | None = None) -> dict:
    """Train one run in-process and return its record (validation curve, final loss, seconds)."""
    from mars_ref.gpt.train import TrainConfig, TrainingError, train

    _, _, optimizer, exact = next(o for o in OPTIMIZERS if o[0] == (EXACT_KEY if key == HALF_KEY else key))
    steps = settings["max_iters"] if max_iters is None else max_iters
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"run_one: max_iters={steps!r}: must be an integer >= 1")
    out_dir = runs_dir / f"{key}-x{factor:.4g}-s{seed}"
    cfg = TrainConfig(preset=settings["preset"], optimizer=optimizer, exact=exact, seed=seed,
                      max_iters=steps, warmup_iters=settings["warmup_iters"],
                      eval_interval=settings["eval_interval"], eval_iters=settings["eval_iters"],
                      log_interval=settings["eval_interval"], ckpt_interval=0, sample_tokens=0,
                      data_dir=settings["data_dir"], out_dir=str(out_dir), device="cpu", overwrite=True,
                      **settings.get("train_overrides", {}))  # e.g. a smaller model or data set in tests
    lr, lr_1d, min_lr = BASE_LR[key]
    cfg = replace(cfg, lr=lr * factor, min_lr=min_lr * factor, lr_1d=lr_1d * factor)
    try:
        summary = train(cfg)
    except (FloatingPointError, TrainingError):  # the run diverged: its curve up to there, no final loss
        summary = {"val_loss": None, "seconds": None, "grad_evals": None}
    evals = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in evals if r.get("kind") == "eval" and r.get("val_loss") is not None]
    final = summary["val_loss"]
    return {"key": key, "label": LABELS[key], "optimizer": optimizer, "exact": exact, "phase": phase,
            "factor": factor, "lr": cfg.lr, "lr_1d": cfg.lr_1d, "min_lr": cfg.min_lr, "seed": seed,
            "max_iters": steps, "steps": [r["step"] for r in evals], "grad_evals": [r["grad_evals"] for r in evals],
            "val_loss": [r["val_loss"] if math.isfinite(r["val_loss"]) else None for r in evals],
            "time": [r["time"] for r in evals], "final_val_loss": final if final is not None and math.isfinite(final)
            else None, "seconds": summary["seconds"], "total_grad_evals": summary["grad_evals"]}


def same_run(a: dict, key: str, factor: float, seed: int, max_iters: int) -> bool:
    return a["key"] == key and math.isclose(a["factor"], factor) and a["seed"] == seed and a["max_iters"] == max_iters


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"


def run_all(settings: dict, results_path: Path, runs_dir: Path, command: str, workers: int = 1) -> dict:
    """The whole protocol; every finished run is appended to the results JSON at once (rerun to resume).

    ``workers`` > 1 trains the runs of each phase (tune, seeds, half) in that many processes of one torch
    thread each; the results are the same runs with the same numbers, appended in the order they finish."""
    results = {"settings": settings, "command": command, "runs": []}
    if results_path.exists():
        try:
            old = json.loads(results_path.read_text())
        except (OSError, ValueError) as e:
            old = None
            print(f"warning: not resuming from {results_path} ({type(e).__name__}: {e}); it is replaced")
        if isinstance(old, dict) and old.get("settings") == settings and isinstance(old.get("runs"), list):
            results["runs"] = old["runs"]
            print(f"resuming: {len(results['runs'])} runs already in {results_path}")
    results["host"] = {"cpus": os.cpu_count(), "torch_threads": settings["threads"], "workers": workers,
                       "machine": platform.machine(), "load_avg_at_start": os.getloadavg()}

    results_path.parent.mkdir(parents=True, exist_ok=True)

    def record(r: dict, t0: float) -> None:
        results["runs"].append(r)
        write_atomic(results_path, json.dumps(results, indent=1) + "\n")  # a kill leaves the old file or the new
        print(f"[{len(results['runs'])}] {LABELS[r['key']]:28s} lr×{r['factor']:.3g} seed {r['seed']} "
              f"{r['max_iters']} steps: val {r['final_val_loss']}, {time.perf_counter() - t0:.1f} s", flush=True)

    def ensure(jobs: list[tuple]) -> None:
        """Run every (key, factor, seed, phase, max_iters) not in the results yet."""
        todo = [j for j in jobs if not any(same_run(r, j[0], j[1], j[2], j[4]) for r in results["runs"])]
        if workers == 1 or len(todo) < 2:
            for key, factor, seed, phase, steps in todo:
                t0 = time.perf_counter()
                record(run_one(key, factor, seed, settings, runs_dir, phase, steps), t0)
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker) as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(run_one, key, factor, seed, settings, runs_dir, phase, steps)
                       for key, factor, seed, phase, steps in todo]
            for future in as_completed(futures):
                record(future.result(), t0)

    n = settings["max_iters"]
    ensure([(key, factor, settings["seeds"][0], "tune", n) for key, *_ in OPTIMIZERS for factor in settings["grid"]])
    ensure([(key, best_factor(results["runs"], key, n), seed, "seeds", n)
            for key, *_ in OPTIMIZERS for seed in settings["seeds"][1:]])
    best = best_factor(results["runs"], EXACT_KEY, n)
    ensure([(HALF_KEY, best, seed, "half", n // 2) for seed in settings["seeds"]])
    return results


# ----------------------------------------------------------------------------- analysis (no torch)


class ResultsError(ValueError):
    """A results file that cannot be read as this script's results (the message says what is wrong)."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


#: what each run record of a results file must hold (the table and the figure read these)
RUN_FIELDS = {"key": "one of " + ", ".join(LABELS), "phase": "a string", "factor": "a number", "seed": "an integer",
              "max_iters": "an integer >= 1", "lr": "a number", "steps": "a list", "grad_evals": "a list",
              "val_loss": "a list", "final_val_loss": "a number or null", "seconds": "a number or null",
              "total_grad_evals": "a number or null"}


def _bad_field(name: str, value) -> bool:
    if name == "key":
        return value not in LABELS
    if name == "phase":
        return not isinstance(value, str)
    if name in ("factor", "lr"):
        return not _is_number(value)
    if name == "seed":
        return not isinstance(value, int) or isinstance(value, bool)
    if name == "max_iters":
        return not isinstance(value, int) or isinstance(value, bool) or value < 1
    if name in ("steps", "grad_evals", "val_loss"):
        return not isinstance(value, list)
    return not (value is None or _is_number(value))


def check_results(results, where: str = "the results") -> dict:
    """``results`` if it has the shape this script writes (settings, runs, AdamW's tuning runs); else
    ``ResultsError`` naming what is missing or wrong."""
    if not isinstance(results, dict):
        raise ResultsError(f"{where} is a JSON {type(results).__name__}, not an object with \"settings\" and "
                           "\"runs\" (a file written by benchmarks/reproduce.py)")
    s = results.get("settings")
    if not isinstance(s, dict):
        raise ResultsError(f"{where} has no \"settings\" object (a file written by benchmarks/reproduce.py has one)")
    checks = {"preset": isinstance(s.get("preset"), str),
              "max_iters": isinstance(s.get("max_iters"), int) and s.get("max_iters", 0) >= 1,
              "grid": isinstance(s.get("grid"), list) and bool(s["grid"]) and all(
                  _is_number(f) and f > 0 for f in s["grid"]),
              "seeds": isinstance(s.get("seeds"), list) and bool(s["seeds"]) and all(
                  isinstance(x, int) for x in s["seeds"])}
    for name, ok in checks.items():
        if not ok:
            raise ResultsError(f"{where}: settings.{name} = {s.get(name)!r} is not valid (preset: a string, "
                               "max_iters: an integer >= 1, grid: a non-empty list of factors > 0, seeds: a "
                               "non-empty list of integers)")
    runs = results.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ResultsError(f"{where} has no runs (\"runs\" = {runs!r}): nothing to tabulate; run the "
                           "protocol first")
    for i, r in enumerate(runs):
        if not isinstance(r, dict):
            raise ResultsError(f"{where}: run {i} is {r!r}, not a run record")
        for name, valid in RUN_FIELDS.items():
            if name not in r or _bad_field(name, r[name]):
                raise ResultsError(f"{where}: run {i} has {name} = {r.get(name, '(missing)')!r}; expected {valid}")
        if not len(r["steps"]) == len(r["grad_evals"]) == len(r["val_loss"]):
            raise ResultsError(f"{where}: run {i} has {len(r['steps'])} steps, {len(r['grad_evals'])} grad_evals "
                               f"and {len(r['val_loss'])} val_loss values; expected as many of each")
    if not any(r["key"] == "adamw" and r["phase"] == "tune" and r["max_iters"] == s["max_iters"] for r in runs):
        raise ResultsError(f"{where} has no AdamW tuning run of {s['max_iters']} steps: the table compares "
                           "every optimizer with AdamW")
    return results


def load_results(path: Path) -> dict:
    """A results file, checked (:func:`check_results`); ``ResultsError`` if it is missing, not JSON, or not
    of this script's shape."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ResultsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        results = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{path} is not valid JSON ({e}): a truncated or damaged file?") from None
    return check_results(results, str(path))


def _loss(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def best_factor(runs: list[dict], key: str, max_iters: int) -> float:
    """The grid factor whose seed-0 ("tune") run of ``key`` has the lowest final validation loss."""
    tune = [r for r in runs if r["key"] == key and r["phase"] == "tune" and r["max_iters"] == max_iters]
    if not tune:
        raise ValueError(f"no tuning runs for {key!r}")
    return min(tune, key=lambda r: _loss(r["final_val_loss"]))["factor"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_curve(runs: list[dict]) -> dict:
    """Seed-mean validation curve of runs with identical evaluation steps: steps, grad_evals, mean, std."""
    steps = runs[0]["steps"]
    if any(r["steps"] != steps for r in runs):
        raise ValueError("runs evaluated at different steps")
    mean, std = [], []
    for i in range(len(steps)):
        m, s = mean_std([_loss(r["val_loss"][i]) for r in runs])
        mean.append(m)
        std.append(s if math.isfinite(s) else 0.0)
    grad_evals = [sum(r["grad_evals"][i] for r in runs) / len(runs) for i in range(len(steps))]
    return {"steps": steps, "grad_evals": grad_evals, "mean": mean, "std": std}


def first_reach(curve: dict, target: float) -> tuple[int, float] | None:
    """(step, grad evals) of the first evaluation where the mean curve is at or below ``target``; else None."""
    for step, evals, value in zip(curve["steps"], curve["grad_evals"], curve["mean"], strict=True):
        if value <= target + 1e-12:
            return step, evals
    return None


def final_runs(runs: list[dict], key: str, max_iters: int) -> list[dict]:
    """The runs of ``key`` at its best factor: seed 0 from tuning plus the other seeds (for the half-step
    exact runs: all of them)."""
    if key == HALF_KEY:
        return sorted([r for r in runs if r["key"] == key], key=lambda r: r["seed"])
    best = best_factor(runs, key, max_iters)
    chosen = [r for r in runs if r["key"] == key and r["max_iters"] == max_iters and math.isclose(r["factor"], best)]
    return sorted(chosen, key=lambda r: r["seed"])


def summarize(results: dict) -> list[dict]:
    """One row per optimizer (and the half-step exact runs, if any)."""
    runs, n = results["runs"], results["settings"]["max_iters"]
    keys = [k for k, *_ in OPTIMIZERS if any(r["key"] == k for r in runs)]
    if any(r["key"] == HALF_KEY for r in runs):
        keys.append(HALF_KEY)
    adamw = final_runs(runs, "adamw", n)
    target = mean_std([_loss(r["final_val_loss"]) for r in adamw])[0]
    rows = []
    for key in keys:
        chosen = final_runs(runs, key, n)
        curve = mean_curve(chosen)
        m, s = mean_std([_loss(r["final_val_loss"]) for r in chosen])
        reach = first_reach(curve, target)
        tune = sorted([r for r in runs if r["key"] == (EXACT_KEY if key == HALF_KEY else key)
                       and r["phase"] == "tune"], key=lambda r: r["factor"])
        rows.append({"key": key, "label": LABELS.get(key, key), "lr": chosen[0]["lr"], "factor": chosen[0]["factor"],
                     "seeds": [r["seed"] for r in chosen], "mean": m, "std": s,
                     "reach_step": reach[0] if reach else None, "reach_evals": reach[1] if reach else None,
                     "steps": chosen[0]["max_iters"],
                     "grad_evals": mean_std([r["total_grad_evals"] for r in chosen])[0],
                     "seconds": mean_std([r["seconds"] for r in chosen])[0], "curve": curve, "target": target,
                     "grid": [(r["factor"], r["lr"], r["final_val_loss"]) for r in tune]})
    return rows


def paired_gaps(results: dict) -> list[dict]:
    """Each optimizer's final validation loss minus AdamW's on the same seed (each at its own best lr; the
    half-step exact runs on their own schedule), with the 95% t interval of the mean difference."""
    runs, n = results["runs"], results["settings"]["max_iters"]
    adamw = {r["seed"]: _loss(r["final_val_loss"]) for r in final_runs(runs, "adamw", n)}
    out = []
    for row in summarize(results):
        if row["key"] == "adamw":
            continue
        mine = {r["seed"]: _loss(r["final_val_loss"]) for r in final_runs(runs, row["key"], n)}
        seeds = sorted(set(mine) & set(adamw))
        if not seeds:
            continue
        diffs = [mine[s] - adamw[s] for s in seeds]
        out.append({"key": row["key"], "label": row["label"], "seeds": seeds, "diffs": diffs, **interval(diffs)})
    return out


def fmt_loss(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "diverged"


def table_markdown(results: dict) -> str:
    """The results table (and the learning-rate grid) as markdown."""
    s = results["settings"]
    rows = summarize(results)
    target = rows[0]["target"]
    out = [f"Character-level GPT on `shakespeare`, preset `{s['preset']}`, {s['max_iters']} steps, "
           f"lr grid ×{{{', '.join(f'{f:.3g}' for f in s['grid'])}}} of the CPU recipe (seed 0), "
           f"best lr × seeds {s['seeds']}. Mean ± std (ddof=1) over seeds. "
           f"Target for \"steps to reach\": AdamW's mean final val loss {target:.3f}.", "",
           "| optimizer | best lr (×recipe) | final val loss | steps to reach AdamW | grad evals to reach AdamW "
           "| steps | grad evals | wall-clock s (mean) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "—" if r["reach_step"] is None else f"{r['reach_step']}"
        reach_e = "—" if r["reach_evals"] is None else f"{r['reach_evals']:.0f}"
        std = f" ± {r['std']:.3f}" if math.isfinite(r["mean"]) else ""
        edge = " †" if r["key"] != HALF_KEY and (math.isclose(r["factor"], min(s["grid"]))
                                                 or math.isclose(r["factor"], max(s["grid"]))) else ""
        out.append(f"| {r['label']} | {r['lr']:.3g} (×{r['factor']:.3g}){edge} | {fmt_loss(r['mean'])}{std} | {reach} "
                   f"| {reach_e} | {r['steps']} | {r['grad_evals']:.0f} | {r['seconds']:.1f} |")
    if any(" †" in line for line in out):
        out += ["", "† best lr at the edge of the grid: the optimum may lie outside it (this optimizer is "
                    "under-tuned compared with the others)."]
    out += ["", "Learning-rate grid, final val loss on seed 0 (best in bold):", "",
            "| optimizer | " + " | ".join(f"×{f:.3g}" for f in s["grid"]) + " |",
            "|---|" + "---|" * len(s["grid"])]
    for r in rows:
        if r["key"] == HALF_KEY:
            continue
        cells = []
        for f in s["grid"]:
            hit = [g for g in r["grid"] if math.isclose(g[0], f)]
            if not hit:
                cells.append("")
                continue
            _, lr, loss = hit[0]
            text = f"{lr:.3g}: {fmt_loss(_loss(loss))}"
            cells.append(f"**{text}**" if math.isclose(f, r["factor"]) else text)
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    gaps = paired_gaps(results)
    if gaps:
        out += ["", "Paired by seed: final val loss minus AdamW's on the same seed (same initial weights and "
                    "data order), mean with its 95% t interval (t(0.975, n − 1): with 3 seeds the intervals are "
                    "wide). Negative = better than AdamW; \"yes\" when the interval excludes 0.", "",
                "| optimizer − AdamW | per seed | mean | 95% interval | excludes 0 |", "|---|---|---|---|---|"]
        for g in gaps:
            per_seed = ", ".join(f"{d:+.3f}" if math.isfinite(d) else "diverged" for d in g["diffs"])
            if g["mean"] is None:
                mean, ci, sig = "—", "—", "—"
            else:
                mean = f"{g['mean']:+.3f}"
                ci = "—" if g["lo"] is None else f"[{g['lo']:+.3f}, {g['hi']:+.3f}]"
                sig = "—" if g["lo"] is None else ("yes" if g["lo"] > 0 or g["hi"] < 0 else "no")
            out.append(f"| {g['label']} − AdamW | {per_seed} | {mean} | {ci} | {sig} |")
    exact = next((r for r in rows if r["key"] == EXACT_KEY), None)
    if exact is not None:
        c = exact["curve"]
        others = [r["grad_evals"] for r in rows if r["key"] not in (EXACT_KEY, HALF_KEY)]
        budget = max(others) if others else None
        at = [(st, v) for st, e, v in zip(c["steps"], c["grad_evals"], c["mean"], strict=True)
              if budget is not None and e <= budget + 1e-9]
        if at:
            out += ["", f"Exact MARS at equal gradient evaluations ({budget:.0f}): its full-length runs were at "
                        f"val loss {fmt_loss(at[-1][1])} (mean) at step {at[-1][0]}, mid-schedule; the "
                        f"half-step runs (own schedule) are the row \"{LABELS[HALF_KEY]}\"."]
    host = results.get("host", {})
    out += ["", f"Wall-clock: {host.get('cpus', '?')} CPU cores shared with other jobs "
                f"(load average {', '.join(f'{x:.1f}' for x in host.get('load_avg_at_start', []))} at the start), "
                f"torch threads {host.get('torch_threads', '?')}: seconds are pessimistic and noisy; compare ratios.",
            f"Command: `{results.get('command', '?')}`"]
    return "\n".join(out) + "\n"


def plot(results: dict, out: Path) -> Path:
    """Validation loss (seed mean, ±1 std band) vs steps and vs gradient evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results)
    s = results["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {key: colours[i % len(colours)] for i, (key, *_) in enumerate(OPTIMIZERS)}
    colour_of[HALF_KEY] = colour_of[EXACT_KEY]
    lows, highs = [], []
    for r in rows:
        c = r["curve"]
        style = "--" if r["key"] == HALF_KEY else "-"
        label = f"{r['label']} lr={r['lr']:.3g}: {fmt_loss(r['mean'])}"
        mean = [v if math.isfinite(v) else float("nan") for v in c["mean"]]
        lo = [m - d for m, d in zip(mean, c["std"], strict=True)]
        hi = [m + d for m, d in zip(mean, c["std"], strict=True)]
        for ax, x in ((axes[0], c["steps"]), (axes[1], c["grad_evals"])):
            if r["key"] == HALF_KEY and ax is axes[0]:
                continue
            ax.plot(x, mean, style, color=colour_of[r["key"]], label=label, lw=1.6)
            ax.fill_between(x, lo, hi, color=colour_of[r["key"]], alpha=0.18, lw=0)
        finite = [v for v in mean if math.isfinite(v)]
        if finite:
            lows.append(min(finite))
            later = [v for st, v in zip(c["steps"], mean, strict=True) if st >= 0.25 * s["max_iters"]
                     and math.isfinite(v)]
            highs.append(max(later) if later else max(finite))
    target = rows[0]["target"]
    for ax in axes:
        ax.axhline(target, color="k", ls=":", lw=1, label=f"AdamW final mean {target:.3f}")
        ax.grid(True, alpha=0.3)
        ax.set_ylabel("validation loss (nats per character)")
    if lows:
        axes[0].set_ylim(min(lows) - 0.03, max(highs) + 0.05)
    axes[0].set(xlabel="optimizer steps", title="Validation loss vs steps (mean over 3 seeds, ±1 std)")
    axes[1].set(xlabel="gradient evaluations (exact MARS: 2 per step)",
                title="Validation loss vs gradient evaluations")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False,
               title="optimizer, best lr: final val loss (mean over seeds)", title_fontsize=9)
    fig.suptitle(f"Char-level GPT on Shakespeare, preset {s['preset']}, {s['max_iters']} steps, "
                 f"best lr of ×{{{', '.join(f'{f:.3g}' for f in s['grid'])}}} per optimizer", fontsize=11)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(results: dict, stem: Path) -> str:
    md = table_markdown(results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stem.with_suffix(".md"), md)
    plot(results, stem.with_suffix(".png"))
    return md


def _at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, not {text!r}")
        return n
    return parse


def _threads(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return _at_least(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, not {text!r}") from None


def _writable(directory: Path) -> str | None:
    """None if files can be created in ``directory`` (made if missing); else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".reproduce-probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick mode (2 × 64 model, 400 steps)")
    parser.add_argument("--from-results", metavar="JSON", help="redraw the table and figure from a results file")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                        help="where the .json/.md/.png go (default benchmarks/results)")
    parser.add_argument("--out", metavar="STEM", help="output path without suffix (default "
                        "<results-dir>/reproduce_<mode>, or the --from-results file's stem)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "reproduce"), help="run directories (git-ignored)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--threads", default="auto", type=_threads,
                        help="torch threads; auto (default): all cores if the 1-minute load average is below 1, "
                             "else 1 (on a busy 2-core machine 2 threads ran ~10x slower than 1)")
    parser.add_argument("--max-iters", type=_at_least(2, " (exact MARS's equal-evaluation runs take half of it)"),
                        help="override the mode's step count (and the results name); at least 2")
    parser.add_argument("--workers", type=_at_least(1), default=1,
                        help="train each phase's runs in this many processes of 1 torch thread (default 1: "
                             "in this process, with --threads threads)")
    args = parser.parse_args(argv)

    if args.from_results:
        src = Path(args.from_results)
        try:
            results = load_results(src)
        except ResultsError as e:
            parser.error(f"--from-results: {e}")
        stem = Path(args.out) if args.out else src.with_suffix("")
        why = _writable(stem.parent)
        if why:
            parser.error(f"cannot write the table and figure to {stem.parent} ({why}): give --out a writable path")
        try:
            md = write_outputs(results, stem)
        except OSError as e:
            print(f"error: cannot write {stem}.{{md,png}}: {e}", file=sys.stderr)
            return 1
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            parser.error(f"--from-results: cannot make the table from {src}: {type(e).__name__}: {e}")
        print(md, end="")
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.png')}")
        return 0

    mode = "quick" if args.quick else "full"
    name = f"reproduce_{mode}"
    if args.max_iters is not None:
        name += f"_{args.max_iters}"
    stem = Path(args.out) if args.out else Path(args.results_dir) / name
    runs_dir = Path(args.runs_dir) / name
    for option, directory in (("--out" if args.out else "--results-dir", stem.parent), ("--runs-dir", runs_dir)):
        why = _writable(directory)
        if why:
            parser.error(f"{option}: cannot write in {directory} ({why}); give a writable directory")

    import torch

    if args.workers > 1:
        args.threads = 1  # each worker trains with one thread
    if args.threads == "auto":
        args.threads = (os.cpu_count() or 1) if os.getloadavg()[0] < 1 else 1
    torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    settings = {**MODES[mode], "mode": mode, "threads": args.threads, "data_dir": args.data_dir}
    if args.max_iters is not None:
        settings["max_iters"] = args.max_iters
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/reproduce.py", *(argv or sys.argv[1:])])
    t0 = time.perf_counter()
    try:
        results = run_all(settings, stem.with_suffix(".json"), runs_dir, command, args.workers)
        results["total_seconds"] = results.get("total_seconds", 0.0) + time.perf_counter() - t0
        write_atomic(stem.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
        md = write_outputs(results, stem)
    except OSError as e:
        print(f"error: {type(e).__name__}: {e} (the runs finished so far are in {stem.with_suffix('.json')} "
              "if it could be written; rerun the same command to resume)", file=sys.stderr)
        return 1
    print(md, end="")
    print(f"total {results['total_seconds']:.0f} s; wrote {stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
