"""Small helpers shared by the test files (tests/ is on sys.path under pytest's default import mode)."""

import importlib.util
from pathlib import Path

import torch

from mars_ref.optimizer import MARS

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def load_solution(name: str):
    """Import ``notebooks/solutions/<name>.py`` (the exercise solutions are plain modules, not a package)."""
    spec = importlib.util.spec_from_file_location(f"solutions_{name}", SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the foreach and fused steps beside the readable one

SHAPES = [(12, 10), (10,), (6, 7, 2), (16, 16), (7,)]  # 2-D, 1-D, 3-D: the MARS path and the fallback


def make_params(shapes=SHAPES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def set_grads(params_list, step, gen, skip=()):
    """The same random gradients on every copy; alternately clipped (×3) and not clipped (×0.01)."""
    shapes = [p.shape for p in params_list[0]]
    scale = 3.0 if step % 2 else 0.01
    grads = [torch.randn(s, generator=gen) * scale for s in shapes]
    for params in params_list:
        for i, (p, gr) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i in skip else gr.clone()


def run_side_by_side(kw, path: dict, steps=20, shapes=SHAPES, groups=None, skip_every=None):
    """The readable MARS and MARS(**path) (e.g. foreach=True) on two copies of the same parameters with
    the same gradients; returns (readable params, other params, readable optimizer, other optimizer)."""
    pa, pb = make_params(shapes), make_params(shapes)

    def make(params, extra):
        if groups is None:
            return MARS(params, **extra, **kw)
        return MARS([dict(params=[params[i] for i in idx], **g) for idx, g in groups], **extra, **kw)

    A, B = make(pa, {}), make(pb, path)
    gen = torch.Generator().manual_seed(2)
    for t in range(steps):
        skip = {t % len(shapes)} if skip_every and t % skip_every == 0 else ()
        set_grads([pa, pb], t, gen, skip)
        A.step()
        B.step()
    return pa, pb, A, B


def exact_side_by_side(path: dict, steps=20, **kw):
    """Exact mode (two gradients per step, dropout) on a small network, readable and MARS(**path);
    returns (readable params, other params, readable optimizer, other optimizer)."""
    torch.manual_seed(0)
    X, Y = torch.randn(32, 12), torch.randn(32, 10)

    def model_and_opt(extra):
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                  torch.nn.Linear(16, 10))
        return net, MARS(net.parameters(), lr=1e-2, exact=True, weight_decay=0.1, **extra, **kw)

    (na, oa), (nb, ob) = model_and_opt({}), model_and_opt(path)
    for t in range(steps):
        rows = slice((t % 4) * 8, (t % 4) * 8 + 8)
        for net, opt in ((na, oa), (nb, ob)):
            torch.manual_seed(100 + t)  # same dropout masks on both sides

            def closure(net=net, opt=opt, rows=rows):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(X[rows]), Y[rows])
                loss.backward()
                return loss

            opt.step(closure)
    return list(na.parameters()), list(nb.parameters()), oa, ob


def max_diff(pa, pb):
    return max((a - b).abs().max().item() for a, b in zip(pa, pb, strict=True))


def assert_same_state(A, B, pa, pb, atol=1e-6, rtol=0.0):
    """Same keys, dtypes and shapes; tensors equal to ``atol`` (+ ``rtol``·|value|); step counters equal."""
    for a, b in zip(pa, pb, strict=True):
        sa, sb = A.state[a], B.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape
                torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol)
            else:
                assert sa[key] == sb[key]


# ---------------------------------------------------------------- side by side with torch.optim.Muon


def single_steps_vs_torch_muon(make_ours, shapes, state_key: str, steps: int = 10, **muon_kwargs):
    """Feed ours and ``torch.optim.Muon(lr=0.02, momentum=0.95, weight_decay=0.1, **muon_kwargs)`` the same gradients
    from the same state at every step (parameters and ours' momentum ``state_key`` re-synchronised to torch's before
    each step); return the worst relative Frobenius distance of the updates and of the momentum buffers."""
    g = torch.Generator().manual_seed(0)
    init = [0.1 * torch.randn(*s, generator=g) for s in shapes]
    ours_p = [torch.nn.Parameter(x.clone()) for x in init]
    ref_p = [torch.nn.Parameter(x.clone()) for x in init]
    ours = make_ours(ours_p)
    ref = torch.optim.Muon(ref_p, lr=0.02, momentum=0.95, weight_decay=0.1, **muon_kwargs)
    worst_update, worst_buf = 0.0, 0.0
    for t in range(steps):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, q, grad in zip(ours_p, ref_p, grads, strict=True):
            p.data.copy_(q)
            p.grad, q.grad = grad.clone(), grad.clone()
            if t:
                ours.state[p][state_key].copy_(ref.state[q]["momentum_buffer"])
        before = [q.detach().clone() for q in ref_p]
        ours.step()
        ref.step()
        for p, q, x0 in zip(ours_p, ref_p, before, strict=True):
            u_ours, u_ref = p.detach() - x0, q.detach() - x0
            worst_update = max(worst_update, ((u_ours - u_ref).norm() / u_ref.norm()).item())
            b_ours, b_ref = ours.state[p][state_key], ref.state[q]["momentum_buffer"]
            worst_buf = max(worst_buf, ((b_ours - b_ref).norm() / b_ref.norm()).item())
    return worst_update, worst_buf


# ---------------------------------------------------------------- numbers computed on another machine

def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 16) -> None:
    """``actual`` (computed here) equals ``expected`` (computed on another machine: a fixture, a committed output)
    to rounding. CPUs of other vector widths sum in other orders (norms, matrix products, reductions), so an
    element may differ by a few units in the last place of the largest value it was computed from, not of itself:
    the tolerance is ``ulps`` units in the last place of ``max|expected|`` of the tensor (16 ulp: 3.6e-15 of the
    scale in float64, far below any change of the algorithm, which moves results by 1e-4 and more)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape,
                                                                            expected.dtype, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = ulps * torch.finfo(expected.dtype).eps * max(scale, torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
