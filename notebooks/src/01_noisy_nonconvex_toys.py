"""Notebook 01: noisy nonconvex toy problems with an exact full gradient (built by scripts/run_notebooks.py)."""

# %% [markdown]
# # 01 · Noisy nonconvex toys: where stochastic gradients stall
#
# Variance reduction (STORM, MARS) is about one thing: the stochastic gradient
# $g_t = \nabla f(x_t, \xi_t)$ is a noisy estimate of the full gradient $\nabla F(x_t)$, with
# $F(x) = \mathbb{E}_\xi f(x, \xi)$, and the noise, not the curvature, is what stops SGD from
# getting close to a minimum. To *see* that we need problems where $\nabla F$ is known exactly and
# the noise size is a knob. This notebook builds two (they live in `mars_ref/toys.py`, and
# notebooks 02–05 import the same definitions):
#
# 1. a **finite sum** $F(x) = \frac1N\sum_{i=1}^N f_i(x)$: a small tanh network fitted to a noisy
#    teacher, minibatch gradients over random index sets, $\nabla F$ = mean over all $N$;
# 2. a **2-D valley** (Rosenbrock type) with additive Gaussian gradient noise of chosen size $\sigma$.
#
# We check that the minibatch noise is what theory says ($\operatorname{tr}\Sigma/B$), draw SGD and
# SGD-with-momentum on contour plots, and measure the **noise floor**: the loss where SGD stalls,
# $\approx \eta\sigma^2/2$ on the 2-D valley, proportional to the step size times the noise variance.

# %%
import os

import matplotlib.pyplot as plt
import torch

from mars_ref import toys

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
FULL = os.environ.get("MARS_REF_FULL", "0") == "1"
SEEDS = 256 if FULL else 128   # independent runs, vectorised as one batch dimension
print(f"{'full' if FULL else 'default'} size: {SEEDS} seeds")

# %% [markdown]
# ## 1. The finite sum and its minibatch noise
#
# $x = (W_1, w_2)$ with $W_1 \in \mathbb{R}^{16\times 8}$, $w_2 \in \mathbb{R}^{16}$ (144 parameters),
# $N = 128$ samples $(a_i, b_i)$:
#
# $$f_i(x) = \tfrac12\big(w_2^\top \tanh(W_1 a_i) - b_i\big)^2, \qquad
#   g(x, \xi) = \frac1B \sum_{i \in \xi} \nabla f_i(x),$$
#
# with $\xi = (i_1, \dots, i_B)$ drawn uniformly, with replacement.
#
# Each index is an independent draw, so the minibatch gradient is unbiased and its noise is the
# per-sample covariance $\Sigma(x) = \frac1N\sum_i (\nabla f_i - \nabla F)(\nabla f_i - \nabla F)^\top$
# divided by $B$:
#
# $$\mathbb{E}\,\|g(x,\xi) - \nabla F(x)\|^2 = \frac{\operatorname{tr}\Sigma(x)}{B}.$$
#
# The batch size is the noise knob. We compute $\operatorname{tr}\Sigma$ exactly from the $N$
# per-sample gradients and compare with 4096 sampled minibatches.

# %%
# NBVAL_CHECK_OUTPUT
problem = toys.TwoLayerRegression()          # N = 128, d_in = 8, hidden = 16, batch = 8
gen = torch.Generator().manual_seed(1)
x0 = problem.init(gen)
full = problem.grad(x0)
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

# %% [markdown]
# At the start the noise of a batch of 8 ($\operatorname{tr}\Sigma/8$) is already comparable to the
# squared full gradient itself; near a minimum $\nabla F \to 0$ while $\Sigma$ does not (the teacher's
# labels are noisy, so no $x$ fits every sample): there the noise is *all* there is.
#
# ## 2. The 2-D valley: SGD and momentum on a contour plot
#
# $$F(u, v) = (1-u)^2 + 5\,(v-u^2)^2, \qquad g(x, \xi) = \nabla F(x) + \sigma\,\xi,\quad \xi\sim N(0, I_2).$$
#
# The minimum is $F^\star = 0$ at $(1, 1)$ at the end of a curved valley. Two methods, same step size
# $\eta$, the same noise draws (same seed):
#
# * **SGD**: $x_{t+1} = x_t - \eta\, g_t$
# * **SGD-momentum** (EMA form, as in MARS): $m_t = \beta m_{t-1} + (1-\beta) g_t$, $x_{t+1} = x_t - \eta\, m_t$,
#   $\beta = 0.9$ (`mars_ref.pieces.momentum`).
#
# `toys.run` runs all seeds at once as rows of one tensor.

# %%
ETA, STEPS_2D = 0.01, 1500
paths, losses = {}, {}
for sigma in (0.0, 3.0):
    valley = toys.Noisy2D(sigma=sigma)
    for method in ("sgd", "momentum"):
        r = toys.run(valley, method, lr=ETA, steps=STEPS_2D, seeds=SEEDS, seed=2, beta=0.9, keep_path=True)
        paths[sigma, method], losses[sigma, method] = r.path[:, 0], r.loss

