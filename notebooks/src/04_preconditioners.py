"""Notebook 04: the three preconditioners of MARS, and the Shampoo ladder (built by scripts/run_notebooks.py)."""

# %% [markdown]
# # 04 · The preconditioners: AdamW's diagonal, Lion's sign, and the Shampoo ladder
#
# MARS builds a variance-reduced, clipped momentum $m_t$ and then hands it to a
# **preconditioner** $P$ that turns it into the update direction:
#
# $$x_{t+1} = x_t - \eta\,\big(\lambda x_t + u_t\big), \qquad u_t = P(m_t).$$
#
# The paper's three optimizers differ only in $P$. This notebook takes each one apart,
# calling the very functions `mars_ref.MARS` calls (`mars_ref.pieces`):
#
# 1. **AdamW**: a per-coordinate scale $1/(\sqrt{\hat v_t}+\varepsilon)$. Where $\varepsilon$
#    sits differs between the authors' code and pytorch-optimizer; we measure by how much.
# 2. **Lion**: $\operatorname{sign}(m_t)$, and how MARS-Lion's momentum differs from Lion's.
# 3. **Shampoo**, as a ladder of three rungs: full Shampoo (accumulated Kronecker factors,
#    inverse fourth roots) → one-step Shampoo (exactly $UV^\top$, by SVD) → Newton–Schulz
#    (five cheap matrix products, what the authors actually run, in bfloat16). We prove
#    the middle rung algebraically, check it numerically, and measure how far each rung is
#    from the next on random matrices and on momentum matrices from a real training run.
# 4. Finally: with $\gamma = 0$ MARS *is* its base optimizer, to machine precision in float64.

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch import nn

import mars_ref
from mars_ref.pieces import (
    adamw_direction,
    lion_direction,
    newton_schulz,
    polar_svd,
    second_moment,
    momentum,
    shampoo_direction,
    shampoo_factors,
    shampoo_scale,
)

torch.manual_seed(0)
torch.set_num_threads(1)  # small matrices: one thread is faster, and robust on a shared machine
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})


def rel_dist(A, B, match_scale=False):
    """Relative Frobenius distance ‖A − B‖_F / ‖B‖_F (A first rescaled to ‖B‖_F if match_scale)."""
    A, B = A.double(), B.double()
    if match_scale:
        A = A * (B.norm() / A.norm())
    return ((A - B).norm() / B.norm()).item()


# %% [markdown]
# ## 1. AdamW's diagonal, and where $\varepsilon$ goes
#
# MARS-AdamW keeps a second moment of the *clipped, corrected* gradient $c_t$ and divides:
#
# $$v_t = \beta_2 v_{t-1} + (1-\beta_2)\,c_t^2, \qquad
#   u_t = \frac{m_t}{\Big(\dfrac{\sqrt{v_t}}{\sqrt{1-\beta_2^t}} + \varepsilon\Big)(1-\beta_1^t)}
#   \quad\text{(authors, and } \texttt{torch.optim.AdamW}\text{)}.$$
#
# pytorch-optimizer's MARS puts $\varepsilon$ (and a floor of $10^{-15}$) *before* the bias
# correction:
#
# $$u_t^{\text{po}} = \frac{m_t}{\dfrac{\sqrt{v_t + 10^{-15}} + \varepsilon}{\sqrt{1-\beta_2^t}}\,(1-\beta_1^t)}.$$
#
# At step 1 ($m_1 = (1-\beta_1)g$, $v_1 = (1-\beta_2)g^2$) the two are
# $u_1 = \dfrac{g}{|g| + \varepsilon}$ and
# $u_1^{\text{po}} = \dfrac{g}{\sqrt{g^2 + 10^{-15}/(1-\beta_2)} + \varepsilon/\sqrt{1-\beta_2}}$:
# with $\beta_2 = 0.99$ the second one has an effective $\varepsilon$ ten times larger plus a floor
# of $3\cdot10^{-7}$. Both are $\approx \operatorname{sign}(g)$ when $|g| \gg 10^{-6}$ (Adam's first
# step *is* signSGD); they part ways for small gradients. `adamw_direction` is the authors'
# formula; the other one is written out below only to compare.

