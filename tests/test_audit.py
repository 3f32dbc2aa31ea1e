"""The audit of other MARS implementations (``python benchmarks/audit.py``, ``docs/algorithm.md`` §12).

Three kinds of test:

* the diagnosis machinery, without any third-party package (what CI runs): the emulation of mars_ref's own chain
  is mars_ref bit for bit; mars_ref audited against itself differs nowhere; a deliberately mutated copy of
  mars_ref (``g_prev`` by reference, ε before the bias correction), and an emulation with any one link changed,
  are diagnosed at exactly that link; the verdicts of a choice (configured away to zero) and of a defect;
* the authors' code that is not on PyPI (``MARS/optimizers/mars.py``, ``mars_fused.py``, ``MARS_M/.../mars_m.py``),
  each difference shown numerically with mars_ref's pieces;
* each package's diagnosis pinned for the versions of the ``audit`` extra (skipped when it is not installed).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch

from mars_ref import optimizer as mars_optimizer
from mars_ref import pieces
from mars_ref.optimizer import MARS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import audit  # noqa: E402
from audit import Chain, Hyper  # noqa: E402

H = Hyper()


@pytest.fixture(scope="module")
def base():
    """mars_ref's own findings and its runs on the model (30 steps: enough for the tests, 3× faster)."""
    return audit.baseline(H, steps=30)


def mutant(name: str, cls) -> audit.Implementation:
    """A ``MARS`` subclass audited as an implementation, with the paper's hyperparameters."""
    def build(params, h, **_):
        return cls(params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, gamma=h.gamma,
                   lr_1d=h.lr_1d, betas_1d=h.betas_1d, weight_decay_1d=h.weight_decay_1d)

    return audit.Implementation(name, "mutant", build, "the paper's hyperparameters as they are")


def differing(impl, base) -> list[str]:
    _, links = audit.diagnose(impl, H)
    return [link for link in audit.LINKS if audit.differs(links[link], base.links[link])]


# ------------------------------------------------------------------------------------------ the machinery (CI)


def test_the_emulation_of_mars_refs_chain_is_mars_ref_bit_for_bit(base):
    emulated = audit.run(lambda ps: audit.Emulation(ps, H, Chain()), base.x0, base.grads)
    for x_emulated, x_ref in zip(emulated.xs, base.primary.xs, strict=True):
        for a, b in zip(x_emulated, x_ref, strict=True):
            assert torch.equal(a, b)


def test_mars_ref_against_itself_differs_nowhere(base):
    result = audit.audit(audit.reference(), base, H)
    assert result.differing == [] and result.chain == Chain()
    assert max(result.deviation) == max(result.reused) == max(result.residual) == max(result.explained) == 0
    assert all(f.clear for f in result.links.values())
    assert result.verdict == "The same chain as mars_ref, link for link."


def test_mars_refs_own_links_read_as_the_paper_says(base):
    links = base.links
    assert links["correction"].text == "k = 0.475 = γ·β1/(1−β1)"
    assert links["first step"].value is None and links["clip"].value == ("tensor", 1.0, True)
    assert (links["path"].value, links["fallback"].value) == ("ndim==2", "standard")
    assert [links[k].value for k in ("g_prev", "second moment", "ε", "bias correction", "weight decay",
                                     "step count", ".grad after step")] == \
        ["copy", "c", "after", "both", "decoupled", "tensor", "kept"]


