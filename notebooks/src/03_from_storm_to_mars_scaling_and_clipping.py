"""Notebook 03: from STORM to MARS, the gamma scale and clipping (built by scripts/run_notebooks.py)."""

# %% [markdown] tags=["slide"]
# # 03 · From STORM to MARS: the $\gamma\,\beta_1/(1-\beta_1)$ scale, and why MARS clips
#
# **What this notebook teaches.** How large MARS's correction is (the scale $k = \gamma\beta_1/(1-\beta_1)$,
# 19γ at $\beta_1 = 0.95$); the feedback loop through which a large exact-mode correction blows a run
# up; how clipping $c_t$, per tensor (the authors) or by the global norm (Levanter, a JAX library for
# training language models, in its MARS), breaks the loop, and
# what it costs when the correction is mostly noise; and `mars_ref.MARS` under its three clip modes.

# %% [markdown] tags=["notes"]
# **You need.** Notebook 02 (STORM, exact and approx; MARS's momentum); vector norms.
#
# **Class time.** 20 minutes in lecture 2 (§1–§3); §4 is reading (10 minutes). The code runs in about 15 s
# on a laptop CPU.
# Notation: the [shared table](README.md#notation).

# %% [markdown] tags=["slide"]
# ## The correction, scaled and clipped
#
# Notebook 02 showed that MARS's corrected momentum with $\gamma = 1$ is STORM. MARS writes the
# correction as a separate, scaled and **clipped** vector:
#
# $$c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{\text{prev}}), \qquad
#   c_t \leftarrow c_t\,\min\!\Big(1, \frac{\tau}{\|c_t\|}\Big), \qquad
#   m_t = \beta_1 m_{t-1} + (1-\beta_1)\,c_t .$$

# %% [markdown] tags=["notes"]
# This notebook measures three things on the toys of notebook 01 (`mars_ref.course.toys`), always through
# the library's own pieces (`storm_correction`, `clip_by_norm`, `clip_by_global_norm`) and optimizer:
#
# 1. how large the scale $\gamma\beta_1/(1-\beta_1)$ is, and how large the correction $c_t - g_t$ gets;
# 2. the feedback loop that makes large corrections blow up (exact mode, large steps), and how
#    clipping, **per tensor** (the authors) or by the **global norm** (Levanter), breaks it;
#    and what clipping costs when the correction is mostly noise (approx mode, large $\gamma$);
# 3. `mars_ref.MARS` itself (AdamW preconditioner) on the finite sum with `clip="tensor"/"global"/"none"`.

# %%
import math
import os
import mars_ref
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import LogLocator

from mars_ref.course import claims, style, toys
from mars_ref.course.exercises import check
from mars_ref.pieces import storm_correction

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine
torch.manual_seed(0)
style.use()
FULL = os.environ.get("MARS_REF_FULL", "0") == "1"
SEEDS, STEPS = (128, 400) if FULL else (64, 200)
BETA = 0.95
problem = toys.TwoLayerRegression()  # N = 128, minibatch B = 8; x = (W1: 16 x 8, w2: 16)
print(f"{'full' if FULL else 'default'} size: {SEEDS} seeds x {STEPS} steps")

# %% [markdown] tags=["slide"]
# ## 1. The scale
#
# The correction is $k\,(g_t - g_{\text{prev}})$ with $k = \gamma\beta_1/(1-\beta_1)$. The factor
# $\beta_1/(1-\beta_1)$ is what turns the momentum average back into STORM (notebook 02): momentum
# gives $c_t$ the weight $1-\beta_1$, so the correction must be $\beta_1/(1-\beta_1)$ times larger to
# contribute $\beta_1(g_t - g_{\text{prev}})$ to $m_t$. With $\beta_1 = 0.95$ it is **19**: the default
# $\gamma = 0.025$ gives $k = 0.475$, and $\gamma = 1$ gives $k = 19$.

