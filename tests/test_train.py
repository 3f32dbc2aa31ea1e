"""The training command: metrics, variance probe, checkpoints, resume, DDP, exact MARS, optimizers, plots.

Every run is a tiny model (2 layers × 32, block 32) on a small generated text, so the whole
file takes about a minute and a half on two loaded CPU cores.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ref.gpt import data
from mars_ref.gpt.train import OPTIMIZERS, load_checkpoint, load_model, main, parse_args, read_metrics, train

TINY = ["--preset", "cpu-mini", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-iters", "2", "--sample-tokens", "0", "--warmup-iters", "5",
        "--variance-batches", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in every subprocess: the runs are tiny, the machine's two cores
    are shared (oversubscribed OpenMP threads slow everything down many times), and the resumed run
    must do its arithmetic exactly as the in-process reference run does."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A ~60 kB character-level data set written through mars_ref.gpt.data.prepare."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ("to be or not that is the question whether tis nobler in mind suffer slings arrows of "
             "outrageous fortune take arms against a sea troubles and by opposing end them").split()
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "." for _ in range(1200)]
    source = root / "source.txt"
    source.write_text("\n".join(lines) + "\n")
    data.prepare("tiny", data_dir=str(root), tokenizer="char", source=str(source))
    return root


def flags(data_dir: Path, out_dir: Path, *extra) -> list[str]:
    return [*TINY, "--dataset", "tiny", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            *map(str, extra)]


def run(argv: list[str]) -> dict:
    cfg, given = parse_args(argv)
    return train(cfg, given)


def losses(out_dir: Path) -> dict[int, float]:
    records = read_metrics(out_dir / "metrics.jsonl")
    return {r["step"]: r["train_loss"] for r in records if r["kind"] == "train"}


def cli(*args) -> subprocess.Popen:
    """``python *args`` with one thread per process, like this test process (see ``one_thread``)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory) -> Path:
    """20 steps of MARS-AdamW with the variance probe every 5 steps and a checkpoint every 10."""
    out = tmp_path_factory.mktemp("short")
    run(flags(data_dir, out, "--max-iters", 20, "--eval-interval", 10, "--log-interval", 1,
              "--ckpt-interval", 10, "--variance-every", 5))
    return out


def test_short_run_writes_metrics_variance_and_checkpoint(short_run):
    records = read_metrics(short_run / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    probes = [r for r in records if r["kind"] == "variance"]
    assert [r["step"] for r in train_records] == list(range(1, 21))
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert [r["step"] for r in probes] == [5, 10, 15, 20]
    for r in train_records + evals:
        assert {"step", "tokens", "time", "train_loss", "lr", "grad_evals"} <= r.keys()
    assert train_records[-1]["tokens"] == 20 * 8 * 32 and train_records[-1]["grad_evals"] == 20
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    for r in probes:
        for name in ("g", "c", "m"):
            assert r[f"mse_{name}"] > 0 and 0 <= r[f"cos_err_{name}"] <= 2 and r[f"rel_{name}"] > 0
    ckpt = load_checkpoint(short_run / "ckpt.pt")
    assert ckpt["step"] == 20 and ckpt["config"]["optimizer"] == "mars-adamw"
    assert {"model", "optimizer", "scheduler", "rng", "data"} <= ckpt.keys()
    assert not (short_run / "ckpt.pt.tmp").exists()
    config = json.loads((short_run / "config.json").read_text())
    assert config["n_layer"] == 2
    assert config["vocab_size"] == data.load_meta(data_dir_of(short_run))["vocab_size"]
    model = load_model(short_run)  # the checkpointed weights in a fresh GPT of the run's shape
    assert not model.training and model.config.n_layer == 2
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())


def data_dir_of(run_dir: Path) -> Path:
    config = json.loads((run_dir / "config.json").read_text())
    return Path(config["data_dir"]) / config["dataset"]


