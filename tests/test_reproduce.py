"""benchmarks/reproduce.py: the table and figure from a hand-made results file (no training), and one
few-step run through mars_ref.gpt.train."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.path.insert(0, str(ROOT / "benchmarks"))  # the spawned workers of --workers import it by name
sys.modules.setdefault("reproduce", reproduce)
spec.loader.exec_module(reproduce)


def run(key, factor, seed, mid, final, phase, max_iters=20, steps=(0, 10, 20), evals_per_step=1):
    """A fake run record: validation 4.0 at step 0, ``mid`` at the middle evaluation, ``final`` at the end."""
    evals = [max(0, evals_per_step * s - (evals_per_step - 1)) for s in steps]  # exact: 2 per step but the 1st
    return {"key": key, "label": reproduce.LABELS[key], "optimizer": "x", "exact": evals_per_step == 2,
            "phase": phase, "factor": factor, "lr": 1e-3 * factor, "lr_1d": 1e-3, "min_lr": 1e-5, "seed": seed,
            "max_iters": max_iters, "steps": list(steps), "grad_evals": evals, "val_loss": [4.0, mid, final],
            "time": [0.0, 1.0, 2.0], "final_val_loss": final, "seconds": 2.0 + seed, "total_grad_evals": evals[-1]}


@pytest.fixture
def results() -> dict:
    runs = [
        # AdamW: factor 1 wins on seed 0 (2.0); seeds 1, 2 end at 2.2, 2.4 -> 2.200 ± 0.200 (ddof 1)
        run("adamw", 0.5, 0, 3.5, 3.0, "tune"), run("adamw", 1.0, 0, 3.0, 2.0, "tune"),
        run("adamw", 2.0, 0, 3.0, 2.5, "tune"),
        run("adamw", 1.0, 1, 3.0, 2.2, "seeds"), run("adamw", 1.0, 2, 3.0, 2.4, "seeds"),
        # MARS-AdamW: factor 2 wins (1.8); finals 1.8, 1.9, 2.0 -> 1.900 ± 0.100; mean at step 10 is
        # 2.1 <= 2.2, so it reaches AdamW's final at step 10 (10 gradient evaluations)
        run("mars-adamw", 0.5, 0, 3.0, 2.6, "tune"), run("mars-adamw", 1.0, 0, 3.0, 2.1, "tune"),
        run("mars-adamw", 2.0, 0, 2.1, 1.8, "tune"),
        run("mars-adamw", 2.0, 1, 2.1, 1.9, "seeds"), run("mars-adamw", 2.0, 2, 2.1, 2.0, "seeds"),
        # Lion never gets below 2.2
        run("lion", 1.0, 0, 3.0, 2.5, "tune"), run("lion", 1.0, 1, 3.0, 2.6, "seeds"),
        run("lion", 1.0, 2, 3.0, 2.7, "seeds"),
        # exact MARS: 2 evaluations per step (1 on the first step): reaches 2.2 at step 20 = 39 evaluations
        *[run("mars-adamw-exact", 1.0, s, 2.3, 2.1, "tune" if s == 0 else "seeds", evals_per_step=2)
          for s in range(3)],
        *[run(reproduce.HALF_KEY, 1.0, s, 3.0, 2.5, "half", max_iters=10, steps=(0, 5, 10), evals_per_step=2)
          for s in range(3)],
    ]
    settings = {"preset": "cpu-mini", "max_iters": 20, "warmup_iters": 2, "eval_interval": 10, "eval_iters": 2,
                "grid": [0.5, 1.0, 2.0], "seeds": [0, 1, 2], "mode": "quick", "threads": 1, "data_dir": "data"}
    return {"settings": settings, "command": "hand-made", "runs": runs,
            "host": {"cpus": 2, "torch_threads": 1, "load_avg_at_start": [1.0, 1.0, 1.0]}}


def row(md: str, label: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_statistics_by_hand():
    m, s = reproduce.mean_std([2.0, 2.2, 2.4])
    assert m == pytest.approx(2.2) and s == pytest.approx(0.2)
    assert reproduce.mean_std([1.5]) == (1.5, 0.0)
    curve = {"steps": [0, 10, 20], "grad_evals": [0, 19, 39], "mean": [4.0, 2.3, 2.1]}
    assert reproduce.first_reach(curve, 2.2) == (20, 39)
    assert reproduce.first_reach(curve, 2.0) is None


def test_from_results_regenerates_table_and_figure(results, tmp_path, capsys):
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(results))
    assert reproduce.main(["--from-results", str(path)]) == 0
    md = (tmp_path / "synthetic.md").read_text()
    assert md in capsys.readouterr().out
    assert (tmp_path / "synthetic.png").stat().st_size > 10_000
    # columns: optimizer, best lr, final val loss, steps to reach, grad evals to reach, steps, grad evals, seconds
    assert row(md, "AdamW")[1:] == ["0.001 (×1)", "2.200 ± 0.200", "20", "20", "20", "20", "3.0"]
    assert row(md, "MARS-AdamW (approx)")[1:] == ["0.002 (×2) †", "1.900 ± 0.100", "10", "10", "20", "20", "3.0"]
    assert row(md, "Lion")[3:5] == ["—", "—"]
    assert row(md, "MARS-AdamW (exact)")[2:7] == ["2.100 ± 0.000", "20", "39", "20", "39"]
    assert row(md, "MARS-AdamW (exact), ½ steps")[2:7] == ["2.500 ± 0.000", "—", "—", "10", "19"]
    assert "AdamW's mean final val loss 2.200" in md
    assert "† best lr at the edge of the grid" in md
    assert "| MARS-AdamW (approx) | 0.0005: 2.600 | 0.001: 2.100 | **0.002: 1.800** |" in md


def test_paired_gaps_to_adamw_by_hand(results):
    """AdamW ends at 2.0, 2.2, 2.4 on seeds 0, 1, 2; MARS (approx) at 1.8, 1.9, 2.0: differences −0.2, −0.3,
    −0.4, mean −0.3, sd 0.1, 95% half-width t(0.975, 2)·0.1/√3 = 4.303·0.1/1.732 = 0.2484."""
    gaps = {g["key"]: g for g in reproduce.paired_gaps(results)}
    assert "adamw" not in gaps
    mars = gaps["mars-adamw"]
    assert mars["seeds"] == [0, 1, 2]
    assert mars["diffs"] == pytest.approx([-0.2, -0.3, -0.4])
    assert mars["mean"] == pytest.approx(-0.3) and mars["sd"] == pytest.approx(0.1)
    assert (mars["lo"], mars["hi"]) == pytest.approx((-0.3 - 0.24844, -0.3 + 0.24844), abs=1e-4)
    # exact MARS ends at 2.1 on every seed: +0.1, −0.1, −0.3, sd 0.2, an interval that contains 0
    exact = gaps[reproduce.EXACT_KEY]
    assert exact["mean"] == pytest.approx(-0.1) and exact["lo"] < 0 < exact["hi"]
    md = reproduce.table_markdown(results)
    assert "| MARS-AdamW (approx) − AdamW | -0.200, -0.300, -0.400 | -0.300 | [-0.548, -0.052] | yes |" in md
    assert "| MARS-AdamW (exact) − AdamW | +0.100, -0.100, -0.300 | -0.100 | [-0.597, +0.397] | no |" in md
    assert "| Lion − AdamW | +0.500, +0.400, +0.300 | +0.400 |" in md
    # a diverged seed leaves no mean or interval, and says so
    results["runs"][-4]["final_val_loss"] = None  # exact MARS, seed 2
    line = next(x for x in reproduce.table_markdown(results).splitlines() if x.startswith("| MARS-AdamW (exact) −"))
    assert line == "| MARS-AdamW (exact) − AdamW | +0.100, -0.100, diverged | — | — | — |"


def test_best_factor_ignores_diverged_runs(results):
    runs = results["runs"]
    runs[1]["final_val_loss"] = None  # the winning AdamW run diverged: the next best (2.5 at ×2) wins
    assert reproduce.best_factor(runs, "adamw", 20) == 2.0
    assert math.isinf(reproduce._loss(float("nan")))


def tiny_settings(tmp_path: Path) -> dict:
    """A 1 × 16 model on a made-up 3,200-word corpus, 3 steps: the whole protocol in seconds."""
    from mars_ref.gpt import data

    words = "to be or not that is the question whether tis nobler in the mind".split()
    rng = np.random.default_rng(0)
    source = tmp_path / "source.txt"
    source.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(400)) + "\n")
    data.prepare("tiny", data_dir=str(tmp_path), tokenizer="char", source=str(source))
    return {"preset": "cpu-mini", "max_iters": 3, "warmup_iters": 1, "eval_interval": 2, "eval_iters": 1,
            "data_dir": str(tmp_path), "train_overrides": {"dataset": "tiny", "n_layer": 1, "n_embd": 16,
                                                          "n_head": 2, "block_size": 16, "batch_size": 4}}


def test_run_one_trains_a_few_steps(tmp_path):
    """Three steps of exact MARS on a tiny data set through mars_ref.gpt.train: the record the table needs."""
    import torch

    torch.set_num_threads(1)
    settings = tiny_settings(tmp_path)
    r = reproduce.run_one("mars-adamw-exact", 3.0, 0, settings, tmp_path / "runs", "tune")
    assert r["steps"] == [0, 2, 3] and r["grad_evals"] == [0, 3, 5]  # exact: 2 per step, 1 on the first
    assert r["lr"] == pytest.approx(3 * 1e-2) and r["lr_1d"] == pytest.approx(3 * 5e-3)
    assert r["final_val_loss"] == r["val_loss"][-1] and math.isfinite(r["final_val_loss"])


def test_workers_give_the_same_runs_and_resume(tmp_path, monkeypatch):
    """The protocol in 2 worker processes: the same runs with the same numbers as in-process, in any order;
    a rerun on the finished results file trains nothing."""
    import torch

    torch.set_num_threads(1)
    monkeypatch.setattr(reproduce, "OPTIMIZERS", [o for o in reproduce.OPTIMIZERS
                                                  if o[0] in ("adamw", reproduce.EXACT_KEY)])
    settings = {**tiny_settings(tmp_path), "grid": [0.5, 1.0], "seeds": [0, 1], "mode": "test", "threads": 1}
    one = reproduce.run_all(settings, tmp_path / "one.json", tmp_path / "runs1", "test", workers=1)
    two = reproduce.run_all(settings, tmp_path / "two.json", tmp_path / "runs2", "test", workers=2)

    def finals(res):
        return {(r["key"], r["factor"], r["seed"], r["max_iters"]): r["final_val_loss"] for r in res["runs"]}

    assert len(one["runs"]) == 2 * 2 + 2 * 1 + 2  # grid on seed 0, seed 1 at the best, exact at ½ steps
    assert finals(two) == finals(one)
    assert json.loads((tmp_path / "two.json").read_text())["runs"] == two["runs"]
    again = reproduce.run_all(settings, tmp_path / "two.json", tmp_path / "runs2", "test", workers=2)
    assert again["runs"] == two["runs"]


# ---------------------------------------------------------------------------- refused input


@pytest.mark.parametrize("argv, message", [
    (["--max-iters", "0"], "argument --max-iters: must be an integer >= 2"),
    (["--max-iters", "-1"], "argument --max-iters: must be an integer >= 2"),
    (["--max-iters", "1"], "argument --max-iters: must be an integer >= 2 (exact MARS's equal-evaluation runs"),
    (["--max-iters", "abc"], "argument --max-iters: must be an integer >= 2"),
    (["--threads", "0"], "argument --threads: must be 'auto' or an integer >= 1, not '0'"),
    (["--threads", "abc"], "argument --threads: must be 'auto' or an integer >= 1, not 'abc'"),
    (["--workers", "0"], "argument --workers: must be an integer >= 1, not '0'"),
])
def test_bad_counts_exit_2_with_the_valid_range(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "run_all", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--out", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_max_iters_zero_is_not_the_default_length(tmp_path):
    with pytest.raises(ValueError, match=r"max_iters=0: must be an integer >= 1"):
        reproduce.run_one("adamw", 1.0, 0, {"max_iters": 400}, tmp_path, "tune", max_iters=0)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ('{"settings": {"preset": "cpu-mini", "max_', "is not valid JSON"),
    ("[]", "is a JSON list, not an object"),
    ("{}", 'has no "settings" object'),
    ('{"settings": {"preset": "p", "max_iters": 20, "grid": [1.0], "seeds": [0]}, "runs": []}', "has no runs"),
    ('{"settings": {"preset": "p", "max_iters": 0, "grid": [1.0], "seeds": [0]}, "runs": []}',
     "settings.max_iters = 0 is not valid"),
])
def test_from_results_refuses_an_unusable_file_with_exit_2(content, message, tmp_path, capsys):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--from-results", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--from-results: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("damage, message", [
    (lambda r: r["runs"][0].pop("final_val_loss"), "run 0 has final_val_loss = '(missing)'; expected a number"),
    (lambda r: r["runs"][2].update(seed="0"), "run 2 has seed = '0'; expected an integer"),
    (lambda r: r["runs"][1].update(key="sgd"), "run 1 has key = 'sgd'; expected one of adamw, lion"),
    (lambda r: r["runs"][0].update(val_loss=[4.0]), "run 0 has 3 steps, 3 grad_evals and 1 val_loss values"),
    (lambda r: r.update(runs=[x for x in r["runs"] if x["key"] != "adamw"]), "has no AdamW tuning run of 20 steps"),
    (lambda r: r["runs"][0].update(seconds="slow"), "run 0 has seconds = 'slow'; expected a number or null"),
])
def test_from_results_names_the_damaged_record(damage, message, results, tmp_path, capsys):
    damage(results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--from-results", str(path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_committed_results_files_are_read(capsys):
    for name in ("reproduce_full", "reproduce_quick"):
        results = reproduce.load_results(ROOT / "benchmarks" / "results" / f"{name}.json")
        assert len(results["runs"]) >= 38


def test_an_unwritable_out_exits_2_before_anything_runs(results, tmp_path, monkeypatch, capsys):
    """--out under a regular file (the tests run as root, which ignores permission bits), or in /proc."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    for out in (blocker / "sub" / "table", Path("/proc/mars-ref-test/table")):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["--from-results", str(path), "--out", str(out)])
        assert e.value.code == 2
        assert f"cannot write the table and figure to {out.parent}" in capsys.readouterr().err
    monkeypatch.setattr(reproduce, "run_all", lambda *a, **k: pytest.fail("trained into an unwritable directory"))
    for option, value, shown in (("--out", blocker / "x" / "stem", "--out: cannot write in"),
                                 ("--runs-dir", blocker / "runs", "--runs-dir: cannot write in")):
        argv = ["--quick", "--out", str(tmp_path / "ok" / "stem"), "--runs-dir", str(tmp_path / "runs"),
                option, str(value)]
        with pytest.raises(SystemExit) as e:
            reproduce.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert shown in err and "give a writable directory" in err


def test_a_write_that_fails_later_exits_1_with_a_message(results, tmp_path, monkeypatch, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "results.md"))

    monkeypatch.setattr(reproduce, "write_atomic", read_only)
    assert reproduce.main(["--from-results", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "Read-only file system" in err
    monkeypatch.setattr(reproduce, "run_all", read_only)
    assert reproduce.main(["--quick", "--threads", "1", "--out", str(tmp_path / "q"),
                           "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "error: OSError: [Errno 30] Read-only file system" in err and "rerun the same command" in err


def test_the_script_prints_no_traceback(tmp_path):
    import subprocess

    missing = tmp_path / "missing.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--from-results", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--from-results: cannot read {missing}: No such file or directory" in proc.stderr
