"""Notebook 04: the three preconditioners of MARS, and the Shampoo ladder (built by scripts/run_notebooks.py)."""

# %% [markdown] tags=["slide"]
# # 04 · The preconditioners: AdamW's diagonal, Lion's sign, and the Shampoo ladder
#
# **What this notebook teaches.** The second half of MARS: the variance-reduced, clipped momentum
# $m_t$ is handed to a **preconditioner** $\mathcal{P}$ that turns it into the update direction,
#
# $$x_{t+1} = x_t - \eta\,\big(\lambda x_t + u_t\big), \qquad u_t = \mathcal{P}(m_t),$$
#
# and the paper's three optimizers differ only in $\mathcal{P}$: AdamW's per-coordinate scale, Lion's
# sign, and "Shampoo".

# %% [markdown] tags=["notes"]
# We climb "Shampoo" down as a ladder of three rungs: full Shampoo (accumulated Kronecker factors, inverse
# fourth roots) → one-step Shampoo (exactly $UV^\top$, by SVD) → Newton–Schulz (five matrix products, what the
# authors run, in bfloat16). Last, with $\gamma = 0$ and `clip="none"` MARS *is* its base optimizer, to machine
# precision: everything MARS adds is the correction and its clip. (With the default per-tensor clip,
# $\gamma = 0$ gives the base optimizer on clipped gradients.)
#
# **You need.** Notebooks 02–03 (what $m_t$ is); the singular value decomposition; eigenvalues of
# symmetric matrices. Adam/AdamW at the level of its update equations.
#
# **Class time.** 25 minutes in lecture 2 (§1 AdamW's diagonal in 5, §2 in 3, §3 the Shampoo ladder in 12,
# §4 in 5). The code runs in about 5 s on a laptop CPU. Notation: the
# [shared table](README.md#notation). Where the published implementations differ in small details
# (where AdamW's `eps` goes) and how the three implementations of the step in `mars_ref` agree is in
# the appendix notebook `07_appendix_porting.ipynb`: porting matters, not part of this lesson.

# %%
import mars_ref
import matplotlib.pyplot as plt
import torch
from torch import nn

from mars_ref.course import claims, style
from mars_ref.course.exercises import check
from mars_ref.pieces import (
    adamw_direction,
    lion_direction,
    momentum,
    newton_schulz,
    polar_svd,
    second_moment,
    shampoo_direction,
    shampoo_factors,
    shampoo_scale,
)

torch.manual_seed(0)
torch.set_num_threads(1)  # small matrices: one thread is faster, and robust on a shared machine
style.use()


def rel_dist(A, B, match_scale=False):
    """Relative Frobenius distance ‖A − B‖_F / ‖B‖_F (A first rescaled to ‖B‖_F if match_scale)."""
    A, B = A.double(), B.double()
    if match_scale:
        A = A * (B.norm() / A.norm())
    return ((A - B).norm() / B.norm()).item()


# %% [markdown] tags=["slide"]
# ## 1. AdamW's diagonal
#
# MARS-AdamW keeps a second moment of the *clipped, corrected* gradient $c_t$ and divides every
# coordinate by its own running root mean square:
#
# $$v_t = \beta_2 v_{t-1} + (1-\beta_2)\,c_t^2, \qquad
#   u_t = \frac{m_t}{\Big(\dfrac{\sqrt{v_t}}{\sqrt{1-\beta_2^t}} + \texttt{eps}\Big)(1-\beta_1^t)}
#   \qquad(\texttt{eps} = 10^{-8}).$$
#
# Two consequences:
#
# * **The step does not depend on the gradient's scale** (as long as it is far above `eps`).
# * **The first step is a sign step:** $u_1 = c_1/(|c_1| + \texttt{eps})$.

# %% [markdown] tags=["notes"]
# Both are checked below with the library's `momentum`, `second_moment` and `adamw_direction`:
#
# * multiply every gradient by 1000 and $m_t$ and $\sqrt{v_t}$ both grow 1000×, so $u_t$ does not change;
# * with $m_1 = (1-\beta_1)c_1$ and $v_1 = (1-\beta_2)c_1^2$ the bias corrections cancel, so
#   $u_1 = c_1/(|c_1| + \texttt{eps})$: every coordinate moves by $\eta$, in the direction of its sign.

# %%
# NBVAL_CHECK_OUTPUT
BETA1, BETA2, EPS = 0.95, 0.99, 1e-8  # the authors' MARS defaults
gen = torch.Generator().manual_seed(0)
stream = [1e-3 * torch.randn(1000, generator=gen, dtype=torch.float64).sign()  # sizes 5e-4 to 1.5e-3, random signs
          * (0.5 + torch.rand(1000, generator=gen, dtype=torch.float64)) for _ in range(50)]