# %% [markdown] tags=["notes"]
# We read $k$ off `storm_correction` itself ($g_t = 1$, $g_{\text{prev}} = 0$ gives $c_t = 1 + k$).

# %%
# NBVAL_CHECK_OUTPUT
one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
print(f"{'beta1':>6} | " + " ".join(f"{'gamma=' + format(g, 'g'):>12}" for g in (0.0025, 0.025, 0.1, 1.0)))
for beta1 in (0.9, 0.95, 0.99):
    ks = [storm_correction(one, zero, g, beta1).item() - 1 for g in (0.0025, 0.025, 0.1, 1.0)]
    print(f"{beta1:6.2f} | " + " ".join(f"{k:12.4g}" for k in ks))
assert abs(storm_correction(one, zero, 1.0, 0.95).item() - 20) < 1e-12  # k = 19 at beta1 = 0.95

# %% [markdown] tags=["slide"]
# ## 2. How large the correction gets, and the feedback loop
#
# What multiplies $k$ differs between the two modes:
#
# * **exact**: $g_t - g_{\text{prev}} = \nabla f(x_t, \xi_t) - \nabla f(x_{t-1}, \xi_t)
#   \approx H_{\xi_t}\,(x_t - x_{t-1})$, the curvature times the last step. With no clipping,
#   $x_t - x_{t-1} = -\eta\, m_{t-1}$, so a large $m$ makes a long step, a long step makes a large
#   correction, and the correction enters the next $m$ with weight $(1-\beta_1)k = \gamma\beta_1$:
#   **a loop with gain $\approx \gamma\beta_1\,\eta\,\|H_\xi\|$** (a heuristic).
# * **approx**: $g_t - g_{t-1}$ contains two independent noise draws, so the correction is mostly
#   noise, of size $\approx k\sqrt{2\operatorname{tr}\Sigma/B}$, however small the step.

# %% [markdown] tags=["notes"]
# In exact mode, a large $\gamma$, a large $\eta$ or a sharp minibatch make the gain large. Read "gain above
# about 1 explodes" as a *heuristic*: it takes norms and ignores the sign. The correction is
# $-k\eta H_\xi m_{t-1}$, so a positive semi-definite $H_\xi$ pushes *against* the momentum and damps it; in an
# eigendirection of curvature $h$ the momentum's factor per step is roughly $\beta_1(1 - \gamma\eta h)$, which
# exceeds 1 in size (with alternating sign) only once $\gamma\eta h > (1+\beta_1)/\beta_1 \approx 2$. Minibatch
# Hessians of the tanh network are indefinite, and the negative-curvature directions grow with either sign;
# the measurement below, not the heuristic, is what says when runs diverge.
#
# We run MARS momentum on the finite sum (SGD-style step $x_{t+1} = x_t - \eta m_t$, no preconditioner,
# no clipping) and record $\|c_t - g_t\|$ for every seed and step.

# %% tags=["slide"]
corr_runs = {}
for eta in (0.1, 0.2, 0.4):
    corr_runs["exact", 1.0, eta] = toys.run(problem, "mars-exact", lr=eta, steps=STEPS, seeds=SEEDS, seed=3,
                                            beta=BETA, gamma=1.0)
for gamma in (0.025, 0.3):
    corr_runs["approx", gamma, 0.1] = toys.run(problem, "mars-approx", lr=0.1, steps=STEPS, seeds=SEEDS, seed=3,
                                               beta=BETA, gamma=gamma)

fig, (ax0, ax1) = style.figure(1, 2)
steps = torch.arange(1, STEPS + 1)
LOOK = {("exact", 0.1): dict(color=style.GREEN, ls="-"), ("exact", 0.2): dict(color=style.BLUE, ls="--"),
        ("exact", 0.4): dict(color=style.VERMILION, ls="-."), ("approx", 0.025): dict(color=style.ORANGE, ls=":"),
        ("approx", 0.3): dict(color=style.PURPLE, ls=(0, (5, 1, 1, 1)))}
