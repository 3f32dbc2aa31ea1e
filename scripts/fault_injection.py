"""Fault injection for ``mars_ref.gpt.train``: kills, Ctrl-C, corrupt checkpoints, a full disk and bad input.

    python scripts/fault_injection.py                      # 50 SIGKILLs, 10 SIGINTs, 200 flipped bytes, ...
    python scripts/fault_injection.py --kills 5 --sigints 2 --flips 20 --truncations 5 --disk-full 2

Every fault comes from one seeded RNG (``--seed``) and every outcome is checked; the summary counts the
faults and the checks, and the exit status is 1 if any check failed. ``tests/test_faults_train.py`` runs the
same functions with small counts. A tiny GPT (2 layers × 32) trains on a generated character corpus.

* **SIGKILL** (``interrupted_round``) at a random moment of a subprocess run: during start-up, during training, or
  during a checkpoint write (the kill is sent as soon as ``ckpt.pt.tmp`` appears). After each kill ``ckpt.pt``
  is absent or loads and holds exactly the weights the uninterrupted run had at its step (the reference run
  records a digest of the weights after every step); a ``ckpt.pt.tmp`` left behind either is
  refused by ``load_checkpoint`` (torn) or is complete and exact. The next launch resumes (``--resume``; a new
  run with ``--overwrite`` while there is no checkpoint yet). When a run finally completes, every training
  loss and validation loss it logged equals the uninterrupted run's, bit for bit.
* **SIGINT** (Ctrl-C) and **SIGTERM** at a random moment of training or of a checkpoint write: exit status 130
  (143), no traceback, the checkpoint of the step it names holds the reference's weights of that step; resumed
  to the end, the same bit-for-bit comparison.
* **Flipped bytes and truncations** (``flip_bytes``) of a good checkpoint, at random positions (and at its
  first and last byte, in the checksum trailer's magic and digest): ``CheckpointError`` naming the file,
  every time.
* **A full disk** (``disk_full``): ``torch.save`` writes a random number of bytes, then raises
  ``OSError(ENOSPC)``; also an ``ENOSPC`` appending to ``metrics.jsonl``. Exit status 1, a message saying the
  disk is full, the previous ``ckpt.pt`` byte for byte intact, no ``.tmp`` left.
* **Bad input** (``bad_inputs``): every number flag out of range (0, negative, nan, inf, 1 for betas...),
  wrong names, unusable ``--out-dir``, ``--resume`` conflicts, corrupt or foreign checkpoints, missing or
  unusable corpora, non-finite training: each with its exit status and message, never a traceback; the files of
  the run directory used are unchanged afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU only, so that "--device cuda" is refused everywhere
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mars_ref.gpt import data, run_dir  # noqa: E402
from mars_ref.gpt import train as T  # noqa: E402

TINY = ["--preset", "cpu-mini", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-iters", "2", "--sample-tokens", "0", "--warmup-iters", "5",
        "--variance-batches", "8"]
WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows of "
         "outrageous fortune take arms against a sea troubles and by opposing end them").split()


def common_flags(max_iters: int) -> list:
    """The schedule of the interrupted runs: a checkpoint every 3 steps, so that kills often hit a write."""
    return ["--max-iters", max_iters, "--eval-interval", 20, "--log-interval", 1, "--ckpt-interval", 3,
            "--variance-every", 15]


@dataclass
class Tally:
    """Counts of faults and checks, and the checks that failed."""

    counts: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> bool:
        self.counts["checks"] += 1
        if not ok:
            self.failures.append(what)
        return ok


# ----------------------------------------------------------------------------- runs


def make_corpus(root: Path, seed: int = 0, words: list[str] = WORDS) -> Path:
    """A ~60 kB character corpus named "tiny" in ``root`` (the data directory), as tests/test_train.py's."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "." for _ in range(1200)]
    root.mkdir(parents=True, exist_ok=True)
    source = root / "source.txt"
    source.write_text("\n".join(lines) + "\n")
    data.prepare("tiny", data_dir=str(root), tokenizer="char", source=str(source))
    return root


def train_flags(data_dir: Path, out_dir: Path, *extra) -> list[str]:
    return [*TINY, "--dataset", "tiny", "--data-dir", str(data_dir), "--out-dir", str(out_dir), *map(str, extra)]