def adamw_directions(scale):
    """u_t for t = 1..50 of the AdamW branch fed the gradient stream times `scale`."""
    m = v = torch.zeros(1000, dtype=torch.float64)
    out = []
    for t, c in enumerate(stream, start=1):
        m, v = momentum(m, scale * c, BETA1), second_moment(v, scale * c, BETA2)
        out.append(adamw_direction(m, v, t, BETA1, BETA2, EPS))
    return torch.stack(out)


u_small, u_large = adamw_directions(1.0), adamw_directions(1000.0)
scale_gap = (u_small - u_large).abs().max().item()
sign_gap = (u_small[0] - torch.sign(stream[0])).abs()
print(f"gradients of size ~1e-3 vs the same times 1000: largest change of u_t over 50 steps {scale_gap:.1e}")
print(f"step 1: largest |u_1 - sign(c_1)| = {sign_gap.max().item():.1e} (= eps / (|c| + eps) for the smallest |c|)")
claims.check({
    "multiplying every gradient by 1000 changes u_t by under 1e-4": scale_gap < 1e-4,
    "u_1 = sign(c_1) up to eps / |c_1| in every coordinate": bool((sign_gap <= EPS / stream[0].abs() + 1e-15).all()),
})

# %% [markdown] tags=["notes"]
# The only place the scale still enters is `eps`: for coordinates whose gradients are not far above
# $10^{-8}$ the division damps the step. *Where* exactly `eps` is added differs between published
# implementations, which matters for tiny gradients; appendix notebook 07 measures it.

# %% [markdown] tags=["slide"]
# ## 2. Lion's sign
#
# MARS-Lion replaces the diagonal by the sign of the momentum:
#
# $$u_t = \operatorname{sign}(m_t), \qquad m_t = \beta_1 m_{t-1} + (1-\beta_1)\,c_t .$$
#
# Every coordinate moves by exactly $\pm\eta$, so $\|u_t\|_F = \sqrt{n}$ whatever the gradient's
# size (and Adam's first step, section 1, is this sign up to `eps`).

# %% [markdown] tags=["slide"]
# ### Lion's own constants
#
# **Lion itself** (Chen et al., 2023) is not quite this: it has two constants of its own, which its paper
# calls $\beta_1, \beta_2$ and we write $b_1, b_2$ (they are not MARS's momentum and second-moment constants):
#
# $$u_t = \operatorname{sign}\big(b_1 m_{t-1} + (1-b_1) g_t\big), \qquad
#   m_t = b_2 m_{t-1} + (1-b_2) g_t ,$$
#
# i.e. the sign of a *different* interpolation than the average it stores.

# %% [markdown] tags=["notes"]
# With $b_1 = b_2$ the two coincide, and Lion is MARS-Lion at $\gamma = 0$ with $\beta_1 = b_1$, which section 4
# checks. A small demonstration of how often the two disagree in sign with Lion's default $(b_1, b_2) = (0.9, 0.99)$:

# %%
# NBVAL_CHECK_OUTPUT
gen = torch.Generator().manual_seed(1)
signal = torch.randn(10_000, generator=gen, dtype=torch.float64)
m_lion = torch.zeros_like(signal)  # Lion's stored average (b2 = 0.99)
m_mars = torch.zeros_like(signal)  # MARS-Lion's average (β1 = 0.9), γ = 0, no clipping
disagree = []
for _ in range(200):
    g = 0.2 * signal + torch.randn(10_000, generator=gen, dtype=torch.float64)  # weak signal, strong noise
    u_lion = torch.sign(torch.lerp(g, m_lion, 0.9))
    m_lion = momentum(m_lion, g, 0.99)
    m_mars = momentum(m_mars, g, 0.9)
    u_mars = lion_direction(m_mars)
    disagree.append((u_lion != u_mars).double().mean().item())
late = sum(disagree[100:]) / 100
print(f"fraction of coordinates where Lion(0.9, 0.99) and MARS-Lion(beta1=0.9) disagree in sign, "
      f"steps 101-200: {late:.2f}")
assert 0.05 < late < 0.5

# %% [markdown] tags=["slide"]
# ## 3. The Shampoo ladder
#
# ### Rung 1: full Shampoo
#
# For a matrix parameter with gradients $G_s$ (rows × cols), Shampoo (Gupta et al.,
# 2018) accumulates two Kronecker factors and preconditions on both sides:
#
# $$L_t = \sum_{s\le t} G_s G_s^\top,\qquad R_t = \sum_{s\le t} G_s^\top G_s,\qquad
#   u_t = L_t^{-1/4}\, M_t\, R_t^{-1/4},$$
#
# with inverse fourth roots by eigendecomposition, $L = Q\Lambda Q^\top \Rightarrow
# L^{-1/4} = Q\Lambda^{-1/4}Q^\top$ (`inverse_root`, `shampoo_factors`, `shampoo_direction`).
# That is two `eigh`, of a rows × rows and a cols × cols matrix, per step: expensive.

