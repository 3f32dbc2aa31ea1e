"""Notebook 02: the STORM estimator step by step, and its measured variance (built by scripts/run_notebooks.py)."""

# %% [markdown] tags=["slide"]
# # 02 · STORM step by step: a gradient estimate whose error shrinks
#
# **What this notebook teaches.** Where STORM and MARS sit in the family of variance-reduction
# methods (SVRG → SARAH/SPIDER → STORM → MARS) and what their convergence rates assume; the STORM
# recursion, run by hand with the library's own functions; its error $\mathbb{E}\|d_t - \nabla F(x_t)\|^2$
# measured against steps and against gradient evaluations; why *approximate* STORM is SGD; and what
# approximate MARS is: **a momentum recursion whose every step adds $\gamma\beta_1(g_t - g_{t-1})$**, checked
# to machine precision.

# %% [markdown] tags=["notes"]
# **You need.** Notebook 01 (the toys, the noise floor); exponential moving averages; big-O notation.
#
# **Class time.** 35 minutes in lecture 1 (§0–§4; the family table of §0 in 10 of them). The code
# runs in about 15 s on a laptop CPU.
# Notation: the [shared table](README.md#notation).

# %% [markdown] tags=["slide"]
# ## The STORM recursion
#
# Notebook 01 showed SGD stalling at a noise floor set by the variance of $g_t$. STORM
# (Cutkosky & Orabona, 2019) replaces $g_t$ by a **recursive estimate** $d_t$ of $\nabla F(x_t)$:
#
# $$d_t = g_t + (1-a)\,\big(d_{t-1} - g_{\text{prev}}\big), \qquad g_t = \nabla f(x_t, \xi_t),$$
#
# * **exact** STORM: $g_{\text{prev}} = \nabla f(x_{t-1}, \xi_t)$, the *same* minibatch at the previous
#   point: two gradient evaluations per step;
# * **approx** STORM: $g_{\text{prev}} = g_{t-1} = \nabla f(x_{t-1}, \xi_{t-1})$, the previous step's own
#   gradient: one evaluation per step.

# %%
import os
import mars_ref
import matplotlib.pyplot as plt
import torch

from mars_ref.course import style, toys
from mars_ref.course.exercises import check
from mars_ref.pieces import momentum, storm_correction, storm_estimator

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine
torch.manual_seed(0)
style.use()
FULL = os.environ.get("MARS_REF_FULL", "0") == "1"
SEEDS, STEPS = (128, 600) if FULL else (48, 300)
ETA, BETA = 0.05, 0.95              # step size; 1 − a = β1 = 0.95 (the MARS default β1)
problem = toys.TwoLayerRegression()  # N = 128 samples, minibatch B = 8, n = 144 parameters
print(f"{'full' if FULL else 'default'} size: {SEEDS} seeds x {STEPS} steps, eta = {ETA:g}, 1 - a = {BETA:g}")

# %% [markdown] tags=["slide"]
# ## 0. The family: SVRG → SARAH/SPIDER → STORM → MARS
#
# Every method below replaces $g_t$ by an estimate $d_t$ of $\nabla F(x_t)$ whose error shrinks instead of
# staying at the minibatch noise; they differ in what they pay for it.
#
# | method | estimate $d_t$ of $\nabla F(x_t)$ | gradient evaluations |
# |---|---|---|
# | SGD | $g_t$ | 1 per step |
# | SVRG | $\nabla f_i(x_t) - \nabla f_i(\tilde x) + \nabla F(\tilde x)$ | 2 per step, $N$ per snapshot $\tilde x$ |
# | SARAH, SPIDER | $\nabla f_\xi(x_t) - \nabla f_\xi(x_{t-1}) + d_{t-1}$ | 2 per step, a large batch per restart |
# | STORM | $g_t + (1-a)\,(d_{t-1} - \nabla f(x_{t-1}, \xi_t))$ | 2 per step, nothing else |
# | MARS, exact | STORM's correction $\times\gamma$, clipped, in a preconditioned momentum | 2 per step |
# | MARS, approx | the same with $g_{t-1}$ in place of $\nabla f(x_{t-1}, \xi_t)$ | 1 per step |