def run_main(argv: list[str]) -> tuple[int, str]:
    """``mars_ref.gpt.train.main(argv)`` in this process: (exit status, stderr); argparse's exits included."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = T.main([str(a) for a in argv])
        except SystemExit as e:
            status = e.code
    return status, err.getvalue()


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in T.read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"}


def evals(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in T.read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "eval"]


def model_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Reference:
    """The uninterrupted run: its logged losses and the weights' digest of each checkpoint it wrote."""

    losses: dict
    evals: list
    digests: dict


def reference_run(data_dir: Path, out_dir: Path, common: list) -> Reference:
    """Train ``common`` without interruption in this process (one thread, as the subprocesses), recording the
    digest of the weights after every step."""
    digests = {}
    real = T.train_step

    def recording(run, step):
        real(run, step)
        digests[step + 1] = model_digest(run.raw_model.state_dict())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    T.train_step = recording
    try:
        status, err = run_main(train_flags(data_dir, out_dir, *common))
    finally:
        T.train_step = real
        torch.set_num_threads(threads)
    assert status == 0, err
    return Reference(losses(out_dir), evals(out_dir), digests)


# ----------------------------------------------------------------------------- kills and signals


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m mars_ref.gpt.train *argv``, one thread, output to ``log``, with Ctrl-C's default behaviour (a
    shell's background job would otherwise pass on an ignored SIGINT, which the run rightly keeps ignoring)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "mars_ref.gpt.train", *argv], env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``condition`` (every 0.2 ms) until it holds (True) or the process ends or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.0002)
    return False


def training_since(out_dir: Path, step0: int, t0: float) -> Callable[[], bool]:
    """True once this launch has logged a "train" record past ``step0`` (it rewrites metrics.jsonl at start)."""
    path = out_dir / "metrics.jsonl"

    def started() -> bool:
        try:
            if path.stat().st_mtime < t0:
                return False
            lines = path.read_text().splitlines()
        except OSError:
            return False
        for line in reversed(lines):
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                return record.get("kind") == "train" and record["step"] > step0
        return False

    return started


def aim(proc: subprocess.Popen, out_dir: Path, step0: int, t0: float, moment: str, rng) -> bool:
    """Wait for the moment to send a signal: "start-up" (a random time after launch), "training" (a random time
    after the first step logged), "checkpoint" (as soon as a checkpoint is being written). False: the process
    ended first."""
    if moment == "start-up":
        return not wait_for(lambda: False, proc, timeout=float(rng.uniform(0.05, 2.5)))
    if not wait_for(training_since(out_dir, step0, t0), proc):
        return False
    if moment == "training":
        return not wait_for(lambda: False, proc, timeout=float(rng.uniform(0.0, 0.4)))
    return wait_for((out_dir / "ckpt.pt.tmp").exists, proc)


def check_checkpoint(path: Path, ref: Reference, tally: Tally, what: str, torn_ok: bool = False) -> int | None:
    """``path`` loads and holds the reference's weights of its step (or, if ``torn_ok``, is refused as torn).
    Returns its step (None if refused)."""
    try:
        state = T.load_checkpoint(path)
    except T.CheckpointError as e:
        tally.expect(torn_ok and str(path) in str(e), f"{what}: {path} did not load: {e}")
        tally.counts["torn .tmp refused by load_checkpoint"] += 1
        return None
    tally.expect(model_digest(state["model"]) == ref.digests.get(state["step"]),
                 f"{what}: {path} (step {state['step']}) loads weights the uninterrupted run never had")
    return state["step"]


def after_kill(out_dir: Path, ref: Reference, tally: Tally, what: str) -> None:
    """After a SIGKILL: ckpt.pt absent or exact; a .tmp left behind torn (refused) or complete and exact."""
    if (out_dir / "ckpt.pt").exists():
        check_checkpoint(out_dir / "ckpt.pt", ref, tally, what)
    if (out_dir / "ckpt.pt.tmp").exists():
        tally.counts["kills that left a ckpt.pt.tmp (mid-write)"] += 1
        check_checkpoint(out_dir / "ckpt.pt.tmp", ref, tally, what, torn_ok=True)


def after_stop(out_dir: Path, ref: Reference, tally: Tally, status: int, text: str, what: str, sig: int) -> None:
    """After a SIGINT or SIGTERM: 128 + the signal without a traceback, and the checkpoint of the step the message
    names."""
    tally.expect("Traceback" not in text, f"{what}: a traceback:\n{text}")
    tally.expect(status == 128 + sig, f"{what}: exit status {status}, not {128 + sig}:\n{text}")
    named = re.search(r"checkpoint of step (\d+) in", text)
    if named:
        tally.counts[f"{signal.Signals(sig).name}s stopped with a checkpoint"] += 1
        step = check_checkpoint(out_dir / "ckpt.pt", ref, tally, what)
        tally.expect(step == int(named[1]), f"{what}: the message names step {named[1]}, ckpt.pt holds {step}")
    else:
        tally.expect("stopped at once" in text, f"{what}: no checkpoint named:\n{text}")