medians, never = {}, []
for (mode, gamma, eta), r in corr_runs.items():
    look = LOOK[mode, eta if mode == "exact" else gamma]
    label = rf"{mode}, $\gamma$ = {gamma:g}, $\eta$ = {eta:g}"
    medians[mode, gamma, eta] = r.corr.nanquantile(0.5, dim=1)  # nan: diverged seeds are left out
    ax0.semilogy(steps, medians[mode, gamma, eta], label=label, **look)
    if r.diverged.any():  # a count that stays 0 would only be a line on the axis
        ax1.step(steps, r.loss.isinf().sum(1), where="post", label=label, **look)
    else:
        never.append(label)
ax0.set(xlabel="step $t$", ylabel=r"$\|c_t - g_t\|$, median of the seeds still running",
        title=r"Size of the correction $k\,(g_t - g_{\rm prev})$", ylim=style.log_limits(*medians.values()))
start = medians["exact", 1.0, 0.1][0].item()  # step 1: c_1 - g_1 = k g_1, the same in every exact run
ax0.annotate("step 1: the three exact runs\n" r"start together at $k\,g_1$ (no $g_{\rm prev}$ yet)", (1, start),
             xytext=(30, 25), textcoords="data", fontsize=12, va="center",
             arrowprops=dict(arrowstyle="->", color=style.BLACK, lw=1.2))
ax1.set(xlabel="step $t$", ylabel=f"seeds diverged (of {SEEDS})", ylim=(0, SEEDS), title="Seeds diverged")
ax1.text(0.03, 0.97, "no seed diverged in:\n" + "\n".join(never), transform=ax1.transAxes, va="top", fontsize=12,
         bbox=dict(facecolor="white", edgecolor=style.GREY, alpha=0.9))
fig.legend(*ax0.get_legend_handles_labels(), loc="outside lower center", ncol=3)
fig.suptitle(f"MARS momentum on the finite sum, no clipping ({SEEDS} seeds)")
style.save(fig, "03_correction_and_divergence")
plt.show()

# %%
print(f"{'mode':>6} {'gamma':>6} {'eta':>4} {'median |c-g| (steps 1-20)':>26} {'diverged':>9}")
for (mode, gamma, eta), r in corr_runs.items():
    print(f"{mode:>6} {gamma:6.3f} {eta:4.1f} {r.corr[:20].nanmedian().item():26.3g} "
          f"{r.diverged.sum().item():5d}/{SEEDS}")

# %%
# NBVAL_CHECK_OUTPUT
n_div = {eta: corr_runs["exact", 1.0, eta].diverged.sum().item() for eta in (0.1, 0.2, 0.4)}
early = {mode_gamma: corr_runs[(*mode_gamma, 0.1)].corr[:20].nanmedian() for mode_gamma in (("approx", 0.3),
                                                                                          ("exact", 1.0))}
claims.check({
    "exact, gamma = 1, eta = 0.1: no seed diverges": n_div[0.1] == 0,
    "exact, gamma = 1, eta = 0.4: at least 1/8 of the seeds diverge": n_div[0.4] >= SEEDS // 8,
    "approx, gamma = 0.3, eta = 0.1: no seed diverges (large noisy corrections, no loop)":
        not corr_runs["approx", 0.3, 0.1].diverged.any(),
    "eta = 0.1, steps 1-20: the median approx correction (gamma = 0.3) is over 3x the exact one (gamma = 1)":
        early["approx", 0.3] > 3 * early["exact", 1.0],
    "exact, gamma = 1, eta = 0.4: the median correction grows over 100x within the first 100 steps":
        medians["exact", 1.0, 0.4][:100].max() > 100 * medians["exact", 1.0, 0.4][:20].min(),
})

