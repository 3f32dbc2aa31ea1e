"""Notebook 02b: SVRG and SARAH as real methods, and the control-variate view (built by scripts/run_notebooks.py)."""

# %% [markdown] tags=["slide"]
# # 02b · SVRG, SARAH and the control variate
#
# **What this notebook teaches.** The two classic variance-reduced methods that STORM and MARS descend
# from, as running code beside their equations: SVRG (a snapshot and a full gradient every epoch) and
# SARAH (a recursive estimate restarted by full gradients; SPIDER is SARAH with a normalised step). The
# **control-variate view** that unites them all (the estimate is $X - \omega\,(Y - \mathbb{E}[Y])$, and it helps
# iff $2\omega\,\mathrm{Cov}[X,Y] > \omega^2\,\mathrm{Var}[Y]$), measured along runs.

# %% [markdown] tags=["notes"]
# Also in this notebook: a comparison at **equal gradient evaluations**, full passes included, of SGD,
# momentum, SVRG, SARAH, exact STORM and approx/exact MARS, each at its own tuned step size; why naive SVRG fails
# on deep networks (the snapshot goes stale); α-SVRG's decaying coefficient beside MARS's $\gamma$; and what
# MARS's convergence theorem assumes and promises.
#
# **You need.** Notebooks 01 and 02 (the finite sum, STORM's recursion, exact vs approx); variance and
# covariance of random vectors.
#
# **Class time.** 25 minutes in lecture 1: §1 (the estimators) in 10, §3's equal-cost figure in 5, §4 (the
# control-variate condition) in 10; §2 (the theorem), §5 (the stale snapshot) and §6 (α-SVRG) are reading (25
# minutes). The code runs in about 20 s on a laptop CPU. Notation: the
# [shared table](README.md#notation); new here: the snapshot $\tilde x$, its full gradient $\mu$, the
# inner-loop (epoch) length $q$ (not the momentum $m_t$), SARAH's estimate $v_t$, the control-variate
# coefficient $\omega$ and α-SVRG's $\alpha_t$. SVRG's estimate of $\nabla F(x_t)$ is $d_t$, the course's
# symbol for an estimate of the full gradient (STORM's in notebook 02).

# %%
import math
import os
import matplotlib.pyplot as plt
import torch

from mars_ref.course import claims, style, toys
from mars_ref.course.exercises import check

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine
torch.manual_seed(0)
style.use()
FULL = os.environ.get("MARS_REF_FULL", "0") == "1"
TUNE_SEEDS, SEEDS = (16, 64) if FULL else (8, 16)
BETA, GAMMA = 0.95, 0.025             # β1 and MARS's γ (the paper's defaults)
problem = toys.TwoLayerRegression()   # N = 128 samples, minibatch B = 8, 144 parameters
N, B = problem.n, problem.batch       # problem.n: the number of samples N (the parameters are problem.dim)
LOOKS = {  # methods without a look in mars_ref.course.style: their own colour, line style and marker
    "SVRG": dict(color=style.PURPLE, ls="--", marker="D"),
    "SARAH": dict(color=style.BLACK, ls=(0, (5, 1, 1, 1)), marker="P"),      # orange is momentum's
    "alpha-SVRG": dict(color=style.BLUE, ls=":", marker="s"),
    "MARS exact": dict(color=style.SKY, ls=":", marker="^"),   # at gamma = 0.025: not exact STORM's look
}


def look(name, label=None, every=None):
    """Keyword arguments for ax.plot: the course's look for `name`, or this notebook's."""
    if name in LOOKS:
        kw = dict(LOOKS[name], label=label or name)
        if every is None:
            kw["marker"] = None
        else:
            kw["markevery"] = every
        return kw
    return style.line(name, every=every, label=label or name)


print(f"{'full' if FULL else 'default'} size: step sizes tuned on {TUNE_SEEDS} runs, scored on {SEEDS} others; "
      f"N = {N}, B = {B}")

# %% [markdown] tags=["slide"]
# ## 1. The two algorithms, beside their code
#
# The finite sum $F(x) = \frac1N\sum_i f_i(x)$ lets both methods take the **full gradient** now and then;
# in between they take minibatch gradients $\nabla f_\xi$ ($\xi$ a minibatch of $B$ indices) at two points.
#
# **SVRG** (Johnson & Zhang, 2013). Every $q$ steps take a snapshot $\tilde x = x_t$ and its full gradient
# $\mu = \nabla F(\tilde x)$ ($N$ component gradients); every step
#
# $$d_t = \nabla f_{\xi_t}(x_t) - \nabla f_{\xi_t}(\tilde x) + \mu, \qquad x_{t+1} = x_t - \eta\,d_t
#   \qquad (2B \text{ component gradients}).$$

# %% [markdown] tags=["notes"]
# $d_t$ is unbiased, $\mathbb{E}_\xi d_t = \nabla F(x_t)$, and its error vanishes as $x_t$ and $\tilde x$ approach
# a common point: near a minimum the noise is gone, not only averaged.

# %% [markdown] tags=["slide"]
# ### SARAH (and SPIDER)
#
# **SARAH** (Nguyen, Liu, Scheinberg & Takáč, 2017). Every $q$ steps a restart $v_t = \nabla F(x_t)$ ($N$);
# in between
#
# $$v_t = \nabla f_{\xi_t}(x_t) - \nabla f_{\xi_t}(x_{t-1}) + v_{t-1}, \qquad x_{t+1} = x_t - \eta\,v_t
#   \qquad (2B).$$

# %% [markdown] tags=["notes"]
# $v_t$ is *biased* (conditionally on the past it carries $v_{t-1}$'s error), but the difference it adds is
# small when the step is small. This is STORM's correction with $a = 0$ (STORM keeps a weight $a$ on the
# fresh gradient instead of restarting). **SPIDER** (Fang, Li, Lin & Zhang, 2018) is the same estimator with
# a *normalised* step, $x_{t+1} = x_t - \min(\eta, \delta/\|v_t\|)\,v_t$, a step of length at most $\delta$
# (`toys.run(..., "spider", max_norm=δ)`).
#
# The cell writes one SVRG run and one SARAH run out by hand (16 seeds as rows, $q = N/B = 16$ steps per
# epoch) and compares them with `toys.run`, which also counts every component gradient.

# %%
# NBVAL_CHECK_OUTPUT
STEPS_HAND, Q = 40, N // B
gen = torch.Generator().manual_seed(1)
x = problem.init(gen, (16,))
x_svrg, x_sarah, x_prev, spent = x.clone(), x.clone(), None, {"SVRG": 0, "SARAH": 0}
for t in range(STEPS_HAND):
    xi = problem.sample(gen, (16,))                           # the minibatch ξ_t (B indices per run)
    if t % Q == 0:                                            # every q steps:
        snap, mu = x_svrg.clone(), problem.grad(x_svrg)       #   SVRG: x̃ = x_t, μ = ∇F(x̃)
        v = problem.grad(x_sarah)                             #   SARAH: restart, v_t = ∇F(x_t)
        spent["SVRG"] += N
        spent["SARAH"] += N
    else:                                                     # SARAH: v_t = ∇f_ξ(x_t) − ∇f_ξ(x_{t−1}) + v_{t−1}
        v = problem.grad(x_sarah, xi) - problem.grad(x_prev, xi) + v
        spent["SARAH"] += 2 * B
    d = problem.grad(x_svrg, xi) - problem.grad(snap, xi) + mu   # SVRG: d_t = ∇f_ξ(x_t) − ∇f_ξ(x̃) + μ
    spent["SVRG"] += 2 * B
    x_prev = x_sarah
    x_svrg, x_sarah = x_svrg - 0.1 * d, x_sarah - 0.1 * v
