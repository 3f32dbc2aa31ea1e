"""Checkpoints: written whole or not at all, checksummed, read back only if intact, and the rules of a resume.

``ckpt.pt`` is ``torch.save``'s zip followed by a 48-byte trailer, ``CHECKSUM_MAGIC`` and the sha256 of the zip
(``torch.load`` still reads the file). It is written to ``ckpt.pt.tmp``, synced and renamed (``mars_ref._io``): a
killed run leaves the previous checkpoint or the new one, whole; a full disk leaves the previous one and no
``.tmp``. ``load_checkpoint`` checks the sha256 first: a changed byte anywhere is a ``CheckpointError``.
Checkpoints of format ``mars_ref.gpt.train/1`` (no checksum) load with a note that they could not be verified.

``--resume`` continues the same run (``resume_config``): the flags given may change only ``RESUMABLE`` settings.
Any other setting that differs from the checkpoint's is a ``ConfigError`` listing each one with its saved and
given values. ``restore`` loads the checkpoint into the run's model, optimizer, schedule and random states.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import _io
from .config import RESUMABLE, CheckpointError, ConfigError, TrainConfig, flag, model_config, resolve
from .model import GPT
from .run_dir import check_new_run_dir

CHECKPOINT_FORMAT = "mars_ref.gpt.train/2"  # torch.save's zip + CHECKSUM_MAGIC + sha256 of the zip
UNCHECKSUMMED_FORMATS = ("mars_ref.gpt.train/1",)  # no checksum: loaded unverified, with a note
CHECKSUM_MAGIC = b"\nMARS_REF_SHA256"  # 16 bytes; then the 32-byte digest ends the file
TRAILER_BYTES = len(CHECKSUM_MAGIC) + 32
CORRUPT_FIX = ("Restore a good copy, or start a new run in its directory (--overwrite) or in another --out-dir, "
               "without --resume.")


def sha256_of(f, n_bytes: int) -> bytes:
    """The sha256 of the first ``n_bytes`` of the open binary file ``f``, read from its start."""
    f.seek(0)
    digest = hashlib.sha256()
    while n_bytes > 0:
        chunk = f.read(min(n_bytes, 1 << 20))
        if not chunk:
            break
        digest.update(chunk)
        n_bytes -= len(chunk)
    return digest.digest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``torch.save(state)`` and its checksum trailer to ``PATH.tmp``, fsync, then rename it onto ``path``.

    A run killed at any moment leaves either the previous checkpoint or the new one, whole; any error (a full disk)
    removes the temporary file and leaves the previous checkpoint, if there is one, as it was (``StorageError``).
    """
    path = Path(path)
    if path.exists():
        after = (". The previous checkpoint is intact and the partial file was removed; continue with --resume "
                 "once that is fixed")
    else:
        after = (". No checkpoint of this run exists yet and the partial file was removed; start the run again "
                 "once that is fixed")

    def write(f) -> None:
        torch.save(state, f)
        f.flush()
        size = f.seek(0, os.SEEK_END)
        digest = sha256_of(f, size)
        f.seek(size)
        f.write(CHECKSUM_MAGIC + digest)

    with _io.storage(path, "writing a checkpoint", "choose another --out-dir", after=after):
        _io.write_atomic(path, write, tmp=path.with_name(path.name + ".tmp"))


def verify_checksum(path: Path) -> bool:
    """True if ``path`` ends with a checksum trailer that matches its contents; False if it has no trailer (a
    format 1 checkpoint, or a damaged trailer); ``CheckpointError`` if the checksum does not match."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < TRAILER_BYTES:
                return False
            f.seek(size - TRAILER_BYTES)
            trailer = f.read(TRAILER_BYTES)
            if not trailer.startswith(CHECKSUM_MAGIC):
                return False
            ok = sha256_of(f, size - TRAILER_BYTES) == trailer[len(CHECKSUM_MAGIC):]
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from e
    if not ok:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match their sha256 checksum (a "
                              f"changed or damaged byte). {CORRUPT_FIX}")
    return True


def load_model(run_dir: str | Path) -> GPT:
    """The model of a run's last checkpoint (``RUN_DIR/ckpt.pt``), on the CPU, in eval mode."""
    path = Path(run_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    cfg = saved_config(ckpt, path)
    vocab_size = json.loads((Path(run_dir) / "config.json").read_text())["vocab_size"]
    model = GPT(model_config(cfg, {"vocab_size": vocab_size}))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint, or raise ``CheckpointError`` naming the file: never start afresh silently.

    The sha256 trailer is checked before the file is unpickled. A format 1 checkpoint (which has no checksum) is
    read unverified, with a note on stderr."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path} (run without --resume to start a new run; "
                              "--overwrite if the directory holds an earlier run's files)")
    verified = verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}: {e}). {CORRUPT_FIX}"
        ) from e
    required = {"format", "step", "config", "model", "optimizer", "scheduler", "rng", "metrics"}
    formats = (CHECKPOINT_FORMAT, *UNCHECKSUMMED_FORMATS)
    if not isinstance(state, dict) or state.get("format") not in formats or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else "everything"
        raise CheckpointError(f"checkpoint {path} is not a {' or '.join(formats)} checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else None!r}, "
                              f"missing {missing})")
    if state["format"] == CHECKPOINT_FORMAT and not verified:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum trailer is missing or damaged. "
                              f"{CORRUPT_FIX}")
    if not verified:
        print(f"note: {path} is a {state['format']} checkpoint, written before checkpoints carried a checksum: "
              "read without verifying it (this run's next checkpoint will carry one)", file=sys.stderr)
    return state


