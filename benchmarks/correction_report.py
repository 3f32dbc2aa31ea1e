"""The report of ``benchmarks/correction.py``: tables, figures and a summary JSON from the caches only.

    python benchmarks/correction.py --report

Intervals: the mean of the paired (same seed) differences ± t(0.975, n − 1)·sd/√n, "95% t interval". Across the 6
points of the primary estimand: Holm's step-down correction of the two-sided paired-t p-values (family-wise error
5%) and simultaneous Bonferroni intervals, t(1 − 0.025/6, n − 1). Pooled over points: the mean of the points'
means with a t interval over points, and a two-sided sign test of the points' means. A cell with fewer than 2
seeds has no interval; the report says how many seeds each number rests on.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import correction as C
import study as S

METRICS = ("final", "best", "mid")


# ----------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| ≥ |t|) for Student's t with ``dof`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betai(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t, by bisection on the distribution function."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - t_two_sided_p(mid, dof) / 2.0 < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired(diffs: list[float], simultaneous: int = 1) -> dict | None:
    """Mean of paired differences with its two-sided 95% t interval (Bonferroni over ``simultaneous`` intervals),
    and the paired-t p-value; None with fewer than 2 finite differences."""
    xs = [d for d in diffs if math.isfinite(d)]
    if len(xs) < 2:
        return None
    n, mean, sd = len(xs), statistics.fmean(xs), statistics.stdev(xs)
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    half = t_quantile(1 - 0.025 / simultaneous, n - 1) * se
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "t": t,
            "p": t_two_sided_p(t, n - 1), "diverged": len(diffs) - n}


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def sign_test(xs: list[float]) -> float:
    """Two-sided exact sign test of the median 0 (zeros dropped)."""
    pos, neg = sum(x > 0 for x in xs), sum(x < 0 for x in xs)
    n, k = pos + neg, min(pos, neg)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


# ----------------------------------------------------------------------------- reading the runs


def metric(rec: dict | None, which: str) -> float:
    """A run's final, best, or mid-run validation loss (+∞ for a diverged or missing run)."""
    if rec is None:
        return math.inf
    r = rec["result"]
    if r.get("diverged") or r.get("final_val_loss") is None:
        return math.inf
    if which == "final":
        return r["final_val_loss"]
    if which == "best":
        return r["best_val_loss"]
    steps, vals = r["steps"], r["val_loss"]
    target = C.MID_FRACTION * steps[-1]
    i = min(range(len(steps)), key=lambda j: (abs(steps[j] - target), steps[j]))
    v = vals[i]
    return v if v is not None else math.inf


def collect(c: C.Correction, cache: dict) -> tuple[C.Plan, dict]:
    """The plan and, for every run of it, its record (or None while it has not run)."""
    merged = {**c._study_cache(), **cache}
    plan = c.plan_runs(merged)
    return plan, {run: merged.get(c.job(run).key) for run in plan.runs}


def _by(records: dict, part: str, point: str, arm: str, factor: float | None = None, overrides=()) -> dict:
    return {r.seed: rec for r, rec in records.items() if r.part == part and r.point == point and r.arm == arm
            and (factor is None or r.factor == factor) and r.overrides == tuple(overrides)}


def _diffs(a: dict, b: dict, which: str) -> list[float]:
    """Per-seed ``a − b`` over the seeds both have run (a diverged run counts as +∞, and drops out)."""
    return [metric(a[s], which) - metric(b[s], which) for s in sorted(set(a) & set(b))
            if a[s] is not None and b[s] is not None]


def _at_fraction(rec: dict, fraction: float) -> float:
    """The validation loss at the evaluation nearest ``fraction`` of the steps (+∞ if diverged)."""
    r = rec["result"]
    if r.get("diverged"):
        return math.inf
    steps, vals = r["steps"], r["val_loss"]
    i = min(range(len(steps)), key=lambda j: (abs(steps[j] - fraction * steps[-1]), steps[j]))
    return vals[i] if vals[i] is not None else math.inf