# %%
BETA1, BETA2, EPS, LR = 0.95, 0.99, 1e-8, 3e-3  # the authors' MARS defaults


def adamw_direction_pytorch_optimizer(m, v, step, beta1, beta2, eps):
    """pytorch-optimizer 4.1's MARS denominator (for comparison only; not what mars_ref uses)."""
    denom = (v + 1e-15).sqrt().add_(eps).div_(math.sqrt(1.0 - beta2**step)).mul_(1.0 - beta1**step)
    return m / denom


def run_both_placements(grad_scales, steps, copies=64, seed=0):
    """Feed the same noisy gradient stream to both formulas for `steps` steps.

    Each scale gets `copies` coordinates with gradients scale·(1 + 0.5·noise); returns, per scale,
    the median over its coordinates of |x_authors − x_po| after every step."""
    gen = torch.Generator().manual_seed(seed)
    n = len(grad_scales)
    x = {"authors": torch.zeros(n, copies, dtype=torch.float64), "po": torch.zeros(n, copies, dtype=torch.float64)}
    m = {k: torch.zeros_like(x[k]) for k in x}
    v = {k: torch.zeros_like(x[k]) for k in x}
    gaps = []
    for t in range(1, steps + 1):
        g = grad_scales[:, None] * (1.0 + 0.5 * torch.randn(n, copies, generator=gen, dtype=torch.float64))
        for k, direction in (("authors", adamw_direction), ("po", adamw_direction_pytorch_optimizer)):
            m[k] = momentum(m[k], g, BETA1)
            v[k] = second_moment(v[k], g, BETA2)
            x[k] -= LR * direction(m[k], v[k], t, BETA1, BETA2, EPS)
        gaps.append((x["authors"] - x["po"]).abs().median(dim=1).values)
    return torch.stack(gaps)


def first_step(g):
    """Step-1 directions of both placements for a noise-free gradient g."""
    m, v = (1 - BETA1) * g, (1 - BETA2) * g**2
    return {"authors": adamw_direction(m, v, 1, BETA1, BETA2, EPS),
            "po": adamw_direction_pytorch_optimizer(m, v, 1, BETA1, BETA2, EPS)}


scales = torch.logspace(-10, 0, 101, dtype=torch.float64)
first = first_step(scales)
gaps = run_both_placements(scales, steps=100)

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
ax0.semilogx(scales, first["authors"], label=r"authors: $g/(|g|+\varepsilon)$", lw=2)
ax0.semilogx(scales, first["po"], "--", label="pytorch-optimizer", lw=2)
ax0.semilogx(scales, torch.ones_like(scales), ":", color="k", label=r"Lion: $\mathrm{sign}(g) = 1$")
ax0.set(xlabel=r"gradient $g > 0$", ylabel=r"$u_1$ (update per unit learning rate)",
        title="Step 1: AdamW direction vs gradient size", ylim=(-0.05, 1.1))
ax0.legend(loc="center right")
for i, label in ((0, "after 1 step"), (9, "after 10 steps"), (99, "after 100 steps")):
    ax1.loglog(scales, gaps[i], label=label)
ax1.set(xlabel=r"gradient scale $|g|$ (noisy: $g = |g|\,(1 + 0.5\,\xi)$)",
        ylabel=r"median $|x^{\mathrm{authors}} - x^{\mathrm{po}}|$",
        title=rf"Parameter gap between the two $\varepsilon$ placements ($\eta$ = {LR:g})")