def saved_config(ckpt: dict, path: Path) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint was written with (``CheckpointError`` if it is not one)."""
    try:
        return TrainConfig(**ckpt["config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read ({e}): it was "
                              "written by another version of mars_ref") from e


def rng_states(device: str) -> dict:
    """Every random state this process uses (torch CPU and CUDA for dropout; numpy and random for luck)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict, device: str) -> None:
    """Restore what ``rng_states`` returned (the CUDA state only on a CUDA device)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(states["cuda"], device)
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def resume_config(cfg: TrainConfig, given: dict, out_dir: Path, master: bool) -> tuple[TrainConfig, dict | None]:
    """The run's config and, with --resume, its checkpoint: the checkpoint's config, with the ``RESUMABLE``
    settings given on this command line (``ConfigError`` for any other that differs). Without --resume: ``cfg``,
    once ``out_dir`` holds no earlier run (or ``--overwrite``)."""
    if not cfg.resume:
        check_new_run_dir(out_dir, cfg.overwrite, master)
        return cfg, None
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path)
    saved = saved_config(ckpt, ckpt_path)
    changes = {k: v for k, v in given.items() if k not in ("resume", "overwrite") and getattr(saved, k) != v}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"{flag(k)} (checkpoint: {getattr(saved, k)!r}, given: {v!r})" for k, v in fixed.items())
        raise ConfigError(f"--resume continues the run in {ckpt_path}, and these settings cannot change during a "
                          f"run: {listed}. A resumed run may change only "
                          f"{', '.join(flag(k) for k in sorted(RESUMABLE))}; to train with other settings start "
                          "a new run (another --out-dir, or --overwrite)")
    if changes.get("max_iters", ckpt["step"]) < ckpt["step"]:
        raise ConfigError(f"--max-iters {changes['max_iters']} is below the checkpoint's step {ckpt['step']}: "
                          f"a run cannot be shortened (give --max-iters >= {ckpt['step']})")
    if changes and master:
        print(f"resume: changing {changes} (every other setting from the checkpoint)")
    if changes.get("max_iters", 0) > saved.lr_decay_iters and master:
        print(f"note: --max-iters {changes['max_iters']} goes past the end of the run's lr schedule "
              f"(--lr-decay-iters {saved.lr_decay_iters}): the lr stays at min_lr = {saved.min_lr} from there")
    merged = {**asdict(saved), **changes, "out_dir": str(out_dir), "resume": True, "overwrite": False}
    return resolve(TrainConfig(**merged)), ckpt


def restore(ckpt: dict, model: GPT, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
            rank: int, world: int, device: str, path: Path, meta: dict) -> tuple[int, float, int]:
    """Load a checkpoint into the run's objects and this process's RNGs: (step, elapsed seconds, grad_evals).
    ``CheckpointError`` if it does not fit them (another run's checkpoint, another corpus)."""
    corpus = ckpt.get("data", {}).get("corpus", {})
    differ = {k: (v, meta.get(k)) for k, v in corpus.items() if meta.get(k) != v}
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained on another corpus than the one in --data-dir "
                              f"--dataset (checkpoint vs now: {differ}): give the run's data")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(f"checkpoint {path} does not fit the model and optimizer its config describes "
                              f"({type(e).__name__}: {detail}): it was written by another run or version; "
                              f"{CORRUPT_FIX}") from e
    per_rank = ckpt["rng"]
    if len(per_rank) == world:
        set_rng_states(per_rank[rank], device)
    elif rank == 0:
        print(f"resume: checkpoint written by {len(per_rank)} processes, now {world}: "
              "dropout random streams start afresh")
    return ckpt["step"], ckpt["metrics"]["elapsed"], ckpt["metrics"]["grad_evals"]