# %% [markdown] tags=["notes"]
# Exact mode with $\gamma = 1$ (STORM) is stable at $\eta = 0.1$, and at $\eta = 0.4$ a large part of the seeds blow
# up: the median correction grows by more than two orders of magnitude within a hundred steps, and the runs that
# explode leave the median one by one (the curve "exact, $\gamma$ = 1, $\eta$ = 0.4" falls again once only the seeds
# that rode out the burst are left). At step 1 every correction is $k\,g_1$ (there is no previous gradient yet), so
# the exact runs, with $k = 19$, start highest. Within a few steps the exact corrections at $\eta = 0.1$ and $0.2$
# fall below the approx one at $\gamma = 0.3$ ($k = 5.7$) and keep falling as the steps shorten, while the approx
# corrections stay at their noise level (noise times $k$): large, but they do not feed on themselves, since the noise
# of step $t$ does not depend on the length of step $t-1$.

# %% [markdown] tags=["slide"]
# ## 3. Clipping breaks the loop
#
# Clipping caps the corrected gradient at a norm $\tau$ (here $\tau = 1$, the authors' value). The two rules,
# for the $J$ tensors $c^{(1)}, \dots, c^{(J)}$ of one model (`mars_ref.pieces`):
#
# $$\text{per tensor: } c^{(i)} \leftarrow c^{(i)} \min\!\Big(1, \frac{\tau}{\|c^{(i)}\|}\Big)
#   \qquad
#   \text{global: } c^{(i)} \leftarrow c^{(i)} \min\!\Big(1, \frac{\tau}{\sqrt{\sum_j \|c^{(j)}\|^2}}\Big).$$
#
# The momentum $m_t$ averages the clipped $c_s$, so either rule bounds every step $x_{t+1} - x_t = -\eta m_t$,
# whatever the curvature: the loop cannot run away. How long a clipped step can be is exercise 03.1.

# %% [markdown] tags=["notes"]
# Global clipping keeps the direction of the whole update; per-tensor clipping equalises tensors (here
# $W_1$ with 128 entries and $w_2$ with 16). `toys.run(..., clip="tensor"/"global")` applies them per
# seed over `problem.split(x) = (W1, w2)`. We compare the final loss $F(x_{201})$ over seeds.

# %% tags=["slide"]
CLIPS = ("none", "tensor", "global")
clip_runs = {}
for mode, gamma, eta in (("exact", 1.0, 0.2), ("exact", 1.0, 0.4), ("approx", 0.3, 0.1)):
    for clip in CLIPS:
        if clip == "none" and (mode, gamma, eta) in corr_runs:
            clip_runs[mode, gamma, eta, clip] = corr_runs[mode, gamma, eta]
            continue
        clip_runs[mode, gamma, eta, clip] = toys.run(problem, f"mars-{mode}", lr=eta, steps=STEPS, seeds=SEEDS,
                                                     seed=3, beta=BETA, gamma=gamma, clip=clip)