# %% [markdown] tags=["slide"]
# ### Rung 2: one-step Shampoo is $UV^\top$
#
# Drop the accumulation: take $L = MM^\top$, $R = M^\top M$ from the one matrix $M = USV^\top$
# (thin SVD, $S$ the diagonal of singular values $s_i$, invertible). Then $L = US^2U^\top$, $R = VS^2V^\top$, so
# $L^{-1/4} = US^{-1/2}U^\top$ and $R^{-1/4} = VS^{-1/2}V^\top$ on the ranges, and
#
# $$L^{-1/4} M R^{-1/4}
#   = US^{-1/2}\,\underbrace{U^\top U}_{I}\,S\,\underbrace{V^\top V}_{I}\,S^{-1/2}V^\top
#   = U\,S^{-1/2}SS^{-1/2}\,V^\top = UV^\top .$$
#
# Every singular value is set to 1: the update is the orthogonal polar factor of $M$, the
# nearest semi-orthogonal matrix to it.

# %% [markdown] tags=["notes"]
# (The part of $\mathbb{R}^m$ outside $U$'s range, where
# $L$ has zero eigenvalues, is never touched because $M$ has no component there.)
# Numerically, in float64, for a square, a tall and a wide matrix:

# %%
# NBVAL_CHECK_OUTPUT
gen = torch.Generator().manual_seed(2)
worst = 0.0
for shape in [(48, 48), (96, 32), (32, 96)]:
    M = torch.randn(*shape, generator=gen, dtype=torch.float64)
    L, R = shampoo_factors(torch.zeros(shape[0], shape[0], dtype=torch.float64),
                           torch.zeros(shape[1], shape[1], dtype=torch.float64), M)  # one step
    gap = (shampoo_direction(L, R, M) - polar_svd(M)).abs().max().item()
    worst = max(worst, gap)
    print(f"{str(shape):>9}: max |L^-1/4 M R^-1/4 - U V^T| < 1e-9: {gap < 1e-9}")
assert worst < 1e-9

# %% [markdown] tags=["slide"]
# ### Rung 3: Newton–Schulz
#
# An SVD is still expensive on accelerators. Newton–Schulz reaches (approximately) $UV^\top$
# with matrix products only. Normalise $X_0 = M/(\|M\|_F+\texttt{eps})$ so every singular value is
# $\le 1$, then repeat five times
#
# $$X \leftarrow q_1 X + q_3\,(XX^\top)X + q_5\,(XX^\top)^2X,\qquad (q_1, q_3, q_5) = (3.4445,\,-4.7750,\,2.0315).$$
#
# Since $X = U S V^\top$ gives $XX^\top X = US^3V^\top$, each step applies the *same odd polynomial*
# $p(s) = q_1 s + q_3 s^3 + q_5 s^5$ to every singular value, and leaves $U, V$ alone.

# %% [markdown] tags=["notes"]
# The coefficients are tuned to push small singular values up fast (slope $q_1 = 3.4445$ at 0), at the
# price of not converging: after five steps the singular values that made it sit in roughly
# $[0.7, 1.2]$ instead of at 1. "Made it": near 0 each step multiplies by at most $q_1$, so five
# steps lift a singular value by at most $q_1^5 \approx 490$; anything below $\sim 10^{-3}\|M\|_F$
# stays small. The authors run it in **bfloat16** (8 bits of mantissa, relative rounding $2^{-8}$).
# Below: a $128\times 64$ matrix $M = USV^\top$ with singular values spread over four decades (as
# momentum matrices can be), and what $j$ steps make of each singular value, $u_i^\top X_j v_i$, in
# float64 and bfloat16, for $j$ up to 16, three times the authors' five.

# %% tags=["slide"]
gen = torch.Generator().manual_seed(3)
U0, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen, dtype=torch.float64))
V0, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
spectrum = torch.logspace(0, -4, 64, dtype=torch.float64)
M_spread = U0 @ torch.diag(spectrum) @ V0.T
P_spread = polar_svd(M_spread)

ks = range(0, 17)
sv = {dt: [] for dt in (torch.float64, torch.bfloat16)}
dist = {dt: [] for dt in sv}
for dt in sv:
    for k in ks:
        X = M_spread / M_spread.norm() if k == 0 else newton_schulz(M_spread, k, dtype=dt)
        sv[dt].append(torch.diagonal(U0.T @ X.double() @ V0))  # what became of each singular value of M
        dist[dt].append(rel_dist(X, P_spread))
bf_vs_64 = [rel_dist(newton_schulz(M_spread, k, dtype=torch.bfloat16),
                     newton_schulz(M_spread, k, dtype=torch.float64)) for k in ks if k > 0]

fig, (ax0, ax1) = style.figure(1, 2)
colors = plt.cm.plasma([0.6 * j / 5 for j in range(6)])  # dark blue to red: no light end, all read on the band
for j in range(6):
    ax0.semilogx(spectrum / spectrum.norm(), sv[torch.float64][j], "-", color=colors[j], label=f"j = {j}",
                 lw=3 if j == 5 else 2)
    ax0.semilogx(spectrum / spectrum.norm(), sv[torch.bfloat16][j], ".", color=colors[j], ms=6)