# %% [markdown] tags=["slide"]
# ### The rates and what they assume
#
# The number of stochastic gradient evaluations that guarantee a point with
# $\mathbb{E}\|\nabla F(x)\| \le \epsilon$ on a smooth **nonconvex** $F$ (the worst case over a class of
# problems, constants and logarithms dropped):
#
# | method | evaluations to $\mathbb{E}\|\nabla F\| \le \epsilon$ | assumes |
# |---|---|---|
# | SGD (Ghadimi & Lan) | $O(\epsilon^{-4})$ | $F$ $\ell$-smooth, $\mathbb{E}\|g - \nabla F\|^2 \le \nu^2$ |
# | SVRG (Reddi et al.; Allen-Zhu & Hazan) | $O(N + N^{2/3}\epsilon^{-2})$ | a finite sum, each $f_i$ $\ell$-smooth |
# | SARAH, SPIDER (Fang et al.)¹ | $O(\epsilon^{-3})$, finite sum $O(N + \sqrt N\epsilon^{-2})$ | mean-squared smooth |
# | STORM (Cutkosky & Orabona) | $\tilde O(\epsilon^{-3})$ | each $f(\cdot, \xi)$ smooth a.s.², bounded gradients |
# | MARS, exact (Yuan et al.) | STORM-type in the paper's analysis | the same, a preconditioner in a fixed range |
# | MARS, approx (what is run) | no guarantee beyond momentum's | |

# %% [markdown] tags=["notes"]
# $\tilde O$ is $O$ with logarithmic factors dropped as well; *a.s.* (almost surely) means for every sample
# $\xi$ outside a set of probability zero. $\nu^2$ bounds the whole noise vector's squared norm; the valley's
# $\sigma$ (notebook 01) is per coordinate, so there $\nu^2 = n\sigma^2$.
#
# ¹ SARAH's own paper analyses convex problems; its nonconvex rate came later (SPIDER, and SARAH's
# follow-ups). ² A stronger assumption than mean-squared smoothness; STORM also assumes bounded gradients
# (for its adaptive steps).
#
# SVRG's first analysis (Johnson & Zhang) was for strongly convex finite sums, where it converges
# linearly; the nonconvex rate in the table is later work. For MARS, read the paper's theorem for the
# exact conditions (step sizes, the schedule of $\beta_1$, the eigenvalue range of the preconditioner).

# %% [markdown] tags=["slide"]
# ### Mean-squared smoothness
#
# *Mean-squared smoothness* is the assumption that separates the two rates:
# $\mathbb{E}_\xi\|\nabla f(x, \xi) - \nabla f(y, \xi)\|^2 \le \ell^2\|x - y\|^2$, i.e. one *sample*'s gradient
# changes smoothly. It is what makes $\nabla f(x_t, \xi) - \nabla f(x_{t-1}, \xi)$ small when the step is small,
# and every method from SARAH on subtracts exactly that difference.

# %% [markdown] tags=["notes"]
# With it, $O(\epsilon^{-3})$ is the best
# any method can do, and with only $F$ smooth, SGD's $O(\epsilon^{-4})$ is (Arjevani et al., 2019): the
# gap between the two rows is what variance reduction can buy, and only when the same sample can be
# evaluated at two points.
#
# **What the theory buys, and what it does not.** The guarantees are about the *exact* estimators
# (two evaluations of one sample) with step sizes and weights $a$ chosen by the analysis, typically
# shrinking over time. The MARS runs that produced the paper's GPT-2 results use the *approximate*
# estimator with $\gamma = 0.025$ and per-tensor clipping, in MARS-AdamW (the headline results; the
# Newton–Schulz step belongs to MARS-Shampoo only): none of the rates
# above covers them, and section 1 shows why none can, since approx STORM at full strength *is* SGD.
# A rate is also a worst case over a class: it says nothing about one problem at one step size, which
# is what the measurements in this notebook and in 03b are about.

# %% [markdown] tags=["slide"]
# ## 1. Why the recursion reduces the error
#
# Write the minibatch noise as a function of the point, $\zeta_t(x) = \nabla f(x, \xi_t) - \nabla F(x)$,
# and the estimator's error $e_t = d_t - \nabla F(x_t)$. Subtracting $\nabla F(x_t)$ from both sides of
# exact STORM:
#
# $$e_t = (1-a)\,e_{t-1} \;+\; \underbrace{a\,\zeta_t(x_t)}_{\text{new noise, scaled by } a}
#   \;+\; (1-a)\underbrace{\big(\zeta_t(x_t) - \zeta_t(x_{t-1})\big)}_{\text{small if } x_t \approx x_{t-1}}.$$

