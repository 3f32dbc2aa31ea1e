"""Notebook 01: noisy nonconvex toy problems with an exact full gradient (built by scripts/run_notebooks.py)."""

# %% [markdown] tags=["slide"]
# # 01 · Noisy nonconvex toys: where stochastic gradients stall
#
# **What this notebook teaches.** Why the *noise* of a stochastic gradient, not the curvature, is what
# stops SGD close to a minimum; how to measure that noise exactly on problems whose full gradient is
# known; and the law of SGD's noise floor (for small steps $\mathbb{E}[F] \approx n\eta\sigma^2/4$ in $n$
# dimensions, so $\eta\sigma^2/2$ on the 2-D valley), checked against nine runs. These toys are the test
# bench of notebooks 02, 03 and 03b.

# %% [markdown] tags=["notes"]
# **You need.** Gradient descent and the idea of a minibatch gradient; expectations and variances of
# sums of independent terms; enough PyTorch to read tensor code. No optimizer theory.
#
# **Class time.** 20 minutes in lecture 1 (§1–§3); §4 is reading (10 minutes). The code
# runs in about 15 s on a laptop CPU.
# Notation: the [shared table](README.md#notation) of the course; one meaning per symbol in every notebook.
#
# Variance reduction (STORM, MARS) is about one thing: the stochastic gradient
# $g_t = \nabla f(x_t, \xi_t)$ is a noisy estimate of the full gradient $\nabla F(x_t)$, with
# $F(x) = \mathbb{E}_\xi f(x, \xi)$. To *see* what the noise does we need problems where $\nabla F$ is
# known exactly and the noise size is a knob. This notebook builds two (they live in `mars_ref/course/toys.py`,
# and the later notebooks import the same definitions):
#
# 1. a **finite sum** $F(x) = \frac1N\sum_{i=1}^N f_i(x)$: a small tanh network fitted to a noisy
#    teacher, minibatch gradients over random index sets, $\nabla F$ = mean over all $N$;
# 2. a **2-D valley** (Rosenbrock type) with additive Gaussian gradient noise: standard deviation $\sigma$
#    in each coordinate, so $\mathbb{E}\|g - \nabla F\|^2 = n\sigma^2 = 2\sigma^2$.

# %%
import os
import matplotlib.pyplot as plt
import torch

from mars_ref.course import claims, style, toys
from mars_ref.course.exercises import check

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine
torch.manual_seed(0)
style.use()               # the course's plotting style: large fonts, distinct colours and line styles
FULL = os.environ.get("MARS_REF_FULL", "0") == "1"
SEEDS = 256 if FULL else 128   # independent runs, vectorised as one batch dimension
print(f"{'full' if FULL else 'default'} size: {SEEDS} seeds")

# %% [markdown] tags=["slide"]
# ## 1. The finite sum and its minibatch noise
#
# $x = (W_1, w_2)$ with $W_1 \in \mathbb{R}^{16\times 8}$, $w_2 \in \mathbb{R}^{16}$ ($n = 144$ parameters),
# $N = 128$ samples $(a_i, b_i)$:
#
# $$f_i(x) = \tfrac12\big(w_2^\top \tanh(W_1 a_i) - b_i\big)^2, \qquad
#   g(x, \xi) = \frac1B \sum_{i \in \xi} \nabla f_i(x),$$
#
# with the minibatch $\xi = (i_1, \dots, i_B)$ drawn uniformly, with replacement.

# %% [markdown] tags=["slide"]
# ### The noise of a minibatch gradient
#
# Each index is an independent draw, so the minibatch gradient is unbiased and its noise is the
# per-sample covariance $\Sigma(x) = \frac1N\sum_i (\nabla f_i - \nabla F)(\nabla f_i - \nabla F)^\top$
# divided by $B$:
#
# $$\mathbb{E}\,\|g(x,\xi) - \nabla F(x)\|^2 = \frac{\operatorname{tr}\Sigma(x)}{B}.$$
#
# The batch size is the noise knob.

