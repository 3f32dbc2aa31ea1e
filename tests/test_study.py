"""benchmarks/study.py: the stages (grid → widening → seeds) on hand-made results, the statistics, and a
very tiny study end to end through the command line: cached, resumed, safe after a kill, reported."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # a plain import, so the spawned workers can import it too
import study  # noqa: E402

# Every axis of the real study, at a size that trains in a fraction of a second per run: one 1 × 16 model,
# 1× = 0.15 tokens per parameter (~10 steps of 4 × 16 tokens), 2 lr factors, 2 seeds, at most 1 widening.
TINY = {
    "name": "study_tiny", "dataset": "tiny", "preset": "cpu-mini",
    "sizes": {"M": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}},
    "tpp_unit": 0.15, "batch": 4, "eval_tokens": 128, "evals": 2, "warmup_frac": 0.02, "min_warmup": 2,
    "grid": [0.5, 1.0], "seeds": [0, 1], "max_widen": 1,
    "middle": {"size": "M", "tpp": 1, "batch": 4},
    "tpp_axis": {"M": [1, 2]},
    "batch_axis": {"size": "M", "tpp": 1, "batches": [2, 4]},
    "gammas": [0.0, 0.025],
    "middle_extras": ["mars-adamw-exact-half"],
}
N_CELLS = 8  # t1-b4 (AdamW, MARS), t2-b4 (×2), t1-b2 (×2), γ = 0, exact at equal gradient evaluations


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from mars_ref.gpt import data

    tmp = tmp_path_factory.mktemp("study_data")
    words = "to be or not that is the question whether tis nobler in the mind".split()
    rng = np.random.default_rng(0)
    source = tmp / "source.txt"
    source.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(400)) + "\n")
    data.prepare("tiny", data_dir=str(tmp), tokenizer="char", source=str(source))
    return tmp


@pytest.fixture(scope="module")
def tiny(data_dir) -> study.Study:
    return study.Study(TINY, data_dir)


def fake(job: study.Job, final: float | None) -> dict:
    """A cached record for ``job`` with final validation loss ``final`` (None: diverged)."""
    return {"version": study.STUDY_VERSION, "key": job.key, "spec": {}, "config": job.kwargs,
            "result": {"final_val_loss": final, "best_val_loss": final, "seconds": 1.0, "diverged": final is None,
                       "steps": [0, 10], "grad_evals": [0, 10], "val_loss": [4.0, final], "total_grad_evals": 10}}


def test_statistics_by_hand():
    assert study.t975(2) == 4.303 and study.t975(22) == 2.086  # between table entries: the smaller dof
    r = study.interval([0.1, 0.2, 0.3])
    assert r["mean"] == pytest.approx(0.2) and r["sd"] == pytest.approx(0.1)
    assert r["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert study.interval([0.1, math.inf])["mean"] is None
    assert study.interval([0.5])["half"] is None


def test_keys_follow_the_resolved_config(tiny):
    cell = tiny.cells[0]
    a, b = tiny.job(cell, 1.0, 0), tiny.job(cell, 0.5, 0)
    assert a.key != b.key and a.key != tiny.job(cell, 1.0, 1).key
    assert a.key == study.run_key(dict(a.kwargs), tiny.data_id)  # deterministic
    # a field left to the recipe (None) and the same value given explicitly resolve alike: same key
    assert study.run_key({**a.kwargs, "beta1": 0.9}, tiny.data_id) == a.key  # AdamW's recipe β1
    assert study.run_key({**a.kwargs, "beta1": 0.8}, tiny.data_id) != a.key
    assert study.run_key(a.kwargs, {**tiny.data_id, "text_sha256": "x"}) != a.key


def test_stages_grid_widening_seeds(tiny):
    cell = study.Cell("M", 1.0, 4, "adamw")
    job = lambda f, s=0: tiny.job(cell, f, s)
    cache = {}
    st = tiny.state(cell, cache)
    assert st.stage == "tune" and [j.factor for j in st.ready] == [0.5, 1.0] and st.projected == 1
    # best at the top edge -> one more run at twice that factor (max_widen = 1)
    cache.update({job(0.5).key: fake(job(0.5), 2.5), job(1.0).key: fake(job(1.0), 2.2)})
    st = tiny.state(cell, cache)
    assert st.stage == "widen" and [j.factor for j in st.ready] == [2.0]
    # ×2 diverged: ×1 is interior -> seeds at ×1
    cache[job(2.0).key] = fake(job(2.0), None)
    st = tiny.state(cell, cache)
    assert st.stage == "seeds" and st.best == 1.0 and not st.edge
    assert [(j.factor, j.seed) for j in st.ready] == [(1.0, 1)]
    cache[job(1.0, 1).key] = fake(job(1.0, 1), 2.3)
    st = tiny.state(cell, cache)
    assert st.stage == "done" and {s: study.final_loss(r) for s, r in st.finals.items()} == {0: 2.2, 1: 2.3}
    # if ×2 had been best too, the widenings are used up: seeds at ×2, marked as at the edge
    cache[job(2.0).key] = fake(job(2.0), 2.0)
    st = tiny.state(cell, cache)
    assert st.best == 2.0 and st.edge and st.stage == "seeds"
    # every grid run diverged: widen downwards
    other = study.Cell("M", 1.0, 4, "mars-adamw")
    cache = {tiny.job(other, f, 0).key: fake(tiny.job(other, f, 0), None) for f in (0.5, 1.0)}
    assert [j.factor for j in tiny.state(other, cache).ready] == [0.25]


def test_timing_prices_the_runs_at_the_quiet_speed(tiny):
    cell = study.Cell("M", 1.0, 4, "adamw")
    jobs = [tiny.job(cell, f, 0) for f in (0.5, 1.0, 2.0)]
    tiny.calibration = {}
    model = tiny.estimate(cell)
    cache = {}
    for j, (ratio, load) in zip(jobs, [(1.2, 1.9), (1.4, 2.4), (5.0, 4.0)], strict=True):
        rec = fake(j, 2.0)
        rec["result"]["seconds"] = ratio * model
        rec["host"] = {"load_avg_before": [load, load, load]}
        rec["finished_at"] = f"2026-01-0{len(cache) + 1}T00:00:00+00:00"
        cache[j.key] = rec
    tiny.calibration = {16: 3.0}  # a calibration in force must not leak into the quiet price, nor be lost
    t = study.timing(tiny, cache)
    assert tiny.calibration == {16: 3.0}
    assert t["quiet_runs"] == 2 and t["quiet_factor"] == pytest.approx(1.3)  # median of [1.2, 1.4]
    assert t["run_seconds"] == pytest.approx(7.6 * model) and t["quiet_seconds"] == pytest.approx(3 * 1.3 * model)
    assert t["quiet_hours_at_2_workers"] == pytest.approx(3 * 1.3 * model / 7200)
    assert (t["first_finished"], t["last_finished"]) == ("2026-01-01T00:00:00+00:00", "2026-01-03T00:00:00+00:00")
    assert "3 runs took" in study.timing_text(t)


def test_paired_gap_is_per_seed(tiny):
    a, b = study.CellState(tiny.cells[0], "done"), study.CellState(tiny.cells[1], "done")
    job = tiny.job(tiny.cells[0], 1.0, 0)
    a.finals = {0: fake(job, 2.0), 1: fake(job, 2.2), 2: fake(job, 2.1)}
    b.finals = {0: fake(job, 2.1), 1: fake(job, 2.4), 2: fake(job, 2.1)}
    g = study.paired(a, b)
    assert g["diffs"] == pytest.approx([-0.1, -0.2, 0.0]) and g["mean"] == pytest.approx(-0.1)
    assert g["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_tiny_study_runs_resumes_survives_a_kill_and_reports(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.MODES, "quick", TINY)
    cache, results = tmp_path / "cache", tmp_path / "results"
    args = ["--quick", "--workers", "1", "--cache", str(cache), "--results-dir", str(results),
            "--data-dir", str(data_dir)]

    # an interrupted first session: 3 runs, each cached as it finished
    assert study.main([*args, "--max-runs", "3"]) == 0
    files = sorted(cache.glob("*.json"))
    assert len(files) == 3
    rec = json.loads(files[0].read_text())
    assert rec["version"] == study.STUDY_VERSION and rec["key"] == files[0].stem
    r = rec["result"]
    assert math.isfinite(r["final_val_loss"]) and r["best_val_loss"] <= r["final_val_loss"] + 1e-12
    assert r["steps"][0] == 0 and r["steps"][-1] == rec["config"]["max_iters"] and r["total_grad_evals"] > 0

    # what a kill leaves: a half-written temporary file, a torn result file (not from our atomic writes, but
    # the loader must not trust it), a run directory of a dead process
    (cache / f".{files[1].name}.99999999.tmp").write_text('{"version": "stu')
    files[2].write_text(files[2].read_text()[:50])
    files[0].write_text(json.dumps({**json.loads(files[0].read_text()), "result": None}))  # valid JSON, no result
    stale = Path(tempfile.mkdtemp(prefix=f"{study.RUN_TMP_PREFIX}99999999-"))
    capsys.readouterr()
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert f"ignoring unreadable cache file {files[2].name}" in out
    assert not list(cache.glob("*.tmp")) and not stale.exists()
    assert f"ignoring {files[0].name}: its result is None, not an object; its run is done again" in out
    for f in (files[0], files[2]):
        assert json.loads(f.read_text())["result"]["final_val_loss"] > 0  # rerun and replaced whole
    assert f"cells done: {N_CELLS} of {N_CELLS}" in out

    # a second invocation runs nothing new and rewrites no result
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.glob("*.json")}
    assert study.main(args) == 0
    assert "0 new runs" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.glob("*.json")} == before
    n_runs = len(before)
    assert 2 * N_CELLS - 2 <= n_runs  # shared cells (γ = 0.025 is the MARS cell) are counted once

    # the report, from the cache only
    for f in results.glob("study_tiny*"):
        f.unlink()
    assert study.main([*args, "--report"]) == 0
    md = (results / "study_tiny.md").read_text()
    assert "| M-t2-b4 | 1×16 | 4 |" in md and "pending" not in md and "MARS-AdamW exact, equal grad evals" in md
    assert "t = 12.706 on 1 degrees of freedom" in md
    for png in ("study_tiny_gap.png", "study_tiny_gamma.png", "study_tiny_middle.png", "study_tiny_gap_curves.png"):
        assert (results / png).stat().st_size > 10_000
    summary = json.loads((results / "study_tiny_summary.json").read_text())
    t = summary["timing"]
    assert t["runs"] == n_runs and t["run_seconds"] == pytest.approx(summary["total_run_seconds"])
    assert f"Time: the {n_runs} runs took" in md
    # the gap curve is the per-evaluation version of the final gap: its last point is the final gap
    entry = summary["tpp_gaps"]["M"][1]
    curve = entry["gap_curve"]
    assert curve["frac"][0] == 0 and curve["frac"][-1] == 1 and len(curve["mean"]) == len(curve["steps"])
    assert curve["mean"][-1] == pytest.approx(entry["gap"]["mean"])
    assert curve["lo"][-1] == pytest.approx(entry["gap"]["lo"]) and curve["hi"][-1] == pytest.approx(entry["gap"]["hi"])
    assert summary["cells_done"] == N_CELLS and summary["runs_cached"] == n_runs
    gap = summary["tpp_gaps"]["M"][1]["gap"]
    assert gap["seeds"] == [0, 1] and len(gap["diffs"]) == 2
    assert gap["mean"] == pytest.approx(sum(gap["diffs"]) / 2)
    assert [e["batch"] for e in summary["batch_gaps"]] == [2, 4]

    assert study.main([*args, "--status"]) == 0
    assert f"cells done: {N_CELLS} of {N_CELLS}" in capsys.readouterr().out


def test_bad_flags(capsys):
    for bad in (["--workers", "0"], ["--status", "--report"], ["--report", "--max-runs", "2"], ["--nope"]):
        with pytest.raises(SystemExit) as e:
            study.main(bad)
        assert e.value.code == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_one_runner_per_cache(tmp_path):
    with study.cache_lock(tmp_path):
        with pytest.raises(SystemExit, match="another study runner"):
            with study.cache_lock(tmp_path):
                pass
    with study.cache_lock(tmp_path):  # released
        pass
    assert os.listdir(tmp_path) == [".lock"]  # beside the results, never read as one
    assert study.load_cache(tmp_path) == {}


# ---------------------------------------------------------------------------- damaged caches, locks, outputs

DAMAGES = {
    "result null": (lambda r: r.update(result=None), "its result is None, not an object"),
    "result a string": (lambda r: r.update(result="2.5"), "its result is '2.5', not an object"),
    "final loss a string": (lambda r: r["result"].update(final_val_loss="2.5"),
                            "result.final_val_loss = '2.5'; expected a loss >= 0 or null"),
    "no best loss": (lambda r: r["result"].pop("best_val_loss"),
                     "its result has no best_val_loss (expected a loss >= 0 or null)"),
    "negative loss": (lambda r: r["result"].update(final_val_loss=-5),
                      "result.final_val_loss = -5; expected a loss >= 0 or null"),
    "infinite loss": (lambda r: r["result"].update(best_val_loss=math.inf),
                      "result.best_val_loss = inf; expected a loss >= 0 or null"),
    "curve of another length": (lambda r: r["result"].update(val_loss=[4.0]),
                                "result.val_loss = [4.0]; expected a list of losses >= 0 or null, one per entry"),
    "seconds missing": (lambda r: r["result"].pop("seconds"), "its result has no seconds"),
    "host a string": (lambda r: r.update(host="box"), "host = 'box'; expected an object"),
    "empty object": (lambda r: r.clear(), "not a study/1 result for key"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_cached_record_of_the_wrong_shape_is_warned_about_skipped_and_rerun(damage, tiny, tmp_path):
    cell = study.Cell("M", 1.0, 4, "adamw")
    good, bad = tiny.job(cell, 0.5, 0), tiny.job(cell, 1.0, 0)
    rec = json.loads(json.dumps(fake(bad, 2.2)))
    change, message = DAMAGES[damage]
    change(rec)
    (tmp_path / f"{bad.key}.json").write_text(json.dumps(rec))
    (tmp_path / f"{good.key}.json").write_text(json.dumps(fake(good, 2.5)))
    warnings = []
    cache = study.load_cache(tmp_path, warn=warnings.append)
    assert list(cache) == [good.key]
    assert len(warnings) == 1 and f"warning: ignoring {bad.key}.json: " in warnings[0]
    assert message in warnings[0] and "its run is done again" in warnings[0]
    assert [j.key for j in tiny.state(cell, cache).ready] == [bad.key]  # scheduled again


def test_report_skips_damaged_records_and_refuses_an_unwritable_directory(data_dir, tiny, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(study.MODES, "quick", TINY)
    cache = tmp_path / "cache"
    cache.mkdir()
    cell = study.Cell("M", 1.0, 4, "adamw")
    good, bad = tiny.job(cell, 0.5, 0), tiny.job(cell, 1.0, 0)
    (cache / f"{good.key}.json").write_text(json.dumps(fake(good, 2.5)))
    (cache / f"{bad.key}.json").write_text(json.dumps({**fake(bad, 2.2), "result": None}))
    args = ["--quick", "--cache", str(cache), "--data-dir", str(data_dir), "--report"]
    assert study.main([*args, "--results-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"ignoring {bad.key}.json: its result is None" in out and (tmp_path / "out" / "study_tiny.md").exists()

    blocker = tmp_path / "a-file"  # the tests run as root, which writes through permission bits: use a file
    blocker.write_text("")
    for where in (blocker / "report", Path("/proc/mars-ref-test")):
        with pytest.raises(SystemExit) as e:
            study.main([*args, "--results-dir", str(where)])
        assert e.value.code == 2
        assert f"--results-dir: cannot write the report in {where}" in capsys.readouterr().err

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system", str(tmp_path / "out" / "study_tiny_gap.png"))

    monkeypatch.setattr(study, "plot_gaps", read_only)
    assert study.main([*args, "--results-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write the report in {tmp_path / 'out'} (OSError: Read-only file system" in err
    assert "Traceback" not in err


LOCK_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {benchmarks!r})
import study
with study.cache_lock(Path({cache!r})):
    print("locked", flush=True)
    time.sleep(float(sys.argv[1]))
"""