# %% [markdown] tags=["notes"]
# Old error decays by $(1-a)$ per step, fresh noise enters only with weight $a$, so in a steady state
# $\mathbb{E}\|e\|^2 \approx \frac{a}{2-a}\operatorname{tr}\Sigma/B$ plus a drift term that grows with the
# step length $\|x_t - x_{t-1}\|$ (that term is where mean-squared smoothness enters). **Momentum**
# $m_t = (1-a) m_{t-1} + a g_t$ averages the noise the same way but also averages *stale gradients*: its
# error carries the lag $(1-a)(\nabla F(x_{t-1}) - \nabla F(x_t))$ at every step, which STORM's correction
# term cancels.

# %% [markdown] tags=["slide"]
# ### Approx STORM at full strength is SGD
#
# **Approx STORM** is different. With $g_{\text{prev}} = g_{t-1}$ the recursion reads
# $d_t - g_t = (1-a)(d_{t-1} - g_{t-1})$: the gap to the raw gradient only *decays*. Started as
# usual from $d_0 = g_{\text{prev}} = 0$, $d_1 = g_1$ and then $d_t = g_t$ for every $t$: **approx
# STORM at full strength is exactly SGD.** (This is why MARS's approx mode uses a small $\gamma$.)

# %% [markdown] tags=["slide"]
# ## 2. The loop, by hand
#
# This is the loop `toys.run` runs; here it
# is written out once, for exact STORM, with MARS's momentum at $\gamma = 1$ computed alongside
# from the same gradients:
#
# $$c_t = g_t + \gamma\frac{\beta_1}{1-\beta_1}(g_t - g_{\text{prev}}), \qquad
#   m_t = \beta_1 m_{t-1} + (1-\beta_1)\,c_t .$$
#
# Expanding, $m_t = g_t + \beta_1(m_{t-1} - g_{\text{prev}})$ at $\gamma = 1$: STORM with $1 - a = \beta_1$.

# %% [markdown] tags=["notes"]
# All seeds are rows of one tensor `x` of shape `(seeds, 144)`; every method sees the same
# minibatches $\xi_1, \xi_2, \dots$ (common random numbers). The cell checks that $m_t$ and $d_t$ agree to
# rounding at every step.

# %%
# NBVAL_CHECK_OUTPUT
gen = torch.Generator().manual_seed(1)
x = problem.init(gen, (SEEDS,))
d = torch.zeros_like(x)   # STORM's d_{t-1}
m = torch.zeros_like(x)   # MARS's m_{t-1}
x_prev, worst = None, 0.0
for t in range(1, 101):
    xi = problem.sample(gen, (SEEDS,))                     # the minibatch ξ_t, one per seed
    g = problem.stoch_grad(x, xi)                          # g_t = ∇f(x_t, ξ_t)
    g_prev = problem.stoch_grad(x_prev, xi) if t > 1 else torch.zeros_like(x)  # ∇f(x_{t-1}, ξ_t)
    d = storm_estimator(g, g_prev, d, a=1 - BETA)          # d_t = g_t + (1−a)(d_{t−1} − g_prev)
    c = storm_correction(g, g_prev, gamma=1.0, beta1=BETA)  # c_t = g_t + γ·β1/(1−β1)·(g_t − g_prev)
    m = momentum(m, c, BETA)                               # m_t = β1 m_{t−1} + (1−β1) c_t
    worst = max(worst, ((m - d).abs().max() / d.abs().max()).item())
    x_prev, x = x, x - ETA * d
print(f"exact STORM vs MARS momentum (gamma = 1, no clipping), 100 steps x {SEEDS} seeds:")
print(f"  max |m_t - d_t| / max |d_t| = {'below 1e-14' if worst < 1e-14 else f'{worst:.1e}'}")
assert worst < 1e-14  # float64: equal up to rounding