# %% [markdown] tags=["notes"]
# We compute $\operatorname{tr}\Sigma$ exactly from the $N$
# per-sample gradients and compare with 4096 sampled minibatches.
#
# Two lines you will meet in every notebook: `# NBVAL_CHECK_OUTPUT` marks a cell whose printed output the
# course's tests compare with the saved one on every commit, and `claims.check({...})` tests each claim the
# text makes, printing `holds:` or `FAILS:` for each and stopping the notebook if one fails.

# %%
# NBVAL_CHECK_OUTPUT
problem = toys.TwoLayerRegression()          # N = 128, d_in = 8, hidden = 16, B = 8
gen = torch.Generator().manual_seed(1)
x0 = problem.init(gen)
full = problem.grad(x0)
# problem.n is the number of samples N (not the n = 144 parameters, which is problem.dim)
per_sample = problem.grad(x0.expand(problem.n, -1), torch.arange(problem.n).unsqueeze(-1))  # ∇f_i(x0), (N, 144)
tr_sigma = (per_sample - full).square().sum(-1).mean().item()
print(f"F(x0) = {problem.loss(x0).item():.4f}, ||grad F(x0)||^2 = {full.square().sum().item():.4f}, "
      f"tr Sigma(x0) = {tr_sigma:.4f}")
print(f"{'B':>4} {'tr Sigma / B':>13} {'measured':>9} {'ratio':>6}")
for B in (1, 4, 16, 64):
    idx = torch.randint(problem.n, (4096, B), generator=gen)
    measured = (problem.grad(x0.expand(4096, -1), idx) - full).square().sum(-1).mean().item()
    print(f"{B:4d} {tr_sigma / B:13.4f} {measured:9.4f} {measured / (tr_sigma / B):6.2f}")
    assert abs(measured / (tr_sigma / B) - 1) < 0.1  # 4096 draws: a few % sampling error

# %% [markdown] tags=["notes"]
# At the start the noise of a batch of 8 ($\operatorname{tr}\Sigma/8$) is already comparable to the
# squared full gradient itself. What happens to it later depends on the problem: on the 2-D valley
# below the noise has the same size everywhere, on the finite sum it shrinks as the network fits the
# data (section 4 measures it).

# %% [markdown] tags=["slide"]
# ## 2. The 2-D valley: SGD and momentum on a contour plot
#
# $$F(u, v) = (1-u)^2 + 5\,(v-u^2)^2, \qquad g(x, \xi) = \nabla F(x) + \sigma\,\xi,\quad \xi\sim N(0, I_2).$$
#
# The minimum is $F^\star = 0$ at $(1, 1)$ at the end of a curved valley. Two methods, same step size
# $\eta$, the same noise draws (same seed):
#
# * **SGD**: $x_{t+1} = x_t - \eta\, g_t$
# * **SGD-momentum** (EMA form, as in MARS): $m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t$,
#   $x_{t+1} = x_t - \eta\, m_t$, $\beta_1 = 0.9$ (`mars_ref.pieces.momentum`).

# %% [markdown] tags=["notes"]
# `toys.run` runs all seeds at once as rows of one tensor.

# %% tags=["slide"]
ETA, STEPS_2D = 0.01, 1500
paths, losses = {}, {}
for sigma in (0.0, 3.0):
    valley = toys.Noisy2D(sigma=sigma)
    for method in ("sgd", "momentum"):
        r = toys.run(valley, method, lr=ETA, steps=STEPS_2D, seeds=SEEDS, seed=2, beta=0.9, keep_path=True)
        paths[sigma, method], losses[sigma, method] = r.path[:, 0], r.loss
NAME = {"sgd": "SGD", "momentum": "momentum"}

uu, vv = torch.meshgrid(torch.linspace(-1.7, 1.7, 300), torch.linspace(-0.6, 2.0, 300), indexing="xy")
FF = toys.Noisy2D().loss(torch.stack([uu, vv], -1).double())
fig, axes = style.figure(1, 2, sharey=True)
for ax, sigma in zip(axes, (0.0, 3.0), strict=True):
    cs = ax.contour(uu, vv, FF, levels=[0.03, 0.1, 0.3, 1, 3, 10, 30], colors=style.GREY, linewidths=0.8)
    ax.clabel(cs, levels=[0.3, 1, 3, 10, 30], fontsize=12, fmt="%g")  # the two innermost unlabelled: no room
    for method in ("sgd", "momentum"):
        p = paths[sigma, method]
        ax.plot(p[:, 0], p[:, 1], **style.line(NAME[method], lw=1.3, label=f"{NAME[method]} (one seed)"))
    ax.plot(-1.2, 1.0, "o", color=style.BLACK, ms=8, label="start")
    ax.plot(1, 1, "*", color=style.VERMILION, ms=16, label="minimum (1, 1)")
    ax.set(xlabel="$u$", title=rf"$\sigma$ = {sigma:g}: {'no noise' if sigma == 0 else 'noisy gradients'}",
           xlim=(-1.7, 1.7), ylim=(-0.6, 2.0))