for name, mine in (("SVRG", x_svrg), ("SARAH", x_sarah)):
    r = toys.run(problem, name.lower(), lr=0.1, steps=STEPS_HAND, seeds=16, seed=1, epoch=Q, keep_path=True)
    gap = (r.path[-1] - mine).abs().max().item()
    print(f"{name}: by hand vs toys.run after {STEPS_HAND} steps: max |difference| "
          f"{'below 1e-12' if gap < 1e-12 else f'{gap:.1e}'}; component gradients {spent[name]} "
          f"(toys.run: {r.grad_evals[-1].item()}) = {math.ceil(STEPS_HAND / Q)} full passes of {N} + "
          f"{(spent[name] - math.ceil(STEPS_HAND / Q) * N) // (2 * B)} steps of 2 x {B}")
    assert gap < 1e-12 and spent[name] == r.grad_evals[-1].item()

# %% [markdown]
# ## 2. What the theory promises, and under which assumptions
#
# Gradient evaluations (component gradients $\nabla f_i$, or stochastic gradients for the online methods) that
# guarantee a point with $\mathbb{E}\|\nabla F(x)\| \le \epsilon$ on a smooth nonconvex $F$, worst case over
# the class, constants dropped; $\tilde O$ also drops logarithms.
#
# | method | evaluations | assumes | source |
# |---|---|---|---|
# | SGD | $O(\epsilon^{-4})$ | $F$ $\ell$-smooth; bounded variance $\mathbb{E}\|g - \nabla F\|^2 \le \nu^2$ | [GL] |
# | GD (full passes) | $O(N\epsilon^{-2})$ | a finite sum, $F$ $\ell$-smooth | [GL], $\nu = 0$ |
# | SVRG | $O(N + N^{2/3}\epsilon^{-2})$ | a finite sum; each $f_i$ $\ell$-smooth (on average suffices) | [R], [AH] |
# | SARAH, SPIDER | $O(N + \sqrt N\epsilon^{-2})$ finite sum, $O(\epsilon^{-3})$ online | mean-sq. smooth | [F] |
# | STORM | $\tilde O(\epsilon^{-3})$ | each $f(\cdot,\xi)$ $\ell$-smooth, bounded variance, bounded gradients | [CO] |
# | MARS, exact | $\tilde O(\epsilon^{-3})$ | see the statement below | [Y] |
# | MARS, approx | none beyond momentum's | | |
# | lower bound | $\Omega(\epsilon^{-3})$; $\Omega(\epsilon^{-4})$ if only $F$ is smooth | bounded variance | [A] |
#
# [GL] Ghadimi & Lan, SIAM J. Optim. 2013, arXiv 1309.5549. [R] Reddi et al., ICML 2016, arXiv 1603.06160.
# [AH] Allen-Zhu & Hazan, ICML 2016, arXiv 1603.05643. [F] Fang et al. (SPIDER), NeurIPS 2018, arXiv 1807.01695.
# [CO] Cutkosky & Orabona (STORM), NeurIPS 2019, arXiv 1905.10018; its bounded gradients serve its adaptive
# steps. [Y] Yuan et al. (MARS), arXiv 2411.10438. [A] Arjevani et al., arXiv 1912.02365.
#
# *Mean-squared (average) smoothness*: $\mathbb{E}_\xi\|\nabla f(x,\xi) - \nabla f(y,\xi)\|^2 \le \ell^2\|x - y\|^2$.
# It is what every row from SVRG on relies on: the difference of *one sample's* gradient at two points is
# small when the points are close. SARAH's own paper analyses convex problems; its nonconvex rate comes from
# later work (SPIDER's analysis, and SARAH's own follow-ups). SVRG's first analysis (Johnson & Zhang) is for
# strongly convex finite sums, where it converges linearly.
#
# **MARS's theorem, stated.** The paper's main convergence theorem (Yuan, Liu, Wu, Zhou & Gu, *MARS:
# Unleashing the Power of Variance Reduction for Training Large Models*, arXiv 2411.10438) covers **exact**
# MARS, $g_{\text{prev}} = \nabla f(x_{t-1}, \xi_t)$. Assumptions: bounded variance,
# $\mathbb{E}\|\nabla f(x,\xi) - \nabla F(x)\|^2 \le \nu^2$; mean-squared (average) smoothness with constant
# $\ell$, as above; a preconditioner whose eigenvalues stay in a fixed range; step sizes and $\beta_1$ chosen by
# the analysis. Rate: after $T$ steps $\mathbb{E}\|\nabla F\| = \tilde O(T^{-1/3})$, i.e. $\tilde O(\epsilon^{-3})$
# gradient evaluations, STORM's rate and the lower bound's up to logarithms. Approximate MARS (the default,
# $g_{\text{prev}} = g_{t-1}$) is not covered. This is the course's summary: the repository's account of the
# algorithm (`docs/algorithm.md`) gives the equations, not the theorem or its number, so read the paper for
# the constants and the exact schedules.
#
# Two things the table hides. The finite-sum rates count the full passes, and pay off when $N$ is small
# against $\epsilon^{-2}$ (against SGD's $\epsilon^{-4}$) or $\epsilon^{-1}$ (SARAH against STORM): data sets
# of billions of tokens are the other regime. And a rate bounds $\|\nabla F\|$, not the loss: on a flat,
# nonconvex landscape a small gradient is not a low loss, which section 3 shows.

# %% [markdown] tags=["slide"]
# ## 3. At equal gradient evaluations, each method at its tuned step size
#
# The finite sum ($N = 128$, $B = 8$) from the point where 300 steps of full-batch gradient descent
# ($\eta = 0.5$) leave it, as in notebook 03b: past the fast descent, where the minibatch noise dominates the
# gradient. Budget: 50 passes, $50N = 6400$ component gradients, SVRG's snapshots and SARAH's restarts
# included (one epoch, $q = N/B = 16$ steps, costs $N + 16\cdot 2B = 3N$: a third of SVRG's budget is full
# passes).

# %% [markdown] tags=["notes"]
# Seven methods: SGD (1 minibatch per step), momentum ($\beta_1 = 0.95$, 1 per step: MARS approx without its
# correction), SVRG, SARAH, exact STORM ($1 - a = \beta_1 = 0.95$; MARS's momentum at $\gamma = 1$), MARS approx
# and MARS exact (MARS's momentum, no preconditioner, no clip, $\gamma = 0.025$, through `toys.run` as in
# notebooks 02–03).
#
# **Tuning.** Each method's step size is the one of $\eta \in \{0.1, 0.2, 0.4, 0.8\}$ with the lowest mean
# loss $F$ over the last tenth of the budget, on 8 *tuning* runs (random stream 100) where none diverges. A best
# step size at the edge of the grid says the optimum may lie outside it, so a grid whose best is its largest
# step size is widened by doubling (its smallest, by halving) until the best is inside the grid or the next
# step size diverges. The numbers reported come from 16 *other* runs (random stream 0), so the choice is not
# fitted to them.