ax1.legend()
fig.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"eta = {LR:g}, betas = ({BETA1:g}, {BETA2:g}), eps = {EPS:g}")
print("u1: step-1 direction for a noise-free g; gap: median |x_authors - x_po| over 64 noisy coordinates")
print(f"{'|g|':>7} {'u1 authors':>11} {'u1 po':>9} {'gap 1 step':>11} {'gap 100 steps':>14}")
rows = {}
for target in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9):
    i = int(torch.argmin((scales.log10() - math.log10(target)).abs()))
    rows[target] = (first["authors"][i].item(), first["po"][i].item(), gaps[0][i].item(), gaps[-1][i].item())
    print(f"{target:7.0e} {rows[target][0]:11.4f} {rows[target][1]:9.4f} {rows[target][2]:11.2e} "
          f"{rows[target][3]:14.2e}")
assert rows[1e-3][2] < 1e-5 and rows[1e-3][3] < 1e-4  # ordinary gradients: a tiny gap
assert rows[1e-7][2] > 1e-3 and rows[1e-7][3] > 1e-2  # tiny gradients: a large one
assert abs(rows[1e-1][0] - 1) < 1e-6  # Adam's first step is sign(g), up to ε

# %% [markdown]
# **Reading.** For gradients of ordinary size ($|g| \approx 10^{-3}$) the two placements agree to
# a relative $10^{-4}$: the parameters differ by $3\cdot10^{-7}$ after one step and $3\cdot10^{-6}$ after a
# hundred. At $|g| = 10^{-5}$ the gap is $3\cdot10^{-5}$ after one step, $3\cdot10^{-4}$ after a hundred.
# For coordinates with tiny gradients (rarely used embedding rows, dead units, late training
# with small losses) pytorch-optimizer's version damps the update strongly while the authors'
# still moves the coordinate by most of $\eta$ per step: at $|g| = 10^{-7}$ the two runs are
# $2\cdot10^{-3}$ apart after one step and $4\cdot10^{-2}$ after a hundred. Neither is wrong; they
# are different optimizers at small $|g|$, and a port must say which one it is.
#
# ## 2. Lion's sign
#
# MARS-Lion replaces the diagonal by the sign of the momentum:
#
# $$u_t = \operatorname{sign}(m_t), \qquad m_t = \beta_1 m_{t-1} + (1-\beta_1)\,c_t .$$
#
# Every coordinate moves by exactly $\pm\eta$, so $\|u_t\|_F = \sqrt{n}$ whatever the gradient's
# size (the black line in the left plot: Adam at step 1 is sign except for tiny $|g|$).
# **Lion itself** (Chen et al., 2023) is not quite this: it uses a second $\beta$,
#
# $$u_t = \operatorname{sign}\big(\beta_1 m_{t-1} + (1-\beta_1) g_t\big), \qquad
#   m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t ,$$
#
# i.e. the sign of a *different* interpolation than the average it stores. With Lion's
# $\beta_1 = \beta_2$ the two coincide, which section 4 checks. A small demonstration of how
# often the two disagree in sign with Lion's default $(\beta_1, \beta_2) = (0.9, 0.99)$:

# %%
# NBVAL_CHECK_OUTPUT
gen = torch.Generator().manual_seed(1)
signal = torch.randn(10_000, generator=gen, dtype=torch.float64)
m_lion = torch.zeros_like(signal)  # Lion's stored average (β2 = 0.99)
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

