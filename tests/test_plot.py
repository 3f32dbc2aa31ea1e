"""The plot command (mars_ref.gpt.plot) on runs it cannot draw: a non-zero exit and a message naming the
run and what is missing, never a blank image; an existing image replaced only by a complete one.

Run directories are written by hand (config.json, metrics.jsonl as mars_ref.gpt.train writes them):
no training needed.
"""

import errno
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mars_ref.gpt import plot

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(folder: Path, val_losses, *, optimizer="mars-adamw", extra_records=(), config=True) -> Path:
    """A run directory whose evaluations have the given validation losses (None: no eval records)."""
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"optimizer": optimizer, "lr": 3e-3, "exact": False}))
    records = [{"kind": "train", "step": s, "tokens": 100 * s, "time": 0.1 * s, "loss": 4.0} for s in (1, 2)]
    for i, v in enumerate(val_losses or ()):
        records.append({"kind": "eval", "step": 5 * i, "tokens": 500 * i, "time": 0.5 * i, "train_loss": None,
                        "val_loss": v})
    records += list(extra_records)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN -> NaN
    return folder


def run_plot(capsys, *argv) -> tuple[int, str]:
    code = plot.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_good_run_is_drawn(tmp_path, capsys):
    run = make_run(tmp_path / "good", [4.2, 3.1, float("nan"), 2.5],  # a NaN point is left out, not fatal
                   extra_records=[{"kind": "variance", "step": 5, "mse_g": 1e-3, "cos_err_g": 0.5,
                                   "mse_m": 1e-4, "cos_err_m": 0.1}])
    out = tmp_path / "p.png"
    assert run_plot(capsys, run, "--out", out) == (0, "")
    assert out.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "p.png"]  # no temporary left


CANNOT = [
    ("all NaN", lambda d: make_run(d, [float("nan")] * 3),
     "{m}: all 3 validation losses are NaN, infinite or missing ([nan, nan, nan]): the run diverged or is damaged; "
     "nothing to plot"),
    ("all infinite", lambda d: make_run(d, [float("inf"), float("-inf")]),
     "{m}: all 2 validation losses are NaN, infinite or missing ([inf, -inf]): the run diverged or is damaged; "
     "nothing to plot"),
    ("val_loss null", lambda d: make_run(d, [None, None]),
     "{m}: its 2 evaluation(s) have no val_loss: nothing to plot"),
    ("empty metrics", lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")),
     "{m} holds no records: the run logged nothing (did it start?)"),
    ("only torn lines", lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"kind": "ev')),
     "{m} holds no records: the run logged nothing (did it start?)"),
    ("no evaluations", lambda d: make_run(d, None),
     "{m} has 2 record(s) but no evaluation (kind \"eval\"): nothing to plot; train with --eval-interval > 0"),
    ("not UTF-8", lambda d: (d.mkdir(), (d / "metrics.jsonl").write_bytes(b'{"kind": "\xff"}\n')),
     "{m} is not UTF-8 text (byte 10): the file is damaged"),
    ("missing directory", lambda d: None,
     "run directory {d} does not exist (metrics.jsonl not found): give a directory written by python -m "
     "mars_ref.gpt.train (its --out-dir)"),
    ("a file", lambda d: d.write_text("x"),
     "{d} is a file, not a run directory (metrics.jsonl not found): give a directory written by python -m "
     "mars_ref.gpt.train (its --out-dir)"),
    ("no metrics.jsonl", lambda d: d.mkdir(),
     "{m} not found: is {d} a mars_ref.gpt.train run directory? (give a directory written by python -m "
     "mars_ref.gpt.train (its --out-dir))"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in CANNOT], ids=[c[0] for c in CANNOT])
def test_a_run_that_cannot_be_drawn_exits_2_and_writes_nothing(tmp_path, capsys, make, message):
    run = tmp_path / "run"
    make(run)
    out = tmp_path / "p.png"
    code, err = run_plot(capsys, run, "--out", out)
    assert code == 2
    assert err == "error: " + message.format(d=run, m=run / "metrics.jsonl") + "\n"
    assert not out.exists()


def test_one_bad_run_among_good_ones_keeps_the_old_image(tmp_path, capsys):
    good = make_run(tmp_path / "good", [4.0, 3.0])
    bad = make_run(tmp_path / "diverged", [float("nan")])
    out = tmp_path / "p.png"
    out.write_bytes(PNG + b"the previous plot")
    code, err = run_plot(capsys, good, bad, "--out", out)
    assert code == 2
    assert err == (f"error: {bad / 'metrics.jsonl'}: all 1 validation losses are NaN, infinite or missing ([nan]): "
                   "the run diverged or is damaged; nothing to plot\nleave such runs out of the command\n")
    assert out.read_bytes() == PNG + b"the previous plot"


def test_bad_outputs(tmp_path, capsys):
    run = make_run(tmp_path / "run", [4.0, 3.0])
    code, err = run_plot(capsys, run, "--out", tmp_path / "p.xyz")
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'p.xyz'}: unknown image format '.xyz': use one "
                                        "of ") and ".png" in err and ".pdf" in err
    code, err = run_plot(capsys, run, "--out", tmp_path)
    assert (code, err) == (2, f"error: --out {tmp_path} is a directory: give a file name, for example "
                              f"{tmp_path / 'runs.png'}\n")
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    code, err = run_plot(capsys, run, "--out", a_file / "p.png")
    assert (code, err) == (2, f"error: --out {a_file / 'p.png'}: {a_file} is a file, not a directory: choose "
                              "another place\n")
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]


def test_a_failure_while_writing_keeps_the_previous_image_and_no_temporary(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def full(self, fname, **kwargs):
        fname.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    run = make_run(tmp_path / "run", [4.0, 3.0])
    out = tmp_path / "p.png"
    out.write_bytes(PNG + b"the previous plot")
    code, err = run_plot(capsys, run, "--out", out)
    assert (code, err) == (2, f"error: cannot write --out {out} (No space left on device): choose a writable "
                              "place; the existing file is unchanged\n")
    assert out.read_bytes() == PNG + b"the previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "run"]


def test_damaged_lines_and_config_are_noted_but_drawn(tmp_path, capsys):
    run = make_run(tmp_path / "run", [4.0, 3.0], config=False)
    (run / "config.json").write_text('{"optimizer": "mars"')  # torn
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n[1, 2]\n" + json.dumps({"kind": "eval", "step": 9, "tokens": 900, "time": 1.0,
                                                  "val_loss": 2.0}) + "\n" + '{"kind": "tr')
    code, err = run_plot(capsys, run, "--out", tmp_path / "p.png")
    assert code == 0
    assert err == (f"note: {run / 'metrics.jsonl'}: skipped 3 line(s) that are not JSON records (line 5, 6, 8)\n"
                   f"note: {run / 'config.json'} is unreadable or incomplete (JSONDecodeError: Expecting ',' "
                   "delimiter: line 1 column 21 (char 20)); the run is labelled by its directory name\n")
    label, records = plot.load_run(run)
    assert label == "run" and len(plot.validation_points(records)) == 3 and math.isfinite(records[-1]["val_loss"])


def test_the_command_exits_non_zero(tmp_path):
    run = make_run(tmp_path / "run", [float("nan")] * 2)
    result = subprocess.run([sys.executable, "-m", "mars_ref.gpt.plot", str(run), "--out", str(tmp_path / "p.png")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {run / 'metrics.jsonl'}: all 2 validation losses are NaN, infinite or missing "
                             "([nan, nan]): the run diverged or is damaged; nothing to plot\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