# Two panels on one log scale, broken at F = 1: below, where every median and nearly every seed lies, the
# spread within each group; above, compressed, the unclipped seeds that blew up but stayed finite.
BREAK = 1.0
finite = torch.cat([r.final_loss[torch.isfinite(r.final_loss)] for r in clip_runs.values()])
fig, (ax_hi, ax) = style.figure(2, 1, sharex=True, height_ratios=(1, 2.4))
labels = []
for i, ((mode, gamma, eta, clip), r) in enumerate(clip_runs.items()):
    final = r.final_loss  # +inf for a diverged seed
    jitter = (torch.rand(SEEDS, generator=torch.Generator().manual_seed(i)) - 0.5) * 0.4
    ok = torch.isfinite(final)
    colour = (style.BLUE, style.VERMILION, style.GREEN)[CLIPS.index(clip)]
    marker = "os^"[CLIPS.index(clip)]
    for a in (ax_hi, ax):  # each panel shows the seeds inside its own range
        a.scatter(i + jitter[ok], final[ok], s=28, alpha=0.6, color=colour, marker=marker,
                  label=f"clip {clip!r}" if i < 3 else None)
    n_div = int((~ok).sum())
    median = final.median().item()  # over all seeds, a diverged one counting as +inf
    if math.isfinite(median):
        ax.plot([i - 0.3, i + 0.3], [median] * 2, color=style.BLACK, ls="-", lw=2.5,
                label="median of all seeds" if i == 0 else None)
    # above the panels: x in data (the group), y in axes coordinates (just over the top)
    ax_hi.text(i, 1.04, f"{n_div}/{SEEDS}\ndiverged" + ("" if math.isfinite(median) else "\n(median +∞)"),
               transform=ax_hi.get_xaxis_transform(), ha="center", va="bottom", fontsize=12,
               color=style.BLACK if n_div else style.GREY, fontweight="bold" if n_div else "normal")
    labels.append(f"{mode}\nγ = {gamma:g}\nη = {eta:g}")
for a in (ax_hi, ax):
    a.set_yscale("log")
    for i in (2.5, 5.5):
        a.axvline(i, color=style.GREY, lw=1)
ax.set_ylim(finite.min().item() / 1.5, BREAK)
ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # ticks 0.01, 0.02, 0.05, 0.1, ...
ax.yaxis.set_major_formatter(lambda y, _: f"{y:g}")    # as plain numbers
ax_hi.set_ylim(BREAK, max(finite.max().item(), BREAK) * 5)
ax_hi.set_yticks([10.0 ** k for k in range(2, int(math.log10(ax_hi.get_ylim()[1])) + 1, 2)])
ax_hi.spines["bottom"].set_visible(False)
ax_hi.tick_params(axis="x", bottom=False)
for a, y in ((ax_hi, 0), (ax, 1)):  # the break marks on the left spine
    a.plot([0], [y], transform=a.transAxes, marker=[(-1, -0.5), (1, 0.5)], ms=14, mew=1.5, color=style.BLACK,
           ls="none", clip_on=False)
ax.set_xticks(range(len(labels)), labels)
fig.supylabel(r"final loss $F(x_{T+1})$ per seed (axis broken at 1)", fontsize=13)
fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4)
fig.suptitle(rf"Final loss of {SEEDS} seeds after {STEPS} steps (bar: median of all seeds, diverged = $+\infty$; "
             "top: seeds diverged)", fontsize=14)
style.save(fig, "03_clipping_final_loss")
plt.show()

# %%
print(f"{'setting':>24} {'clip':>7} {'diverged':>9} {'median F':>9} {'max F':>9}   (median: all seeds, diverged = "
      "inf; max: the finite ones)")
summary = {}
for (mode, gamma, eta, clip), r in clip_runs.items():
    final = r.final_loss[torch.isfinite(r.final_loss)]
    summary[mode, gamma, eta, clip] = (r.diverged.sum().item(), r.final_loss.median().item(), final.max().item())
    n, med, worst = summary[mode, gamma, eta, clip]
    print(f"{f'{mode} gamma={gamma:g} eta={eta:g}':>24} {clip:>7} {n:5d}/{SEEDS} {med:9.4g} {worst:9.3g}")