# %% [markdown]
# ## 3. The Shampoo ladder
#
# ### Rung 1: full Shampoo
# For a matrix parameter with gradients $G_s \in \mathbb{R}^{m\times n}$, Shampoo (Gupta et al.,
# 2018) accumulates two Kronecker factors and preconditions on both sides:
#
# $$L_t = \sum_{s\le t} G_s G_s^\top,\qquad R_t = \sum_{s\le t} G_s^\top G_s,\qquad
#   u_t = L_t^{-1/4}\, M_t\, R_t^{-1/4},$$
#
# with inverse fourth roots by eigendecomposition, $A = Q\Lambda Q^\top \Rightarrow
# A^{-1/4} = Q\Lambda^{-1/4}Q^\top$ (`inverse_root`, `shampoo_factors`, `shampoo_direction`).
# That is two `eigh` of $m\times m$ and $n\times n$ matrices per step: expensive.
#
# ### Rung 2: one-step Shampoo is $UV^\top$
# Drop the accumulation: take $L = MM^\top$, $R = M^\top M$ from the one matrix $M = U\Sigma V^\top$
# (thin SVD, $\Sigma$ invertible). Then $L = U\Sigma^2U^\top$, $R = V\Sigma^2V^\top$, so
# $L^{-1/4} = U\Sigma^{-1/2}U^\top$ and $R^{-1/4} = V\Sigma^{-1/2}V^\top$ on the ranges, and
#
# $$L^{-1/4} M R^{-1/4}
#   = U\Sigma^{-1/2}\,\underbrace{U^\top U}_{I}\,\Sigma\,\underbrace{V^\top V}_{I}\,\Sigma^{-1/2}V^\top
#   = U\,\Sigma^{-1/2}\Sigma\Sigma^{-1/2}\,V^\top = UV^\top .$$
#
# Every singular value is set to 1: the update is the orthogonal polar factor of $M$, the
# nearest semi-orthogonal matrix to it. (The part of $\mathbb{R}^m$ outside $U$'s range, where
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

# %% [markdown]
# ### Rung 3: Newton–Schulz
# An SVD is still expensive on accelerators. Newton–Schulz reaches (approximately) $UV^\top$
# with matrix products only. Normalise $X_0 = M/(\|M\|_F+\epsilon)$ so every singular value is
# $\le 1$, then repeat five times
#
# $$A = XX^\top,\quad B = AX,\quad X \leftarrow aX + bB + cAB,\qquad (a,b,c) = (3.4445,\,-4.7750,\,2.0315).$$
#
# Since $X = U S V^\top$ gives $XX^\top X = US^3V^\top$, each step applies the *same odd polynomial*
# $p(s) = as + bs^3 + cs^5$ to every singular value, and leaves $U, V$ alone. The
# coefficients are tuned to push small singular values up fast (slope $a = 3.4445$ at 0), at the
# price of not converging: after five steps the singular values that made it sit in roughly
# $[0.7, 1.2]$ instead of at 1. "Made it": near 0 each step multiplies by at most $a$, so five
# steps lift a singular value by at most $a^5 \approx 490$; anything below $\sim 10^{-3}\|M\|_F$
# stays small. The authors run it in **bfloat16** (8 bits of mantissa, relative rounding $2^{-8}$).
# Below: a $128\times 64$ matrix $M = U\Sigma V^\top$ with singular values spread over four decades (as
# momentum matrices can be), and what $k$ steps make of each singular value, $u_i^\top X_k v_i$, in
# float64 and bfloat16.

# %%
gen = torch.Generator().manual_seed(3)
U0, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen, dtype=torch.float64))
V0, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
spectrum = torch.logspace(0, -4, 64, dtype=torch.float64)
M_spread = U0 @ torch.diag(spectrum) @ V0.T
P_spread = polar_svd(M_spread)

ks = range(0, 9)
sv = {dt: [] for dt in (torch.float64, torch.bfloat16)}
dist = {dt: [] for dt in sv}
for dt in sv:
    for k in ks:
        X = M_spread / M_spread.norm() if k == 0 else newton_schulz(M_spread, k, dtype=dt)
        sv[dt].append(torch.diagonal(U0.T @ X.double() @ V0))  # what became of each singular value of M
        dist[dt].append(rel_dist(X, P_spread))