def _plain(a: dict, b: dict) -> list[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def summarize(c: C.Correction, cache: dict) -> dict:
    plan, records = collect(c, cache)
    points = [C._point(*p) for p in C.M_POINTS] + [C.T_POINT]
    out: dict = {"design": {"seeds": C.SEEDS, "held_out_seed": C.HELD_OUT_SEED, "gamma": C.GAMMA,
                            "mid_fraction": C.MID_FRACTION, "points": points,
                            "lr_factors": {f"{k[0]}/{k[1]}": v for k, v in plan.factors.items()}},
                 "runs": {"planned": len(plan.runs), "done": sum(rec is not None for rec in records.values())},
                 "points": {}}
    for point in points:
        arms = {arm: _by(records, "primary", point, arm) for arm in ("adamw", "recipe", "mars")}
        entry = {"seeds_done": {arm: sorted(s for s, rec in runs.items() if rec is not None)
                                for arm, runs in arms.items()}, "means": {}, "effects": {},
                 "per_seed": {arm: {w: {s: metric(rec, w) for s, rec in sorted(runs.items()) if rec is not None}
                                    for w in ("final", "mid")} for arm, runs in arms.items()}}
        for arm, runs in arms.items():
            vals = [metric(rec, "final") for rec in runs.values() if rec is not None]
            entry["means"][arm] = statistics.fmean(vals) if vals and all(map(math.isfinite, vals)) else None
        for name, (a, b) in {"recipe": ("recipe", "adamw"), "correction": ("mars", "recipe"),
                             "total": ("mars", "adamw")}.items():
            entry["effects"][name] = {w: paired(_diffs(arms[a], arms[b], w)) for w in METRICS}
            entry["effects"][name + "_simultaneous"] = paired(_diffs(arms[a], arms[b], "final"), len(points))
        out["points"][point] = entry
    primary = [(p, out["points"][p]["effects"]["correction"]["final"]) for p in points]
    have = [(p, e) for p, e in primary if e is not None]
    if have:
        for (_, e), adj in zip(have, holm([e["p"] for _, e in have]), strict=True):
            e["p_holm"] = adj
        means = [e["mean"] for _, e in have]
        out["pooled_correction"] = {"points": len(means), "mean_of_means": statistics.fmean(means),
                                    "interval_over_points": paired(means), "sign_test_p": sign_test(means)}
    mid = C._point(*C.MIDDLE)
    chain = [("adamw", "primary"), ("adamw+betas", "recipe"), ("adamw+betas+wd", "recipe"), ("recipe", "primary"),
             ("mars", "primary")]
    steps = []
    for (a, pa), (b, pb) in zip(chain[1:], chain[:-1], strict=True):
        steps.append({"from": b, "to": a, "effect": paired(_diffs(_by(records, pa, mid, a), _by(records, pb, mid, b),
                                                                  "final"))})
    out["recipe_pieces"] = steps
    beta2 = {}
    for size, tpp, batch in C.M_POINTS:
        if batch == 32:
            continue
        point = C._point(size, tpp, batch)
        runs = {arm: {r.seed: rec for r, rec in records.items() if r.part == "beta2" and r.point == point
                      and r.arm == arm} for arm in ("adamw", "recipe", "mars")}
        beta2[point] = {"correction": paired(_diffs(runs["mars"], runs["recipe"], "final")),
                        "recipe": paired(_diffs(runs["recipe"], runs["adamw"], "final")),
                        "total": paired(_diffs(runs["mars"], runs["adamw"], "final")),
                        "seeds_done": {a: sorted(s for s, rec in r.items() if rec is not None)
                                       for a, r in runs.items()}}
    out["beta2_half_life_fixed"] = beta2
    sched = {}
    for size, tpp, batch in C.SCHEDULE_POINTS:
        point = C._point(size, tpp, batch)
        runs = {arm: {r.seed: rec for r, rec in records.items() if r.part == "schedule" and r.point == point
                      and r.arm == arm} for arm in ("adamw", "recipe", "mars")}
        before = {a: {s: _at_fraction(rec, 0.8) for s, rec in r.items() if rec is not None} for a, r in runs.items()}
        sched[point] = {
            "before_decay": {"correction": paired(_plain(before["mars"], before["recipe"])),
                             "total": paired(_plain(before["mars"], before["adamw"]))},
            "final": {"correction": paired(_diffs(runs["mars"], runs["recipe"], "final")),
                      "total": paired(_diffs(runs["mars"], runs["adamw"], "final"))},
            "seeds_done": {a: sorted(s for s, rec in r.items() if rec is not None) for a, r in runs.items()}}
    out["schedule_wsd"] = sched
    grid: dict = {}
    for r, rec in records.items():
        if r.part == "gamma-lr":
            gamma = C.ARMS[r.arm][2]
            grid.setdefault(f"{gamma:g}", {}).setdefault(f"{r.factor:g}", {})[r.seed] = (
                None if rec is None else metric(rec, "final"))
    out["gamma_lr"] = grid
    own = {}
    for p in C.OWN_LR_POINTS:
        point = C.T_POINT if p is None else C._point(*p)
        grid = {r.factor: metric(rec, "final") for r, rec in records.items()
                if r.part == "own-lr" and r.point == point and r.seed == C.HELD_OUT_SEED and rec is not None}
        f = plan.factors.get((point, "recipe-own-lr"))
        at_own = {} if f is None else {s: rec for s, rec in _by(records, "own-lr", point, "recipe", f).items()
                                       if s in C.SEEDS}  # its grid's seed 0 at that lr is no estimate
        mars, adamw = _by(records, "primary", point, "mars"), _by(records, "primary", point, "adamw")
        own[point] = {"grid_seed0": grid, "chosen_factor": f, "mars_factor": plan.factors.get((point, "mars-adamw")),
                      "correction": {w: paired(_diffs(mars, at_own, w)) for w in METRICS},
                      "recipe": paired(_diffs(at_own, adamw, "final")),
                      "per_seed": {s: metric(rec, "final") for s, rec in sorted(at_own.items()) if rec is not None}}
    out["gamma0_own_lr"] = own
    out["cost"] = cost(records, cache)
    return out


def cost(records: dict, cache: dict) -> dict:
    """What the runs cost: the single-thread seconds of the runs this script made (its own cache), as measured, and
    how many planned runs it read from the study's cache instead."""
    done = {rec["key"]: rec for rec in records.values() if rec is not None}  # two parts may name one run
    own = [rec for key, rec in done.items() if key in cache]
    stamps = sorted(rec["finished_at"] for rec in own if rec.get("finished_at"))
    return {"own_runs": len(own), "shared_with_study": len(done) - len(own),
            "run_seconds": sum(rec["result"]["seconds"] for rec in own),
            "first_finished": stamps[0] if stamps else None, "last_finished": stamps[-1] if stamps else None}


# ----------------------------------------------------------------------------- writing


def _fmt(e: dict | None, p: bool = False) -> str:
    if e is None:
        return "—"
    s = f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] (n={e['n']})"
    if p and "p_holm" in e:
        s += f", Holm p = {e['p_holm']:.3g}"
    return s