def test_variance_probe_does_not_change_the_trajectory(data_dir, short_run, tmp_path):
    run(flags(data_dir, tmp_path, "--max-iters", 20, "--eval-interval", 10, "--log-interval", 1,
              "--ckpt-interval", 10))
    assert losses(tmp_path) == losses(short_run)


def test_resume_after_sigkill_is_bit_identical(data_dir, tmp_path):
    common = ["--max-iters", 60, "--eval-interval", 20, "--log-interval", 1, "--ckpt-interval", 10,
              "--variance-every", 15]
    reference = tmp_path / "reference"
    run(flags(data_dir, reference, *common))

    killed = tmp_path / "killed"
    proc = cli("-m", "mars_ref.gpt.train", *flags(data_dir, killed, *common))
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = load_checkpoint(killed / "ckpt.pt")["step"]
    assert 0 < step_at_kill < 60

    resumed = cli("-m", "mars_ref.gpt.train", *flags(data_dir, killed, "--resume"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert losses(killed) == losses(reference)  # bit-identical, every step
    def evals(run_dir):
        records = read_metrics(run_dir / "metrics.jsonl")
        return [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]

    assert evals(killed) == evals(reference)


def test_corrupt_or_missing_checkpoint_is_a_clear_error(data_dir, tmp_path, capsys):
    assert main(flags(data_dir, tmp_path / "none", "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err

    run(flags(data_dir, tmp_path, "--max-iters", 3, "--eval-interval", 0))
    path = tmp_path / "ckpt.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    assert main(flags(data_dir, tmp_path, "--resume")) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "truncated or corrupt" in err


def test_exact_mars_counts_two_gradient_evaluations_per_step(data_dir, tmp_path):
    run(flags(data_dir, tmp_path, "--exact", "--max-iters", 6, "--log-interval", 1, "--eval-interval", 0,
              "--variance-every", 3))
    records = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r["grad_evals"] for r in records if r["kind"] == "train"]
    # Step 1 has no previous point (g_prev = 0): one evaluation; every later step two.
    assert evals == [1, 3, 5, 7, 9, 11]
    assert [r["step"] for r in records if r["kind"] == "variance"] == [3, 6]


def test_exact_is_refused_for_non_mars_optimizers(data_dir, tmp_path):
    with pytest.raises(ValueError, match="exact"):  # a ConfigError
        run(flags(data_dir, tmp_path, "--optimizer", "adamw", "--exact"))


@pytest.mark.parametrize("optimizer", ["mars-adamw", "mars-lion"])
def test_fast_mars_steps_train_as_the_readable_one(data_dir, tmp_path, optimizer):
    """--step-impl foreach / fused: the same losses as the readable step (float32 rounding apart)."""
    common = ["--optimizer", optimizer, "--max-iters", 8, "--log-interval", 1, "--eval-interval", 0]
    runs = {}
    for impl in ("readable", "foreach", "fused"):
        run(flags(data_dir, tmp_path / impl, *common, "--step-impl", impl))
        runs[impl] = losses(tmp_path / impl)
    assert runs["readable"].keys() == set(range(1, 9))
    for impl in ("foreach", "fused"):
        diff = max(abs(runs["readable"][k] - runs[impl][k]) for k in runs["readable"])
        print(f"{optimizer} {impl} vs readable, max |Δ train loss| over 8 steps: {diff:.1e}")
        assert diff < 1e-5, (impl, diff)  # losses ≈ 3–4: a few float32 ulps
    with pytest.raises(ValueError, match="step-impl is a MARS option"):
        run(flags(data_dir, tmp_path / "x", "--optimizer", "adamw", "--step-impl", "fused"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(data_dir, tmp_path, optimizer):
    summary = run(flags(data_dir, tmp_path, "--optimizer", optimizer, "--max-iters", 4, "--log-interval", 1,
                        "--eval-interval", 4, "--variance-every", 2))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["train_loss"]) for r in records if r["kind"] == "train")
    probes = [r for r in records if r["kind"] == "variance"]
    assert len(probes) == 2 and all(np.isfinite(r["mse_m"]) for r in probes)
    assert ("mse_c" in probes[0]) == optimizer.startswith("mars")
    assert np.isfinite(summary["val_loss"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
def test_ddp_two_processes_match_one(data_dir, tmp_path, exact):
    """2 gloo processes, each half of every global batch, match one process on the whole batch.

    DDP uses ``gradient_as_bucket_view=True``: ``.grad`` is a view into DDP's reused buckets. Were
    MARS's ``g_prev`` a reference to ``.grad`` (the authors' bug), ``g_t − g_prev`` would be 0 under
    DDP only and the trajectories would part after step 1.
    """
    common = ["--max-iters", 8, "--grad-accum", 4, "--log-interval", 1, "--eval-interval", 8,
              "--variance-every", 4, *(["--exact"] if exact else [])]
    single = tmp_path / "single"
    run(flags(data_dir, single, *common))
    ddp = tmp_path / "ddp"
    proc = cli("-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "mars_ref.gpt.train", *flags(data_dir, ddp, *common))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a, b = losses(single), losses(ddp)
    assert a.keys() == b.keys() == set(range(1, 9))
    diff = max(abs(a[k] - b[k]) for k in a)
    print(f"DDP vs one process, max |Δ train loss| over 8 steps: {diff:.2e}")
    assert diff < 2e-6, diff  # float32 sums in a different order: observed 2.4e-7 (losses ≈ 3-4)
    config = json.loads((ddp / "config.json").read_text())
    assert config["world_size"] == 2


def test_plot_writes_a_png(short_run, data_dir, tmp_path):
    from mars_ref.gpt import plot

    other = tmp_path / "adamw"
    run(flags(data_dir, other, "--optimizer", "adamw", "--max-iters", 10, "--eval-interval", 5,
              "--variance-every", 5))
    out = tmp_path / "plot.png"
    assert plot.main([str(short_run), str(other), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_default_config_is_the_cpu_demo():
    cfg, given = parse_args([])
    assert given == {} and cfg.preset == "cpu-tiny" and cfg.optimizer == "mars-adamw"
    from mars_ref.gpt.train import resolve

    full = resolve(cfg)
    assert (full.n_layer, full.n_embd, full.dataset, full.device) == (4, 128, "shakespeare", "auto")
    small = resolve(parse_args(["--preset", "gpt2-small"])[0])
    assert (small.lr, small.lr_1d, small.min_lr, small.beta1, small.beta2) == (6e-3, 3e-3, 3e-5, 0.95, 0.99)
    assert (small.weight_decay, small.gamma, small.grad_clip, small.warmup_iters) == (1e-2, 0.025, 1.0, 2000)
    assert small.batch_size * small.grad_accum * small.block_size == 480 * 1024 and small.bias is False
    adamw = resolve(parse_args(["--preset", "gpt2-small", "--optimizer", "adamw", "--lr", "1e-3"])[0])
    assert (adamw.lr, adamw.beta1, adamw.beta2, adamw.weight_decay) == (1e-3, 0.9, 0.95, 0.1)


@pytest.mark.parametrize("kind", ["adamw", "mars-adamw", "mars-adamw-exact", "mars-lion", "muon"])
def test_variance_probe_recomputes_the_optimizers_momentum(kind):
    """The probe's m_t (and MARS's c_t), computed before the step, is what the optimizer then stores."""
    import math
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch

    from mars_ref import MARS, Muon
    from mars_ref.course.variance import VarianceProbe
    from mars_ref.gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=2, n_embd=8, bias=True))
    exact = kind.endswith("exact")
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    elif kind == "muon":
        opt = Muon(model.parameters(), lr=1e-2, momentum=0.9, nesterov=False, ns_dtype=None)
    else:
        opt = MARS(model.parameters(), lr=1e-2, gamma=0.5, exact=exact, max_norm=0.05,
                   preconditioner=kind.split("-")[1])
    batches = [(torch.randint(0, 7, (4, 8)), torch.randint(0, 7, (4, 8))) for _ in range(6)]
    probe = VarianceProbe(model, opt, SimpleNamespace(optimizer=kind.removesuffix("-exact")), batches[:2],
                          nullcontext())
    params = list(model.parameters())
    for step in range(1, 5):
        x, y = batches[2 + step % 4]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = model(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            return loss

        closure()
        g_prev = probe._exact_previous_gradients([(x, y)], 0.5) if exact else {}
        est = probe.estimates(step, [p.grad.clone() for p in params], g_prev)
        opt.step(closure) if exact else opt.step()
        for p, m_hat in zip(params, est["m"], strict=True):
            state = opt.state[p]
            if kind == "adamw":
                stored, beta = state["exp_avg"], 0.9
            elif kind == "muon" and p.ndim == 2:
                stored, beta = state["momentum_buffer"], 0.9
            elif kind == "muon":
                stored, beta = state["m"], 0.9  # the AdamW fallback's betas_1d
            else:
                stored, beta = state["m"], (0.95 if p.ndim == 2 else 0.9)
            torch.testing.assert_close(m_hat * (1 - beta**step), stored, rtol=1e-4, atol=1e-7)
        if kind.startswith("mars"):
            for p, c in zip(params, est["c"], strict=True):
                if p.ndim == 2:
                    assert torch.linalg.vector_norm(c) <= 0.05 * (1 + 1e-5)
    record = probe.measure(5, None, 0.0, [batches[0]])
    assert math.isfinite(record["cos_err_m"])
    # The held-out spread: for two minibatch gradients the unbiased variance is ‖g1 − g2‖²/2.
    g1, g2 = (torch.autograd.grad(model(x, y)[1], params) for x, y in batches[:2])
    n = sum(p.numel() for p in params)
    var = sum(float(((a - b) ** 2).sum()) for a, b in zip(g1, g2, strict=True)) / 2 / n
    assert record["heldout_var"] == pytest.approx(var, rel=1e-4)
    assert record["heldout_noise"] == pytest.approx(var / 2, rel=1e-4)


def test_mars_under_ddp_bucket_views_matches_plain_training(tmp_path):
    """With ``gradient_as_bucket_view=True`` every ``.grad`` is a view into one of DDP's buckets, the
    same memory every step. MARS copies ``g_prev`` out of it, so training is unchanged (a by-reference
    ``g_prev`` would make ``g_t − g_prev`` zero from step 2 on)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mars_ref import MARS
    from mars_ref.gpt.model import GPT, GPTConfig

    x = torch.randint(0, 7, (4, 8), generator=torch.Generator().manual_seed(0))

    def trajectory(wrap: bool) -> list[float]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=2, n_embd=8))
        net = DDP(model, gradient_as_bucket_view=True) if wrap else model
        opt = MARS(model.parameters(), lr=1e-2, gamma=0.5)
        out, storages = [], set()
        for step in range(6):
            opt.zero_grad()
            loss = net(x, x)[1]
            loss.backward()
            if step > 0:  # DDP rebuilds its buckets after the first backward
                storages |= {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
            opt.step()
            out.append(loss.item())
        if wrap:
            assert len(storages) == 1  # from step 2 on, all gradients live in one bucket, reused
            g_prev = opt.state[model.lm_head.weight]["g_prev"]
            assert g_prev.untyped_storage().data_ptr() not in storages
        return out

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert trajectory(wrap=True) == trajectory(wrap=False)
    finally:
        dist.destroy_process_group()


def test_plot_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from mars_ref.gpt import plot

    assert plot.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "p.png")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reliability


def test_resume_applies_the_settings_it_may_change_and_config_json_says_what_ran(data_dir, tmp_path):
    run(flags(data_dir, tmp_path, "--max-iters", 6, "--eval-interval", 0, "--ckpt-interval", 3, "--log-interval", 1))
    run(flags(data_dir, tmp_path, "--resume", "--max-iters", 10, "--log-interval", 2, "--step-impl", "foreach"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["max_iters"], config["log_interval"], config["step_impl"]) == (10, 2, "foreach")
    assert config["resume"] is True and config["lr"] == 1e-2  # the rest: the checkpoint's
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 10 and config["device"] == "cpu"  # config.json: the device the run found
    assert ckpt["config"] == {**{k: v for k, v in config.items() if k in ckpt["config"]}, "device": "auto"}
    (group,) = ckpt["optimizer"]["param_groups"]  # what the optimizer ran with
    assert (group["foreach"], group["fused"]) == (True, False)
    assert (group["betas"], group["gamma"], group["weight_decay"]) == ((0.95, 0.99), 0.025, 1e-2)
    assert (group["initial_lr"], group["lr_1d"], ckpt["scheduler"]["base_lrs"]) == (1e-2, 5e-3, [1e-2])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [
        1, 2, 3, 4, 5, 6, 8, 10]


def test_resume_refuses_settings_that_define_the_run(data_dir, tmp_path, capsys):
    run(flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(flags(data_dir, tmp_path, "--resume", "--optimizer", "mars-lion", "--lr", "0.02", "--max-iters",
                      "4")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume continues the run in {tmp_path / 'ckpt.pt'}, and these settings cannot "
                          "change during a run: --optimizer (checkpoint: 'mars-adamw', given: 'mars-lion'), --lr "
                          "(checkpoint: 0.01, given: 0.02). A resumed run may change only --ckpt-interval, ")
    assert "--max-iters" in err and "start a new run (another --out-dir, or --overwrite)" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_from_a_checkpoint_of_another_model_is_a_clear_error(data_dir, tmp_path, capsys):
    from mars_ref.gpt.train import save_checkpoint

    run(flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    ckpt["config"]["n_embd"] = 64  # the weights of a 32-wide model under the config of a 64-wide one
    save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    assert main(["--resume", "--out-dir", str(tmp_path)]) == 2  # every setting from the checkpoint
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'ckpt.pt'} does not fit the model and optimizer its config describes" in err
    assert "size mismatch" in err and "Traceback" not in err


def test_a_new_run_does_not_replace_an_earlier_one_unless_overwrite(data_dir, tmp_path, capsys):
    run(flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0, "--log-interval", 1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(flags(data_dir, tmp_path, "--max-iters", 3)) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} already holds a run (metrics.jsonl, ckpt.pt): continue it with --resume, start it "
        "again with --overwrite (which deletes them), or choose another --out-dir\n")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(flags(data_dir, tmp_path, "--max-iters", 3, "--eval-interval", 0, "--log-interval", 1,
                      "--overwrite")) == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3 and sorted(losses(tmp_path)) == [1, 2, 3]


def test_checkpoint_checksum_and_the_old_format(data_dir, tmp_path, capsys):
    """A changed byte is refused; a format 1 checkpoint (no checksum) loads with a note and resumes on the same
    trajectory."""
    from mars_ref.gpt.train import CheckpointError

    common = ["--max-iters", 8, "--eval-interval", 4, "--log-interval", 1, "--ckpt-interval", 4]
    run(flags(data_dir, tmp_path / "reference", *common))
    old = tmp_path / "old"
    run(flags(data_dir, old, *common[:1], 4, *common[2:], "--lr-decay-iters", 8))  # the reference's schedule
    path = old / "ckpt.pt"
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match their sha256 checksum"):
        load_checkpoint(path)
    path.write_bytes(good)
    state = load_checkpoint(path)
    state["format"] = "mars_ref.gpt.train/1"
    del state["data"]["corpus"]
    torch.save(state, path)  # format 1: no checksum trailer
    assert load_checkpoint(path)["step"] == 4
    assert "written before checkpoints carried a checksum: read without verifying it" in capsys.readouterr().err
    assert main(flags(data_dir, old, "--resume", "--max-iters", 8)) == 0
    assert losses(old) == losses(tmp_path / "reference")
    assert load_checkpoint(old / "ckpt.pt")["format"] == "mars_ref.gpt.train/2"


def test_max_iters_zero_trains_nothing(data_dir, tmp_path):
    summary = run(flags(data_dir, tmp_path, "--max-iters", 0, "--eval-interval", 5))
    assert summary["steps"] == 0 and not (tmp_path / "ckpt.pt").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]  # the untrained model's eval


def nan_at(monkeypatch, step: int, what: str) -> None:
    """From step ``step`` (1-based) on: a non-finite training loss ("loss"), weights ("weights") after the update,
    or an infinite gradient ("grad", which MARS refuses)."""
    from mars_ref.gpt import train as T

    real_closure, real_step = T.closure, T.train_step

    def closure(run):
        loss = real_closure(run)
        if run.step + 1 >= step and what == "loss":
            run.loss = loss = torch.tensor(float("nan"))
        if run.step + 1 >= step and what == "grad":
            next(run.raw_model.parameters()).grad[0, 0] = float("inf")
        return loss

    def train_step(run, i):
        real_step(run, i)
        if i + 1 >= step and what == "weights":
            with torch.no_grad():
                next(run.raw_model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(T, "closure", closure)
    monkeypatch.setattr(T, "train_step", train_step)


@pytest.mark.parametrize("what, step, message", [
    ("loss", 7, "step 7: the training loss is not finite"),
    ("weights", 8, "step 8: the weights are no longer finite after the optimizer's update"),
    ("grad", 7, "step 7: the optimizer refused a non-finite gradient (the training loss was 3."),
])
def test_a_run_that_goes_non_finite_fails_and_keeps_its_last_good_checkpoint(data_dir, tmp_path, capsys,
                                                                             monkeypatch, what, step, message):
    """A NaN at step 7 found at the checkpoint of step 8 (logs every 5, checkpoints every 4), NaN weights after
    step 8's update found before its checkpoint, an infinite gradient refused by MARS at step 7: exit 1, the step
    named, the checkpoint of step 4 kept, no NaN in the metrics."""
    nan_at(monkeypatch, step, what)
    argv = flags(data_dir, tmp_path, "--max-iters", 12, "--eval-interval", 0, "--log-interval", 5,
                 "--ckpt-interval", 4)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err
    assert f"Training stopped; the last good checkpoint, of step 4, is kept in {tmp_path / 'ckpt.pt'}" in err
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(np.isfinite(r["train_loss"]) for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_validation_loss_that_is_not_finite_fails(data_dir, tmp_path, capsys, monkeypatch):
    from mars_ref.gpt import train as T

    monkeypatch.setattr(T, "evaluate", lambda run: float("nan") if run.step > 0 else 4.0)
    assert main(flags(data_dir, tmp_path, "--max-iters", 4, "--eval-interval", 2, "--ckpt-interval", 1)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: step 2: the validation loss is nan. Training stopped; the last good checkpoint, "
                          f"of step 1, is kept in {tmp_path / 'ckpt.pt'}")
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1  # step 2's was not written


@pytest.mark.parametrize("signals, repeat, status, at_once", [
    ((signal.SIGTERM,), 3.0, 143, False),
    ((signal.SIGTERM, signal.SIGTERM), 3.0, 143, False),  # the same request twice (SLURM and torchrun both send it)
    ((signal.SIGINT, signal.SIGTERM), 3.0, 130, True),  # another signal: at once
    ((signal.SIGINT, signal.SIGINT), 0.0, 130, True),  # the same signal after REPEAT_SECONDS: at once
], ids=["one", "same-twice", "another", "same-later"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_a_second_at_once(data_dir, tmp_path, capsys,
                                                                              monkeypatch, signals, repeat, status,
                                                                              at_once):
    """In this process, deterministically: signals sent during step 5. One (or the same one twice within
    ``REPEAT_SECONDS``): step 5 finishes, is checkpointed, exit 128 + the signal. Another: stop at once, the
    checkpoint of step 4 kept. (The subprocess version, Ctrl-C at a random moment, is in
    tests/test_faults_train.py; torchrun's, in test_sigterm_under_torchrun_*.)"""
    from mars_ref.gpt import signals as S
    from mars_ref.gpt import train as T

    real_step = T.train_step
    monkeypatch.setattr(S, "REPEAT_SECONDS", repeat)

    def train_step(run, i):
        if i + 1 == 5:
            for sig in signals:
                os.kill(os.getpid(), sig)
        real_step(run, i)

    monkeypatch.setattr(T, "train_step", train_step)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    argv = flags(data_dir, tmp_path, "--max-iters", 12, "--eval-interval", 0, "--log-interval", 1, "--ckpt-interval",
                 4)
    assert main(argv) == status
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    err = capsys.readouterr().err
    if not at_once:
        name = signal.Signals(signals[0]).name
        assert err.endswith(f"interrupted: {name} after step 5 of 12: checkpoint of step 5 in {tmp_path / 'ckpt.pt'};"
                            f" continue with --resume --out-dir {tmp_path}\n")
        assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5
    else:
        assert err.endswith("interrupted: stopped at once, without a checkpoint of the step in progress (--resume "
                            "continues from the last one, if any)\n")
        assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4
    assert "Traceback" not in err


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("who", ["torchrun-and-workers", "workers"])
def test_sigterm_under_torchrun_checkpoints_the_stop_step_and_resumes_bit_for_bit(data_dir, tmp_path, who):
    """2 gloo processes under torchrun. SIGTERM to torchrun and both workers (as SLURM sends it: the workers get it
    twice, once forwarded by torchrun), or to the workers only (torchrun then stops whatever is left when one
    exits): either way a checkpoint of the step the run stopped after, and ``--resume`` continues on the
    uninterrupted run's losses, bit for bit."""
    common = ["--log-interval", 1, "--eval-interval", 0, "--ckpt-interval", 0, "--lr-decay-iters", 3000,
              "--grad-accum", 2]
    launch = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
    out = tmp_path / "stopped"
    proc = cli(*launch, f"--master-port={free_port()}", "-m", "mars_ref.gpt.train",
               *flags(data_dir, out, "--max-iters", 3000, *common))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 5:
        time.sleep(0.2)
    workers = [c for c in _children(proc.pid)]
    assert len(workers) == 2, workers
    for pid in ([proc.pid] if who == "torchrun-and-workers" else []) + workers:
        os.kill(pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=240)
    assert "stopped at once" not in text, text
    stop = load_checkpoint(out / "ckpt.pt")["step"]
    assert 5 <= stop < 3000 and f"checkpoint of step {stop}" in text, text
    resumed = cli(*launch, f"--master-port={free_port()}", "-m", "mars_ref.gpt.train",
                  *flags(data_dir, out, "--max-iters", stop + 4, "--resume", *common))
    assert resumed.communicate(timeout=240)[0] is not None and resumed.returncode == 0
    reference = tmp_path / "reference"
    ref = cli(*launch, f"--master-port={free_port()}", "-m", "mars_ref.gpt.train",
              *flags(data_dir, reference, "--max-iters", stop + 4, *common))
    assert ref.communicate(timeout=240)[0] is not None and ref.returncode == 0
    a, b = losses(out), losses(reference)
    assert all(a[k] == b[k] for k in range(stop + 1, stop + 5)), (a, b)


def test_gpu_lab_preset_runs_shrunk_on_the_cpu(tmp_path):
    """The one-GPU lab tier (``--preset gpu-lab``: GPT-2-shaped, Shakespeare in GPT-2 tokens, AdamW vs MARS with
    the variance probe), verified here on the CPU at shrunk size: the real BPE corpus (prepared offline), the
    vocabulary padded to 50304, a 1-layer model of width 32, 3 steps, each of the lab's runs (notebook 06's four,
    the gamma = 0 control among them)."""
    data_root = tmp_path / "data"
    for optimizer, extra in (("adamw", []), ("mars-adamw", []), ("mars-adamw", ["--exact"]),
                             ("mars-adamw", ["--gamma", "0"])):
        out = tmp_path / "-".join([optimizer, *(e.strip("-") for e in extra)])
        summary = run(["--preset", "gpu-lab", "--optimizer", optimizer, *extra, "--n-layer", "1", "--n-head", "2",
                       "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--max-iters", "3",
                       "--eval-interval", "3", "--eval-iters", "1", "--variance-every", "3", "--variance-batches",
                       "2", "--sample-tokens", "0", "--data-dir", str(data_root), "--out-dir", str(out),
                       "--device", "cpu"])
        config = json.loads((out / "config.json").read_text())
        assert config["dataset"] == "shakespeare-gpt2" and config["vocab_size"] == 50304
        if optimizer == "mars-adamw":  # the control: MARS-AdamW's betas and recipe, gamma 0
            assert config["gamma"] == (0.0 if "--gamma" in extra else 0.025) and config["beta1"] == 0.95
        assert math.isfinite(summary["val_loss"])
        assert any(r["kind"] == "variance" for r in read_metrics(out / "metrics.jsonl"))
    meta = json.loads((data_root / "shakespeare-gpt2" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and 1.4e6 < meta["train_tokens"] + meta["val_tokens"] < 1.7e6


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    """Warm-up to the peak; cosine decays to min_lr at lr_decay_iters; wsd holds the peak, then decays linearly to
    min_lr over the last decay_frac of the steps after the warm-up; constant holds the peak."""
    from mars_ref.gpt.config import TrainConfig, resolve
    from mars_ref.gpt.optim import lr_factor

    cfg = resolve(TrainConfig(preset="cpu-tiny", optimizer="adamw", max_iters=110, warmup_iters=10, lr=1e-2,
                              min_lr=1e-4, schedule=schedule, decay_frac=0.2))
    f = lr_factor(cfg)
    assert [f(i) for i in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]
    if schedule == "cosine":
        assert f(60) == pytest.approx(0.01 + 0.5 * 0.99) and f(110) == pytest.approx(0.01)
    elif schedule == "wsd":  # decay over the last 20 of the 100 steps after the warm-up: steps 90..110
        assert f(50) == f(89) == 1.0 and f(100) == pytest.approx(1 - 0.99 * 10 / 20) and f(110) == pytest.approx(0.01)
    else:
        assert f(50) == f(110) == 1.0


@pytest.mark.parametrize("field, value, match", [("schedule", "linear", "unknown --schedule 'linear'"),
                                                 ("decay_frac", 0.0, "--decay-frac must be a number in"),
                                                 ("step_impl", "fast", "unknown --step-impl 'fast'")])
def test_schedule_and_step_impl_flags_are_checked(field, value, match):
    from mars_ref.gpt.config import ConfigError, TrainConfig, resolve

    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig(preset="cpu-tiny", **{field: value}))


def test_auto_step_impl_is_the_readable_step_on_the_cpu_and_foreach_on_cuda():
    from mars_ref.gpt.config import TrainConfig, resolve
    from mars_ref.gpt.optim import _foreach

    cfg = resolve(TrainConfig(preset="cpu-tiny"))
    assert cfg.step_impl == "auto" and _foreach(cfg) is None  # MARS(foreach=None): foreach on CUDA only
    assert resolve(TrainConfig(preset="cpu-tiny", optimizer="adamw")).step_impl == "auto"  # valid for every optimizer


def test_evaluation_calls_the_compiled_model(data_dir, tmp_path, monkeypatch):
    """With --compile, evaluation runs the compiled model (in eval mode), not the bare one. torch.compile is
    replaced by a wrapper that records the mode of each call, so the test needs no compiler."""
    calls = []

    class Recorded(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(self.inner.training)
            return self.inner(*args, **kwargs)

    def fake_compile(obj, *args, **kwargs):
        return Recorded(obj) if isinstance(obj, torch.nn.Module) else obj

    monkeypatch.setattr(torch, "compile", fake_compile)
    run(flags(data_dir, tmp_path, "--max-iters", 4, "--eval-interval", 2, "--compile"))
    assert True in calls and False in calls  # training steps and evaluations both went through it
