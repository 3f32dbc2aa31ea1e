"""Fault injection for the training command, the CI-sized part of scripts/fault_injection.py (the same functions
with small counts; ``python scripts/fault_injection.py --kills 50`` is the long randomized version).

Random SIGKILLs (during start-up, training and checkpoint writes) and SIGINTs of a subprocess run, each
resumed: the finished run's losses equal the uninterrupted run's bit for bit, and every checkpoint found after a
kill holds exactly the uninterrupted run's weights of its step (a torn ``ckpt.pt.tmp`` is refused). Flipped bytes
and truncations anywhere in a checkpoint: ``CheckpointError`` naming it. A full disk during a checkpoint: exit 1,
"the disk is full", the previous checkpoint intact, no ``.tmp``. Every class of bad input: its exit status and
message, no traceback.
"""

import errno
import importlib.util
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from mars_ref.gpt import train as T

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"
spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
fi = sys.modules["fault_injection"] = importlib.util.module_from_spec(spec)  # (dataclasses look it up there)
spec.loader.exec_module(fi)

STEPS = 120  # ~1 s of training per launch here; each launch also spends ~2 s starting up


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fi.make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[Path, "fi.Reference"]:
    out = tmp_path_factory.mktemp("reference")
    return out, fi.reference_run(data_dir, out, fi.common_flags(STEPS))


def report(tally: "fi.Tally") -> None:
    print(dict(tally.counts))
    assert not tally.failures, "\n".join(tally.failures)


def test_random_sigkills_resume_on_the_same_trajectory(data_dir, reference, tmp_path):
    """3 SIGKILLs at seeded random moments (start-up, training, a checkpoint write), each resumed."""
    _, ref = reference
    tally = fi.Tally()
    fi.signal_campaign(data_dir, tmp_path, ref, fi.common_flags(STEPS), 3, np.random.default_rng(1), tally)
    report(tally)
    assert tally.counts["SIGKILLs"] == 3 and tally.counts["interrupted runs completed"] >= 1


def test_sigint_checkpoints_the_last_step_exits_130_and_resumes_on_the_same_trajectory(data_dir, reference,
                                                                                        tmp_path):
    """Ctrl-C during training: status 130, no traceback, a checkpoint of the step it names; resumed, identical."""
    _, ref = reference
    tally = fi.Tally()
    fi.signal_campaign(data_dir, tmp_path, ref, fi.common_flags(STEPS), 1, np.random.default_rng(2), tally,
                       signal.SIGINT)
    report(tally)
    assert tally.counts["SIGINTs stopped with a checkpoint"] == 1
    assert tally.counts["interrupted runs completed"] == 1


def test_flipped_bytes_and_truncations_are_refused(reference, tmp_path):
    out, _ = reference
    tally = fi.Tally()
    fi.flip_bytes(out / "ckpt.pt", tmp_path, 40, 10, np.random.default_rng(3), tally)
    report(tally)
    assert tally.counts["flipped bytes"] == 40 and tally.counts["truncations"] == 10


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path):
    tally = fi.Tally()
    fi.disk_full(data_dir, tmp_path, 2, np.random.default_rng(4), tally)
    report(tally)
    assert tally.counts["full disks"] == 3  # two checkpoints cut short, one metrics.jsonl append


def test_full_disk_message(data_dir, tmp_path, capsys, monkeypatch):
    """The exact message of a full disk during a checkpoint, and the previous checkpoint as it was."""
    argv = fi.train_flags(data_dir, tmp_path, "--max-iters", 2, "--eval-interval", 0)
    assert T.main(argv) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    with fi.full_disk_in_torch_save(1000):
        assert T.main([*argv, "--resume", "--max-iters", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'ckpt.pt'}: the disk is full while writing a checkpoint: free some "
                          "space, or choose another --out-dir. The previous checkpoint is intact and the partial "
                          "file was removed; continue with --resume once that is fixed")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def test_every_bad_input_is_a_clear_error(data_dir, tmp_path):
    """Each class of bad input (fault_injection.bad_inputs: every number flag out of range, names, --out-dir,
    --resume conflicts, damaged or foreign checkpoints, corpora, non-finite training), in this process and two
    through the command line: the exit status and the message expected, never a traceback."""
    tally = fi.Tally()
    fi.check_bad_inputs(data_dir, tmp_path, tally, subprocesses=2)
    report(tally)
    assert tally.counts["bad inputs"] == len(fi.bad_inputs(data_dir, tmp_path)) > 80


@pytest.mark.parametrize("value, message", [
    ("0", "--batch-size must be an integer >= 1, not 0"),
    ("-3", "--batch-size must be an integer >= 1, not -3"),
])
def test_range_error_message(data_dir, tmp_path, capsys, value, message):
    assert T.main(fi.train_flags(data_dir, tmp_path, "--batch-size", value)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_range_error_messages_name_flag_and_range():
    assert T.range_error("lr", float("inf")) == "--lr must be a finite number >= 0, not inf"
    assert T.range_error("beta2", 1.0) == "--beta2 must be a number in [0, 1), not 1.0"
    assert T.range_error("eval_interval", -1) == "--eval-interval must be an integer >= 0 (0: no evaluation), not -1"
    assert T.range_error("max_iters", 0) is None  # valid: nothing is trained
    assert T.range_error("grad_clip", 0.0) is None  # valid: no clipping
    assert T.range_error("seed", 2**63) == "--seed must be an integer >= 0 and <= 2**63 - 1, not 9223372036854775808"
    assert T.range_error("n_layer", 2.0) == "--n-layer must be an integer >= 1, not 2.0"  # the API's floats too
    assert T.range_error("warmup_iters", True) is not None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir_is_a_clear_error(data_dir, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        assert T.main(fi.train_flags(data_dir, folder)) == 2
    finally:
        folder.chmod(0o700)
    assert f"--out-dir {folder} cannot be written (Permission denied)" in capsys.readouterr().err


def test_read_only_out_dir_simulated(data_dir, tmp_path, capsys, monkeypatch):
    """As root can write anywhere: the same error, with mkstemp failing as on a read-only file system."""
    monkeypatch.setattr(T.tempfile, "mkstemp", fi.raising(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    assert T.main(fi.train_flags(data_dir, tmp_path / "out")) == 2
    assert capsys.readouterr().err == (f"error: --out-dir {tmp_path / 'out'} cannot be written (read-only file "
                                       "system): make it writable, or give another --out-dir\n")