bf_vs_64 = [rel_dist(newton_schulz(M_spread, k, dtype=torch.bfloat16),
                     newton_schulz(M_spread, k, dtype=torch.float64)) for k in ks if k > 0]

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
colors = plt.cm.viridis([k / 6 for k in range(6)])
for k in range(6):
    ax0.semilogx(spectrum / spectrum.norm(), sv[torch.float64][k], "-", color=colors[k], label=f"k = {k}")
    ax0.semilogx(spectrum / spectrum.norm(), sv[torch.bfloat16][k], ".", color=colors[k], ms=4)
ax0.axhspan(0.7, 1.2, color="tab:orange", alpha=0.12, label="[0.7, 1.2]")
ax0.set(xlabel=r"singular value $s_i$ of $X_0 = M/\|M\|_F$",
        ylabel=r"$u_i^\top X_k v_i$ (= $p^{(k)}(s_i)$ in exact arithmetic)",
        title="Newton–Schulz moves every singular value\n(lines float64, dots bfloat16)")
ax0.legend(fontsize=8, ncol=4, loc="upper center")
ax0.set_ylim(-0.05, 1.6)
ax1.semilogy(list(ks), dist[torch.float64], "o-", label=r"float64: $\|X_k - UV^\top\|_F / \|UV^\top\|_F$")
ax1.semilogy(list(ks), dist[torch.bfloat16], "s--", label=r"bfloat16: $\|X_k - UV^\top\|_F / \|UV^\top\|_F$")
ax1.semilogy(list(ks)[1:], bf_vs_64, "^:", label=r"$\|X_k^{bf16} - X_k^{f64}\|_F / \|X_k^{f64}\|_F$")
ax1.axvline(5, color="gray", lw=0.8)
ax1.set(xlabel="Newton–Schulz steps k", ylabel="relative Frobenius distance",
        title="Distance to the polar factor, and bf16 vs float64")
ax1.legend(fontsize=8)
fig.tight_layout()
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
assert 0.65 < sv5[big].min().item() and sv5[big].max().item() < 1.25
assert sv5[-1].item() < 0.1  # a^5 = 490 is not enough for s0 = 5e-5
assert bf_vs_64[0] < 0.01 and bf_vs_64[4] > 0.1  # bf16 noise in the small directions, amplified

# %% [markdown]
# Three things to notice.
#
# * The distance to $UV^\top$ does not go to zero with more steps: the iteration is built to
#   land in a band around 1 quickly, not to converge (singular values oscillate in the band).
# * On a spectrum spanning four decades, five steps leave the bottom decade well below the
#   band: $\mathrm{NS}_5$ is *not* $UV^\top$ in the weakest directions, which is half of its 0.5
#   distance here. (For momentum that may be a feature: those directions are mostly noise.)
# * bfloat16 agrees with float64 to a few $10^{-3}$ after one step, but its rounding
#   ($2^{-8}$ relative to the largest entries) swamps the directions whose singular values are
#   below $\sim 10^{-2}$ of the largest, and every later step amplifies that noise like any
#   other small singular value (the dots above the lines at the left of the plot). On this
#   ill-conditioned matrix the bf16 and float64 results end up 20 % apart; on well-conditioned
#   ones (next section) it is a few per cent.
#
# ### How far is each rung from the next?
# Three distances, each relative in Frobenius norm:
#
# * **full → one-step**: $L_T^{-1/4}M_TR_T^{-1/4}$ (factors accumulated over $T$ gradients) vs $UV^\top$ of
#   $M_T$. Full Shampoo's overall scale depends on $T$ (a learning rate absorbs it), so we
#   rescale it to $\|UV^\top\|_F$ first and compare directions.
# * **one-step → Newton–Schulz**: $UV^\top$ vs $\mathrm{NS}_5(M_T)$ in float64.
# * **float64 → bfloat16**: $\mathrm{NS}_5$ in float64 vs in bfloat16.
#
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