# %% [markdown] tags=["slide"]
# ## 3. The measured error, against steps and against gradient evaluations
#
# Five estimators, all with the same $\eta = 0.05$ and minibatch size $B = 8$ (except one), the same
# seeds and samples:
#
# | method | $d_t$ | gradient evaluations per step |
# |---|---|---|
# | SGD | $g_t$ | 1 |
# | SGD, 2B | $g_t$ on twice the batch ($B = 16$) | 2 (the cost of exact STORM) |
# | momentum | $m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t$ | 1 |
# | exact STORM | $g_t + (1-a)(d_{t-1} - \nabla f(x_{t-1}, \xi_t))$ | 2 |
# | approx STORM | $g_t + (1-a)(d_{t-1} - g_{t-1})$ | 1 |
#
# One "gradient evaluation" is a minibatch gradient of $B = 8$ samples.

# %% tags=["slide"]
runs = {
    "SGD": toys.run(problem, "sgd", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2),
    "SGD, 2B": toys.run(toys.TwoLayerRegression(batch=16), "sgd", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2),
    "momentum": toys.run(problem, "momentum", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2, beta=BETA),
    "exact STORM": toys.run(problem, "storm-exact", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2, beta=BETA),
    "approx STORM": toys.run(problem, "storm-approx", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2, beta=BETA),
}
evals = {"SGD": 1, "SGD, 2B": 2, "momentum": 1, "exact STORM": 2, "approx STORM": 1}
steps = torch.arange(1, STEPS + 1)


def draw(ax, name, xs, ys):
    """One method's curve; approx STORM as markers only, since it lies exactly on SGD's line."""
    if name == "approx STORM":
        ax.plot(xs[9::20], ys[9::20], ms=9, mew=2, **style.line(name, label="approx STORM (= SGD: markers)"))
    else:
        ax.plot(xs, ys, **style.line(name))


fig, axes = style.figure(1, 2, sharey=True)
for name, r in runs.items():
    draw(axes[0], name, steps, r.err.mean(1))
    draw(axes[1], name, steps * evals[name], r.err.mean(1))
axes[0].set(xlabel="step $t$", ylabel=r"$\mathbb{E}\,\|d_t - \nabla F(x_t)\|^2$", yscale="log",
            title="Against steps")
axes[1].set(xlabel="gradient evaluations (minibatches of 8)", title="Against cost", xlim=(0, STEPS))
axes[0].legend()
fig.suptitle(f"Error of the gradient estimate, mean of {SEEDS} seeds")
style.save(fig, "02_estimator_error")
plt.show()

# %% tags=["slide"]
fig, ax = style.figure()
for name, r in runs.items():
    draw(ax, name, steps * evals[name], r.grad_sq.mean(1))
ax.set(xlabel="gradient evaluations (minibatches of 8)", ylabel=r"$\mathbb{E}\,\|\nabla F(x_t)\|^2$", yscale="log",
       xlim=(0, STEPS), title=f"What an optimizer is for: stationarity per gradient evaluation ({SEEDS} seeds)")
ax.legend()
style.save(fig, "02_progress_per_evaluation")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
window = slice(STEPS - 100, STEPS)  # the last 100 steps
err = {name: r.err[window].mean().item() for name, r in runs.items()}
print(f"mean error E||d_t - grad F(x_t)||^2 over steps {STEPS - 99}-{STEPS} and {SEEDS} seeds:")
for name in runs:
    print(f"  {name:13s} {err[name]:.2e}   ({err['SGD'] / err[name]:5.1f}x below SGD)")
same = max((runs["approx STORM"].loss - runs["SGD"].loss).abs().max().item(),
           (runs["approx STORM"].err - runs["SGD"].err).abs().max().item())