# %%
x_warm = problem.init(torch.Generator().manual_seed(0))
for _ in range(300):  # full-batch gradient descent: the deterministic part of the descent, done
    x_warm = x_warm - 0.5 * problem.grad(x_warm)
BUDGET = 50 * N
ETAS = (0.1, 0.2, 0.4, 0.8)
METHODS = {  # name: (toys.run method, keyword arguments)
    "SGD": ("sgd", {}), "momentum": ("momentum", {}), "SVRG": ("svrg", {}), "SARAH": ("sarah", {}),
    "exact STORM": ("storm-exact", {}), "MARS approx": ("mars-approx", dict(gamma=GAMMA)),
    "MARS exact": ("mars-exact", dict(gamma=GAMMA)),
}


def steps_within(method, budget):
    """Enough steps to spend `budget` component gradients (the runs are cut at the budget when scored)."""
    return budget // (B if method in ("sgd", "momentum", "mars-approx") else 2 * B)


def score(r, budget):
    """Per run: mean F and mean ||grad F||^2 over the steps whose cost falls in the last tenth of the budget."""
    window = (r.grad_evals > 0.9 * budget) & (r.grad_evals <= budget)
    return r.loss[window].mean(0), r.grad_sq[window].mean(0)


def tuning_loss(name, eta, budget, x0, seeds):
    """Mean F over the last tenth of the budget on the tuning runs (random stream 100); inf if one diverges."""
    method, kw = METHODS[name]
    r = toys.run(problem, method, lr=eta, steps=steps_within(method, budget), seeds=seeds, seed=100, beta=BETA,
                 x0=x0, **kw)
    return math.inf if r.diverged.any() else score(r, budget)[0].mean().item()


def tune(names, budget, x0, etas=ETAS, seeds=TUNE_SEEDS):
    """{name: (best eta, {eta: mean F of the tuning runs})}: lowest mean F among step sizes where no run diverges.

    A grid whose best step size is its largest is widened by doubling, one whose best is its smallest by halving,
    until the best is inside the grid (or the next step size diverges, inf)."""
    out = {}
    for name in names:
        table = {eta: tuning_loss(name, eta, budget, x0, seeds) for eta in etas}
        while True:
            best = min(table, key=table.get)
            if math.isinf(table[best]):
                raise RuntimeError(f"{name}: every step size of the grid diverges")
            if best not in (min(table), max(table)):
                break
            eta = 2 * best if best == max(table) else best / 2
            table[eta] = tuning_loss(name, eta, budget, x0, seeds)
        out[name] = (best, dict(sorted(table.items())))
    return out


tuned = tune(METHODS, BUDGET, x_warm)
runs, scores = {}, {}
for name, (method, kw) in METHODS.items():
    runs[name] = toys.run(problem, method, lr=tuned[name][0], steps=steps_within(method, BUDGET), seeds=SEEDS,
                          seed=0, beta=BETA, x0=x_warm, **kw)
    scores[name] = [toys.t_interval(s) for s in score(runs[name], BUDGET)]  # (mean, half-width) for F, ||grad F||^2
print(f"start: F = {problem.loss(x_warm).item():.3e}, ||grad F||^2 = {problem.grad(x_warm).square().sum().item():.2e}")
print("tuning runs, mean F over the last tenth of the budget (inf: a run diverged):")
for name, (best, table) in tuned.items():
    print(f"  {name:>12}: " + "  ".join(f"{eta:g}: {v:.4e}" for eta, v in table.items()) + f"   -> eta = {best:g}")
print(f"scored runs ({SEEDS}), after {BUDGET} component gradients, mean ± 95% t-interval over runs:")
for name, ((F, dF), (G, dG)) in scores.items():
    print(f"  {name:>12} (eta {tuned[name][0]:g}): F = {F.item():.4e} ± {dF.item():.1e}   "
          f"||grad F||^2 = {G.item():.2e} ± {dG.item():.1e}   diverged {int(runs[name].diverged.sum())}")

# %% tags=["slide"]
EDGES = torch.linspace(0, BUDGET, 26)


def binned(r, values):
    """Per run, the mean of `values` over the steps whose cost falls in each bin of EDGES: (bins, runs)."""
    rows = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        window = (r.grad_evals > lo) & (r.grad_evals <= hi)
        rows.append(values[window].mean(0))
    return torch.stack(rows)


fig, axes = style.figure(1, 2, sharex=True)
centres = (EDGES[:-1] + EDGES[1:]) / 2 / N
STRIP = {name: 56.5 + 2.2 * i for i, name in enumerate(METHODS)}  # where each method's final interval is drawn
curves = {0: [], 1: []}  # what each panel must hold: the curves after the first 10 passes and the intervals
for name, r in runs.items():
    kw = look(name, label=f"{name} (eta {tuned[name][0]:g})", every=4)
    for i, (ax, values) in enumerate(((axes[0], r.loss), (axes[1], r.grad_sq))):
        mean = binned(r, values).mean(1)
        ax.plot(centres, mean, **kw)
        mid, half = scores[name][i]
        ax.errorbar(STRIP[name], mid, yerr=half, color=kw["color"], marker=kw["marker"] or "o", ms=9, capsize=4,
                    lw=2.5, ls="none")
        curves[i] += [mean[centres > 10], mid - half, mid + half]
lo, hi = (torch.cat([torch.as_tensor(v).flatten() for v in curves[0]]).aminmax())
axes[0].set_ylim(lo.item() - 0.05 * (hi - lo).item(), hi.item() + 0.05 * (hi - lo).item())
axes[1].set(yscale="log", ylim=style.log_limits(*curves[1], pad=1.4))
for ax in axes:
    ax.axvline(51.5, color=style.GREY, lw=1)
    ax.text(52, 0.5, "last tenth: mean ± 95% t-interval", transform=ax.get_xaxis_transform(), rotation=90,
            ha="left", va="center", fontsize=12, color=style.GREY)
top = axes[0].get_ylim()[1]
off = [name for name, r in runs.items() if binned(r, r.loss).mean(1).max() > top]  # early curves off the scale
if off:
    axes[0].annotate(" and ".join(off) + "\nstart higher (off the scale)", xy=(3, top), xytext=(12, top),
                     va="top", fontsize=12, color=style.GREY, arrowprops=dict(arrowstyle="->", color=style.GREY))
axes[0].set(xlabel="component gradients / N (passes over the data)", ylabel=r"$F(x_t)$", title="Loss",
            xticks=[0, 10, 20, 30, 40, 50])
axes[1].set(xlabel="component gradients / N (passes over the data)", ylabel=r"$\|\nabla F(x_t)\|^2$",
            title="Stationarity")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4)