def interrupted_round(data_dir: Path, out_dir: Path, ref: Reference, common: list, budget: int, rng, tally: Tally,
                      sig: int = signal.SIGKILL) -> None:
    """Train into a fresh ``out_dir`` to the end, sending ``sig`` to launches until ``budget`` signals were sent;
    check after each, and compare the finished run with the reference."""
    name = signal.Signals(sig).name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    moments = ["start-up", "training", "checkpoint"] if sig == signal.SIGKILL else ["training", "checkpoint"]
    for launch in range(10_000):
        resume = (out_dir / "ckpt.pt").exists()
        step0 = T.load_checkpoint(out_dir / "ckpt.pt")["step"] if resume else 0
        log = out_dir.parent / f"{out_dir.name}.{launch}.log"
        t0 = time.time()
        proc = spawn(train_flags(data_dir, out_dir, *common, "--resume" if resume else "--overwrite"), log)
        moment = str(rng.choice(moments))
        sent = budget > 0 and aim(proc, out_dir, step0, t0, moment, rng)
        if sent:
            proc.send_signal(sig)
            budget -= 1
            tally.counts[f"{name}s sent ({moment})"] += 1
        try:
            status = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
            tally.expect(False, f"{log}: no exit within 300 s")
        text = log.read_text()
        what = f"{name} #{tally.counts[name + 's']} ({moment}, {log})"
        finished = status == 0 and "done:" in text
        if sent:
            tally.counts[name + "s"] += 1
            if finished:
                tally.counts[f"{name}s that arrived after the run finished"] += 1
            elif sig == signal.SIGKILL:
                tally.expect(status == -signal.SIGKILL, f"{what}: exit status {status}:\n{text}")
                after_kill(out_dir, ref, tally, what)
            else:
                after_stop(out_dir, ref, tally, status, text, what, sig)
        if finished:
            break
        if not tally.expect(sent, f"{log}: exit status {status} without a signal:\n{text}"):
            return
    tally.counts["interrupted runs completed"] += 1
    tally.expect(losses(out_dir) == ref.losses, f"{out_dir}: training losses differ from the uninterrupted run")
    tally.expect(evals(out_dir) == ref.evals, f"{out_dir}: validation losses differ from the uninterrupted run")


def signal_campaign(data_dir: Path, work: Path, ref: Reference, common: list, signals: int, rng, tally: Tally,
                    sig: int = signal.SIGKILL) -> None:
    """``interrupted_round``s until ``signals`` signals were sent."""
    name = signal.Signals(sig).name + "s"
    start = tally.counts[name]
    for round_ in range(10_000):
        if tally.counts[name] - start >= signals:
            break
        budget = signals - (tally.counts[name] - start)
        interrupted_round(data_dir, work / f"{name.lower()}-{round_}", ref, common, budget, rng, tally, sig)


# ----------------------------------------------------------------------------- damaged checkpoints


def flip_bytes(ckpt: Path, work: Path, flips: int, truncations: int, rng, tally: Tally) -> None:
    """Copies of ``ckpt`` with one byte changed (xor a random non-zero byte) or cut short: each is refused."""
    good = ckpt.read_bytes()
    n = len(good)
    work.mkdir(parents=True, exist_ok=True)
    bad = work / "ckpt.pt"
    trailer = n - T.TRAILER_BYTES
    must = [0, n - 1, trailer, trailer + len(T.CHECKSUM_MAGIC) - 1, n - 32]  # first, last, magic, digest
    positions = (must + [int(p) for p in rng.integers(0, n, max(0, flips - len(must)))])[:flips]
    damaged = [("flipped bytes", p, bytes(good[:p]) + bytes([good[p] ^ int(rng.integers(1, 256))]) + good[p + 1:])
               for p in positions]
    damaged += [("truncations", int(c), good[:int(c)]) for c in rng.integers(0, n, truncations)]
    for kind, where, payload in damaged:
        bad.write_bytes(payload)
        try:
            T.load_checkpoint(bad)
            tally.expect(False, f"{kind}: {ckpt} damaged at byte {where} of {n} loaded without an error")
        except T.CheckpointError as e:
            tally.expect(str(bad) in str(e), f"{kind} at {where}: the error does not name the file: {e}")
        tally.counts[kind] += 1