# %%
all_ladders = {**random_ladders, **real_ladders}
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
for i, (name, lad) in enumerate(all_ladders.items()):
    style = "--" if name.startswith("random") else "-"
    ax0.semilogy(range(1, STEPS + 1), lad["full->one-step"], style, color=f"C{i}", label=name)
ax0.set(xlabel=r"number of gradients $T$ accumulated in $L_T, R_T$",
        ylabel="relative Frobenius distance (scale matched)",
        title="Rung 1 → rung 2: full Shampoo vs $UV^\\top$ of the momentum")
ax0.legend(fontsize=8, title="matrix", title_fontsize=8)
keys = [("full->one-step", "full Shampoo → $UV^\\top$"), ("one-step->NS", "$UV^\\top$ → NS$_5$ (float64)"),
        ("NS f64->bf16", "NS$_5$ float64 → bfloat16")]
width = 0.26
for j, (key, label) in enumerate(keys):
    ax1.bar([i + (j - 1) * width for i in range(len(all_ladders))], [lad[key][-1] for lad in all_ladders.values()],
            width, label=label, color=f"C{j + 5}")
ax1.set_yscale("log")
ax1.set_xticks(range(len(all_ladders)), [n.replace(" ", "\n") for n in all_ladders], fontsize=8)
ax1.set(ylabel="relative Frobenius distance", title=f"Distances between rungs after T = {STEPS} steps", ylim=(5e-3, 2))
ax1.legend(fontsize=8, loc="upper left")
fig.tight_layout()
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
mars_ref.claims.check({
    "T = 1: full Shampoo is U V^T to 1e-6 on the random matrices":
        all(lad["full->one-step"][0] < 1e-6 for name, lad in all_ladders.items() if name.startswith("random")),
    "T = 1: within 0.1 on every matrix": all(lad["full->one-step"][0] < 0.1 for lad in all_ladders.values()),
    "NS_5 is 10-60 % from U V^T on every matrix, never close": all(0.1 < row[1] < 0.6 for row in table.values()),
    "accumulating over T steps moves full Shampoo over 20 % from one-step": all(row[0] > 0.2 for row in table.values()),
    "bfloat16 moves NS_5 by under 5 % on the random matrices":
        all(row[2] < 0.05 for name, row in table.items() if name.startswith("random")),
})

# %% [markdown]
# **Reading.**
#
# * With one gradient, full Shampoo *is* $UV^\top$: to round-off for the random matrices; for
#   the real ones up to the $\varepsilon = 10^{-12}$ in the inverse roots, which damps the
#   directions with tiny singular values. Real gradients have many: the $64\times64$ layer sits
#   between a 64-unit layer and an 8-dimensional output, so its gradient is dominated by
#   about 8 directions (exercise 2 works out what the damping does).
# * As $L, R$ accumulate, full Shampoo remembers past gradients and its direction moves
#   away from the orthogonalised momentum: 40–85 % after 30 steps. The top rung and the
#   middle one are really different optimizers.
# * Newton–Schulz stays 20 % from $UV^\top$ on well-conditioned matrices (singular values in
#   the band, not at 1) and about 45 % on the real $64\times64$ momentum, whose weak directions
#   five steps do not lift. bfloat16 adds 3 % on well-conditioned matrices and 15 % on that
#   ill-conditioned one.
#
# So "MARS-Shampoo" as the authors ran it is orthogonalised momentum, as in Muon, not Shampoo
# with second-moment memory, and its bottom rung is a loose, cheap version of $UV^\top$.
#
# ## 4. With $\gamma = 0$, MARS is its base optimizer
#
# $\gamma = 0$ makes $c_t = g_t$; with clipping off (`clip="none"`) the rest of MARS is then
# exactly the base optimizer. We check it in float64 on a small MLP, 25 steps each, with
# weight decay on:
#
# * MARS-AdamW (`optimize_1d=True`, so biases take the same path) vs `torch.optim.AdamW`;
# * MARS-Lion vs `mars_ref.Lion` with $\beta_1 = \beta_2$;
# * MARS-Shampoo (`ns_dtype=torch.float64`) vs orthogonalised momentum written out with
#   `newton_schulz`: $b_t = \beta_1 b_{t-1} + (1-\beta_1)g_t$,
#   $x \leftarrow x - \eta\big(\lambda x + \sqrt{\max(1, m/n)}\,\mathrm{NS}_5(b_t/(1-\beta_1))\big)$
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
mars_ref.claims.check({
    "gamma = 0: MARS-AdamW, MARS-Lion, MARS-Shampoo equal their base optimizers to 1e-12":
        max(gap_adamw[0], gap_lion[0], gap_shampoo[0]) < 1e-12,
    "and the parameters did move (by over 0.01)": min(gap_adamw[1], gap_lion[1], gap_shampoo[1]) > 1e-2,
})