fig.suptitle(f"Equal cost, each method at its tuned step size: mean of {SEEDS} runs")
style.save(fig, "02b_equal_cost")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
F_ = {name: s[0][0].item() for name, s in scores.items()}
G_ = {name: s[1][0].item() for name, s in scores.items()}
others = [n for n in METHODS if n != "SVRG"]
start_G = problem.grad(x_warm).square().sum().item()
# approx MARS against momentum (the same beta1, no correction), paired by run: the same seed, the same minibatches
paired, paired_half = toys.t_interval(score(runs["MARS approx"], BUDGET)[0] - score(runs["momentum"], BUDGET)[0])
tuning_ratio = {eta: tuned["MARS approx"][1][eta] / tuned["momentum"][1][eta] for eta in (0.2, 0.4)}
claims.check({
    "every chosen step size lies inside its grid (a larger and a smaller one were tried)":
        all(min(table) < best < max(table) for best, table in tuned.values()),
    "SVRG ends with a ||grad F||^2 at least 10x below every other method's, at equal cost":
        all(G_["SVRG"] * 10 < G_[b] for b in others),
    "... and below the start's, while SGD, exact STORM and both MARS end above it":
        all(G_["SVRG"] < start_G < G_[b] for b in ("SGD", "exact STORM", "MARS approx", "MARS exact")),
    "on the loss F, exact STORM and approx MARS are more than 10 % below SVRG":
        all(F_[b] < 0.9 * F_["SVRG"] for b in ("exact STORM", "MARS approx")),
    "momentum (beta1 = 0.95, no correction) ends below SGD and SVRG in the loss":
        F_["momentum"] < min(F_["SGD"], F_["SVRG"]),
    "approx MARS ends below momentum, by 5 to 15 % (paired by run: the 95% t-interval of the gap excludes 0)":
        0.85 < F_["MARS approx"] / F_["momentum"] < 0.95 and (paired + paired_half).item() < 0,
    "tuning runs: approx MARS within 5 % of momentum at eta = 0.2, over 10 % below it at eta = 0.4":
        abs(tuning_ratio[0.2] - 1) < 0.05 and tuning_ratio[0.4] < 0.9,
    "no scored run diverges": not any(r.diverged.any() for r in runs.values()),
})
print(f"approx MARS - momentum, loss over the last tenth, paired by run: {paired.item():.2e} "
      f"± {paired_half.item():.1e} ({100 * (F_['MARS approx'] / F_['momentum'] - 1):+.1f} %)")

# %% [markdown] tags=["notes"]
# **Reading.** Two pictures, two answers. In **stationarity**, the quantity every rate of section 2 bounds,
# SVRG is in a class of its own: its estimate's error vanishes as the iterates settle near the snapshot, so
# $\|\nabla F\|^2$ keeps falling, while SGD, momentum, STORM and MARS sit on a noise floor set by their step size. In
# the **loss**, it has no such lead: the landscape here is a long, flat valley, where progress in $F$ comes
# from long steps, and SVRG's step size is capped by stability and its budget by the full passes (a third of
# it). Tuned on the loss, SARAH takes the largest stable step, where some runs wander (its wide interval):
# its recursion carries errors from step to step until the next restart, and a large step lets them grow.
# A lower $\|\nabla F\|$ is a better *stationary point*, not a lower loss; which one matters is the question
# to ask before reading any rate.
#
# The lowest loss is approx MARS's, and it is not variance reduction: its correction cannot cancel noise
# (section 4: its $Y$ is an independent draw), and notebook 03b §3 finds it behaving like momentum. Momentum
# with the same $\beta_1$ and no correction takes a part of its lead: it ends below SGD and SVRG. Approx MARS
# ends about 9 % below momentum still (the paired gap is printed above), and the tuning runs show where: at
# $\eta = 0.2$ the two are within 5 % of each other, at $0.4$ approx MARS is over 10 % lower, so the correction
# lets the momentum take a larger step. That is consistent with the correction removing part of momentum's
# lag (notebook 02 §4), not with a less noisy estimate. (Measured on one small problem; the printout above
# lists the tuned step sizes and every mean with its interval. MARS exact's grid reaches 1.6, where its loss is
# higher, so its best, 0.8, lies inside the grid.)

# %% [markdown] tags=["slide"]
# ## 4. One idea behind all of them: the control variate
#
# To estimate $\mathbb{E}[X]$ from a noisy $X$, subtract a correlated $Y$ whose mean you know (or estimate):
#
# $$\hat X = X - \omega\,(Y - \mathbb{E}[Y]), \qquad
#   \operatorname{Var}[\hat X] = \operatorname{Var}[X] - 2\omega\operatorname{Cov}[X,Y]
#   + \omega^2\operatorname{Var}[Y].$$
#
# So **the variance falls iff $2\omega\,\mathrm{Cov}[X,Y] > \omega^2\,\mathrm{Var}[Y]$**, it is smallest at
# $\omega^\star = \mathrm{Cov}[X,Y]/\mathrm{Var}[Y]$, and with $\omega = 1$ it needs $\mathrm{Cov} > \mathrm{Var}[Y]/2$:
# for $X$ and $Y$ of equal variance a correlation above $\tfrac12$.

# %% [markdown] tags=["notes"]
# For vectors: traces, $\mathrm{Cov} = \mathbb{E}\langle X - \mathbb{E}X, Y - \mathbb{E}Y\rangle$,
# $\mathrm{Var} = \mathbb{E}\|Y - \mathbb{E}Y\|^2$.

# %% [markdown] tags=["slide"]
# ### Each method is one choice
#
# | method | $X$ | $Y$ (same minibatch unless said) | $\mathbb{E}[Y]$ from | $\omega$ |
# |---|---|---|---|---|
# | SVRG | $\nabla f_\xi(x_t)$ | $\nabla f_\xi(\tilde x)$ | $\mu$, exact (a full pass) | 1 (α-SVRG: $\alpha_t$) |
# | SARAH | $\nabla f_\xi(x_t)$ | $\nabla f_\xi(x_{t-1})$ | $v_{t-1}$, an estimate | 1 |
# | exact STORM | $g_t$ | $\nabla f(x_{t-1}, \xi_t)$ | $d_{t-1}$, an estimate | $1 - a = \beta_1$ |
# | MARS | $g_t$ | exact: as STORM; approx: $g_{t-1}$, *another* minibatch | the momentum $m_{t-1}$ | $k/(1+k)$ |

# %% [markdown] tags=["notes"]
# MARS's corrected gradient is $c_t = (1+k)(X - \omega Y)$ with $k = \gamma\beta_1/(1-\beta_1)$ and
# $\omega = k/(1+k)$. At $\gamma = 1$ MARS's $\omega = \beta_1$, STORM's. At $\gamma = 0.025$, $\omega = 0.32$. In
# approx mode $Y$ is an independent draw, $\mathrm{Cov}[X,Y] \approx 0$, and the condition fails for every
# $\omega > 0$: the noise of $c_t/(1+k)$ is $1 + \omega^2$ times $g_t$'s, i.e. $c_t$'s is $(1+k)^2 + k^2$ times
# (notebook 02's $2.4\times$).
#
# `toys.run(..., keep_cv=True)` records $\langle\zeta_X, \zeta_Y\rangle$, $\|\zeta_X\|^2$ and $\|\zeta_Y\|^2$ with
# $\zeta = $ value $-$ its exact mean, per step and run; their means over 32 runs estimate the traces. Here
# from a random start (the whole run, where the iterate moves), $\eta = 0.2$ for all.