uu, vv = torch.meshgrid(torch.linspace(-1.7, 1.7, 300), torch.linspace(-0.6, 2.0, 300), indexing="xy")
FF = toys.Noisy2D().loss(torch.stack([uu, vv], -1).double())
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
for ax, sigma in zip(axes[:2], (0.0, 3.0), strict=True):
    cs = ax.contour(uu, vv, FF, levels=[0.03, 0.1, 0.3, 1, 3, 10, 30], colors="0.55", linewidths=0.7)
    ax.clabel(cs, fontsize=7, fmt="%g")
    for method, color in (("sgd", "C0"), ("momentum", "C1")):
        p = paths[sigma, method]
        ax.plot(p[:, 0], p[:, 1], color=color, lw=0.8, alpha=0.9, label=f"{method} (one seed)")
    ax.plot(-1.2, 1.0, "ko", ms=5, label="start (-1.2, 1)")
    ax.plot(1, 1, "r*", ms=12, label="minimum (1, 1)")
    ax.set(xlabel="$u$", ylabel="$v$", title=rf"$\sigma$ = {sigma:g}, $\eta$ = {ETA:g}, {STEPS_2D} steps",
           xlim=(-1.7, 1.7), ylim=(-0.6, 2.0))
    ax.legend(loc="lower right", fontsize=8)
ax = axes[2]
for (sigma, method), L in losses.items():
    ax.semilogy(L.mean(1), color="C0" if method == "sgd" else "C1", ls="-" if sigma else "--",
                label=rf"{method}, $\sigma$ = {sigma:g}")
ax.axhline(ETA * 3.0**2 / 2, color="k", ls=":", lw=1, label=r"$\eta\sigma^2/2$ ($\sigma$ = 3)")
ax.set(xlabel="step $t$", ylabel=r"$F(x_t)$, mean over seeds", title=f"Loss, mean of {SEEDS} seeds", ylim=(1e-4, 10))
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Without noise both methods follow the valley floor to the minimum and the loss keeps falling
# (the dashed curves go down by orders of magnitude). With $\sigma = 3$ they reach the valley just as
# fast, then **stall**: the iterate jitters around $(1,1)$ and the loss flattens at a *noise floor*.
# Momentum's path is smoother, but at the same $\eta$ its floor is about the same: averaging over
# $\approx 1/(1-\beta)$ steps lowers the noise of each step, and the iterate integrates the same
# noise over the same time.
#
# ## 3. The noise floor is $\propto \eta\,\sigma^2$
#
# Near the minimum, $F(x) \approx \tfrac12 (x - x^\star)^\top H (x - x^\star)$ and SGD is a linear
# recursion driven by noise, $e_{t+1} = (I - \eta H) e_t - \eta\sigma\xi_t$. In each eigendirection
# of $H$ (eigenvalue $h_k$) the stationary variance is $\eta^2\sigma^2 / (1 - (1-\eta h_k)^2)$, so
#
# $$\mathbb{E}[F] \;\to\; \sum_k \frac{h_k}{2}\cdot\frac{\eta\sigma^2}{h_k(2 - \eta h_k)}
#   = \frac{\eta\sigma^2}{2}\sum_k \frac{1}{2-\eta h_k}
#   \;\approx\; \frac{\eta\sigma^2}{2}\ \ (\text{2-D}, \eta h_k \ll 1).$$
#
# The curvature cancels: the floor depends only on the step size and the noise. We measure the
# plateau (mean of $F$ over the last half of 4000 steps, started at the minimum) for three $\eta$
# and three $\sigma$.

# %%
# NBVAL_CHECK_OUTPUT
H = torch.tensor([[2 + 8 * 5.0, -4 * 5.0], [-4 * 5.0, 2 * 5.0]], dtype=torch.float64)  # Hessian at (1, 1)
h = torch.linalg.eigvalsh(H)
print(f"Hessian eigenvalues at the minimum: {h[0].item():.3f}, {h[1].item():.2f}")
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

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for eta, marker in zip((0.005, 0.01, 0.02), "os^", strict=True):
    xs = [eta * s**2 for s in (0.5, 1.0, 2.0)]
    ax.loglog(xs, [floors[eta, s][0] for s in (0.5, 1.0, 2.0)], marker, ms=8, label=rf"measured, $\eta$ = {eta:g}")