ax0.axhspan(0.7, 1.2, facecolor=style.GREY, alpha=0.12, edgecolor="none", label="[0.7, 1.2]")
for edge in (0.7, 1.2):
    ax0.axhline(edge, color=style.GREY, lw=1, ls="--")
ax0.set(xlabel=r"singular value $s_i$ of $X_0 = M/\|M\|_F$", ylim=(-0.05, 1.6),
        ylabel=r"$u_i^\top X_j v_i$ (= $p^{(j)}(s_i)$ exactly)",
        title="What j steps do to each singular value\n(lines float64, dots bfloat16)")
ax0.legend(ncol=3, loc="upper center")
ax1.plot(list(ks), dist[torch.float64], "o-", color=style.BLUE, label=r"float64: $\|X_j - UV^\top\|_F / \|UV^\top\|_F$")
ax1.plot(list(ks), dist[torch.bfloat16], "s--", color=style.VERMILION, mfc="none", ms=10, mew=2,  # open: float64 shows
         label=r"bfloat16: the same")
ax1.plot(list(ks)[1:], bf_vs_64, "^:", color=style.GREEN, label=r"$\|X_j^{bf16} - X_j^{f64}\|_F / \|X_j^{f64}\|_F$")
ax1.axvline(5, color=style.GREY, lw=1.5, ls="-")
ax1.text(5.2, 0.03, "the authors' 5 steps", color=style.GREY, fontsize=12)
ax1.set(xlabel="Newton–Schulz steps j", ylabel="relative Frobenius distance", ylim=(0, 1),
        title="Distance to the polar factor: falls, then levels off")
ax1.legend(loc="upper right")
style.save(fig, "04_newton_schulz")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
sv5 = sv[torch.float64][5]  # in the order of `spectrum`, descending
s0 = spectrum / spectrum.norm()
big = s0 >= 3e-3
print(f"after 5 steps (float64): the {int(big.sum())} singular values with s0 >= 3e-3 are in "
      f"[{sv5[big].min().item():.2f}, {sv5[big].max().item():.2f}]; "
      f"the smallest (s0 = {s0[-1].item():.1e}) is {sv5[-1].item():.3f}")
print(f"distance to U V^T after 5 steps: float64 {dist[torch.float64][5]:.2f}, bfloat16 {dist[torch.bfloat16][5]:.2f}")
print(f"bfloat16 vs float64 after 1 step {bf_vs_64[0]:.3f}, after 5 steps {bf_vs_64[4]:.2f}")
late64, late16 = dist[torch.float64][9:], dist[torch.bfloat16][9:]
print(f"float64 distance for j = 9-16: {min(late64):.2f} to {max(late64):.2f}; bfloat16: {min(late16):.2f} to "
      f"{max(late16):.2f}")
assert 0.65 < sv5[big].min().item() and sv5[big].max().item() < 1.25
assert sv5[-1].item() < 0.1  # q1^5 = 490 is not enough for s0 = 5e-5
assert bf_vs_64[0] < 0.01 and bf_vs_64[4] > 0.1  # bf16 noise in the small directions, amplified
assert all(b < a for a, b in zip(dist[torch.float64][:8], dist[torch.float64][1:9], strict=True))  # falls to j = 8
assert 0.1 < min(late64) and max(late64) < 1.5 * min(late64)  # then levels off above 0.1: no convergence
assert min(late16) > 2 * max(late64)  # bfloat16 levels off higher still

# %% [markdown] tags=["notes"]
# Three things to notice.
#
# * The distance to $UV^\top$ falls only while the weakest directions are still being lifted into the
#   band (near 0 each step multiplies a singular value by $q_1 = 3.44$, and $3.44^8 \approx 2\cdot10^4$
#   lifts $s_0 = 5\cdot10^{-5}$): up to $j = 8$. From there on it **levels off** above 0.1 (the printout):
#   the iteration is built to land in a band around 1 quickly, not to converge, and the singular values
#   keep oscillating inside the band.
# * At the authors' five steps the bottom decade of this spectrum is still well below the band:
#   $\mathrm{NS}_5$ is *not* $UV^\top$ in the weakest directions, which is most of its distance here.
#   (For momentum that may be a feature: those directions are mostly noise.)
# * bfloat16 agrees with float64 to a few $10^{-3}$ after one step, but its rounding
#   ($2^{-8}$ relative to the largest entries) swamps the directions whose singular values are
#   below $\sim 10^{-2}$ of the largest, and every later step amplifies that noise like any
#   other small singular value (the dots above the lines at the left of the plot). On this
#   ill-conditioned matrix the bfloat16 iteration levels off more than twice as far from $UV^\top$ as
#   the float64 one; on well-conditioned matrices (next section) it moves the result by a few per cent.