def table_markdown(summary: dict) -> str:
    d = summary["design"]
    lines = ["# Does the correction pay off? The recipe and the correction, measured apart", "",
             f"Runs: {summary['runs']['done']} of {summary['runs']['planned']} planned are in the caches "
             "(`python benchmarks/correction.py --workers 2` runs the rest).", "",
             f"Each lr is chosen on seed {d['held_out_seed']}, which no estimate uses; estimates over seeds "
             f"{d['seeds']}. Effects are paired by seed: mean difference [95% t interval] (n = seeds), negative = "
             "lower validation loss. The primary estimand is the correction: MARS at γ = "
             f"{d['gamma']:g} minus MARS at γ = 0, same lr, same seed; its p-values are Holm-corrected over the "
             f"{len(d['points'])} points.", "",
             "| point | AdamW | MARS γ = 0 | MARS γ = 0.025 | recipe (γ=0 − AdamW) | **correction** (γ=0.025 − γ=0) "
             "| total (MARS − AdamW) |", "|---|---|---|---|---|---|---|"]
    for point, e in summary["points"].items():
        m = e["means"]
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {point} | {f(m['adamw'])} | {f(m['recipe'])} | {f(m['mars'])} | "
                     f"{_fmt(e['effects']['recipe']['final'])} | {_fmt(e['effects']['correction']['final'], True)} | "
                     f"{_fmt(e['effects']['total']['final'])} |")
    lines += ["", "## The correction at the best and the mid-run loss", "",
              f"Mid-run: the evaluation nearest {d['mid_fraction']:g} of the steps (fixed in advance).", "",
              "| point | final | best | mid-run | simultaneous 95% (Bonferroni, final) |", "|---|---|---|---|---|"]
    for point, e in summary["points"].items():
        c = e["effects"]["correction"]
        lines.append(f"| {point} | {_fmt(c['final'])} | {_fmt(c['best'])} | {_fmt(c['mid'])} | "
                     f"{_fmt(e['effects']['correction_simultaneous'])} |")
    pooled = summary.get("pooled_correction")
    if pooled:
        lines += ["", f"Pooled over {pooled['points']} points: mean of the points' correction effects "
                  f"{pooled['mean_of_means']:+.3f}, 95% t interval over points {_fmt(pooled['interval_over_points'])}, "
                  f"sign test p = {pooled['sign_test_p']:.3g}."]
    lines += ["", "## Every seed (final validation loss, and at half the steps in brackets; ∞ = diverged)", "",
              "A paired mean can hide two kinds of run: on a character-level model a run can stay on the early "
              "plateau (about 2.5 nats) for most of its steps. The seeds, arm by arm:", "",
              "| point | arm | " + " | ".join(f"seed {s}" for s in d["seeds"]) + " |",
              "|---|---|" + "---|" * len(d["seeds"])]
    names = {"adamw": "AdamW", "recipe": "MARS γ = 0", "mars": f"MARS γ = {d['gamma']:g}"}
    v = lambda x: "∞" if not math.isfinite(x) else f"{x:.3f}"  # noqa: E731
    for point, e in summary["points"].items():
        for arm, label in names.items():
            runs = e["per_seed"][arm]
            if not runs["final"]:
                continue
            cells = [f"{v(runs['final'][s])} ({v(runs['mid'][s])})" if s in runs["final"] else "·"
                     for s in d["seeds"]]
            lines.append(f"| {point} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## γ = 0 at its own lr (exploratory)", "",
              "Where γ = 0 at MARS's lr stays on the plateau, γ = 0 gets its own seed-0 grid (×1/4 … ×4 of MARS's "
              "base) and its best lr on seeds 1–5; the correction is then γ = 0.025 at MARS's lr minus γ = 0 at its "
              "own. Not fixed in advance, so outside the Holm family above.", "",
              "| point | seed-0 grid (lr factor: final) | γ = 0's lr / MARS's | correction, final | "
              "correction, mid-run | recipe (γ = 0 own lr − AdamW) |", "|---|---|---|---|---|---|"]
    for point, e in summary["gamma0_own_lr"].items():
        grid = ", ".join(f"×{f:g}: {v(x)}" for f, x in sorted(e["grid_seed0"].items()))
        ratio = "—" if e["chosen_factor"] is None else f"×{e['chosen_factor']:g} / ×{e['mars_factor']:g}"
        lines.append(f"| {point} | {grid or '—'} | {ratio} | {_fmt(e['correction']['final'])} | "
                     f"{_fmt(e['correction']['mid'])} | {_fmt(e['recipe'])} |")
    lines += ["", "## The recipe, piece by piece (middle point, AdamW's lr)", "", "| step | effect |", "|---|---|"]
    for s in summary["recipe_pieces"]:
        lines.append(f"| {s['from']} → {s['to']} | {_fmt(s['effect'])} |")
    lines += ["", "## β2's half-life in tokens fixed at batch 32's", "",
              "| point | recipe | correction | total |", "|---|---|---|---|"]
    for point, e in summary["beta2_half_life_fixed"].items():
        lines.append(f"| {point} | {_fmt(e['recipe'])} | {_fmt(e['correction'])} | {_fmt(e['total'])} |")
    lines += ["", "## Schedule control: warmup-stable-decay (the lrs chosen under the cosine)", "",
              "Before the decay: the evaluation at 80% of the steps, where the lr has been at its peak since the "
              "warm-up; final: after the linear decay to min_lr.", "",
              "| point | correction before decay | correction final | total before decay | total final |",
              "|---|---|---|---|---|"]
    for point, e in summary["schedule_wsd"].items():
        lines.append(f"| {point} | {_fmt(e['before_decay']['correction'])} | {_fmt(e['final']['correction'])} | "
                     f"{_fmt(e['before_decay']['total'])} | {_fmt(e['final']['total'])} |")
    lines += ["", "## γ × lr at the middle point (final validation loss by seed; ∞ = diverged)", ""]
    factors = sorted({f for g in summary["gamma_lr"].values() for f in g}, key=float)
    lines += ["| γ | " + " | ".join(f"lr ×{f}" for f in factors) + " |", "|---|" + "---|" * len(factors)]
    for gamma, row in sorted(summary["gamma_lr"].items(), key=lambda kv: float(kv[0])):
        cells = []
        for f in factors:
            seeds = row.get(f, {})
            cells.append(" ".join("·" if x is None else v(x) for _, x in sorted(seeds.items())))
        lines.append(f"| {gamma} | " + " | ".join(cells) + " |")
    k = summary["cost"]
    lines += ["", "## Cost", "",
              f"This script's own {k['own_runs']} runs took {k['run_seconds'] / 3600:.2f} core-hours as measured "
              f"({k['run_seconds'] / 2 / 3600:.2f} h at 2 workers; one torch thread each; finished between "
              f"{k['first_finished']} and {k['last_finished']}, on a machine also doing other work); "
              f"{k['shared_with_study']} more planned runs are the study's, read from its cache."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    points = list(summary["points"])
    for k, (name, label) in enumerate([("recipe", "recipe (γ=0 − AdamW)"), ("correction", "correction (γ=0.025 − γ=0)"),
                                       ("total", "total (MARS − AdamW)")]):
        xs, ys, lo, hi = [], [], [], []
        for i, p in enumerate(points):
            e = summary["points"][p]["effects"][name]["final"]
            if e is not None:
                xs.append(i + (k - 1) * 0.22)
                ys.append(e["mean"])
                lo.append(e["mean"] - e["lo"])
                hi.append(e["hi"] - e["mean"])
        ax1.errorbar(xs, ys, yerr=[lo, hi], fmt="os^"[k], capsize=4, label=label)
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_xticks(range(len(points)), points, rotation=20, fontsize=12)
    ax1.set_ylabel("Δ final validation loss (paired by seed)", fontsize=12)
    ax1.set_title("Recipe and correction, 95% t intervals", fontsize=13)
    ax1.legend(fontsize=12)
    for gamma, row in sorted(summary["gamma_lr"].items(), key=lambda kv: float(kv[0])):
        for f, seeds in row.items():
            for v in seeds.values():
                if v is not None:
                    ax2.plot(float(f), min(v, 3.0), "o", alpha=0.4, color=f"C{list(summary['gamma_lr']).index(gamma)}")
        fs = sorted(row, key=float)
        med = [statistics.median([min(v, 3.0) for v in row[f].values() if v is not None] or [math.nan]) for f in fs]
        ax2.plot([float(f) for f in fs], med, "-", label=f"γ = {gamma} (median)",
                 color=f"C{list(summary['gamma_lr']).index(gamma)}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("lr factor (× MARS's base 0.01)", fontsize=12)
    ax2.set_ylabel("final validation loss (diverged drawn at 3.0)", fontsize=12)
    ax2.set_title("γ × lr at the middle point, seeds as dots", fontsize=13)
    ax2.legend(fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _finite(x):
    """The summary with ∞ and NaN as null (JSON has no such numbers)."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_report(c: C.Correction, cache_dir: Path, results_dir: Path) -> list[Path]:
    from mars_ref._io import write_atomic

    summary = summarize(c, S.load_cache(cache_dir, warn=lambda m: None))
    results_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (results_dir / f"correction{ext}" for ext in (".md", "_summary.json", ".png"))
    write_atomic(md, table_markdown(summary))
    write_atomic(js, json.dumps(_finite(summary), indent=1) + "\n")
    plot(summary, png)
    return [md, js, png]