print(f"approx STORM vs SGD, largest difference in F or error: {'below 1e-12' if same < 1e-12 else f'{same:.1e}'}")
budget = STEPS  # gradient evaluations: STEPS steps of the 1-evaluation methods, STEPS / 2 of the others
progress = {name: r.grad_sq[budget // evals[name] - 20:budget // evals[name]].mean().item() for name, r in runs.items()}
print(f"E||grad F||^2 after {budget} gradient evaluations (mean of the last 20 steps before it):")
print("  " + ", ".join(f"{name} {v:.2e}" for name, v in progress.items()))
assert err["exact STORM"] < err["SGD"] / 10            # at least 10x below SGD
assert err["exact STORM"] < err["SGD, 2B"] / 5          # and well below SGD at the same cost
assert err["exact STORM"] < err["momentum"] / 1.5       # and below momentum: no lag
assert same < 1e-12                                     # approx STORM (gamma = 1) is SGD
others = min(v for name, v in progress.items() if name != "exact STORM")
assert progress["exact STORM"] < 1.1 * others           # not more than 10 % behind at equal cost at the end

# %% [markdown] tags=["notes"]
# **Reading.** After the first few dozen steps exact STORM's error is more than an order of magnitude
# below SGD's, and still far below SGD with a doubled batch, which costs the same two gradient
# evaluations per step. Momentum reduces the noise too (it averages $\approx 1/a = 20$ gradients), but
# carries its lag; exact STORM is below it. Approx STORM lies exactly on SGD, as derived in section 1
# (its markers sit on SGD's line). The second figure is what an optimizer is for:
# $\|\nabla F(x_t)\|^2$ per gradient evaluation. Here the picture is more modest. Exact STORM starts
# slower (it pays two evaluations per step) and only catches up late: at the end of this budget it is
# somewhat ahead of the best other method (the printout above); the margin depends on the budget, so the
# assertion is only "not more than 10 % behind at equal cost". A 40× smaller estimator error at the
# *same* step size does not make a 40× better optimizer: the error is one of several limits on progress (the
# step size, the curvature, the cost per step). Notebook 03b looks for the regime where it does pay.

# %% [markdown] tags=["slide"]
# ## 4. What approximate MARS is, and the $\gamma$ sweep
#
# MARS feeds $c_t = g_t + k\,(g_t - g_{\text{prev}})$, $k = \gamma\frac{\beta_1}{1-\beta_1}$, into momentum.
# Multiply out $m_t = \beta_1 m_{t-1} + (1-\beta_1)c_t$ and the factor $1 - \beta_1$ cancels:
#
# $$m_t \;=\; \underbrace{\beta_1 m_{t-1} + (1-\beta_1)\,g_t}_{\text{plain momentum}}
#   \;+\; \gamma\beta_1\,(g_t - g_{\text{prev}}).$$
#
# So **each step of approximate MARS's momentum is a plain momentum step plus $\gamma\beta_1$ times the last
# change of the minibatch gradient**, $g_t - g_{t-1}$, before clipping and the preconditioner.

# %% [markdown] tags=["notes"]
# At the paper's
# $\gamma = 0.025$, $\beta_1 = 0.95$ the added term is $0.02375\,(g_t - g_{t-1})$ per step. Read it as a
# recursion: $m_{t-1}$ here is MARS's own momentum, so the added terms accumulate. It is *not* "plain
# momentum's $m_t$ plus $\gamma\beta_1(g_t - g_{t-1})$": unrolled, with $m^{\text{mom}}$ plain momentum on the
# same gradients, $m_t = m^{\text{mom}}_t + \gamma\beta_1\,(g_t - m^{\text{mom}}_{t-1})$ (exercise: show it by
# induction), a difference about $1/(1-\beta_1) = 20$ times larger than the one-step term when the gradient
# drifts (notebook 06, exercise 06.2, measures the lag it removes). The cell below checks the identity numerically three
# ways: with `storm_correction` + `momentum`, with the rewritten form, and with the state `m` of
# `mars_ref.MARS` itself (AdamW preconditioner, `clip="none"`, on a $12\times10$ matrix fed the same
# gradients).

# %%
# NBVAL_CHECK_OUTPUT
GAMMA, B1 = 0.025, 0.95
gen = torch.Generator().manual_seed(3)
grads = [torch.randn(12, 10, generator=gen, dtype=torch.float64) for _ in range(30)]
W = torch.zeros(12, 10, dtype=torch.float64, requires_grad=True)
opt = mars_ref.MARS([W], lr=1e-3, betas=(B1, 0.99), gamma=GAMMA, clip="none")  # approx mode, the default
m_pieces = m_rewritten = torch.zeros(12, 10, dtype=torch.float64)
g_prev = torch.zeros(12, 10, dtype=torch.float64)  # g_0 = 0: the authors' first step
gaps = {"rewritten": 0.0, "optimizer": 0.0}
for g in grads:
    m_pieces = momentum(m_pieces, storm_correction(g, g_prev, GAMMA, B1), B1)       # β1 m + (1−β1) c_t
    m_rewritten = momentum(m_rewritten, g, B1) + GAMMA * B1 * (g - g_prev)         # momentum + γβ1 (g_t − g_{t−1})
    W.grad = g.clone()
    opt.step()
    gaps["rewritten"] = max(gaps["rewritten"], (m_rewritten - m_pieces).abs().max().item())
    gaps["optimizer"] = max(gaps["optimizer"], (opt.state[W]["m"] - m_pieces).abs().max().item())
    g_prev = g
scale = max(m.abs().max().item() for m in (m_pieces, m_rewritten))
print(f"gamma * beta1 = {GAMMA * B1:g}; over 30 steps, largest |m - m_pieces| / |m|:")
for name, gap in gaps.items():
    print(f"  {name:9s}: {'below 1e-14' if gap / scale < 1e-14 else f'{gap / scale:.1e}'}")
assert max(gaps.values()) / scale < 1e-14

# %% [markdown] tags=["slide"]
# ### The two ends, and the $\gamma$ sweep
#
# Read the rewritten form at both ends. With $\gamma = 0$ it is plain momentum. With $\gamma = 1$ it is
# $m_t = g_t + \beta_1(m_{t-1} - g_{\text{prev}})$, STORM (section 2); in approx mode that is SGD again
# (section 1).

# %% [markdown] tags=["notes"]
# In between, `toys.run(..., "mars-exact" / "mars-approx", gamma=γ)` (no clipping here)
# shows how the error moves. In **approx** mode, $g_t - g_{t-1}$ contains two *independent* noise draws,
# so the correction adds noise: the noise of $c_t$ is $(1+k)^2 + k^2$ times that of $g_t$ (2.4× at
# $\gamma = 0.025$). In **exact** mode the two draws share the minibatch and the noise cancels to first order.

# %% tags=["slide"]
GAMMAS = [0.0, 0.025, 0.1, 0.3, 1.0]
sweep = {}
for mode in ("exact", "approx"):
    for gamma in GAMMAS:
        if gamma == 0.0 and mode == "approx":  # gamma = 0: both modes are momentum, c_t = g_t
            sweep[mode, gamma] = sweep["exact", gamma]
            continue
        r = toys.run(problem, f"mars-{mode}", lr=ETA, steps=STEPS, seeds=SEEDS, seed=2, beta=BETA, gamma=gamma)
        sweep[mode, gamma] = r.err[window].mean().item()

fig, ax = style.figure()
xs = [max(g, 0.006) for g in GAMMAS]  # put gamma = 0 on the log axis at the left edge
ax.loglog(xs, [sweep["exact", g] for g in GAMMAS], ms=10, **style.line("MARS exact", every=1,
          label="MARS momentum, exact"))
ax.loglog(xs, [sweep["approx", g] for g in GAMMAS], ms=10, **style.line("MARS approx", every=1,
          label="MARS momentum, approx"))
ax.axhline(err["SGD"], **style.line("SGD", label="SGD"))
ax.axhline(err["momentum"], **style.line("momentum", label="momentum (= MARS, gamma = 0)"))
ax.set_xticks(xs, ["0"] + [f"{g:g}" for g in GAMMAS[1:]])
ax.set(xlabel=r"$\gamma$ (0 plotted at the left edge)",
       ylabel=r"$\mathbb{E}\,\|m_t - \nabla F(x_t)\|^2$, last 100 steps",
       title=rf"Error of MARS momentum against $\gamma$ ($\beta_1$ = {BETA:g}, no clipping, mean of {SEEDS} seeds)")
ax.legend()
style.save(fig, "02_gamma_sweep")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'gamma':>6} {'exact':>9} {'approx':>9}")
for gamma in GAMMAS:
    print(f"{gamma:6.3f} {sweep['exact', gamma]:9.2e} {sweep['approx', gamma]:9.2e}")
gap_storm = abs(sweep["exact", 1.0] - err["exact STORM"]) / err["exact STORM"]
gap_sgd = abs(sweep["approx", 1.0] - err["SGD"]) / err["SGD"]
print(f"gamma = 1 vs STORM: exact {'equal to 1e-9' if gap_storm < 1e-9 else f'{gap_storm:.1e}'}, "
      f"approx (= SGD) {'equal to 1e-9' if gap_sgd < 1e-9 else f'{gap_sgd:.1e}'}")
exact_errs = [sweep["exact", g] for g in GAMMAS]
assert all(b < a for a, b in zip(exact_errs, exact_errs[1:], strict=False))  # exact: more gamma, less error
assert sweep["approx", 1.0] > 5 * sweep["approx", 0.1]                    # approx: full strength is SGD again
assert sweep["approx", 0.3] > sweep["approx", 0.0]                         # approx: a large gamma adds noise
assert gap_storm < 1e-9 and gap_sgd < 1e-9

# %% [markdown] tags=["notes"]
# In exact mode every increase of $\gamma$ lowers the error, down to STORM at $\gamma = 1$. In approx
# mode the lag correction and the added noise nearly cancel at the default $\gamma = 0.025$ (a change of
# about 1 % here), and beyond it the added noise takes over until, at $\gamma = 1$, the estimate is SGD's
# raw gradient again. The paper's approx MARS lives at the left end: a mild correction, not STORM.
# (Measured on one small problem at one step size; the balance depends on how fast $\nabla F$ changes
# between steps, i.e. on the lag the correction removes.)

# %% [markdown]
# ## Summary
#
# * The family: SVRG and SARAH/SPIDER need snapshots or large batches; STORM gets the same
#   $O(\epsilon^{-3})$ (against SGD's $O(\epsilon^{-4})$) with two evaluations of one minibatch per step and
#   nothing else, under mean-squared smoothness. MARS's guarantee is for the exact form; the approx form
#   that is run in practice has none beyond momentum's.
# * STORM's recursion $d_t = g_t + (1-a)(d_{t-1} - g_{\text{prev}})$ lets old error decay by $(1-a)$ and
#   admits new noise with weight $a$; exact STORM measured more than 10× below SGD's error on the finite
#   sum, below SGD with a doubled batch at equal cost, and below momentum. In progress per gradient
#   evaluation ($\|\nabla F\|^2$) the gain was small at this step size and budget.
# * Approx STORM ($g_{\text{prev}} = g_{t-1}$) with $d_0 = 0$ is SGD, identically.
# * Each step of approximate MARS's momentum is a momentum step plus $\gamma\beta_1(g_t - g_{t-1})$, as a
#   recursion on its own momentum (checked with the pieces and with
#   `mars_ref.MARS`); with $\gamma = 1$ and no clipping MARS's momentum is STORM with $1-a = \beta_1$
#   (checked to $10^{-14}$). Notebook 03 looks at the size of the scale $\gamma\beta_1/(1-\beta_1)$ and at
#   why MARS clips $c_t$; notebook 03b at where the variance reduction pays.

# %% [markdown] tags=["slide"]
# ## Questions
#
# Answers at the end of the notebook.
#
# 1. Exact STORM's error is 10× or more below SGD's, yet its $\|\nabla F\|^2$ per gradient evaluation is only a
#    little better. Name two reasons.
# 2. Why is approx STORM at full strength ($\gamma = 1$) exactly SGD, and why is that not true of exact STORM?
# 3. Which assumption separates the $O(\epsilon^{-3})$ rows of the rate table from SGD's $O(\epsilon^{-4})$, and
#    what does it require of the way gradients are computed?

# %% [markdown]
# ## Exercises
#
# Write each function in its cell, run it, then run the `check` cell under it. Reference solutions:
# `notebooks/solutions/nb02.py`.
#
# **Exercise 02.1 · Exact STORM under additive noise.** On `toys.Noisy2D` the noise does not depend on
# $x$, so $\zeta_t(x_t) = \zeta_t(x_{t-1})$ and the recursion becomes $e_t = (1-a)e_{t-1} + a\sigma\xi_t$, with
# $e_1 = \sigma\xi_1$. Write `exact_storm_error_additive(a, sigma, t, dim=2)` returning $\mathbb{E}\|e_t\|^2$ in
# closed form, and compare it with `toys.run(toys.Noisy2D(sigma), "storm-exact", ...)`. Closed form means no
# loop over the steps: the check asks for $t$ up to $10^9$ (with $a = 10^{-9}$) and has a time limit.

# %%
def exact_storm_error_additive(a, sigma, t, dim=2):
    """E||e_t||^2 of exact STORM when the gradient noise sigma * xi does not depend on x."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("02.1", exact_storm_error_additive)

# %% [markdown]
# **Exercise 02.2 · Noise of the approx correction.** For independent noise draws, the noise of $c_t$ is
# $(1+k)^2 + k^2$ times that of $g_t$, $k = \gamma\beta_1/(1-\beta_1)$. Write `gamma_doubling_noise(beta1)`: the
# $\gamma$ at which approx $c_t$ is twice as noisy as $g_t$. The equation for $k$ has two roots: which one is a
# $\gamma$ that `mars_ref.MARS` accepts ($\gamma \ge 0$ and finite)? Is the default $\gamma = 0.025$ above or
# below it at $\beta_1 = 0.95$?

# %%
def gamma_doubling_noise(beta1):
    """The gamma at which approx MARS's c_t has twice the noise variance of g_t."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("02.2", gamma_doubling_noise)

# %% [markdown]
# ## Answers to the questions
#
# 1. It pays two gradient evaluations per step, so at equal cost it takes half the steps; and the error of the
#    estimate is one of several limits on progress: the step size and the curvature limit it too, and at this
#    $\eta$ the iterate already averages much of SGD's noise (notebook 01). Notebook 03b finds where it pays.
# 2. With $g_{\text{prev}} = g_{t-1}$ the recursion is $d_t - g_t = (1-a)(d_{t-1} - g_{t-1})$, and $d_1 = g_1$ makes
#    the gap 0 forever. Exact STORM subtracts $\nabla f(x_{t-1}, \xi_t)$, the *same* sample at the previous point,
#    which is not $g_{t-1}$: the difference cancels the noise of $\xi_t$ instead of the estimate's memory.
# 3. Mean-squared smoothness, $\mathbb{E}_\xi\|\nabla f(x, \xi) - \nabla f(y, \xi)\|^2 \le \ell^2\|x - y\|^2$. It is
#    only useful if one sample's gradient can be evaluated at two points (two evaluations of the same minibatch).
#
# ## References
#
# * A. Cutkosky, F. Orabona, *Momentum-Based Variance Reduction in Non-Convex SGD* (STORM), NeurIPS 2019,
#   [arXiv 1905.10018](https://arxiv.org/abs/1905.10018).
# * R. Johnson, T. Zhang, *Accelerating Stochastic Gradient Descent using Predictive Variance Reduction*
#   (SVRG), [NeurIPS
#   2013](https://proceedings.neurips.cc/paper/2013/hash/ac1dd209cbcc5e5d1c6e28598e8cbbe8-Abstract.html).
# * L. M. Nguyen, J. Liu, K. Scheinberg, M. Takáč, *SARAH*, ICML 2017, [arXiv
# 1703.00102](https://arxiv.org/abs/1703.00102).
# * C. Fang, C. J. Li, Z. Lin, T. Zhang, *SPIDER*, NeurIPS 2018, [arXiv 1807.01695](https://arxiv.org/abs/1807.01695).
# * S. J. Reddi, A. Hefny, S. Sra, B. Póczos, A. Smola, *Stochastic Variance Reduction for Nonconvex
#   Optimization*, [arXiv 1603.06160](https://arxiv.org/abs/1603.06160); Z. Allen-Zhu, E. Hazan,
#   *Variance Reduction for Faster Non-Convex Optimization*, [arXiv 1603.05643](https://arxiv.org/abs/1603.05643).
# * S. Ghadimi, G. Lan, SGD on nonconvex problems, [arXiv 1309.5549](https://arxiv.org/abs/1309.5549);
#   Y. Arjevani, Y. Carmon, J. C. Duchi, D. J. Foster, N. Srebro, B. Woodworth, *Lower Bounds for
#   Non-Convex Stochastic Optimization*, [arXiv 1912.02365](https://arxiv.org/abs/1912.02365).
# * H. Yuan et al., *MARS: Make vAriance Reduction Shine*, [arXiv 2411.10438](https://arxiv.org/abs/2411.10438);
#   this repository's account of its equations: `docs/algorithm.md`.
# * The course's bibliography and notation: [notebooks/README.md](README.md).