# %% [markdown] tags=["slide"]
# ### How far is each rung from the next?
#
# Three distances, each relative in Frobenius norm:
#
# * **full → one-step**: $L_T^{-1/4}M_TR_T^{-1/4}$ (factors accumulated over $T$ gradients) vs $UV^\top$ of
#   $M_T$. Full Shampoo's overall scale depends on $T$ (a learning rate absorbs it), so we
#   rescale it to $\|UV^\top\|_F$ first and compare directions.
# * **one-step → Newton–Schulz**: $UV^\top$ vs $\mathrm{NS}_5(M_T)$ in float64.
# * **float64 → bfloat16**: $\mathrm{NS}_5$ in float64 vs in bfloat16.

# %% [markdown] tags=["notes"]
# We use two sources of matrices. *Random*: i.i.d. Gaussian gradients, momentum
# $M_t = \beta_1 M_{t-1} + (1-\beta_1)G_t$. *Real*: the gradients and the MARS momentum of the
# three weight matrices of a small MLP trained for 30 steps by MARS-Shampoo on a
# teacher–student regression.

# %%
def ladder(grads, momenta):
    """Distances along the ladder after each step T, for one parameter's gradient and momentum sequence."""
    m, n = grads[0].shape
    L = torch.zeros(m, m, dtype=torch.float64)
    R = torch.zeros(n, n, dtype=torch.float64)
    out = {"full->one-step": [], "one-step->NS": [], "NS f64->bf16": []}
    scale = grads[0].double().norm()  # full Shampoo's direction is scale-free, its ε is not: work at scale 1
    for G, M in zip(grads, momenta, strict=True):
        L, R = shampoo_factors(L, R, G.double() / scale)
        M = M.double()
        P = polar_svd(M)
        N64 = newton_schulz(M, 5, dtype=torch.float64)
        out["full->one-step"].append(rel_dist(shampoo_direction(L, R, M), P, match_scale=True))
        out["one-step->NS"].append(rel_dist(N64, P))
        out["NS f64->bf16"].append(rel_dist(newton_schulz(M, 5, dtype=torch.bfloat16), N64))
    return out


STEPS, BETA1_SH = 30, 0.95

# Random: i.i.d. Gaussian gradients, EMA momentum.
gen = torch.Generator().manual_seed(4)
random_ladders = {}
for shape in [(64, 32), (64, 64)]:
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]
    mom, M = [], torch.zeros(shape, dtype=torch.float64)
    for G in grads:
        M = BETA1_SH * M + (1 - BETA1_SH) * G
        mom.append(M.clone())
    random_ladders[f"random {shape[0]}x{shape[1]}"] = ladder(grads, mom)

# Real: a 32-64-64-8 MLP (no biases), teacher-student regression, MARS-Shampoo for 30 steps.
# Batches of 128 > 64 rows, so that single gradients have full rank (a batch of B examples
# gives a weight gradient of rank <= B, and U V^T of a rank-deficient matrix is not unique).
torch.manual_seed(5)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
student = nn.Sequential(nn.Linear(32, 64, bias=False), nn.Tanh(), nn.Linear(64, 64, bias=False), nn.Tanh(),
                        nn.Linear(64, 8, bias=False))
opt = mars_ref.MARS(student.parameters(), lr=0.02, betas=(BETA1_SH, 0.99), preconditioner="shampoo")
weights = [student[0].weight, student[2].weight, student[4].weight]
grads, mom = {w: [] for w in weights}, {w: [] for w in weights}
losses = []
for _ in range(STEPS):
    xb = torch.randn(128, 32)
    with torch.no_grad():
        yb = teacher(xb)
    opt.zero_grad()
    loss = ((student(xb) - yb) ** 2).mean()
    loss.backward()
    losses.append(loss.item())
    opt.step()
    for w in weights:
        grads[w].append(w.grad.detach().clone())
        mom[w].append(opt.state[w]["m"].detach().clone())
real_ladders = {f"real {tuple(w.shape)[0]}x{tuple(w.shape)[1]}": ladder(grads[w], mom[w]) for w in weights}
print(f"teacher-student loss: step 1 {losses[0]:.3f}, step {STEPS} {losses[-1]:.3f}")

