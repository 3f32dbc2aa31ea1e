"""``scripts/gpu_check.py`` on a machine without CUDA: the dry run completes, exits 0 and writes the table with every
part ok or skipped; bad arguments exit 2; a part whose budget would overrun the total is skipped."""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic dry run is the path of a machine without CUDA")
def test_dry_run_without_cuda_lists_every_part_ok_or_skipped(tmp_path):
    out = tmp_path / "result.md"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = _run("--out", str(out))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # well under a minute of CPU (about 30 s here, the trainer runs included); the wall clock only bounds a hang,
    # since it depends on how busy the machine is
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 45 and seconds < 150, (cpu, seconds)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["mode"] == "dry run"
    assert report["environment"]["cuda_available"] is False
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == gpu_check.PART_NAMES
    assert {p["status"] for p in parts.values()} <= {"ok", "skipped"}, {n: p["detail"] for n, p in parts.items()}
    # the parts that need CUDA say so; the others ran their plumbing on the CPU
    for name in ("cuda-tests", "trainer-fused-refused", "trainer-compile", "torchrun-2gpu"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"] == "no-cuda", parts[name]
    for name in ("environment", "step-equivalence", "compiled-step-graphs", "bf16-autocast", "gpt2-small-throughput",
                 "trainer-gpu-lab", "trainer-step-impls", "trainer-gpt2-small", "trainer-sigint-resume"):
        assert parts[name]["status"] == "ok", parts[name]
    assert parts["trainer-sigint-resume"]["numbers"]["exit status after SIGINT"] == 130
    assert parts["trainer-step-impls"]["numbers"]["exact grad evals"] == 2 * 4 - 1
    rows = [line.split("|")[1:3] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [name.strip() for name, _ in rows] == gpu_check.PART_NAMES
    assert all(s.strip() == "ok" or s.strip().startswith("skipped") for _, s in rows), rows


@pytest.mark.parametrize("args,flag", [(["--budget", "-5"], "--budget"), (["--budget", "nan"], "--budget"),
                                       (["--only", "no-such-part"], "--only"), (["--skip", "environment,x"], "--skip"),
                                       (["--no-such-flag"], "--no-such-flag"), (["--budget", "ten"], "--budget")])
def test_bad_arguments_exit_2_with_a_message(args, flag):
    result = _run(*args, timeout=60)
    assert result.returncode == 2
    assert flag in result.stderr and "error" in result.stderr


def test_budget_decision():
    assert gpu_check.budget_decision(elapsed=0, budget=60, total=600) is None
    assert gpu_check.budget_decision(elapsed=540, budget=60, total=600) is None  # ends exactly at the total
    assert gpu_check.budget_decision(elapsed=541, budget=60, total=600) is not None
    assert gpu_check.budget_decision(elapsed=0, budget=700, total=600) is not None


class _Clock:
    """A clock that each part advances by the seconds it 'takes'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_run_parts_skips_a_part_that_would_overrun_and_runs_the_next_that_fits():
    clock = _Clock()
    ran = []

    def part(name, takes):
        def run(ctx):
            ran.append(name)
            clock.now += takes
            return {"took": takes}
        return run

    parts = [gpu_check.Part("a", 100, 100, part("a", 250)),  # overruns its own budget: the rest must fit after it
             gpu_check.Part("b", 400, 400, part("b", 1)),  # 250 + 400 > 600: skipped
             gpu_check.Part("c", 300, 300, part("c", 1)),  # 250 + 300 <= 600: runs
             gpu_check.Part("d", 60, 60, part("d", 1))]  # 251 + 60 <= 600, but not selected
    outcomes = gpu_check.run_parts(parts, None, total=600, selected={"a", "b", "c"}, clock=clock, say=lambda s: None)
    assert ran == ["a", "c"]
    assert [(o.part, o.status, o.reason) for o in outcomes] == [
        ("a", "ok", ""), ("b", "skipped", "budget"), ("c", "ok", ""), ("d", "skipped", "not-selected")]


def test_a_failing_part_is_reported_and_the_others_still_run():
    def boom(ctx):
        raise RuntimeError("no")

    def check(ctx):
        raise gpu_check.Failed("too far apart", {"diff": 1.0})

    parts = [gpu_check.Part("x", 1, 1, boom), gpu_check.Part("y", 1, 1, check),
             gpu_check.Part("z", 1, 1, lambda ctx: {"n": 1})]
    outcomes = gpu_check.run_parts(parts, None, total=10, say=lambda s: None)
    assert [o.status for o in outcomes] == ["fail", "fail", "ok"]
    assert outcomes[1].numbers == {"diff": 1.0} and outcomes[2].numbers == {"n": 1}


def test_synthetic_corpus_is_a_prepared_gpt2_corpus(tmp_path):
    from mars_ref.gpt import data

    meta = gpu_check.write_synthetic_corpus(tmp_path / "synthetic", 5000, 1000)
    checked = data.load_meta(tmp_path / "synthetic")
    assert checked["vocab_size"] == meta["vocab_size"] == 50257 and checked["tokenizer"] == "gpt2"
    assert (checked["train_tokens"], checked["val_tokens"]) == (5000, 1000)


def test_cuda_tests_run_with_cuda_left_visible():
    cmd, env = gpu_check.cuda_test_command()
    assert env["MARS_REF_TEST_CUDA"] == "1"
    assert cmd[cmd.index("-k") + 1] == "cuda"
    assert all((ROOT / f).exists() for f in gpu_check.TEST_FILES)