# %%
# NBVAL_CHECK_OUTPUT
claims.check({
    "exact, gamma = 1, eta = 0.4, clipped (tensor, global): no seed diverges":
        all(summary["exact", 1.0, 0.4, clip][0] == 0 for clip in ("tensor", "global")),
    "exact, gamma = 1, eta = 0.2, clipped (tensor, global): every seed ends below F = 0.2":
        all(summary["exact", 1.0, 0.2, clip][2] < 0.2 for clip in ("tensor", "global")),
    "exact, gamma = 1, eta = 0.4, unclipped: at least 1/8 of the seeds diverge":
        summary["exact", 1.0, 0.4, "none"][0] >= SEEDS // 8,
    "exact, gamma = 1, eta = 0.2, unclipped: the worst seed ends over 2x the clipped worst":
        summary["exact", 1.0, 0.2, "none"][2] > 2 * summary["exact", 1.0, 0.2, "tensor"][2],
    "approx, gamma = 0.3: clipping costs speed (median F over 1.5x the unclipped)":
        summary["approx", 0.3, 0.1, "tensor"][1] > 1.5 * summary["approx", 0.3, 0.1, "none"][1],
    "per-tensor and global clipping: median F within a factor 1.5 of each other in every setting":
        all(max(summary[(*k, "tensor")][1], summary[(*k, "global")][1])
            < 1.5 * min(summary[(*k, "tensor")][1], summary[(*k, "global")][1])
            for k in (("exact", 1.0, 0.2), ("exact", 1.0, 0.4), ("approx", 0.3, 0.1))),
})

# %% [markdown] tags=["notes"]
# **Reading.** In exact mode at $\gamma = 1$, clipping is what makes the large step usable: without it
# a large share of the seeds diverge at $\eta = 0.4$ and the unlucky seeds at $\eta = 0.2$ end far above the
# rest; with either clipping rule none diverges and the spread collapses. Per-tensor and global
# clipping are close here (median final losses within a factor 1.5 of each other in every setting; with
# only two tensors the rules differ little).
#
# The approx runs show the price. Their $c_t$ is large because it is noisy ($k = 5.7$ times two noise
# draws), so clipping to $\tau = 1$ mostly shrinks noise, and with it the step: the median final loss is
# higher *with* clipping. Clipping protects against the loop; it does not turn a
# noisy correction into a good one. That is one reason the authors' approx MARS uses a small $\gamma$.

# %% [markdown]
# ## 4. `mars_ref.MARS` itself: AdamW preconditioner, three clip modes
#
# The real optimizer divides by $\sqrt{\hat v_t}$, so the *size* of $c_t$ cancels out of the update
# (every coordinate moves by at most about $\eta$ per step): the feedback loop of section 2 has nothing to
# grow. We train the finite sum with `mars_ref.MARS(preconditioner="adamw")`, the authors'
# defaults ($(\beta_1, \beta_2) = (0.95, 0.99)$, approx, $\gamma = 0.025$) and $\eta = 10^{-2}$, one parameter group per
# seed, so that `clip="global"` clips over the seed's own two tensors ($W_1$ and $w_2$ as a $1\times16$
# matrix, both 2-D, so both take the MARS path: `mars_ref.MARS` gives 2-D tensors the MARS update and 1-D
# ones a plain AdamW step), all seeds in one `step()`.

# %%
MARS_SEEDS, MARS_STEPS = (64, 400) if FULL else (24, 150)


def train_mars(clip, gamma=0.025, lr=1e-2, seed=5):
    """Full-gradient loss F per step (rows) and seed (columns) for MARS-AdamW on the finite sum."""
    gen = torch.Generator().manual_seed(seed)
    x0 = problem.init(gen, (MARS_SEEDS,))
    W1s = [W1.clone().requires_grad_() for W1 in problem.split(x0)[0]]                # (16, 8) each
    w2s = [w2.reshape(1, -1).clone().requires_grad_() for w2 in problem.split(x0)[1]]  # (1, 16) each
    opt = mars_ref.MARS([{"params": [W1, w2]} for W1, w2 in zip(W1s, w2s, strict=True)], lr=lr, gamma=gamma,
                        clip=clip, preconditioner="adamw")
    losses = []
    for _ in range(MARS_STEPS):
        x = torch.cat([torch.stack(W1s).flatten(1), torch.stack(w2s).flatten(1)], dim=1)
        with torch.no_grad():
            losses.append(problem.loss(x))
        opt.zero_grad()
        problem.loss(x, problem.sample(gen, (MARS_SEEDS,))).sum().backward()  # seeds are independent
        opt.step()
    with torch.no_grad():
        x = torch.cat([torch.stack(W1s).flatten(1), torch.stack(w2s).flatten(1)], dim=1)
        losses.append(problem.loss(x))
    return torch.stack(losses)