# %% tags=["slide"]
all_ladders = {**random_ladders, **real_ladders}
fig, (ax0, ax1) = style.figure(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
for i, (name, lad) in enumerate(all_ladders.items()):  # from T = 2: at T = 1 the distance is round-off (printed)
    ax0.plot(range(2, STEPS + 1), lad["full->one-step"][1:], color=style.CYCLE[i],
             ls="--" if name.startswith("random") else "-", marker="os^Dv"[i], markevery=(i, 5), ms=8,
             label=name)  # markers staggered by one step per curve, so that curves that meet keep both
ax0.set(xlabel=r"number of gradients $T$ accumulated in $L_T, R_T$ (from 2)", ylim=(0, None),
        ylabel="relative distance (scale matched)", title="Rung 1 → rung 2: full Shampoo vs $UV^\\top$")
ax0.legend(title="matrix")
keys = [("full->one-step", "full Shampoo → $UV^\\top$"), ("one-step->NS", "$UV^\\top$ → NS$_5$ (float64)"),
        ("NS f64->bf16", "NS$_5$ float64 → bfloat16")]
width = 0.27
for j, ((key, label), colour, hatch) in enumerate(zip(keys, (style.BLUE, style.ORANGE, style.GREEN), ("", "//", ".."),
                                                      strict=True)):
    ax1.bar([i + (j - 1) * width for i in range(len(all_ladders))], [lad[key][-1] for lad in all_ladders.values()],
            width, label=label, color=colour, hatch=hatch, edgecolor="white")
ax1.set_xticks(range(len(all_ladders)), [n.replace(" ", "\n") for n in all_ladders])
ax1.set(ylabel="relative Frobenius distance", ylim=(0, 1), title=f"Between rungs after T = {STEPS} steps")
ax1.legend(loc="upper left")
style.save(fig, "04_shampoo_ladder")
plt.show()

# %%
print(f"relative Frobenius distances after T = {STEPS} steps")
print(f"{'matrix':>14} {'full->1-step':>13} {'1-step->NS':>11} {'NS f64->bf16':>13}")
table = {}
for name, lad in all_ladders.items():
    table[name] = [lad[key][-1] for key in ("full->one-step", "one-step->NS", "NS f64->bf16")]
    print(f"{name:>14} {table[name][0]:13.2f} {table[name][1]:11.2f} {table[name][2]:13.3f}")
print("at T = 1 (one gradient; the momentum is proportional to it), full Shampoo vs U V^T:")
for name, lad in all_ladders.items():
    print(f"{name:>14}: {lad['full->one-step'][0]:.0e}")

# %%
# NBVAL_CHECK_OUTPUT
claims.check({
    "T = 1: full Shampoo is U V^T to 1e-6 on the random matrices":
        all(lad["full->one-step"][0] < 1e-6 for name, lad in all_ladders.items() if name.startswith("random")),
    "T = 1: within 0.1 on every matrix": all(lad["full->one-step"][0] < 0.1 for lad in all_ladders.values()),
    "NS_5 is 10-60 % from U V^T on every matrix, never close": all(0.1 < row[1] < 0.6 for row in table.values()),
    "accumulating over T steps moves full Shampoo over 20 % from one-step": all(row[0] > 0.2 for row in table.values()),
    "bfloat16 moves NS_5 by under 5 % on the random matrices":
        all(row[2] < 0.05 for name, row in table.items() if name.startswith("random")),
    "NS_5 is further from U V^T on the real 64x64 momentum than on any random matrix":
        table["real 64x64"][1] > max(row[1] for name, row in table.items() if name.startswith("random")),
    "bfloat16 moves NS_5 more on the real 64x64 momentum than on any random matrix":
        table["real 64x64"][2] > max(row[2] for name, row in table.items() if name.startswith("random")),
})

# %% [markdown] tags=["notes"]
# **Reading.**
#
# * With one gradient, full Shampoo *is* $UV^\top$: to round-off for the random matrices; for
#   the real ones up to the $\texttt{eps} = 10^{-12}$ in the inverse roots, which damps the
#   directions with tiny singular values. Real gradients have many: the $64\times64$ layer sits
#   between a 64-unit layer and an 8-dimensional output, so its gradient is dominated by
#   about 8 directions (exercise 04.2 works out what the damping does).
# * As $L, R$ accumulate, full Shampoo remembers past gradients and its direction moves
#   away from the orthogonalised momentum: more than 20 % on every matrix after 30 steps (the table).
#   The top rung and the middle one are really different optimizers.
# * Newton–Schulz stays 10–60 % from $UV^\top$ on every matrix (singular values in the band, not at
#   1), furthest on the real $64\times64$ momentum, whose weak directions five steps do not lift.
#   bfloat16 moves the result by under 5 % on the random matrices and more on that ill-conditioned one.
#
# So "MARS-Shampoo" as the authors ran it is orthogonalised momentum, as in Muon, not Shampoo
# with second-moment memory, and its bottom rung is a loose, cheap version of $UV^\top$.

# %% [markdown] tags=["slide"]
# ## 4. With $\gamma = 0$, MARS is its base optimizer
#
# $\gamma = 0$ makes $c_t = g_t$; with clipping off (`clip="none"`) the rest of MARS is then
# exactly the base optimizer. We check it in float64 on a small MLP, 25 steps each, with
# weight decay on: MARS-AdamW against AdamW, MARS-Lion against Lion ($b_1 = b_2$), MARS-Shampoo
# against orthogonalised momentum.

# %% [markdown] tags=["notes"]
# The three comparisons in detail:
#
# * MARS-AdamW (`optimize_1d=True`, so biases take the same path) vs `torch.optim.AdamW`;
# * MARS-Lion ($\beta_1 = 0.9$) vs `mars_ref.Lion` with $b_1 = b_2 = 0.9$;
# * MARS-Shampoo (`ns_dtype=torch.float64`) vs orthogonalised momentum written out with
#   `newton_schulz`: $m_t = \beta_1 m_{t-1} + (1-\beta_1)g_t$,
#   $x \leftarrow x - \eta\big(\lambda x + \sqrt{\max(1, \text{rows}/\text{cols})}\,\mathrm{NS}_5(m_t/(1-\beta_1))\big)$
#   (Muon without Nesterov); bias-free MLP, since Shampoo is for matrices.

# %%
def make_mlp(bias):
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(10, 24, bias=bias), nn.Tanh(), nn.Linear(24, 5, bias=bias)).double()


