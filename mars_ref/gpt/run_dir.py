"""The run directory (``--out-dir``): ``config.json``, ``metrics.jsonl``, ``ckpt.pt`` and the lock ``.lock``.

* One training at a time: ``lock_run_dir`` holds an exclusive ``fcntl.flock`` on ``OUT_DIR/.lock`` for the whole
  run, taken before anything in the directory is read or written; a second training into the same directory (a new
  run, ``--overwrite`` or ``--resume``) is refused with a ``ConfigError`` and touches nothing. The lock goes with
  the process however it ends; the empty file stays.
* ``check_out_dir`` creates the directory and makes sure a file can be written there before any work starts.
* A new run (no ``--resume``) in a directory that holds an earlier run's ``metrics.jsonl`` or ``ckpt.pt`` is
  refused unless ``--overwrite`` (``check_new_run_dir``), which deletes them once the new run is set up
  (``write_run_files``).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import _io
from .config import ConfigError

RUN_FILES = ("metrics.jsonl", "ckpt.pt")  # what a new run refuses to replace without --overwrite
LOCK_NAME = ".lock"


@contextmanager
def lock_run_dir(out_dir: Path) -> Iterator[None]:
    """Hold ``OUT_DIR/.lock`` exclusively while the block runs (``ConfigError`` if another process holds it).
    On a file system without ``flock`` (or without ``fcntl``), a note and no lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path = out_dir / LOCK_NAME
    with _io.storage(out_dir, f"creating the lock file {LOCK_NAME}", "choose another --out-dir"):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out-dir {out_dir}: another process is training in this run directory (it holds "
                              f"the lock {lock_path}): wait for it to finish or stop it, or choose another "
                              "--out-dir") from None
        except OSError as e:  # ENOLCK: a file system without locks
            print(f"note: cannot lock {lock_path} ({e.strerror or e}); training without a lock", file=sys.stderr)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure files can be written there (``ConfigError`` naming it otherwise)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a directory: give a directory (created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        why = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise ConfigError(f"--out-dir {out_dir} cannot be written ({why}): make it writable, or give another "
                          "--out-dir") from e


def check_new_run_dir(out_dir: Path, overwrite: bool, master: bool = True) -> None:
    """A new run may not replace an earlier run's files in ``out_dir`` unless ``overwrite``."""
    found = [n for n in RUN_FILES if (out_dir / n).is_file() and (out_dir / n).stat().st_size > 0]
    if found and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                          "start it again with --overwrite (which deletes them), or choose another --out-dir")
    if found and master:
        print(f"note: --overwrite: deleting the earlier run's {' and '.join(found)} in {out_dir}")


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line is skipped), optionally only up to a step."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_step is None or record.get("step", 0) <= up_to_step:
                records.append(record)
    return records


def write_run_files(out_dir: Path, start_step: int, config: dict) -> list[dict]:
    """Start ``metrics.jsonl`` and write ``config.json``, each replaced whole or not at all; returns the metrics
    kept. A resumed run (``start_step > 0``) keeps its records up to its checkpoint, rewriting what a killed run
    logged after it; a new run starts an empty file and deletes an earlier run's checkpoint (``--overwrite``)."""
    with _io.storage(out_dir, "writing config.json and metrics.jsonl", "choose another --out-dir"):
        (out_dir / "ckpt.pt.tmp").unlink(missing_ok=True)  # what a killed checkpoint write left
        if start_step == 0:
            (out_dir / "ckpt.pt").unlink(missing_ok=True)
        kept = read_metrics(out_dir / "metrics.jsonl", up_to_step=start_step) if start_step > 0 else []
        _io.write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        _io.write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return kept
