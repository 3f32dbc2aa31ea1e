"""Where a run computes: its place in a ``torchrun`` job (``Dist``), its device, the collectives it uses, the
precision of its matrix products (bf16 autocast, TF32) and whether a micro-batch can fit in the device's memory."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig, check_fused_device
from .model import GPTConfig


@dataclass
class Dist:
    """This process's place in the job: rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPUs) for ``--device``."""
    if "RANK" not in os.environ:
        return Dist()
    backend = "nccl" if pick_device(device, Dist()).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if backend == "nccl":  # the first collectives (the run directory's lock) use the current device (unverified)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def pick_device(name: str, d: Dist) -> str:
    """``auto``: CUDA, then Apple's MPS, then the CPU. Under torchrun one GPU per local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, no GPU visible): "
                          "use --device cpu, or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError("--device mps: Apple's MPS is not available here: use --device cpu, or auto")
    if name == "cuda" and "RANK" in os.environ:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


def gather(obj, d: Dist) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (a collective under torchrun)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_mean(x: torch.Tensor, d: Dist) -> float:
    """The mean over all processes of a scalar tensor (a collective under torchrun)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x.item()



def bf16_native() -> bool:
    """Whether this CUDA GPU computes bfloat16 natively (Ampere and later), not by emulation."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: it counts native support only
        return torch.cuda.is_bf16_supported()


def autocast_context(device: str, dtype: str, master: bool = True):
    """bfloat16 autocast on a CUDA GPU that computes bfloat16 natively when ``dtype`` is auto, or when it is
    bfloat16; plain float32 elsewhere. A GPU that only emulates bfloat16 trains in float32 under auto, with a note
    (unverified on such a GPU: the choice is tested with a stand-in for ``torch.cuda.is_bf16_supported``)."""
    kind = device.split(":")[0]
    if dtype == "auto":
        dtype = "float32"
        if kind == "cuda":
            if bf16_native():
                dtype = "bfloat16"
            elif master:
                print("note: this GPU emulates bfloat16 (no native bf16 matrix units): training in float32 "
                      "(--dtype bfloat16 forces bf16 autocast anyway)", file=sys.stderr)
    if dtype == "float32":
        return nullcontext()
    if dtype != "bfloat16":
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def set_matmul_precision(device: str, tf32: bool) -> None:
    """On CUDA, float32 matrix products in TensorFloat-32 (``torch.set_float32_matmul_precision("high")``) unless
    ``--no-tf32`` ("highest"); the CPU is left as it is (unverified on a GPU)."""
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def device_memory(device: str) -> tuple[int, str]:
    """(bytes of memory, what holds them) of the device: the GPU's memory on CUDA (unverified on a GPU), the
    machine's RAM elsewhere."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory, f"the GPU {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    except (AttributeError, ValueError, OSError):
        return 0, "this machine's memory"


def training_memory(cfg: TrainConfig, model_cfg: GPTConfig, autocast_bf16: bool) -> int:
    """An estimate of the bytes one training micro-batch needs, below what it really takes: the activations kept
    for the backward pass (about 17 values per channel, token and layer, attention matrices not counted: the
    attention kernels do not store them), the logits with their float32 copy and gradient, and the weights,
    gradients and two optimizer states in float32."""
    tokens = cfg.batch_size * cfg.block_size
    value = 2 if autocast_bf16 else 4
    c, layers, vocab = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size
    params = layers * 12 * c * c + (vocab + model_cfg.block_size) * c
    per_token = layers * 17 * c * value + vocab * (value + 4 + 4)
    return tokens * per_token + 16 * params


def check_memory(cfg: TrainConfig, model_cfg: GPTConfig, device: str, autocast_bf16: bool) -> None:
    """``ConfigError`` naming the estimate if one micro-batch of ``--batch-size`` × ``--block-size`` clearly cannot
    fit in the device's memory (``training_memory`` is below the real need)."""
    need = training_memory(cfg, model_cfg, autocast_bf16)
    have, where = device_memory(device)
    if have and need > have:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} × --block-size {cfg.block_size} cannot fit: one micro-batch of this "
            f"model ({model_cfg.n_layer} layers × {model_cfg.n_embd}, vocabulary {model_cfg.vocab_size}) needs at "
            f"least {need / 2**30:,.1f} GiB for its activations, logits, weights and optimizer state, and "
            f"{where} has {have / 2**30:,.1f} GiB: lower --batch-size (raising --grad-accum keeps the tokens per "
            "step) or --block-size")


def setup_device(cfg: TrainConfig, d: Dist) -> str:
    """The run's device (``pick_device``), refused for what it cannot run (the fused step on a GPU found by
    ``--device auto``), made the current CUDA device, with its matrix-product precision (``set_matmul_precision``)."""
    device = pick_device(cfg.device, d)
    check_fused_device(cfg.step_impl, device)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # NCCL collectives (and all_gather_object) use the current device
    set_matmul_precision(device, cfg.tf32)
    return device