# %% [markdown]
# ## Summary
#
# * **AdamW's diagonal** divides by $\sqrt{\hat v_t}+\varepsilon$. The authors (like
#   `torch.optim.AdamW`) add $\varepsilon$ after the bias correction; pytorch-optimizer adds it
#   (and a $10^{-15}$ floor) before. The difference is invisible for ordinary gradients
#   ($3\cdot10^{-7}$ in the parameters after a step at $|g| = 10^{-3}$, $\eta = 3\cdot10^{-3}$) and
#   large for tiny ones ($4\cdot10^{-2}$ after 100 steps at $|g| = 10^{-7}$).
# * **Lion's sign** moves each coordinate by $\pm\eta$. MARS-Lion takes the sign of its one
#   momentum; Lion takes the sign of a second interpolation, and they agree only with $\beta_1 = \beta_2$.
# * **The Shampoo ladder**: full Shampoo ($L^{-1/4}MR^{-1/4}$, accumulated) → one-step Shampoo,
#   which is *exactly* $UV^\top$ (shown algebraically and to $10^{-9}$ numerically) → five
#   Newton–Schulz steps, which put the singular values above $\sim 10^{-3}\|M\|_F$ into
#   $\approx[0.7, 1.2]$ (smaller ones stay small): 20–45 % from $UV^\top$, with bfloat16 adding 3 %
#   on well-conditioned and up to 20 % on ill-conditioned matrices. Accumulation moves full
#   Shampoo 40–85 % away from the rung below it: MARS-Shampoo is orthogonalised momentum.
# * **$\gamma = 0$** gives back AdamW, Lion ($\beta_1 = \beta_2$) and orthogonalised momentum to
#   $10^{-12}$ in float64: everything MARS adds lives in the correction term.
#
# ## Exercises
#
# 1. **Newton–Schulz on a scalar.** Write `ns_singular_values(M, steps)` that returns the
#    singular values of `newton_schulz(M, steps, dtype=torch.float64)` *without* any matrix
#    product: normalise the singular values of $M$ by $\|M\|_F$ and apply the polynomial
#    $p(s) = as + bs^3 + cs^5$ `steps` times. Check it against `torch.linalg.svdvals`.
#    Then: how many steps does a singular value of $10^{-6}$ (relative to $\|M\|_F$) need to
#    reach 0.5?
# 2. **Shampoo with damping.** Real Shampoo adds $\epsilon I$ to $L$ and $R$. Show that with
#    $L = MM^\top + \epsilon I$, $R = M^\top M + \epsilon I$ one-step Shampoo is
#    $U\,\mathrm{diag}\big(\sigma_i/\sqrt{\sigma_i^2+\epsilon}\big)V^\top$, write it as
#    `damped_one_step_shampoo(M, eps)` with one SVD, and compare it with
#    `shampoo_direction(M @ M.T, M.T @ M, M, eps)`. Which singular directions does the damping
#    suppress?
#
# Solutions: `notebooks/solutions/nb04.py` (checked by `tests/test_exercises_04_05.py`).