mars_runs = {clip: train_mars(clip) for clip in CLIPS}

fig, axes = style.figure(1, 3, sharey=True)
intervals = {clip: toys.t_interval(L, dim=1) for clip, L in mars_runs.items()}  # mean and 95% half-width
for ax, (clip, (mean, half)), colour in zip(axes, intervals.items(), (style.BLUE, style.VERMILION, style.GREEN),
                                            strict=True):
    for other, (mean_other, _) in intervals.items():  # the other two means, for comparison
        if other != clip:
            ax.plot(mean_other, color=style.GREY, lw=1.2, ls="--")
    ax.fill_between(range(MARS_STEPS + 1), mean - half, mean + half, color=colour, alpha=0.25, lw=0,
                    label="95% t-interval")
    ax.plot(mean, color=colour, lw=2.5, label="mean")
    ax.set(yscale="log", xlabel="step $t$", title=f"clip = {clip!r}")
axes[0].plot([], [], color=style.GREY, lw=1.2, ls="--", label="the other two means")
axes[0].set_ylabel(r"$F(x_t)$")
axes[0].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # ticks 0.05, 0.1, 0.2, 0.5, 1 (shared by the three)
axes[0].yaxis.set_major_formatter(lambda y, _: f"{y:g}")
axes[0].legend(loc="upper right")
fig.suptitle(rf"mars_ref.MARS (AdamW, approx, $\gamma$ = 0.025, $\eta$ = 0.01): mean ± 95% t-interval over "
             f"{MARS_SEEDS} seeds")
style.save(fig, "03_mars_clip_modes")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
final = {clip: L[-1] for clip, L in mars_runs.items()}
print(f"final F over {MARS_SEEDS} seeds after {MARS_STEPS} steps:")
for clip, f in final.items():
    print(f"  clip = {clip:6s}: median {f.median().item():.4f}, 90% quantile {f.quantile(0.9).item():.4f}, "
          f"max {f.max().item():.4f}, non-finite {int((~torch.isfinite(f)).sum())}")
medians = [f.median().item() for f in final.values()]
print(f"largest / smallest median: {max(medians) / min(medians):.2f}")
assert all(torch.isfinite(f).all() for f in final.values())  # nothing diverges with the preconditioner
assert max(medians) / min(medians) < 1.5                       # and the clip mode changes little here

# %% [markdown]
# With the AdamW preconditioner all three clip modes train every seed, and the medians stay close:
# on this problem, at the paper's $\gamma = 0.025$, clipping is a safety net rather than a
# performance knob. Its job shows in section 3: it caps what a single bad correction can do, which
# matters most when the step is not normalised or the correction is large.
#
# ## Summary
#
# * The correction scale is $k = \gamma\beta_1/(1-\beta_1)$: $19\gamma$ at $\beta_1 = 0.95$ ($0.475$ at the
#   default $\gamma = 0.025$). At $\gamma = 1$ MARS momentum is STORM.
# * In exact mode the correction is curvature × last step, which closes a loop with gain
#   $\approx\gamma\beta_1\eta\|H_\xi\|$ (a heuristic: the sign of $H_\xi$ decides whether it damps or grows); at
#   $\gamma = 1$ and a large step many seeds diverged without clipping and none with per-tensor or global
#   clipping (numbers above). In approx mode the correction is noise
#   times $k$; clipping then mostly shrinks the step.
# * `mars_ref.MARS` with the AdamW preconditioner normalises the update, so here the clip mode barely
#   changed the outcome; the clip remains what bounds one step's correction.