def test_one_runner_per_cache_across_temp_directories(tmp_path):
    """Two processes with different TMPDIR: the lock is beside the cache, so the second one is refused."""
    import subprocess

    cache = tmp_path / "cache"
    script = LOCK_SCRIPT.format(benchmarks=str(ROOT / "benchmarks"), cache=str(cache))
    envs = []
    for name in ("tmp_a", "tmp_b"):
        (tmp_path / name).mkdir()
        envs.append({**os.environ, "TMPDIR": str(tmp_path / name)})
    first = subprocess.Popen([sys.executable, "-c", script, "60"], env=envs[0], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", script, "0"], env=envs[1], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1 and "locked" not in second.stdout
        assert f"error: another study runner (pid {first.pid}) is using {cache}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    third = subprocess.run([sys.executable, "-c", script, "0"], env=envs[1], capture_output=True, text=True,
                           timeout=60)
    assert third.returncode == 0 and third.stdout.strip() == "locked"  # released when its holder died


def test_a_cache_that_cannot_be_made_is_refused_with_a_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"error: cannot make the cache directory .*a-file/cache \(\w+Error: .*"
                                         r"give a writable --cache"):
        with study.cache_lock(blocker / "cache"):
            pass


def test_results_are_written_by_the_projects_one_atomic_writer(tmp_path, monkeypatch):
    """study.write_atomic (imported by benchmarks/correction.py) is mars_ref._io's: a failed replace leaves the old
    file whole and no temporary file."""
    from mars_ref import _io

    assert study.write_atomic is _io.write_atomic
    path = tmp_path / "r.json"
    study.write_atomic(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'

    def killed(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", killed)
    with pytest.raises(OSError, match="No space left"):
        study.write_atomic(path, '{"a": 2}\n')
    assert path.read_text() == '{"a": 1}\n' and os.listdir(tmp_path) == ["r.json"]


SIGTERM_SCRIPT = """
import sys
sys.path[:0] = [{benchmarks!r}, {tests!r}]
import study, test_study
study.MODES["quick"] = dict(test_study.TINY, tpp_unit=500.0)  # runs of thousands of steps: one is in flight
sys.exit(study.main(["--quick", "--workers", "2", "--cache", {cache!r}, "--data-dir", {data!r}]))
"""


def test_sigterm_to_the_runner_exits_promptly_and_caches_no_cut_run(data_dir, tmp_path):
    """SIGTERM while two workers train: the runner exits 130 within seconds (no worker may be left blocking the
    exit) and caches nothing of the runs it cut."""
    import contextlib
    import signal
    import subprocess
    import time

    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    script = SIGTERM_SCRIPT.format(benchmarks=str(ROOT / "benchmarks"), tests=str(ROOT / "tests"), cache=str(cache),
                                   data=str(data_dir))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp.glob(f"{study.RUN_TMP_PREFIX}*/metrics.jsonl"))) < 2:  # both workers are training
            assert proc.poll() is None and time.monotonic() < deadline, "the runs did not start"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and any worker it left behind
        proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted (signal 15)" in out
    assert not list(cache.glob("*.json"))  # the cut runs are not cached, as diverged or otherwise