# %%
CV_STEPS, CV_SEEDS = 320, 32
cv_runs = {name: toys.run(problem, METHODS[name][0], lr=0.2, steps=CV_STEPS, seeds=CV_SEEDS, seed=7, beta=BETA,
                          keep_cv=True, **METHODS[name][1])
           for name in ("SVRG", "exact STORM", "MARS approx")}
BLOCK = 16  # one SVRG epoch


def cv_blocks(r):
    """Means over runs and over blocks of 16 steps: Cov, Var X, Var Y and the coefficient omega (toys.run's key "c";
    steps without a control variate skipped)."""
    out = {}
    for key, values in r.cv.items():
        means = values.nanmean(1)                         # over runs
        out[key] = means.unfold(0, BLOCK, BLOCK).nanmean(-1)  # over blocks of steps
    return out


cv_stats = {}
print(f"control variates along the run ({CV_SEEDS} runs, blocks of {BLOCK} steps): "
      "condition 2 omega Cov / (omega^2 Var Y) (> 1: variance falls), Var[X - omega Y] / Var[X], correlation")
for name, r in cv_runs.items():
    s = cv_blocks(r)
    w = s["c"]  # the control-variate coefficient omega
    s["condition"] = 2 * w * s["cov"] / (w**2 * s["var_y"])
    s["factor"] = (s["var_x"] - 2 * w * s["cov"] + w**2 * s["var_y"]) / s["var_x"]
    s["rho"] = s["cov"] / (s["var_x"] * s["var_y"]).sqrt()
    cv_stats[name] = s
    print(f"  {name:>12} (omega = {w[-1].item():.3f}): condition {s['condition'].min().item():7.3f} .. "
          f"{s['condition'].max().item():7.3f}; factor {s['factor'].min().item():.3f} .. "
          f"{s['factor'].max().item():.3f}; correlation {s['rho'].min().item():+.3f} .. {s['rho'].max().item():+.3f}")
k = GAMMA * BETA / (1 - BETA)
print("approx MARS: predicted factor for independent X, Y of equal variance 1 + omega^2 = "
      f"{1 + (k / (1 + k)) ** 2:.3f}")

