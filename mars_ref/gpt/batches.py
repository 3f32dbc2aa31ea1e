"""The data a run reads: the prepared corpus (``prepare_data``) and its micro-batches (``Batches``).

Sampling is a pure function: micro-batch ``j`` of step ``s`` is drawn by ``numpy.random.default_rng((seed,
stream, s, j))``, one stream per use (``TRAIN_STREAM``, ``VAL_STREAM``, ``HELDOUT_STREAM``), so adding evaluations
never shifts training batches, and a resumed run reads exactly the batches the uninterrupted run would have,
whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import data
from .config import ConfigError, TrainConfig
from .devices import Dist

TRAIN_STREAM, VAL_STREAM, HELDOUT_STREAM = 0, 1, 2


class Batches:
    """Micro-batches as a pure function of (seed, stream, step, index): no sampler state to lose."""

    def __init__(self, data_path: Path, seed: int, block_size: int, batch_size: int, device: str):
        """The train and val splits of a prepared data set (each must hold one window at least)."""
        self.paths = {s: data_path / f"{s}.bin" for s in ("train", "val")}
        for path in self.paths.values():
            n_tokens = len(np.memmap(path, dtype=np.uint16, mode="r"))
            if n_tokens <= block_size + 1:
                raise ConfigError(f"{path} has {n_tokens} tokens: too few for --block-size {block_size} (give one "
                                  f"below {n_tokens - 1})")
        self.seed, self.block_size, self.batch_size, self.device = seed, block_size, batch_size, device

    def get(self, split: str, stream: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``block_size + 1`` tokens: inputs and next-token targets."""
        # A memory map per batch, as nanoGPT: the pages one map has read stay counted in the process's memory
        # until it is closed, which over a 17 GB corpus looks like a leak.
        tokens = np.memmap(self.paths[split], dtype=np.uint16, mode="r")
        rng = np.random.default_rng((self.seed, stream, step, index))
        starts = rng.integers(0, len(tokens) - self.block_size - 1, size=self.batch_size)
        xy = torch.from_numpy(np.stack([tokens[i:i + self.block_size + 1] for i in starts]).astype(np.int64))
        if self.device.startswith("cuda"):
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]


def prepare_data(cfg: TrainConfig, d: Dist) -> tuple[Path, dict]:
    """The data set's directory and its checked ``meta.json``, prepared first if needed (``data.prepare``).

    Under torchrun the corpus must be prepared beforehand: preparing one can take hours (OpenWebText), longer than
    the other processes may wait in a collective (NCCL's timeout), so every process only checks it (tested with
    gloo, unverified with NCCL)."""
    if d.world > 1:
        path = Path(cfg.data_dir) / cfg.dataset
        try:
            return path, data.load_meta(path)
        except data.CorpusMissing:
            raise ConfigError(f"--dataset {cfg.dataset} is not prepared in --data-dir {cfg.data_dir}: under torchrun "
                              "prepare it first, in one process: python -m mars_ref.gpt.data "
                              f"{cfg.dataset} --data-dir {cfg.data_dir} (a corpus of your own: add --source PATH)"
                              ) from None
    try:
        path = Path(data.prepare(cfg.dataset, data_dir=cfg.data_dir))
    except data.DataError:
        raise
    except ValueError as e:  # a request mars_ref.gpt.data cannot serve, e.g. an unknown corpus without a source
        raise ConfigError(f"--dataset {cfg.dataset!r} (--data-dir {cfg.data_dir}): {e}; a corpus of your own is "
                          f"prepared first with: python -m mars_ref.gpt.data {cfg.dataset} --source PATH "
                          f"--data-dir {cfg.data_dir}") from e
    return path, data.load_meta(path)