# %% [markdown] tags=["slide"]
# ## Questions
#
# Answers at the end of the notebook.
#
# 1. Why does the factor $\beta_1/(1-\beta_1)$ appear in $k$, and what is $k$ at $\beta_1 = 0.99$, $\gamma = 0.025$?
# 2. At $\eta = 0.1$, approx mode at $\gamma = 0.3$ makes corrections over 3× larger than exact mode at
#    $\gamma = 1$ in the first 20 steps, and no seed diverges; exact mode at $\gamma = 1$ diverges at $\eta = 0.4$.
#    Why is a large exact correction dangerous and a large approx one not?
# 3. When does clipping $c_t$ cost progress, and when is it free?

# %% [markdown]
# ## Exercises
#
# Write each function in its cell, run it, then run the `check` cell under it. Reference solutions:
# `notebooks/solutions/nb03.py`.
#
# **Exercise 03.1 · How long can a clipped step be?** For an SGD-style step $x_{t+1} = x_t - \eta m_t$ with
# $c_t$ clipped at $\tau$, find the least upper bound on $\|x_{t+1} - x_t\|$ under per-tensor clipping ($J$
# tensors) and under global clipping, and prove that it holds (hint: what is $m_t$ a weighted average of, and
# how long can each of those vectors be under each rule?). Write `max_step_norm(lr, tau, n_tensors, clip)`
# (raise `ValueError` for `clip="none"`, which has no bound); the check runs `toys.run(..., keep_path=True)`
# and measures the steps, and it asks for the *least* bound: one that holds but could be lowered is not
# accepted.

# %%
def max_step_norm(lr, tau, n_tensors, clip):
    """The largest possible ||x_{t+1} - x_t|| for an SGD-style step on c_t clipped by `clip` at tau."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("03.1", max_step_norm)

# %% [markdown]
# **Exercise 03.2 · Direction change of per-tensor clipping.** Write `clip_cosine(parts, tau)`: the cosine
# between the concatenated per-tensor-clipped tensors and the unclipped ones. When is it 1? What is it
# for global clipping?

# %%
def clip_cosine(parts, tau):
    """Cosine between the per-tensor-clipped parts (concatenated) and the unclipped ones."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("03.2", clip_cosine)

# %% [markdown]
# ## Answers to the questions
#
# 1. Momentum gives $c_t$ the weight $1-\beta_1$; for the correction to enter $m_t$ as STORM's
#    $\beta_1(g_t - g_{\text{prev}})$ at $\gamma = 1$ it must be $\beta_1/(1-\beta_1)$ times larger. At
#    $\beta_1 = 0.99$, $\gamma = 0.025$: $k = 2.475$.
# 2. Exact mode's correction is curvature times the last step, so its size depends on the previous step: a loop.
#    Approx mode's is mostly the difference of two independent noise draws, whose size does not depend on the
#    step: large but not self-reinforcing.
# 3. It costs when it shrinks useful steps: a noisy correction (approx mode, large $\gamma$) makes $c_t$ long, and
#    clipping then shortens the whole step. It is free when $\|c_t\| < \tau$ (nothing is clipped) and when
#    the preconditioner normalises the step anyway (§4).
#
# ## References
#
# * H. Yuan et al., *MARS: Make vAriance Reduction Shine*, [arXiv 2411.10438](https://arxiv.org/abs/2411.10438):
#   the scaled correction and the per-tensor clip; `docs/algorithm.md` §2–§3 for the equations as coded.
# * A. Cutkosky, F. Orabona, STORM, [arXiv 1905.10018](https://arxiv.org/abs/1905.10018).
# * R. Pascanu, T. Mikolov, Y. Bengio, *On the difficulty of training recurrent neural networks*, ICML 2013,
#   [arXiv 1211.5063](https://arxiv.org/abs/1211.5063): gradient-norm clipping against exploding updates.
# * The course's bibliography and notation: [notebooks/README.md](README.md).