# %% tags=["slide"]
fig, axes = style.figure(1, 2)
steps_axis = torch.arange(BLOCK // 2, CV_STEPS, BLOCK)
for name, s in cv_stats.items():
    axes[0].plot(steps_axis, s["condition"].abs(), **look(name, every=2))
    axes[1].plot(steps_axis, s["factor"], **look(name, every=2))
axes[0].axhline(1.0, color=style.GREY, lw=1.5, label="break-even")
axes[1].axhline(1.0, color=style.GREY, lw=1.5, label="no change (SGD's noise)")
axes[0].set(xlabel="step", ylabel=r"$|2\omega\,\mathrm{Cov}[X,Y]| \,/\, \omega^2\mathrm{Var}[Y]$", yscale="log",
            title="The condition (> 1: the variance falls)")
axes[1].set(xlabel="step", ylabel=r"$\mathrm{Var}[X - \omega Y] \,/\, \mathrm{Var}[X]$", yscale="log",
            title="What the control variate leaves of the noise")
axes[0].legend()
fig.suptitle(f"Control variates measured along runs from a random start, eta = 0.2 ({CV_SEEDS} runs)")
style.save(fig, "02b_control_variate")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
s_svrg, s_storm, s_mars = (cv_stats[n] for n in ("SVRG", "exact STORM", "MARS approx"))
claims.check({
    "exact STORM (Y one step old): 2 omega Cov > omega^2 Var Y in every block of the run (the variance falls)":
        bool((s_storm["condition"] > 1).all()),
    "SVRG, first epoch from the random start: the condition fails and its estimate is noisier than g_t":
        bool(s_svrg["condition"][0] < 1 and s_svrg["factor"][0] > 1),
    "SVRG, from the third epoch on: the condition holds": bool((s_svrg["condition"][2:] > 1).all()),
    "SVRG, last 5 epochs: it leaves less noise than exact STORM (whose omega = 0.95 keeps part of it)":
        bool((s_svrg["factor"][-5:] < s_storm["factor"][-5:]).all()),
    "approx MARS: |correlation| < 0.1 and the condition fails in every block (the noise grows)":
        bool((s_mars["rho"].abs() < 0.1).all() and (s_mars["condition"] < 1).all() and (s_mars["factor"] > 1).all()),
    "approx MARS's factor is within 5 % of 1 + omega^2 (independent draws)":
        abs(s_mars["factor"].mean().item() / (1 + (k / (1 + k)) ** 2) - 1) < 0.05,
})

# %% [markdown] tags=["notes"]
# **Reading.** Exact STORM's $Y$ is one step old, so the condition holds all along. SVRG's $Y$ is as old as
# the epoch: in the first epoch from a random start, where the iterate moves fast, the snapshot goes stale
# within the epoch, the condition fails and SVRG's estimate is *noisier* than the plain minibatch gradient; as
# the steps shorten, the snapshot stays close and SVRG removes almost all the noise, more than exact STORM,
# whose $\omega = 0.95$ cannot remove more than about $1 - (1-\omega)^2$ of it even at perfect correlation (the rest
# its recursion averages out over time). Approx MARS's $Y$ is independent: its correction adds
# $\omega^2 \approx 10\%$.
# The same measurement on the small GPT: notebook 06, section *The control-variate condition on the GPT*.

# %% [markdown]
# ## 5. Why naive SVRG fails on deep networks: the snapshot goes stale
#
# Defazio & Bottou (*On the Ineffectiveness of Variance Reduced Optimization for Deep Learning*, NeurIPS
# 2019) ran SVRG on image classifiers and found that on the larger networks (ResNet, DenseNet) it reduces the
# gradient variance little, and does not beat SGD. The mechanism is section 4's condition: SVRG's $Y$
# is the gradient at the snapshot $\tilde x$, and as $x_t$ moves away from $\tilde x$ within an epoch (and deep
# networks move far: large steps, a curved landscape) the correlation of $\nabla f_i(x_t)$ with
# $\nabla f_i(\tilde x)$ decays; once $2\,\mathrm{Cov}[X,Y] < \mathrm{Var}[Y]$ (section 4's condition at $\omega = 1$),
# subtracting $Y$ *adds* noise, and the full pass that paid for $\mu$ is wasted. A correlation of $\tfrac12$ is
# the break-even only when $X$ and $Y$ have equal variances; here the variance of the per-sample gradients
# changes along the path, and the table below breaks even between its correlations 0.702 and 0.572.
# On the toy, exactly (over all $N$ samples, no sampling noise): along a run of SGD from a random start, the
# correlation between the per-sample gradients at two points of the path, against the distance between them.

# %%
sgd_path = toys.run(problem, "sgd", lr=0.2, steps=800, seeds=4, seed=7, keep_path=True).path[::8]  # (101, 4, dim)
P, R, D = sgd_path.shape
idx = torch.arange(N).unsqueeze(-1)
per_sample = problem.grad(sgd_path.reshape(-1, 1, D).expand(-1, N, D), idx).reshape(P, R, N, D)
zeta = (per_sample - per_sample.mean(2, keepdim=True)).transpose(0, 1).reshape(R, P, N * D)  # ∇f_i(x) − ∇F(x)
gram = zeta @ zeta.transpose(1, 2) / N                  # (run, s, t): Cov over i of ∇f_i(x_s) and ∇f_i(x_t)
s_i, t_i = torch.triu_indices(P, P, offset=1)           # every pair of points s < t, per run
cov, var = gram[:, s_i, t_i], gram.diagonal(dim1=1, dim2=2)
var_s, var_t = var[:, s_i], var[:, t_i]
rho = (cov / (var_s * var_t).sqrt()).flatten()
factor = ((var_t - 2 * cov + var_s) / var_t).flatten()  # SVRG (ω = 1): Var[X − Y] / Var[X], X at x_t, Y at x_s
dist = (sgd_path[s_i] - sgd_path[t_i]).norm(dim=-1).T.flatten()
DIST_EDGES = torch.logspace(-1.3, 0.3, 9)
bins = [(lo.item(), hi.item(), (dist > lo) & (dist <= hi)) for lo, hi in zip(DIST_EDGES[:-1], DIST_EDGES[1:],
                                                                             strict=True)]
print(f"{len(rho)} pairs of points on 4 SGD paths (eta = 0.2, 800 steps, every 8th point)")
print(f"{'distance':>15} {'pairs':>6} {'correlation':>11} {'Var[X-Y]/Var[X]':>16}")
for lo, hi, sel in bins:
    if sel.any():
        print(f"  {lo:5.2f} .. {hi:5.2f} {int(sel.sum()):6d} {rho[sel].mean().item():11.3f} "
              f"{factor[sel].mean().item():16.3f}")

# %% [markdown]
# And the inner-loop length: SVRG from the same random start at its step size of section 3, with epochs
# of $q \in \{4, 16, 64, 256\}$ steps, at the same budget of 50 passes. A short epoch keeps the snapshot
# fresh but spends most of the budget on full passes; a long one makes the passes rare and the snapshot stale.

# %%
x_cold = problem.init(torch.Generator().manual_seed(0))   # the random start the warm start came from
EPOCHS = (4, 16, 64, 256)
inner = {}
for q in EPOCHS:
    steps = BUDGET // (2 * B)
    r = toys.run(problem, "svrg", lr=tuned["SVRG"][0], steps=steps, seeds=SEEDS, seed=0, x0=x_cold, epoch=q,
                 keep_cv=True)
    cut = r.grad_evals <= BUDGET
    cvm = {key: v[cut].nanmean(1) for key, v in r.cv.items()}
    inner[q] = dict(F=score(r, BUDGET)[0].mean().item(), G=score(r, BUDGET)[1].mean().item(),
                    factor=((cvm["var_x"] - 2 * cvm["cov"] + cvm["var_y"]) / cvm["var_x"]).mean().item(),
                    passes=math.ceil(int(cut.sum()) / q), steps=int(cut.sum()))
sgd_cold = toys.run(problem, "sgd", lr=tuned["SGD"][0], steps=BUDGET // B, seeds=SEEDS, seed=0, x0=x_cold)
print(f"random start, {BUDGET} component gradients; SVRG at eta = {tuned['SVRG'][0]:g}, SGD at {tuned['SGD'][0]:g}:")
print(f"{'q':>5} {'steps':>6} {'full passes':>11} {'mean Var[d]/Var[g]':>18} {'F':>10} {'||grad F||^2':>12}")
for q, v in inner.items():
    print(f"{q:5d} {v['steps']:6d} {v['passes']:11d} {v['factor']:18.3f} {v['F']:10.4e} {v['G']:12.2e}")
print(f"  SGD {BUDGET // B:6d} {0:11d} {1.0:18.3f} {score(sgd_cold, BUDGET)[0].mean().item():10.4e} "
      f"{score(sgd_cold, BUDGET)[1].mean().item():12.2e}")

# %%
fig, (ax0, ax1) = style.figure(1, 2)
centres_d = torch.tensor([(lo * hi) ** 0.5 for lo, hi, sel in bins if sel.any()])
ax0.plot(centres_d, [rho[sel].mean().item() for _, _, sel in bins if sel.any()], **look("SVRG", every=1,
         label="correlation of the per-sample gradients"))
ax0.plot(centres_d, [factor[sel].mean().item() for _, _, sel in bins if sel.any()], **look("SGD", every=1,
         label=r"SVRG's $\mathrm{Var}[X - Y]/\mathrm{Var}[X]$"))
ax0.axhline(1.0, color=style.GREY, lw=1.5)
ax0.set(xscale="log", xlabel=r"distance $\|x - \tilde x\|$ between the two points",
        title="Staleness: correlation decays with distance")
ax0.legend()
ax1.plot(EPOCHS, [inner[q]["factor"] for q in EPOCHS],
         **look("SVRG", every=1, label=r"mean $\mathrm{Var}[d]/\mathrm{Var}[g]$"))
ax1.axhline(1.0, color=style.GREY, lw=1.5, label="SGD")
ax1.set(xscale="log", yscale="log", xlabel="inner-loop length q (steps per snapshot)",
        title="Longer epochs, staler snapshots")
ax1.set_xticks(EPOCHS, [str(q) for q in EPOCHS])
ax1.legend()
fig.suptitle("Why SVRG's snapshot stops helping (toy, exact over all N samples / 16 runs)")
style.save(fig, "02b_staleness")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
near, far = bins[0][2], bins[-1][2]
claims.check({
    "the correlation between per-sample gradients falls with the distance between the points":
        rho[near].mean().item() > rho[far].mean().item() + 0.2,
    "far enough apart, subtracting Y adds noise: SVRG's Var[X - Y] / Var[X] exceeds 1":
        factor[far].mean().item() > 1,
    "the longer the inner loop, the more noise SVRG's estimate keeps (q = 4 ... 256)":
        all(inner[a]["factor"] < inner[b]["factor"] for a, b in zip(EPOCHS, EPOCHS[1:], strict=False)),
    "from the random start, SGD's loss at equal cost is below SVRG's for every q":
        all(score(sgd_cold, BUDGET)[0].mean().item() < v["F"] for v in inner.values()),
})

# %% [markdown]
# Two more reasons, stated rather than run: SVRG's $Y = \nabla f_i(\tilde x)$ must be *the same function* $f_i$
# as at $x_t$. **Data augmentation** (a new crop or flip of image $i$ every time it is drawn) and **dropout**
# change $f_i$ from one draw to the next, and **batch normalisation** makes a sample's gradient depend on the
# other samples of its minibatch: the problem is no longer a fixed finite sum, $\mu$ is not the mean of the
# $Y$ subtracted, and the correlation is lower even at $x_t = \tilde x$. Defazio & Bottou restore the finite
# sum by reusing the snapshot's augmentation for each sample (*transform locking*) and by taking care of the
# batch-norm statistics, and still find little gain. STORM and MARS sidestep the snapshot: their $Y$ is one
# step old, at distance $\eta\|d_{t-1}\|$, always at the left end of the figure above, which is why exact
# STORM's condition holds from the first step in section 4, where SVRG's fails.
#
# ## 6. α-SVRG: a coefficient on the correction, beside MARS's γ
#
# Yin, Xu, Li, Darrell & Liu (*A Coefficient Makes SVRG Effective*, ICLR 2025) take section 4's lesson
# literally: the optimal $\omega^\star = \mathrm{Cov}/\mathrm{Var}[Y]$ is below 1 and shrinks during training, so
# they use $d_t = \nabla f_\xi(x_t) - \alpha_t\,(\nabla f_\xi(\tilde x) - \mu)$ with $\alpha_t$ decaying by a linear
# schedule. MARS's $\gamma$ is the same kind of knob on STORM's correction: $\omega = \frac{k}{1+k}$ with
# $k = \frac{\gamma\beta_1}{1-\beta_1}$, constant over the run ($0.32$ at $\gamma = 0.025$). Below: SVRG,
# α-SVRG with $\alpha_t = 1 - t/T$ over the run, and SGD, from the random start, each at its tuned step size
# (tuned as in section 3), and $\omega^\star$ measured along the SVRG run.

# %%
COLD_BUDGET = 50 * N
alpha_steps = COLD_BUDGET // (2 * B)
METHODS["alpha-SVRG"] = ("svrg", dict(alpha=lambda t: 1.0 - t / alpha_steps))
cold_tuned = tune(("SGD", "SVRG", "alpha-SVRG"), COLD_BUDGET, x_cold, etas=(0.1, 0.2, 0.4))
cold = {name: toys.run(problem, METHODS[name][0], lr=cold_tuned[name][0], steps=steps_within(METHODS[name][0],
                                                                                             COLD_BUDGET),
                       seeds=SEEDS, seed=0, x0=x_cold, keep_cv=True, **METHODS[name][1])
        for name in ("SGD", "SVRG", "alpha-SVRG")}
cold_scores = {name: [toys.t_interval(s) for s in score(r, COLD_BUDGET)] for name, r in cold.items()}
print(f"random start, {COLD_BUDGET} component gradients, mean ± 95% t-interval over {SEEDS} runs:")
for name, ((F, dF), (G, dG)) in cold_scores.items():
    print(f"  {name:>10} (eta {cold_tuned[name][0]:g}): F = {F.item():.4e} ± {dF.item():.1e}   "
          f"||grad F||^2 = {G.item():.2e} ± {dG.item():.1e}")
svrg_cv = {key: v.nanmean(1) for key, v in cold["SVRG"].cv.items()}
omega_star = (svrg_cv["cov"] / svrg_cv["var_y"]).unfold(0, BLOCK, BLOCK).mean(-1)
every = max(1, len(omega_star) // 8)  # print every `every`-th epoch of the run
print(f"omega* = Cov / Var Y along the SVRG run, epochs of {BLOCK} steps, one epoch in {every} of {len(omega_star)} "
      f"(epochs {', '.join(str(e) for e in range(1, len(omega_star) + 1, every))}): "
      + " ".join(f"{w:.2f}" for w in omega_star[::every].tolist()))

# %%
fig, ax = style.figure()
epoch_axis = torch.arange(len(omega_star)) * BLOCK + BLOCK / 2
ax.plot(epoch_axis, omega_star, **look("SVRG", every=2,
                                      label=r"$\omega^\star = \mathrm{Cov}/\mathrm{Var}[Y]$ along SVRG's run"))
ax.plot(epoch_axis, 1 - epoch_axis / alpha_steps, **look("alpha-SVRG", label=r"α-SVRG's $\alpha_t = 1 - t/T$"))
ax.axhline(1.0, color=style.GREY, lw=1.5, label=r"SVRG: $\omega$ = 1")
ax.axhline(k / (1 + k), **look("MARS approx",
                               label=rf"MARS at $\gamma$ = {GAMMA:g}: $\omega$ = k/(1+k) = {k / (1 + k):.2f}"))
ax.set(xlabel="step", ylabel=r"coefficient $\omega$", ylim=(0, 1.1),
       title="The optimal coefficient along the run, and the ones the methods use")
ax.legend()
style.save(fig, "02b_coefficients")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
Fc = {name: s[0][0].item() for name, s in cold_scores.items()}
Gc = {name: s[1][0].item() for name, s in cold_scores.items()}
claims.check({
    "along SVRG's run from the random start, omega* is below 1 on average, and below 0.75 in the first 4 epochs":
        omega_star.mean().item() < 1 and bool((omega_star[:4] < 0.75).all()),
    "on this toy omega* grows along the run: below 0.5 in the first epoch, above 0.9 in the last":
        omega_star[0].item() < 0.5 and omega_star[-1].item() > 0.9,
    "alpha-SVRG (alpha decaying to 0) ends with a ||grad F||^2 over 5x SVRG's": Gc["alpha-SVRG"] > 5 * Gc["SVRG"],
    "SGD's loss at equal cost is below SVRG's and alpha-SVRG's": Fc["SGD"] < min(Fc["SVRG"], Fc["alpha-SVRG"]),
})

# %% [markdown]
# **Reading.** The measured $\omega^\star$ is below 1 throughout, as Yin et al. argue, but on this toy it *grows*:
# low in the first epochs, where the iterate moves far from each snapshot, close to 1 once the steps shorten.
# Yin et al.'s decaying schedule comes from deep networks, where they measured $\omega^\star$ falling over training;
# here it has the wrong shape, and α-SVRG, which ends as SGD ($\alpha_T = 0$), ends on SGD's noise floor in
# $\|\nabla F\|^2$. The coefficient is a measurement to make on your problem, not a law. Neither variant beats
# SGD's loss from this start, for the reasons of section 5. MARS's $\gamma$ is the same kind of knob for a
# STORM correction, fixed and small: in approx mode, where $Y$ is uncorrelated, any $\omega$ adds noise (section 4),
# and the small $\gamma$ keeps that addition small.

# %% [markdown]
# ## Summary
#
# * SVRG subtracts the same minibatch's gradient at a snapshot and adds back its exact mean; SARAH subtracts it
#   at the previous iterate and carries its estimate forward, restarting with full gradients; SPIDER is SARAH
#   with a normalised step. `toys.run` counts every component gradient, full passes included.
# * At equal cost, on the finite sum's noisy phase, SVRG reaches a $\|\nabla F\|^2$ more than 10× below
#   everything else (the rates of section 2 are about this), without a lead in the loss. The lowest loss is
#   approx MARS's; momentum with the same $\beta_1$ and no correction takes a part of that lead over SGD, and
#   approx MARS's correction, which cannot cancel noise, lets it take a larger step.
# * Every method here is a control variate $X - \omega(Y - \mathbb{E}[Y])$; it helps iff
#   $2\omega\,\mathrm{Cov} > \omega^2\mathrm{Var}[Y]$. Exact STORM satisfies it along the whole run, SVRG once the
#   iterate moves slowly, approx MARS never (its $Y$ is independent).
# * SVRG's $Y$ goes stale as the iterate leaves the snapshot: the correlation decays with distance and with the
#   inner-loop length, and from a random start SGD wins at equal cost; augmentation, dropout and batch norm
#   break the finite sum outright (Defazio & Bottou). α-SVRG scales the correction by
#   $\alpha_t \approx \omega^\star$; its decaying schedule fits deep networks, not this toy, where $\omega^\star$ grows.
# * MARS's theorem covers exact MARS under bounded variance and mean-squared smoothness: $\tilde O(\epsilon^{-3})$.

# %% [markdown] tags=["slide"]
# ## Questions
#
# Answers at the end of the notebook.
#
# 1. Why is SVRG's estimate unbiased while SARAH's is not, and why does SARAH still converge?
# 2. SVRG with $q = 1$: what method is it, and what does a step cost?
# 3. In the control-variate view, what plays $\mathbb{E}[Y]$ for STORM, and why can STORM avoid full passes?
# 4. Approx MARS's $Y$ is uncorrelated with $X$. What, then, does its correction do (notebook 02)?
# 5. When would you pick SVRG over STORM on a real problem?

# %% [markdown]
# ## Exercises
#
# Write each function in its cell, run it, then run the `check` cell under it. Reference solutions:
# `notebooks/solutions/nb02b.py`.
#
# **Exercise 02b.1 · The variance of an SVRG estimate, exactly.** `X` and `Y` are the per-sample gradients
# $\nabla f_i(x)$ and $\nabla f_i(\tilde x)$, tensors of shape `(N, dim)`. A minibatch $\xi$ of `batch` indices is
# drawn uniformly *with replacement*, and $d = \frac1B\sum_{i\in\xi}(X_i - \omega\,Y_i) + \omega\,\bar Y$ (the
# coefficient $\omega$ is the argument `alpha`, as α-SVRG calls it). Write `svrg_variance(X, Y, alpha, batch)`
# returning $\mathbb{E}\|d - \nabla F(x)\|^2$ exactly. The check also asks for $N = 64$ with $B = 8$ and larger
# ($64^8 \approx 3 \cdot 10^{14}$ minibatches and more), so enumerating them is not an answer.

# %%
def svrg_variance(X, Y, alpha, batch):
    """E||d - grad F(x)||^2 of the (alpha-)SVRG estimate with `batch` indices drawn with replacement."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("02b.1", svrg_variance)

# %% [markdown]
# **Exercise 02b.2 · The best coefficient.** Write `optimal_alpha(X, Y)`: the $\omega$ that minimises the variance of
# exercise 02b.1. Does it depend on the batch size? Then evaluate it on the toy's per-sample gradients at two
# points of a run (`problem.grad(x.expand(N, -1), torch.arange(N).unsqueeze(-1))`) and compare with the $\omega^\star$
# of section 6.

# %%
def optimal_alpha(X, Y):
    """The coefficient alpha minimising the variance of the SVRG estimate."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("02b.2", optimal_alpha)

# %% [markdown]
# ## Answers to the questions
#
# 1. SVRG subtracts $Y - \mu$ with $\mathbb{E}_\xi Y = \mu$ exactly, so $\mathbb{E}_\xi d_t = \nabla F(x_t)$. SARAH's
#    $v_{t-1}$ is itself an estimate with an error, and
#    $\mathbb{E}[v_t\,|\,\text{past}] = \nabla F(x_t) - \nabla F(x_{t-1}) + v_{t-1}$ carries it. Its error grows
#    only by the differences $\nabla f_\xi(x_t) - \nabla f_\xi(x_{t-1})$, small under mean-squared smoothness
#    when steps are small, and restarts reset it.
# 2. Gradient descent: $x_t = \tilde x$ at every step, so $d_t = \mu = \nabla F(x_t)$; each step costs a full pass
#    (plus $2B$ evaluations that cancel; an implementation would skip them).
# 3. Its previous estimate $d_{t-1}$ of $\nabla F(x_{t-1})$: an estimate whose error decays by $1-a$ per step,
#    so no full gradient is needed; the weight $a$ on the fresh gradient keeps the estimate from drifting.
# 4. It removes momentum's lag (the mean part of $g_t - g_{t-1}$ tracks the change of $\nabla F$), at the price of
#    more noise; at $\gamma = 0.025$ both effects are small and nearly cancel in the error.
# 5. On a genuine finite sum (fixed data, no augmentation, dropout or batch norm), of moderate $N$, where a
#    precise stationary point is wanted (a small $\|\nabla F\|$, e.g. late in training or for convex models)
#    and where the full passes are cheap compared with the inner loop.
#
# ## References
#
# * R. Johnson, T. Zhang, *Accelerating Stochastic Gradient Descent using Predictive Variance Reduction* (SVRG),
#   [NeurIPS 2013](https://proceedings.neurips.cc/paper/2013/hash/ac1dd209cbcc5e5d1c6e28598e8cbbe8-Abstract.html).
# * L. M. Nguyen, J. Liu, K. Scheinberg, M. Takáč, *SARAH: A Novel Method for Machine Learning Problems Using
#   Stochastic Recursive Gradient*, ICML 2017, [arXiv 1703.00102](https://arxiv.org/abs/1703.00102).
# * C. Fang, C. J. Li, Z. Lin, T. Zhang, *SPIDER: Near-Optimal Non-Convex Optimization via Stochastic Path
#   Integrated Differential Estimator*, NeurIPS 2018, [arXiv 1807.01695](https://arxiv.org/abs/1807.01695).
# * S. J. Reddi, A. Hefny, S. Sra, B. Póczos, A. Smola, *Stochastic Variance Reduction for Nonconvex
#   Optimization*, ICML 2016, [arXiv 1603.06160](https://arxiv.org/abs/1603.06160); Z. Allen-Zhu, E. Hazan,
#   *Variance Reduction for Faster Non-Convex Optimization*, ICML 2016, [arXiv 1603.05643](https://arxiv.org/abs/1603.05643).
# * A. Cutkosky, F. Orabona, *Momentum-Based Variance Reduction in Non-Convex SGD* (STORM), NeurIPS 2019,
#   [arXiv 1905.10018](https://arxiv.org/abs/1905.10018).
# * A. Defazio, L. Bottou, *On the Ineffectiveness of Variance Reduced Optimization for Deep Learning*, NeurIPS
#   2019, [arXiv 1812.04529](https://arxiv.org/abs/1812.04529).
# * Y. Yin, Z. Xu, Z. Li, T. Darrell, Z. Liu, *A Coefficient Makes SVRG Effective*, ICLR 2025,
#   [arXiv 2311.05589](https://arxiv.org/abs/2311.05589).
# * S. Ghadimi, G. Lan, *Stochastic First- and Zeroth-Order Methods for Nonconvex Stochastic Programming*,
#   SIAM J. Optim. 2013, [arXiv 1309.5549](https://arxiv.org/abs/1309.5549); Y. Arjevani, Y. Carmon, J. C. Duchi,
#   D. J. Foster, N. Srebro, B. Woodworth, *Lower Bounds for Non-Convex Stochastic Optimization*,
#   [arXiv 1912.02365](https://arxiv.org/abs/1912.02365).
# * H. Yuan, Y. Liu, S. Wu, X. Zhou, Q. Gu, *MARS: Unleashing the Power of Variance Reduction for Training Large
#   Models*, ICML 2025, [arXiv 2411.10438](https://arxiv.org/abs/2411.10438); this repository's account of its
#   equations: `docs/algorithm.md`.
# * The course's bibliography and notation: [notebooks/README.md](README.md).
