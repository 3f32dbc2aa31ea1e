"""Write tests/data/mars_state_7b9481a.pt with the code of commit 7b9481a (run with PYTHONPATH there)."""
import copy, sys, torch
from mars_ref import MARS
torch.set_num_threads(1)
out = {}
def grads(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * (3.0 if t % 2 else 0.01) for p in ps]
for name, kw in {"adamw": {}, "lion": {"preconditioner": "lion"}, "shampoo": {"preconditioner": "shampoo", "ns_dtype": torch.float64},
                 "adamw_exact_like": {"clip": "global", "optimize_1d": True}, "fused": {"fused": True}, "foreach": {"foreach": True}}.items():
    dtype = torch.float32 if name == "fused" else torch.float64
    g0 = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=g0, dtype=dtype).requires_grad_() for s in [(6, 5), (5,), (4, 6)]]
    opt = MARS(ps, lr=1e-2, weight_decay=0.1, **kw)
    for t in range(3):
        for p, g in zip(ps, grads(ps, t)): p.grad = g
        opt.step()
    saved = {"kwargs": {k: v for k, v in kw.items()}, "params": [p.detach().clone() for p in ps],
             "optimizer": copy.deepcopy(opt.state_dict())}
    for t in range(3, 5):
        for p, g in zip(ps, grads(ps, t)): p.grad = g
        opt.step()
    saved["params_after"] = [p.detach().clone() for p in ps]
    out[name] = saved
torch.save(out, sys.argv[1])
print("written", list(out))

# exact mode: a linear model on fixed minibatches
def exact_case():
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.randn(32, 5, generator=gen, dtype=torch.float64), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    W = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.zeros(3, dtype=torch.float64).requires_grad_()
    opt = MARS([W, b], lr=1e-2, exact=True, weight_decay=0.1)
    def closure_for(t):
        rows = slice((t % 4) * 8, (t % 4) * 8 + 8)
        def closure():
            opt.zero_grad()
            loss = ((X[rows] @ W.T + b - Y[rows]) ** 2).mean()
            loss.backward()
            return loss
        return closure
    for t in range(3):
        opt.step(closure_for(t))
    saved = {"params": [W.detach().clone(), b.detach().clone()], "optimizer": copy.deepcopy(opt.state_dict())}
    for t in range(3, 5):
        opt.step(closure_for(t))
    saved["params_after"] = [W.detach().clone(), b.detach().clone()]
    return saved
out = torch.load(sys.argv[1], weights_only=False)
out["exact"] = exact_case()
torch.save(out, sys.argv[1])
print("with exact")
