"""One training at a time in a run directory: a second ``python -m mars_ref.gpt.train`` into the ``--out-dir`` of a
running one (a new run, ``--overwrite`` or ``--resume``) is refused with exit status 2 and touches nothing, and the
first run goes on undisturbed. Two real processes, as in practice."""

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mars_ref.gpt import train as T

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"
spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
fi = sys.modules.setdefault("fault_injection", importlib.util.module_from_spec(spec))
if not hasattr(fi, "train_flags"):
    spec.loader.exec_module(fi)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fi.make_corpus(tmp_path_factory.mktemp("data"))


def test_a_second_training_into_a_running_run_directory_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--eval-interval", 0, "--log-interval", 1, "--ckpt-interval", 0]
    assert fi.run_main(fi.train_flags(data_dir, out, "--max-iters", 2, *common))[0] == 0
    t0 = time.time()
    first = fi.spawn(fi.train_flags(data_dir, out, "--resume", "--max-iters", 100_000, *common), tmp_path / "a.log")
    try:
        assert fi.wait_for(fi.training_since(out, 2, t0), first), (tmp_path / "a.log").read_text()
        before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "config.json")}
        for extra in (["--resume", "--max-iters", 100_000], ["--overwrite", "--max-iters", 5], ["--max-iters", 5]):
            second = subprocess.run([sys.executable, "-m", "mars_ref.gpt.train",
                                     *map(str, fi.train_flags(data_dir, out, *extra, *common))],
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr
            assert second.stderr == (f"error: --out-dir {out}: another process is training in this run directory "
                                     f"(it holds the lock {out / '.lock'}): wait for it to finish or stop it, or "
                                     "choose another --out-dir\n")
            assert first.poll() is None, "the first run stopped"
        assert {name: (out / name).read_bytes() for name in before} == before
        assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl"]
    finally:
        first.send_signal(signal.SIGINT)
        status = first.wait(timeout=300)
    assert status == 130, (tmp_path / "a.log").read_text()
    steps = [r["step"] for r in T.read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order
    stopped = T.load_checkpoint(out / "ckpt.pt")["step"]
    assert stopped == steps[-1] > 2
    # The lock went with the first process: the run can be resumed.
    assert fi.run_main(fi.train_flags(data_dir, out, "--resume", "--max-iters", stopped + 1, *common))[0] == 0