axes[0].set_ylabel("$v$")
axes[0].legend(loc="lower left")
fig.suptitle(rf"SGD and momentum on the valley, $\eta$ = {ETA:g}, {STEPS_2D} steps")
style.save(fig, "01_valley_paths")
plt.show()

# %% tags=["slide"]
fig, ax = style.figure()
for (sigma, method), L in losses.items():
    look = style.line(NAME[method], label=rf"{NAME[method]}, $\sigma$ = {sigma:g}")
    if sigma == 0:
        look.update(alpha=0.55, lw=1.5)
    ax.semilogy(L.mean(1), **look)
ax.axhline(ETA * 3.0**2 / 2, color=style.GREY, ls=(0, (1, 1)), lw=2, label=r"$\eta\sigma^2/2$ ($\sigma$ = 3)")
ax.set(xlabel="step $t$", ylabel=r"$F(x_t)$, mean over seeds",
       ylim=style.log_limits(*[L.mean(1) for L in losses.values()]),
       title=f"With noise the loss stops at a floor (mean of {SEEDS} seeds); without, it keeps falling")
ax.legend(ncol=2)
style.save(fig, "01_valley_loss")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
third = STEPS_2D // 3
early, late = slice(STEPS_2D - 2 * third, STEPS_2D - third), slice(STEPS_2D - third, STEPS_2D)  # the last two thirds
level = {key: (L[early].mean().item(), L[late].mean().item()) for key, L in losses.items()}
for (sigma, method), (a, b) in level.items():
    print(f"sigma = {sigma:g}, {method:8s}: mean F over steps {early.start}-{early.stop}: {a:.2e}, "
          f"over {late.start}-{late.stop}: {b:.2e}")
print(f"eta sigma^2 / 2 at sigma = 3: {ETA * 9 / 2:.3f}")

# %%
# NBVAL_CHECK_OUTPUT
claims.check({
    "sigma = 0: both methods end below 1e-3, still falling":
        all(level[0.0, m][1] < min(1e-3, level[0.0, m][0]) for m in ("sgd", "momentum")),
    "sigma = 3: both stay within a factor 1.5 of eta sigma^2 / 2 over the last third":
        all(abs(level[3.0, m][1] / (ETA * 9 / 2) - 1) < 0.5 for m in ("sgd", "momentum")),
    "sigma = 3: and level (the last two thirds within 15 % of each other)":
        all(abs(level[3.0, m][1] / level[3.0, m][0] - 1) < 0.15 for m in ("sgd", "momentum")),
})

# %% [markdown] tags=["notes"]
# Without noise both methods follow the valley floor to the minimum and the loss keeps falling
# (the faint curves go down by orders of magnitude). With $\sigma = 3$ they reach the valley just as
# fast, then **stall**: the iterate jitters around $(1,1)$ and the loss stays at a *noise floor* near
# $\eta\sigma^2/2$ (dotted line): SGD's plateau, 0.0534, is 19 % above the line's 0.045, close to the 18 %
# that section 3 derives for this $\eta$. Momentum's path is smoother, but at the same $\eta$ its floor is about the
# same: averaging over $\approx 1/(1-\beta_1)$ steps lowers the noise of each step, and the iterate
# integrates the same noise over the same time.