gen = torch.Generator().manual_seed(7)
X_batches = torch.randn(25, 16, 10, generator=gen, dtype=torch.float64)
Y_batches = torch.randn(25, 16, 5, generator=gen, dtype=torch.float64)


def batch_loss(model, t):
    return ((model(X_batches[t]) - Y_batches[t]) ** 2).mean()


def train(model, opt):
    for t in range(len(X_batches)):
        opt.zero_grad()
        batch_loss(model, t).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def max_gap(make_a, make_b, bias=True):
    a, b = make_mlp(bias), make_mlp(bias)
    start = torch.cat([p.detach().flatten() for p in a.parameters()])
    xa, xb = train(a, make_a(a.parameters())), train(b, make_b(b.parameters()))
    return (xa - xb).abs().max().item(), (xa - start).abs().max().item()


common = dict(gamma=0.0, clip="none", weight_decay=0.1)
gap_adamw = max_gap(lambda p: mars_ref.MARS(p, lr=1e-2, betas=(0.9, 0.99), optimize_1d=True, **common),
                    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1))
gap_lion = max_gap(lambda p: mars_ref.MARS(p, lr=1e-3, betas=(0.9, 0.99), optimize_1d=True,
                                            preconditioner="lion", **common),
                   lambda p: mars_ref.Lion(p, lr=1e-3, betas=(0.9, 0.9), weight_decay=0.1))