class _MARSByReference(MARS):
    """mars_ref mutated as the authors' mars.py stores g_prev: a reference to p.grad, not a copy."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and "g_prev" in self.state[p]:
                    self.state[p]["g_prev"] = p.grad
        return loss


def _eps_before(m, v, step, beta1, beta2, eps):
    return (m / (1 - beta1**step)) / ((v.sqrt() + eps) / math.sqrt(1 - beta2**step))


class _MARSEpsBefore(MARS):
    """mars_ref mutated to add ε before the bias correction (pytorch-optimizer's and MARS-M's placement)."""

    def step(self, closure=None):
        with mock.patch.object(mars_optimizer, "adamw_direction", _eps_before):
            return super().step(closure)


@pytest.mark.parametrize("cls, link", [(_MARSByReference, "g_prev"), (_MARSEpsBefore, "ε")])
def test_a_mutated_mars_ref_is_diagnosed_at_exactly_its_link(base, cls, link):
    assert differing(mutant(cls.__name__, cls), base) == [link]


MUTANTS = [
    (Chain(k_scale=0.5), "correction"), (Chain(k="swapped"), "correction"), (Chain(k="zero"), "correction"),
    (Chain(first_ratio=1.0), "first step"), (Chain(clip="global"), "clip"),
    (Chain(clip="none"), "clip"), (Chain(tau=0.5), "clip"), (Chain(clip_first=False), "clip"),
    (Chain(g_prev="reference"), "g_prev"), (Chain(path="ndim>=2"), "path"), (Chain(path="all"), "path"),
    (Chain(fallback="lr"), "fallback"), (Chain(fallback="group betas"), "fallback"),
    (Chain(fallback="group wd"), "fallback"), (Chain(v_input="g"), "second moment"), (Chain(eps="before"), "ε"),
    (Chain(eps="before+floor"), "ε"), (Chain(eps="clamp"), "ε"), (Chain(bias="none"), "bias correction"),
    (Chain(bias="frozen"), "bias correction"), (Chain(decay="after"), "weight decay"),
    (Chain(decay="fixed"), "weight decay"), (Chain(decay="coupled"), "weight decay"), (Chain(steps="group"),
                                                                                      "step count"),
    (Chain(grad="consumed"), ".grad after step"),
]


@pytest.mark.parametrize("chain_, link", MUTANTS, ids=[f"{link}:{i}" for i, (_, link) in enumerate(MUTANTS)])
def test_one_changed_link_is_found_at_that_link_and_recovered(base, chain_, link):
    impl = audit.emulation("mutant", chain_, {})
    diagnosed, links = audit.diagnose(impl, H)
    assert [k for k in audit.LINKS if audit.differs(links[k], base.links[k])] == [link]
    assert diagnosed == chain_
    assert all(f.clear for f in links.values())


def test_a_documented_choice_configured_away_leaves_zero(base):
    """timm's choices, emulated: the residual setup (mars_ref with γ = 0 at step 1, kernels on the MARS path) is
    exact, so the verdict is 'MARS with these choices' (the packages' own test is below)."""
    timm_like = audit.emulation("timm-like", Chain(first_ratio=1.0, path="ndim>=2"),
                                {"first step": ("choice", "documented"), "path": ("choice", "documented")},
                                residual=audit.timm().residual)
    result = audit.audit(timm_like, base, H)
    assert result.differing == ["first step", "path"]
    assert max(result.deviation) > 1e-2 and max(result.residual) < 1e-13
    assert result.verdict.startswith("MARS with these choices: first step: c₁ = g₁")


def test_a_defect_is_named_measured_and_compensated(base):
    """HeavyBall's swapped coefficient, emulated: it is the link left after configuring its choices away, and
    the compensation (mars_gamma = k/(β1 + k)) removes it."""
    swapped = H.betas[0] * H.gamma / (1 - H.gamma)
    like = Chain(k="swapped", clip="none", path="all", eps="clamp", steps="group")
    hb = audit.heavyball()
    notes = {k: v for k, v in hb.notes.items() if k != ".grad after step"}
    compensation = replace(hb.compensation, extra=None, ref=replace(hb.compensation.ref,
                                                                    gamma=swapped * (1 - H.betas[0]) / H.betas[0]))
    result = audit.audit(replace(audit.emulation("hb-like", like, notes, residual=hb.residual),
                                 compensation=compensation), base, H)
    assert result.differing == ["correction", "clip", "path", "ε", "step count"]
    assert max(result.residual) > 0.1 and max(result.compensated) < 1e-13
    assert "DEFECT in 'correction': k = 0.024359 = β1·γ/(1−γ): γ and β1 swapped" in result.verdict


def test_a_package_that_is_not_installed_is_skipped_with_a_message(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    hidden = {"timm", "pytorch_optimizer", "heavyball"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    assert audit.main(["--steps", "10", "--no-emulations", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err.count("skipped") == 4 and "pip install -e .[audit] installs heavyball 3.2.1" in err
    assert "| mars_ref | 0.1.0 | 0 | 0 |" in out and "Skipped:" in out
    assert {p.name for p in tmp_path.iterdir()} == {"audit.md", "audit.json", "audit.png"}


# ------------------------------------------------------------------------------------------ the authors' code


def _steps(chain_: Chain, grads, x0, h: Hyper = H, reuse: bool = False):
    return audit.run(lambda ps: audit.Emulation(ps, h, chain_), x0, grads, reuse=reuse).xs


def test_authors_g_prev_by_reference_turns_mars_into_adamw_on_clipped_gradients(base):
    """mars.py stores ``state['last_grad'] = grad`` (a reference). With the .grad tensors reused in place
    (zero_grad(set_to_none=False)) it is, from step 2 on, exactly mars_ref with γ = 0: no correction left;
    with fresh tensors (torch's default) it is mars_ref exactly."""
    by_ref = audit.run(lambda ps: audit.Emulation(ps, H, Chain(g_prev="reference")), base.x0, base.grads, reuse=True)

    class GammaZeroAfterStepOne(MARS):
        def step(self, closure=None):
            loss = super().step(closure)
            for group in self.param_groups:
                group["gamma"] = 0.0
            return loss

    no_correction = audit.run(lambda ps: mutant("", GammaZeroAfterStepOne).build(ps, H), base.x0, base.grads)
    assert max(audit.deviation(by_ref, no_correction)) == 0
    assert max(audit.deviation(by_ref, base.primary)) > 0.1
    fresh = audit.run(lambda ps: audit.Emulation(ps, H, Chain(g_prev="reference")), base.x0, base.grads)
    assert max(audit.deviation(fresh, base.primary)) == 0


def test_mars_fused_multi_tensor_path_shrinks_clipped_steps_by_the_gradient_norm():
    """_multi_tensor_mars puts g_t² into v: at step 1 (ε = 0) the step is c̃/|g| elementwise (c̃ the clipped c),
    where mars.py's is c̃/|c̃| = sign(c): a gradient of norm 50 steps 50× too short."""
    g = torch.full((4, 5), 50 / math.sqrt(20), dtype=torch.float64)
    g[0] *= -1
    h = replace(H, eps=0.0, weight_decay=0.0)
    x0 = [torch.zeros(4, 5, dtype=torch.float64)]
    c_clipped = pieces.clip_by_norm((1 + H.k) * g)
    raw = _steps(Chain(v_input="g"), [[g]], x0, h)[1][0]
    assert torch.allclose(raw, -H.lr * c_clipped / g.abs(), rtol=1e-14, atol=0)
    paper = _steps(Chain(), [[g]], x0, h)[1][0]
    assert torch.allclose(paper, -H.lr * torch.sign(g), rtol=1e-14, atol=0)
    assert float(paper.norm() / raw.norm()) == pytest.approx(50, rel=1e-12)


def test_mars_fused_fused_path_steps_a_tenth_then_a_fifth_of_adamw():
    """The fused CUDA path never advances state['step'] (t = 1 forever) and divides √v by 1−β2^t, not its root:
    with a constant gradient (ε = 0) mars.py steps η·sign(g) at every t, the fused path
    η·(1−β1^t)(1−β2) / ((1−β1)·√(1−β2^t)): √(1−β2) = 0.1 of it at step 1, → (1−β2)/(1−β1) = 0.2 later."""
    g = torch.linspace(-0.1, 0.1, 12, dtype=torch.float64).reshape(3, 4) + 0.005
    h = replace(H, eps=0.0, weight_decay=0.0)
    x0, grads = [torch.zeros(3, 4, dtype=torch.float64)], [[g]] * 400
    frozen, paper = _steps(Chain(bias="frozen"), grads, x0, h), _steps(Chain(), grads, x0, h)

    def step(xs, t):
        return float((xs[t][0] - xs[t - 1][0]).norm())

    b1, b2 = H.betas
    for t in (1, 2, 10, 400):
        ratio = (1 - b1**t) * (1 - b2) / ((1 - b1) * math.sqrt(1 - b2**t))
        assert step(frozen, t) / step(paper, t) == pytest.approx(ratio, rel=1e-12)
    assert step(frozen, 1) / step(paper, 1) == pytest.approx(0.1, rel=1e-12)
    assert step(frozen, 400) / step(paper, 400) == pytest.approx(0.2, rel=2e-2)


def test_mars_fused_single_tensor_path_steps_the_fallback_at_lr_not_lr_1d():
    """_single_tensor_mars (mars_fused.py's default path) decays the 1-D tensors with lr·lr_1d/lr but steps them
    with lr: at the recipe's lr = 2·lr_1d their first AdamW step is twice mars.py's."""
    g = torch.linspace(-1, 1, 6, dtype=torch.float64) + 0.1
    h = replace(H, eps=0.0, weight_decay_1d=0.0)
    x0 = [torch.zeros(6, dtype=torch.float64)]
    fused = _steps(Chain(fallback="lr"), [[g]], x0, h)[1][0]
    paper = _steps(Chain(), [[g]], x0, h)[1][0]
    assert torch.allclose(paper, -H.lr_1d * torch.sign(g), rtol=1e-14, atol=0)
    assert torch.allclose(fused, -H.lr * torch.sign(g), rtol=1e-14, atol=0)


def test_mars_fused_fused_multi_tensor_path_subtracts_the_clipped_c_not_the_gradient():
    """_fused_mars_multi_tensor writes c_t into p.grad in place, and last_grad references p.grad: the next step's
    g_prev is the clipped c̃_{t−1}, not g_{t−1}. With a constant gradient the paper's correction vanishes from step 2
    (c_2 = g); there it does not: c_2 − g = k·(g − c̃_1), of norm k·(‖g‖ − 1) once step 1 was clipped."""
    g = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).reshape(3, 4)  # ‖(1+k)·g‖ ≈ 5: step 1 is clipped
    c1 = pieces.clip_by_norm(pieces.storm_correction(g, torch.zeros_like(g), H.gamma, H.betas[0]))
    paper = pieces.storm_correction(g, g, H.gamma, H.betas[0])
    fused = pieces.storm_correction(g, c1, H.gamma, H.betas[0])
    assert torch.equal(paper, g)
    assert torch.allclose(fused - g, H.k * (g - c1), rtol=1e-14, atol=0)
    assert float((fused - g).norm()) == pytest.approx(H.k * (float(g.norm()) - 1), rel=1e-12)


def _mars_m_steps(grads, clip: bool, beta=0.95, k=0.475):
    """MARS-M's Muon step from the pieces: c_t (clipped or not), buf = β·buf + (1−β)·c_t, u = NS5(buf)."""
    buf, prev, out = torch.zeros_like(grads[0]), torch.zeros_like(grads[0]), []
    for g in grads:
        c = pieces.storm_correction(g, prev, k * (1 - beta) / beta, beta)
        c = pieces.clip_by_norm(c) if clip else c
        buf = pieces.momentum(buf, c, beta)
        out.append(pieces.newton_schulz(buf, dtype=None))
        prev = g
    return out


def test_mars_m_clips_whatever_clip_c_says_and_that_shows_from_step_2():
    """MARS_M's step clips c_t although its clip_c argument (default False) says not to. Newton–Schulz normalises
    its input, so the first update is the same either way (but for the ε in that normalisation); from step 2 the
    clipped c_t weighs differently against the momentum and the updates part."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64) * s for s in (5.0, 0.1, 5.0)]
    clipped, unclipped = _mars_m_steps(grads, True), _mars_m_steps(grads, False)
    assert torch.allclose(clipped[0], unclipped[0], rtol=0, atol=1e-5)
    assert float((clipped[1] - unclipped[1]).norm() / unclipped[1].norm()) > 0.1


# ------------------------------------------------------------------------------------------ the packages, pinned


def _pinned(factory, module: str, dist: str) -> audit.Implementation:
    if importlib.util.find_spec(module) is None:  # not importorskip: importing timm fails beside torch's CPU build
        pytest.skip(f"{dist} is not installed (pip install -e .[audit])")
    impl = factory()
    if impl.version != audit.PINNED[dist]:
        pytest.skip(f"{dist} {impl.version} installed; these findings are pinned for {audit.PINNED[dist]}")
    return impl


PACKAGES = [
    (audit.timm, "timm", "timm", Chain(first_ratio=1.0, path="ndim>=2")),
    (lambda: audit.pytorch_optimizer(None), "pytorch_optimizer", "pytorch-optimizer",
     Chain(path="ndim>=2", eps="before+floor", steps="group")),
    (lambda: audit.pytorch_optimizer(False), "pytorch_optimizer", "pytorch-optimizer",
     Chain(path="ndim>=2", eps="before+floor", steps="group")),
    (audit.heavyball, "heavyball", "heavyball",
     Chain(k="swapped", clip="none", path="all", eps="clamp", steps="group", grad="consumed")),
]


@pytest.mark.parametrize("factory, module, dist, expected", PACKAGES,
                         ids=["timm", "pytorch-optimizer-foreach", "pytorch-optimizer-per-tensor", "heavyball"])
def test_pinned_diagnosis(factory, module, dist, expected):
    impl = _pinned(factory, module, dist)
    diagnosed, links = audit.diagnose(impl, H)
    assert diagnosed == expected
    assert all(f.clear for f in links.values())


@pytest.mark.parametrize("factory, module, dist, residual, compensated", [
    (audit.timm, "timm", "timm", 1e-13, None),
    (lambda: audit.pytorch_optimizer(None), "pytorch_optimizer", "pytorch-optimizer", 1e-4, None),
    (audit.heavyball, "heavyball", "heavyball", 0.1, 1e-12),
], ids=["timm", "pytorch-optimizer", "heavyball"])
def test_pinned_verdict(base, factory, module, dist, residual, compensated):
    """timm: MARS with its choices (zero left); pytorch-optimizer: MARS with its choices, its ε floor (no mapping)
    leaving ~1e-5; HeavyBall: a defect, the swapped coefficient, which its compensation removes."""
    result = audit.audit(_pinned(factory, module, dist), base, H)
    assert max(result.explained) < 1e-12
    if compensated is None:
        assert max(result.residual) < residual and result.verdict.startswith("MARS with these choices")
    else:
        assert max(result.residual) > residual and max(result.compensated) < compensated
        assert "DEFECT in 'correction'" in result.verdict


def test_timm_is_loaded_without_importing_the_timm_package():
    cls = audit.load_timm_mars() if _pinned(audit.timm, "timm", "timm") else None
    assert cls.__name__ == "Mars" and "timm" not in sys.modules


# ------------------------------------------------------------------------------------------ the command's input


@pytest.mark.parametrize("steps", ["0", "-3", "abc"])
def test_a_step_count_below_1_exits_2_with_the_valid_range(steps, monkeypatch, capsys):
    monkeypatch.setattr(audit, "baseline", lambda *a, **k: pytest.fail("ran despite a bad --steps"))
    with pytest.raises(SystemExit) as e:
        audit.main(["--steps", steps])
    assert e.value.code == 2
    assert f"argument --steps: must be an integer >= 1 (the steps each implementation takes on the model), " \
           f"not {steps!r}" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_exits_2_before_the_audit_runs(tmp_path, monkeypatch, capsys):
    """--out at a regular file, under one (the tests run as root, which writes through permission bits), in /proc."""
    monkeypatch.setattr(audit, "baseline", lambda *a, **k: pytest.fail("ran into an unwritable --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "audit", Path("/proc/mars-ref-audit")):
        with pytest.raises(SystemExit) as e:
            audit.main(["--steps", "1", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--out: cannot write in {out} (" in err and "give a writable directory" in err


def test_a_write_that_fails_after_the_audit_exits_1_with_a_message(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "audit.png"))

    monkeypatch.setattr(audit, "plot", read_only)
    assert audit.main(["--steps", "1", "--no-emulations", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "| mars_ref |" in out  # the report is printed all the same
    assert f"error: cannot write the audit into {tmp_path} (OSError: Read-only file system: " in err


def test_the_script_exits_2_without_a_traceback():
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(audit.__file__)), "--steps", "-3"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --steps: must be an integer >= 1" in proc.stderr