# %% [markdown] tags=["slide"]
# ## 3. The noise floor is $\propto \eta\,\sigma^2$
#
# Near the minimum, $F(x) \approx \tfrac12 (x - x^\star)^\top H (x - x^\star)$ and SGD is a linear
# recursion driven by noise, $x_{t+1} - x^\star = (I - \eta H)(x_t - x^\star) - \eta\sigma\xi_t$. In each
# eigendirection of the Hessian $H$ (eigenvalue $h_j$) the stationary variance is
# $\eta^2\sigma^2 / (1 - (1-\eta h_j)^2)$, so
#
# $$\mathbb{E}[F] \;\to\; \sum_{j=1}^{n} \frac{h_j}{2}\cdot\frac{\eta\sigma^2}{h_j(2 - \eta h_j)}
#   = \frac{\eta\sigma^2}{2}\sum_{j=1}^{n} \frac{1}{2-\eta h_j}
#   \;\approx\; \frac{n\,\eta\sigma^2}{4}\quad(\text{every } \eta h_j \ll 2).$$

# %% [markdown] tags=["notes"]
# Each direction contributes about $\eta\sigma^2/4$, whatever its curvature: a flat direction wanders
# further ($\propto 1/h_j$) but costs less per unit of distance ($\propto h_j$). The valley has $n = 2$, which
# is where $\eta\sigma^2/2$ comes from; this notebook's finite sum has $n = 144$.
#
# The small-step form needs $\eta h_j \ll 2$ in every direction, and here it does not hold: at
# $\eta = 0.01$ the stiff direction has $\eta h_{\max} = 0.52$, so its term is $1/(2 - 0.52) = 0.68$ instead
# of $0.5$ and the linearised floor is about 18 % above $\eta\sigma^2/2$ (at $\eta = 0.02$, $\eta h_{\max} = 1.03$: 53 %
# above). What holds for every $\eta h_{\max} < 2$ is the sum itself, the *linearised* prediction in the
# table below; the simple form keeps the scaling ($\propto \eta\sigma^2$, up to that factor). We measure the
# plateau (mean of $F$ over the last half of 4000 steps, started at the minimum) for three $\eta$
# and three $\sigma$.

# %%
# NBVAL_CHECK_OUTPUT
H = torch.tensor([[2 + 8 * 5.0, -4 * 5.0], [-4 * 5.0, 2 * 5.0]], dtype=torch.float64)  # Hessian at (1, 1)
h = torch.linalg.eigvalsh(H)
print(f"Hessian eigenvalues at the minimum: {h[0].item():.3f}, {h[1].item():.2f}; eta h_max = "
      + ", ".join(f"{(eta * h[1]).item():.2f} (eta = {eta:g})" for eta in (0.005, 0.01, 0.02)))
