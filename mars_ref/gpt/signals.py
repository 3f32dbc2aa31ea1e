"""Ctrl-C (SIGINT) and SIGTERM while training: the step in progress finishes, a checkpoint of it is written, and the
run exits with status 128 + the signal (130, 143); ``--resume`` then continues on the identical trajectory. Another
signal stops at once, except the same signal again within ``REPEAT_SECONDS``: that is the same request delivered
twice (SLURM signals torchrun and its workers, and torchrun forwards the signal to the workers; a terminal's Ctrl-C
reaches torchrun and the workers too). A signal the parent process ignores (a shell's background job ignores
SIGINT) stays ignored.

Under DDP every process must stop after the same step, so the request is all-reduced; that is a synchronisation
with the device, so it happens every ``log_interval`` steps (and at the last step), not every step.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

REPEAT_SECONDS = 3.0  # the same signal again within this time is the same request, delivered twice


def next_stop_step(run) -> int:
    """The step after which a stop request made now is acted on: the step in progress; under DDP the next step
    that checks for one."""
    step = run.step + 1
    if run.d.world > 1:
        every = run.cfg.log_interval
        step = min(-(-step // every) * every, run.cfg.max_iters)
    return step


@contextmanager
def stop_signals(run) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM set ``run.stop_signal`` (the loop then stops after the step,
    ``stop_requested``); another signal stops the run at once (``KeyboardInterrupt``), but for the same one again
    within ``REPEAT_SECONDS``. The previous handlers are restored afterwards."""
    first = {}

    def ask(signum, frame):
        now = time.monotonic()
        if run.stop_signal is not None:
            if signum == run.stop_signal and now - first["time"] < REPEAT_SECONDS:
                return  # the same request, delivered twice
            raise KeyboardInterrupt
        run.stop_signal, first["time"] = signum, now
        if run.d.master:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after step {next_stop_step(run)} with a "
                             f"checkpoint (again after {REPEAT_SECONDS:g} s to stop at once)\n")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, ask)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_requested(run, done: int) -> bool:
    """Whether a signal asked this run (any of its processes) to stop after step ``done``. Under DDP the flag is
    all-reduced every ``log_interval`` steps and at the last step only (unverified on GPUs: tested with gloo)."""
    asked = run.stop_signal is not None
    if run.d.world == 1:
        return asked
    if done % run.cfg.log_interval and done != run.cfg.max_iters:
        return False
    flag = torch.tensor([int(asked)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
