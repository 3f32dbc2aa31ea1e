"""The control-variate condition of notebook 02b §4 measured on a GPT (mars_ref.course.variance): the statistics'
exact identities, an independent Y's small correlation, and the function's numbers against a recomputation."""

import torch

from mars_ref.course import variance
from mars_ref.gpt.model import GPT, GPTConfig


def _tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))


def _draw():
    ids = torch.randint(16, (4000,), generator=torch.Generator().manual_seed(1))
    return variance.token_batches(ids, 4, 8)


def _gradients(model, batches):
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([variance._flat_gradient(model, params, b) for b in batches])


def test_y_equal_to_x_gives_cov_equal_var_and_condition_two():
    gen = torch.Generator().manual_seed(0)
    draw, model = _draw(), _tiny()
    X = _gradients(model, [draw(gen) for _ in range(8)])
    s = variance.cv_statistics(X, X.clone(), omega=1.0)
    assert s["cov"] == s["var_x"] == s["var_y"] > 0
    assert s["condition"] == 2.0
    assert abs(s["rho"] - 1.0) < 1e-12
    assert abs(s["factor"]) < 1e-12  # X − X: no noise left
    # omega scales the condition as 2 / omega for Y = X
    assert abs(variance.cv_statistics(X, X, omega=0.5)["condition"] - 4.0) < 1e-12


def test_an_independent_y_has_a_small_correlation():
    gen = torch.Generator().manual_seed(0)
    draw, model = _draw(), _tiny()
    X = _gradients(model, [draw(gen) for _ in range(64)])
    Y = _gradients(model, [draw(gen) for _ in range(64)])  # the same point, other batches
    s = variance.cv_statistics(X, Y, omega=0.5)
    assert abs(s["rho"]) < 0.25  # sampling spread of a correlation over 64 draws: about 1 / sqrt(64)
    assert s["factor"] > 1.0  # the condition fails, the noise grows
    # the same batches would correlate perfectly: the test sees the difference
    assert variance.cv_statistics(X, X, omega=0.5)["rho"] > 0.99


def test_the_function_agrees_with_a_direct_recomputation():
    lag, probe, n = 3, 5, 6
    model = _tiny()
    out = variance.control_variate_on_model(model, _draw(), lr=1e-2, steps=probe + 1, probe_at=[probe],
                                            snapshot_lag=lag, n_batches=n, seed=3)
    assert [r["step"] for r in out] == [probe]
    # again by hand: the same loop, the same random stream, the points kept explicitly
    model, draw = _tiny(), _draw()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(3)
    points = []
    for _ in range(probe):
        points.append([p.detach().clone() for p in params])
        opt.zero_grad()
        _, loss = model(*draw(gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    xi = [draw(gen) for _ in range(n)]
    other = [draw(gen) for _ in range(n)]

    def at(point, batches):
        with torch.no_grad():
            for p, q in zip(params, point, strict=True):
                p.copy_(q)
        return _gradients(model, batches)

    X = at([p.detach().clone() for p in params], xi)
    ys = {"exact STORM": at(points[-1], xi), "SVRG": at(points[-lag], xi), "approx MARS": at(points[-1], other)}
    k = 0.025 * 0.95 / 0.05
    omegas = {"exact STORM": 0.95, "SVRG": 1.0, "approx MARS": k / (1 + k)}
    for method, Y in ys.items():
        zx, zy = X - X.mean(0), Y - Y.mean(0)
        var_x, var_y, cov = (zx * zx).sum() / (n - 1), (zy * zy).sum() / (n - 1), (zx * zy).sum() / (n - 1)
        w = omegas[method]
        got = out[0][method]
        assert abs(got["omega"] - w) < 1e-12
        for key, want in {"var_x": var_x, "var_y": var_y, "cov": cov,
                          "condition": 2 * w * cov / (w**2 * var_y),
                          "factor": ((zx - w * zy) ** 2).sum() / (n - 1) / var_x}.items():
            assert abs(got[key] - float(want)) <= 1e-9 * max(1.0, abs(float(want))), (method, key)
    assert out[0]["exact STORM"]["rho"] > out[0]["approx MARS"]["rho"]