STEPS_FLOOR = 8000 if FULL else 4000
floors = {}
print(f"{'eta':>6} {'sigma':>5} {'measured E[F]':>13} {'eta sigma^2/2':>13} {'linearised':>10} {'ratio':>6}")
for eta in (0.005, 0.01, 0.02):
    for sigma in (0.5, 1.0, 2.0):
        r = toys.run(toys.Noisy2D(sigma=sigma), "sgd", lr=eta, steps=STEPS_FLOOR, seeds=SEEDS, seed=3,
                     x0=torch.tensor([1.0, 1.0]))
        measured = r.loss[STEPS_FLOOR // 2:].mean().item()
        linear = (eta * sigma**2 / 2 * (1 / (2 - eta * h)).sum()).item()
        floors[eta, sigma] = (measured, linear)
        print(f"{eta:6.3f} {sigma:5.1f} {measured:13.2e} {eta * sigma**2 / 2:13.2e} {linear:10.2e} "
              f"{measured / linear:6.2f}")
ratios = [m / lin for m, lin in floors.values()]
print(f"measured / linearised prediction: {min(ratios):.2f} to {max(ratios):.2f}")
assert all(0.75 < q < 1.33 for q in ratios)
# doubling sigma quadruples the floor, doubling eta doubles it
assert 3.0 < floors[0.01, 2.0][0] / floors[0.01, 1.0][0] < 5.0
assert 1.5 < floors[0.02, 1.0][0] / floors[0.01, 1.0][0] < 2.7

# %% tags=["slide"]
fig, ax = style.figure()
for eta, marker in zip((0.005, 0.01, 0.02), "os^", strict=True):
    xs = [eta * s**2 for s in (0.5, 1.0, 2.0)]
    ax.loglog(xs, [floors[eta, s][0] for s in (0.5, 1.0, 2.0)], marker, ls="none", ms=11,
              label=rf"measured, $\eta$ = {eta:g}")
grid = torch.logspace(-3.2, -0.9, 20)
ax.loglog(grid, grid / 2, color=style.GREY, ls="--", lw=2, label=r"$\eta\sigma^2/2$")
ax.set(xlabel=r"$\eta\,\sigma^2$", ylabel=r"plateau of $F$ (mean over seeds and steps)",
       title=rf"SGD's noise floor on the 2-D valley is $\approx \eta\sigma^2/2$ (mean of {SEEDS} seeds)")
ax.legend()
style.save(fig, "01_noise_floor_law")
plt.show()

# %% [markdown] tags=["notes"]
# The points follow the line: the plateau is set by $\eta\sigma^2$ (the excess at $\eta = 0.02$, about
# 1.5×, is the $1/(2 - \eta h_j)$ factor of the stiff direction, where $\eta h_{\max} \approx 1$; the
# linearised formula in the table accounts for it to within the asserted margin).
# So with plain SGD there are only two ways down: **smaller steps** (slower progress everywhere) or
# **less noise** (bigger batches, i.e. more gradient evaluations per step). Variance reduction is a
# third: build a gradient estimate whose error shrinks *without* shrinking $\eta$ or growing $B$.

# %% [markdown]
# ## 4. The finite sum: the batch size sets how far behind SGD is
#
# On the network problem the noise is the minibatch sampling. SGD with a fixed $\eta = 0.2$ and
# batch sizes $B = 2, 8, 32$, for 1500 steps. The runs are compared at **equal steps**, so they do not
# cost the same: a step of $B = 32$ evaluates 32 per-sample gradients, 16× the $B = 2$ step (4× the
# $B = 8$ step); the cell after the figure also compares them at equal cost. Plotted: the squared full-gradient
# norm $\|\nabla F(x_t)\|^2$ (the
# stationarity measure of nonconvex optimisation: no minimum is known, so "converged" means
# $\nabla F \approx 0$), and the noise of the gradient SGD stepped with, $\|g_t - \nabla F(x_t)\|^2$
# (recorded by `toys.run` as the estimator's error). Both axes are logarithmic.

# %%
ETA_FS, STEPS_FS, SEEDS_FS = 0.2, (3000 if FULL else 1500), 32
fs = {}
for B in (2, 8, 32):
    fs[B] = toys.run(toys.TwoLayerRegression(batch=B), "sgd", lr=ETA_FS, steps=STEPS_FS, seeds=SEEDS_FS, seed=4)

fig, (ax0, ax1) = style.figure(1, 2, sharex=True)
steps = torch.arange(1, STEPS_FS + 1)
for B, ls in zip(fs, ("-", "--", ":"), strict=True):
    ax0.loglog(steps, fs[B].grad_sq.mean(1), ls=ls, label=f"SGD, B = {B}")
    ax1.loglog(steps, fs[B].err.mean(1), ls=ls, label=f"SGD, B = {B}")
ax0.set(xlabel="step $t$ (a step of B = 32 costs 16x one of B = 2)", ylabel=r"$\|\nabla F(x_t)\|^2$",
        title="Stationarity: smaller batch, higher")
ax1.set(xlabel="step $t$", ylabel=r"$\|g_t - \nabla F(x_t)\|^2$", title="The noise shrinks as the fit improves")
ax0.legend()
fig.suptitle(rf"SGD on the finite sum, $\eta$ = {ETA_FS:g}, mean of {SEEDS_FS} seeds")
style.save(fig, "01_finite_sum_batch")
plt.show()

# %%
def window(r, key, t, width=100):
    """Mean over seeds and the `width` steps ending at step t."""
    return getattr(r, key)[t - width:t].mean().item()


checkpoints = (300, STEPS_FS // 2, STEPS_FS)
print(f"mean over 100 steps and {SEEDS_FS} seeds (eta = {ETA_FS:g}):")
print(f"{'B':>3} " + " ".join(f"{'||grad F||^2 @' + str(t):>18} {'noise @' + str(t):>12}" for t in checkpoints))
for B, r in fs.items():
    print(f"{B:3d} " + " ".join(f"{window(r, 'grad_sq', t):18.2e} {window(r, 'err', t):12.2e}" for t in checkpoints))
ratio = {t: window(fs[2], "grad_sq", t) / window(fs[32], "grad_sq", t) for t in checkpoints}
print("||grad F||^2 ratio B=2 / B=32: " + ", ".join(f"{v:.0f} at step {t}" for t, v in ratio.items()))
samples = 2 * STEPS_FS  # equal cost: the per-sample gradients B = 2 evaluates in the whole run
equal_cost = {B: window(r, "grad_sq", samples // B, width=max(1, 100 * 2 // B)) for B, r in fs.items()}
print(f"equal cost, {samples} per-sample gradients each (B = 2: step {STEPS_FS}, B = 8: step {samples // 8}, "
      f"B = 32: step {samples // 32}): ||grad F||^2 " + ", ".join(f"B = {B} {v:.2e}" for B, v in equal_cost.items()))

# %%
# NBVAL_CHECK_OUTPUT
claims.check({
    "no run diverges": not any(r.diverged.any().item() for r in fs.values()),
    "at every checkpoint, the smaller the batch the larger ||grad F||^2":
        all(window(fs[2], "grad_sq", t) > window(fs[8], "grad_sq", t) > window(fs[32], "grad_sq", t)
            for t in checkpoints),
    "B = 2 stays over 10x above B = 32 at every checkpoint": min(ratio.values()) > 10,
    "no plateau: every ||grad F||^2 still falls in the second half (last 100 steps below 0.8x the middle)":
        all(window(r, "grad_sq", STEPS_FS) < 0.8 * window(r, "grad_sq", STEPS_FS // 2) for r in fs.values()),
    "the noise shrinks with the fit: over 3x less at the end than at step 300, for every batch size":
        all(window(r, "err", STEPS_FS) < window(r, "err", 300) / 3 for r in fs.values()),
    "at equal cost (per-sample gradients) B = 32 is still below B = 2 at this step size":
        equal_cost[32] < equal_cost[2],
})

# %% [markdown]
# **Reading.** Here there is no plateau within 1500 steps, and the right panel says why: the noise of a
# minibatch gradient is not a fixed $\sigma$ as on the valley but $\operatorname{tr}\Sigma(x)/B$, and
# $\Sigma(x)$ shrinks as the network fits the data (144 parameters for 128 samples: it can nearly fit
# every sample, label noise included). So SGD does not stop at one level; it stays a roughly constant
# factor behind, and that factor is set by the batch: 16× less noise variance ($B = 32$ against
# $B = 2$) keeps $\|\nabla F\|^2$ more than 10× lower at every checkpoint (about 20× in the table).
# Same step size, same problem; the only difference is the noise of $g_t$, bought with 16× the gradient
# evaluations per step. At equal cost the large batch has taken 16× fewer steps, and at this $\eta$ it is
# still ahead (the last printout): with a fixed step size the small batch's noise costs more than its
# extra steps gain.
#
# ## Summary
#
# * `toys.TwoLayerRegression` (a nonconvex finite sum, noise $\operatorname{tr}\Sigma/B$, checked
#   above) and `toys.Noisy2D` (a curved valley, additive noise $\sigma$) give $\nabla F$ exactly, so
#   every later notebook can measure an estimator's true error $\|d_t - \nabla F(x_t)\|^2$.
# * On the valley SGD and momentum both reach the minimum region, then stall at a **noise floor**,
#   $\frac{\eta\sigma^2}{2}\sum_j \frac{1}{2-\eta h_j}$, about $n\eta\sigma^2/4$ for small steps in $n$ dimensions
#   ($\eta\sigma^2/2$ in 2-D): the plateau matched this linearised prediction within the asserted margin for all
#   nine $(\eta, \sigma)$, i.e. it is $\propto \eta\sigma^2$.
# * On the finite sum the noise shrinks with the loss, so there is no fixed floor; at equal steps a 16×
#   smaller batch kept $\|\nabla F\|^2$ more than 10× higher throughout the run, and at equal cost it was
#   still behind at this step size.
#
# Notebook 02 places this course in the family of variance-reduction methods and builds the STORM
# estimator, which lowers the error of the gradient estimate itself.

# %% [markdown] tags=["slide"]
# ## Questions
#
# Answers at the end of the notebook.
#
# 1. Momentum's $m_t$ is far less noisy than $g_t$. Why, at the same $\eta$, does momentum not lower the
#    valley's noise floor?
# 2. With SGD, name two ways to halve the floor on the valley and what each costs.
# 3. Why does the floor per direction, $\approx \eta\sigma^2/4$, not depend on the curvature $h_j$?

# %% [markdown]
# ## Exercises
#
# Write each function in its cell, run the cell, then run the `check` cell under it: it tells you
# whether your answer is right (by an independent computation, so it cannot give it away). Reference
# solutions: `notebooks/solutions/nb01.py`.
#
# **Exercise 01.1 · The floor, exactly.** For a quadratic $F = \frac12 x^\top H x$ and SGD with additive
# noise $\sigma\xi$, the stationary covariance $C$ of $x_t$ solves $C = (I-\eta H)C(I-\eta H)^\top + \eta^2\sigma^2 I$.
# Write `sgd_noise_floor(H, eta, sigma)` returning $\mathbb{E}[F] = \frac12\operatorname{tr}(HC)$ in closed
# form via the eigenvalues of $H$ (`float("inf")` when there is no stationary state), and compare it with
# the table of section 3. What happens as $\eta h_{\max} \to 2$?

# %%
def sgd_noise_floor(H, eta, sigma):
    """Stationary E[F] of SGD with additive noise sigma * xi on F(x) = x^T H x / 2 (inf if there is none)."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("01.1", sgd_noise_floor)

# %% [markdown]
# **Exercise 01.2 · Without replacement.** If a minibatch of $B$ *distinct* indices is drawn, the noise is
# $\frac{N-B}{N-1}\cdot\frac{\operatorname{tr}\Sigma}{B}$. Write `noise_without_replacement(problem, x, B)`
# returning this for a `toys.TwoLayerRegression` (its number of samples $N$ is `problem.n`), and check it by
# sampling (`torch.randperm`). The check also asks for $N = 128$, $B = 32$: about $10^{30}$ subsets, so
# enumerating them is not an answer.

# %%
def noise_without_replacement(problem, x, B):
    """E||g - grad F(x)||^2 for a minibatch of B distinct samples of the finite sum `problem`."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("01.2", noise_without_replacement)

# %% [markdown]
# ## Answers to the questions
#
# 1. The iterate already averages the noise, over about $1/(\eta h_j)$ steps. Momentum's averaging makes
#    successive steps correlated, so the iterate integrates the same total noise: for small $\eta h_j$ the
#    stationary variance of $x$ is the same to first order (notebook 03b §1 measures it: within 25 %).
# 2. Halve $\eta$ (every stretch of the path then takes twice as many steps), or average two independent
#    draws of the noisy gradient per step (halves the noise variance $\sigma^2$, at twice the gradient
#    evaluations per step; on the finite sum, doubling $B$ does the same). Variance reduction is a third way:
#    an estimate with a smaller error at the same $\eta$ and $B$.
# 3. In direction $j$ the stationary variance of $x$ is $\approx \eta\sigma^2/(2h_j)$ (flat directions wander
#    further) and the loss charges $h_j/2$ per unit of squared distance: the $h_j$ cancel.
#
# ## References
#
# * L. Bottou, F. E. Curtis, J. Nocedal, *Optimization Methods for Large-Scale Machine Learning*, SIAM
#   Review 2018, [arXiv 1606.04838](https://arxiv.org/abs/1606.04838): §4 has SGD's floor with a fixed step.
# * S. Ghadimi, G. Lan, *Stochastic first- and zeroth-order methods for nonconvex stochastic programming*,
#   SIAM J. Optim. 2013, [arXiv 1309.5549](https://arxiv.org/abs/1309.5549): SGD on smooth nonconvex problems.
# * H. Yuan, Y. Liu, S. Wu, X. Zhou, Q. Gu, *MARS: Make vAriance Reduction Shine*,
#   [arXiv 2411.10438](https://arxiv.org/abs/2411.10438): where this course is going.
# * The course's bibliography and notation: [notebooks/README.md](README.md).