# ----------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def full_disk_in_torch_save(n_bytes: int) -> Iterator[None]:
    """``torch.save`` writes its first ``n_bytes`` bytes, then fails as on a full disk."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:n_bytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


@contextlib.contextmanager
def full_disk_in_metrics() -> Iterator[None]:
    """Appending to metrics.jsonl fails as on a full disk (``open`` as mars_ref.gpt.train sees it)."""
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "metrics.jsonl" and mode == "a":
            return Full()
        return open(path, mode, *args, **kwargs)

    T.open = fake_open
    try:
        yield
    finally:
        del T.open


def disk_full(data_dir: Path, work: Path, cases: int, rng, tally: Tally) -> None:
    """A run with a checkpoint at step 4, resumed ``cases`` times into a disk that fills up during the next
    checkpoint (after a random number of bytes), and once while appending to metrics.jsonl."""
    out = work / "disk-full"
    argv = train_flags(data_dir, out, "--max-iters", 4, "--ckpt-interval", 2, "--eval-interval", 0,
                       "--log-interval", 1)
    assert run_main([*argv, "--overwrite"])[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    faults = [(full_disk_in_torch_save(int(rng.integers(0, len(before)))), "writing a checkpoint")
              for _ in range(cases)] + [(full_disk_in_metrics(), "appending to metrics.jsonl")]
    for fault, action in faults:
        with fault:
            status, err = run_main([*argv, "--resume", "--max-iters", 6])
        what = f"disk full while {action}"
        tally.expect(status == 1, f"{what}: exit status {status}: {err}")
        tally.expect(f"the disk is full while {action}" in err and "Traceback" not in err, f"{what}: {err}")
        tally.expect((out / "ckpt.pt").read_bytes() == before, f"{what}: the previous checkpoint changed")
        tally.expect(not (out / "ckpt.pt.tmp").exists(), f"{what}: ckpt.pt.tmp left behind")
        tally.counts["full disks"] += 1


# ----------------------------------------------------------------------------- bad input


@dataclass
class Case:
    """One bad command line: its flags, the exit status and a fragment of the message expected."""

    label: str
    argv: list
    status: int
    message: str
    fault: Callable[[], contextlib.AbstractContextManager] | None = None


def range_cases(data_dir: Path, out: Path) -> list[Case]:
    """Every number flag with values out of its range (TrainConfig's NUMBER_RANGES)."""
    cases = []
    for name, rule in T.NUMBER_RANGES.items():
        if rule == "unit":
            values, valid = ["1", "-0.1", "nan"], "a number in [0, 1)"
        elif rule[0] == "float":
            values, valid = ["-1", "nan", "inf"], "a finite number >= 0"
        else:
            values = ["0", "-1"] if rule[1] == 1 else ["-1"] + (["9223372036854775808"] if name == "seed" else [])
            valid = f"an integer >= {rule[1]}"
        for value in values:
            flag = T.flag(name)
            cases.append(Case(f"{flag} {value}", train_flags(data_dir, out, flag, value), 2,
                              f"{flag} must be {valid}"))
    return cases


def bad_inputs(data_dir: Path, work: Path) -> list[Case]:
    """Every class of bad input. ``work/run`` is a finished 4-step run; ``work/other`` a corpus of another
    vocabulary (``prepare_bad_input_dirs``)."""
    run, new = work / "run", work / "new"
    corrupt, foreign = work / "corrupt", work / "foreign"
    a_file = work / "a-file"
    read_only = lambda: patched(run_dir.tempfile, "mkstemp", raising(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    adamw_nan = ["--optimizer", "adamw", "--lr", "1e30", "--min-lr", "0", "--max-iters", 6]
    return [
        *range_cases(data_dir, new),
        Case("n_embd not a multiple of n_head", train_flags(data_dir, new, "--n-embd", 30, "--n-head", 4), 2,
             "--n-embd 30 is not a multiple of --n-head 4"),
        Case("min_lr above lr", train_flags(data_dir, new, "--lr", 0.01, "--min-lr", 0.5), 2, "--min-lr 0.5 is above"),
        Case("unknown device", train_flags(data_dir, new, "--device", "tpu"), 2, "--device 'tpu' is not a device"),
        Case("no CUDA", train_flags(data_dir, new, "--device", "cuda"), 2, "--device cuda: CUDA is not available"),
        Case("unknown dtype", train_flags(data_dir, new, "--dtype", "float16"), 2, "--dtype 'float16' is not a dtype"),
        Case("unknown model", train_flags(data_dir, new, "--model", "gpt5"), 2, "--model: unknown model preset"),
        Case("unknown optimizer", train_flags(data_dir, new, "--optimizer", "sgd"), 2, "invalid choice: 'sgd'"),
        Case("not an integer", train_flags(data_dir, new, "--batch-size", "1.5"), 2, "invalid int value: '1.5'"),
        Case("--exact with AdamW", train_flags(data_dir, new, "--optimizer", "adamw", "--exact"), 2,
             "--exact is a MARS option"),
        Case("--step-impl with AdamW", train_flags(data_dir, new, "--optimizer", "adamw", "--step-impl", "fused"), 2,
             "--step-impl is a MARS option"),
        Case("--gamma with Lion", train_flags(data_dir, new, "--optimizer", "lion", "--gamma", 0.1), 2,
             "--gamma is a MARS option"),
        Case("--step-impl fused on a GPU", train_flags(data_dir, new, "--step-impl", "fused", "--device", "cuda"), 2,
             "--step-impl fused runs MARS's step as C loops on the CPU"),
        Case("a micro-batch that cannot fit in memory", train_flags(data_dir, new, "--n-embd", 128, "--block-size",
                                                                    128, "--batch-size", 1_000_000), 2,
             "--batch-size 1000000 × --block-size 128 cannot fit"),
        Case("out-dir empty", train_flags(data_dir, ""), 2, "--out-dir '' is empty"),
        Case("out-dir is a file", train_flags(data_dir, a_file), 2, f"--out-dir {a_file} is a file, not a directory"),
        Case("out-dir inside a file", train_flags(data_dir, a_file / "x"), 2, f"--out-dir {a_file / 'x'} cannot be "
             "written"),
        Case("out-dir read-only", train_flags(data_dir, new), 2, "cannot be written (read-only file system)",
             read_only),
        Case("--resume and --overwrite", train_flags(data_dir, run, "--resume", "--overwrite"), 2,
             "give one of them"),
        Case("a new run over an earlier one", train_flags(data_dir, run), 2,
             f"{run} already holds a run (metrics.jsonl, ckpt.pt): continue it with --resume"),
        Case("--resume without a checkpoint", train_flags(data_dir, new, "--resume"), 2, "no checkpoint at"),
        *[Case(f"--resume changing {f[0]}", train_flags(data_dir, run, "--resume", *f), 2,
               f"these settings cannot change during a run: {f[0]} (checkpoint: ")
          for f in [("--lr", 0.5), ("--optimizer", "adamw"), ("--n-layer", 1), ("--seed", 7), ("--batch-size", 4),
                    ("--gamma", 0.5), ("--exact",), ("--dataset", "other"), ("--warmup-iters", 9)]],
        Case("--resume shortening the run", train_flags(data_dir, run, "--resume", "--max-iters", 2), 2,
             "a run cannot be shortened"),
        Case("--resume from a corrupt checkpoint", train_flags(data_dir, corrupt, "--resume"), 2,
             f"checkpoint {corrupt / 'ckpt.pt'} is corrupt"),
        Case("--resume on another corpus", train_flags(work / "other", foreign, "--resume"), 2,
             "was trained on another corpus"),
        Case("unknown corpus", train_flags(data_dir, new, "--dataset", "nosuch"), 2, "--dataset 'nosuch'"),
        Case("corpus name with a slash", train_flags(data_dir, new, "--dataset", "../x"), 2,
             "is not a plain directory name"),
        Case("data-dir is a file", train_flags(a_file, new), 2, "(--data-dir) is a file, not a directory"),
        Case("block size above the corpus", train_flags(data_dir, new, "--block-size", 100_000), 2,
             "too few for --block-size 100000"),
        Case("non-finite loss (AdamW, lr 1e30)", train_flags(data_dir, new, *adamw_nan), 1,
             "the training loss is not finite"),
        Case("non-finite gradient (MARS, lr 1e30)", train_flags(data_dir, new, "--lr", "1e30", "--min-lr", "0"), 1,
             "the optimizer refused a non-finite gradient"),
    ]


def raising(error: BaseException) -> Callable:
    def fail(*args, **kwargs):
        raise error
    return fail


@contextlib.contextmanager
def patched(owner, name: str, value) -> Iterator[None]:
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def prepare_bad_input_dirs(data_dir: Path, work: Path) -> None:
    """The run directories and files ``bad_inputs`` refers to."""
    argv = train_flags(data_dir, work / "run", "--max-iters", 4, "--eval-interval", 2, "--log-interval", 1)
    assert run_main(argv)[0] == 0
    (work / "a-file").write_text("not a directory\n")
    (work / "corrupt").mkdir()
    ckpt = bytearray((work / "run" / "ckpt.pt").read_bytes())
    ckpt[len(ckpt) // 2] ^= 0xFF
    (work / "corrupt" / "ckpt.pt").write_bytes(ckpt)
    shutil.copytree(work / "run", work / "foreign")
    make_corpus(work / "other", seed=1, words=[w.upper() for w in WORDS])  # same name, another vocabulary


def check_bad_inputs(data_dir: Path, work: Path, tally: Tally, subprocesses: int = 3) -> None:
    """Every ``bad_inputs`` case in this process, and the first ``subprocesses`` ones through the real command
    line too (no traceback on its stderr either); the files of ``work/run`` are unchanged afterwards."""
    prepare_bad_input_dirs(data_dir, work)
    before = {p.name: p.read_bytes() for p in sorted((work / "run").iterdir())}
    for case in bad_inputs(data_dir, work):
        with case.fault() if case.fault else contextlib.nullcontext():
            status, err = run_main(case.argv)
        tally.expect(status == case.status and case.message in err and "Traceback" not in err,
                     f"{case.label}: exit status {status} (expected {case.status}), stderr:\n{err}"
                     f"expected: {case.message}")
        tally.counts["bad inputs"] += 1
        shutil.rmtree(work / "new", ignore_errors=True)
    chosen = ("--batch-size 0", "out-dir is a file", "--resume changing --lr", "--lr nan", "unknown corpus")
    for case in [c for c in bad_inputs(data_dir, work) if c.label in chosen][:subprocesses]:
        proc = subprocess.run([sys.executable, "-m", "mars_ref.gpt.train", *map(str, case.argv)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        tally.expect(proc.returncode == case.status and case.message in proc.stderr
                     and "Traceback" not in proc.stderr, f"{case.label} (command line): {proc.stderr}")
        tally.counts["bad inputs through the command line"] += 1
    after = {p.name: p.read_bytes() for p in sorted((work / "run").iterdir())}
    tally.expect(after == before, f"{work / 'run'}: a refused command changed its files")


# ----------------------------------------------------------------------------- the campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs (default 50)")
    parser.add_argument("--sigints", type=int, default=10, help="SIGINTs (default 10)")
    parser.add_argument("--sigterms", type=int, default=5, help="SIGTERMs (default 5)")
    parser.add_argument("--flips", type=int, default=200, help="checkpoints with one byte flipped (default 200)")
    parser.add_argument("--truncations", type=int, default=50, help="truncated checkpoints (default 50)")
    parser.add_argument("--disk-full", type=int, default=10, help="full disks during a checkpoint (default 10)")
    parser.add_argument("--max-iters", type=int, default=300, help="steps of each interrupted run (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        work = Path(args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="mars_ref_faults_")))
        tally = campaign(work, args)
    print(f"\nseed {args.seed}, {time.time() - t0:.0f} s")
    for name, count in sorted(tally.counts.items()):
        print(f"  {name}: {count}")
    print(f"failures: {len(tally.failures)}")
    for failure in tally.failures:
        print("  FAILED: " + failure)
    return 1 if tally.failures else 0


def campaign(work: Path, args) -> Tally:
    rng, tally = np.random.default_rng(args.seed), Tally()
    torch.set_num_threads(1)
    data_dir = make_corpus(work / "data")
    common = common_flags(args.max_iters)
    ref = reference_run(data_dir, work / "reference", common)
    print(f"reference: {args.max_iters} steps", flush=True)
    signal_campaign(data_dir, work / "kills", ref, common, args.kills, rng, tally, signal.SIGKILL)
    print(f"kills done: {dict(tally.counts)}", flush=True)
    signal_campaign(data_dir, work / "sigints", ref, common, args.sigints, rng, tally, signal.SIGINT)
    signal_campaign(data_dir, work / "sigterms", ref, common, args.sigterms, rng, tally, signal.SIGTERM)
    flip_bytes(work / "reference" / "ckpt.pt", work / "flips", args.flips, args.truncations, rng, tally)
    disk_full(data_dir, work, args.disk_full, rng, tally)
    check_bad_inputs(data_dir, work / "bad", tally)
    return tally


if __name__ == "__main__":
    sys.exit(main())