class OrthogonalisedMomentum(torch.optim.Optimizer):
    """Momentum, then U V^T by Newton–Schulz in float64: written out from the pieces."""

    def __init__(self, params, lr, beta1, weight_decay, eps):
        super().__init__(params, dict(lr=lr, beta1=beta1, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                b = self.state[p].setdefault("b", torch.zeros_like(p))
                b.copy_(momentum(b, p.grad, group["beta1"]))
                u = newton_schulz(b / (1 - group["beta1"]), 5, group["eps"], torch.float64) * shampoo_scale(p.shape)
                p.sub_(group["lr"] * (group["weight_decay"] * p + u))


gap_shampoo = max_gap(lambda p: mars_ref.MARS(p, lr=1e-2, betas=(0.9, 0.99), preconditioner="shampoo",
                                               ns_dtype=torch.float64, **common),
                      lambda p: OrthogonalisedMomentum(p, lr=1e-2, beta1=0.9, weight_decay=0.1, eps=1e-8),
                      bias=False)

# %%
print("gamma = 0, clip = none, float64, 25 steps: max |x_MARS - x_base| (parameters moved by up to ...)")
for name, (gap, moved) in {"MARS-AdamW vs torch.optim.AdamW": gap_adamw,
                           "MARS-Lion vs mars_ref.Lion(b1 = b2)": gap_lion,
                           "MARS-Shampoo vs NS(momentum)": gap_shampoo}.items():
    print(f"{name:>36}: {gap:.1e}   (moved {moved:.2f})")

# %%
# NBVAL_CHECK_OUTPUT
claims.check({
    "gamma = 0: MARS-AdamW, MARS-Lion, MARS-Shampoo equal their base optimizers to 1e-12":
        max(gap_adamw[0], gap_lion[0], gap_shampoo[0]) < 1e-12,
    "and the parameters did move (by over 0.01)": min(gap_adamw[1], gap_lion[1], gap_shampoo[1]) > 1e-2,
})

# %% [markdown]
# ## Summary
#
# * **AdamW's diagonal** divides each coordinate by its own running RMS: the step is independent
#   of the gradient's scale, and the first step is a sign step (both checked).
# * **Lion's sign** moves each coordinate by $\pm\eta$. MARS-Lion takes the sign of its one
#   momentum; Lion takes the sign of a second interpolation, and they agree only with Lion's $b_1 = b_2$.
# * **The Shampoo ladder**: full Shampoo ($L^{-1/4}MR^{-1/4}$, accumulated) → one-step Shampoo,
#   which is *exactly* $UV^\top$ (shown algebraically and to $10^{-9}$ numerically) → Newton–Schulz,
#   whose five steps put the singular values above $\sim 10^{-3}\|M\|_F$ into $\approx[0.7, 1.2]$
#   (smaller ones stay small) and whose distance to $UV^\top$ levels off instead of going to 0 with more
#   steps. Accumulation moves full Shampoo more than 20 % away from the rung below it:
#   MARS-Shampoo is orthogonalised momentum, as in Muon.
# * **$\gamma = 0$ with `clip="none"`** gives back AdamW, Lion ($b_1 = b_2$) and orthogonalised momentum to
#   $10^{-12}$ in float64: everything MARS adds lives in the correction term and its clip.

# %% [markdown] tags=["slide"]
# ## Questions
#
# Answers at the end of the notebook.
#
# 1. Why is Adam's first step a sign step, whatever the gradient's size?
# 2. One-step Shampoo is $UV^\top$. What does that make MARS-Shampoo, as the authors run it?
# 3. MARS at $\gamma = 0$ with its default `clip="tensor"`: is it AdamW? When would the difference show?

# %% [markdown]
# ## Exercises
#
# Write each function in its cell, run it, then run the `check` cell under it. Reference solutions:
# `notebooks/solutions/nb04.py`.
#
# **Exercise 04.1 · Newton–Schulz on a scalar.** Write `ns_singular_values(M, steps)` that returns the
# singular values of `newton_schulz(M, steps, dtype=torch.float64)` *without* any matrix product:
# normalise the singular values of $M$ by $\|M\|_F$ (plus `eps` = $10^{-7}$, as `newton_schulz` does) and
# apply the polynomial $p(s) = q_1 s + q_3 s^3 + q_5 s^5$ `steps` times (the check notices a call to
# `newton_schulz` and any matrix product: `@`, `torch.matmul`, `einsum`, …). Then: how many steps does a
# singular value of $10^{-6}$ (relative to $\|M\|_F$) need to reach 0.5?

# %%
def ns_singular_values(M, steps):
    """Singular values of newton_schulz(M, steps, dtype=torch.float64), from the scalar polynomial only."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("04.1", ns_singular_values)

# %% [markdown]
# **Exercise 04.2 · Shampoo with damping.** Real Shampoo adds $\texttt{eps}\cdot I$ to $L$ and $R$. Show that with
# $L = MM^\top + \texttt{eps}\,I$, $R = M^\top M + \texttt{eps}\,I$ one-step Shampoo is
# $U\,\mathrm{diag}\big(s_i/\sqrt{s_i^2+\texttt{eps}}\big)V^\top$, write it as `damped_one_step_shampoo(M, eps)` with
# one SVD, and compare it with `shampoo_direction(M @ M.T, M.T @ M, M, eps)`. The check also uses an
# ill-conditioned $M$ (singular values down to $10^{-9}$) with `eps` down to $10^{-24}$: there forming $MM^\top$
# loses the weak directions to round-off and `shampoo_direction` is off by $O(1)$, while one SVD of $M$ is
# accurate. Which singular directions does the damping suppress?

# %%
def damped_one_step_shampoo(M, eps):
    """(M M^T + eps I)^(-1/4) M (M^T M + eps I)^(-1/4), computed with one SVD."""
    raise NotImplementedError  # your code here


# %%
# NBVAL_CHECK_OUTPUT
check("04.2", damped_one_step_shampoo)

# %% [markdown]
# ## Answers to the questions
#
# 1. At step 1, $m_1 = (1-\beta_1)c_1$ and $v_1 = (1-\beta_2)c_1^2$; the bias corrections divide these factors
#    out, so $u_1 = c_1/(|c_1| + \texttt{eps}) \approx \operatorname{sign}(c_1)$ in every coordinate.
# 2. Orthogonalised momentum, as in Muon: Newton–Schulz of $m_t$, a loose and cheap $UV^\top$; no accumulated
#    second-moment factors, so not Shampoo in the sense of Gupta et al.
# 3. No: it is AdamW on gradients clipped to norm 1 per tensor. The difference shows whenever a tensor's
#    gradient norm exceeds 1 (early training, spikes), and vanishes when every norm stays below it.
#
# ## References
#
# * V. Gupta, T. Koren, Y. Singer, *Shampoo: Preconditioned Stochastic Tensor Optimization*, ICML 2018,
#   [arXiv 1802.09568](https://arxiv.org/abs/1802.09568).
# * K. Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024),
#   [blog post](https://kellerjordan.github.io/posts/muon/): orthogonalised momentum by Newton–Schulz.
# * X. Chen et al., *Symbolic Discovery of Optimization Algorithms* (Lion), NeurIPS 2023,
#   [arXiv 2302.06675](https://arxiv.org/abs/2302.06675).
# * I. Loshchilov, F. Hutter, *Decoupled Weight Decay Regularization* (AdamW), ICLR 2019,
#   [arXiv 1711.05101](https://arxiv.org/abs/1711.05101).
# * H. Yuan et al., *MARS: Make vAriance Reduction Shine*, [arXiv 2411.10438](https://arxiv.org/abs/2411.10438);
#   `docs/algorithm.md` §5 for the three preconditioners as coded here.
# * The course's bibliography and notation: [notebooks/README.md](README.md).