grid = torch.logspace(-3.2, -0.9, 20)
ax.loglog(grid, grid / 2, "k--", lw=1, label=r"$\eta\sigma^2/2$")
ax.set(xlabel=r"$\eta\,\sigma^2$", ylabel=r"plateau of $F$ (mean over seeds and steps)",
       title=r"SGD's noise floor on the 2-D valley is $\approx \eta\sigma^2/2$")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The points follow the line: the plateau is set by $\eta\sigma^2$ (the excess at $\eta = 0.02$, about
# 1.5×, is the $1/(2 - \eta h_k)$ factor of the stiff direction, where $\eta h_{\max} \approx 1$; the
# linearised formula in the table accounts for it to within 2 %).
# So with plain SGD there are only two ways down: **smaller steps** (slower progress everywhere) or
# **less noise** (bigger batches, i.e. more gradient evaluations per step). Variance reduction is a
# third: build a gradient estimate whose error shrinks *without* shrinking $\eta$ or growing $B$.
#
# ## 4. The same stall on the finite sum
#
# On the network problem the noise is the minibatch sampling. SGD with a fixed $\eta = 0.2$ and
# batch sizes $B = 2, 8, 32$: the loss and the squared full-gradient norm $\|\nabla F(x_t)\|^2$
# (the stationarity measure of nonconvex optimisation: no minimum is known, so "converged" means
# $\nabla F \approx 0$).

# %%
ETA_FS, STEPS_FS = 0.2, (1500 if FULL else 600)
fs = {}
for B in (2, 8, 32):
    fs[B] = toys.run(toys.TwoLayerRegression(batch=B), "sgd", lr=ETA_FS, steps=STEPS_FS, seeds=64, seed=4)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
for B, r in fs.items():
    ax0.semilogy(r.loss.mean(1), label=f"SGD, B = {B}")
    ax1.semilogy(r.grad_sq.mean(1), label=f"SGD, B = {B}")
ax0.set(xlabel="step $t$", ylabel=r"$F(x_t)$ (mean over 64 seeds)", title=rf"Finite sum: loss, $\eta$ = {ETA_FS:g}")
ax1.set(xlabel="step $t$", ylabel=r"$\|\nabla F(x_t)\|^2$ (mean over 64 seeds)",
        title="Finite sum: squared full-gradient norm")
for ax in (ax0, ax1):
    ax.legend()
fig.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
late = {B: r.grad_sq[-STEPS_FS // 4:].mean().item() for B, r in fs.items()}
late_loss = {B: r.loss[-STEPS_FS // 4:].mean().item() for B, r in fs.items()}
print(f"mean over the last {STEPS_FS // 4} steps and 64 seeds (eta = {ETA_FS:g}):")
for B in fs:
    print(f"  B = {B:2d}: F = {late_loss[B]:.4f}, ||grad F||^2 = {late[B]:.2e}")
print(f"||grad F||^2 ratio B=2 / B=32: {late[2] / late[32]:.1f}")
assert late[2] > late[8] > late[32]
assert late[2] / late[32] > 3  # 16x less noise variance: a much lower stationarity floor
assert not any(r.diverged.any().item() for r in fs.values())

# %% [markdown]
# With $B = 2$ the full gradient stops shrinking early and stays more than an order of magnitude above
# the $B = 32$ run: same step size, same problem, the only difference is the noise of $g_t$.
#
# ## Summary
#
# * `toys.TwoLayerRegression` (a nonconvex finite sum, noise $\operatorname{tr}\Sigma/B$, checked
#   above) and `toys.Noisy2D` (a curved valley, additive noise $\sigma$) give $\nabla F$ exactly, so
#   every later notebook can measure an estimator's true error $\|d_t - \nabla F(x_t)\|^2$.
# * SGD and momentum both reach the valley, then stall at a **noise floor**: on the 2-D valley the
#   plateau matched the linearised prediction $\frac{\eta\sigma^2}{2}\sum_k \frac{1}{2-\eta h_k}$ within
#   the asserted margin for all nine $(\eta, \sigma)$, i.e. it is $\propto \eta\sigma^2$.
# * On the finite sum, a 16× smaller batch left $\|\nabla F\|^2$ about 20× higher at the end of the run.
#
# Notebook 02 builds the STORM estimator, which lowers the error of the gradient estimate itself.
#
# ## Exercises
#
# 1. **The floor, exactly.** For a quadratic $F = \frac12 x^\top H x$ and SGD with additive noise
#    $\sigma\xi$, the stationary covariance $P$ of $x_t$ solves $P = (I-\eta H)P(I-\eta H)^\top + \eta^2\sigma^2 I$.
#    Write `sgd_noise_floor(H, eta, sigma)` returning $\mathbb{E}[F] = \frac12\operatorname{tr}(HP)$ in closed
#    form via the eigenvalues of $H$, and compare it with the table above. What happens as $\eta h_{\max} \to 2$?
# 2. **Without replacement.** If a minibatch of $B$ *distinct* indices is drawn, the noise is
#    $\frac{N-B}{N-1}\cdot\frac{\operatorname{tr}\Sigma}{B}$. Write `noise_without_replacement(problem, x, B)`
#    returning this for `toys.TwoLayerRegression`, and check it by sampling (`torch.randperm`).
#
# Solutions: `notebooks/solutions/nb01.py` (checked by `tests/test_exercises_01_03.py`).
