r"""The fused MARS step on CPU: ``MARS(..., fused=True)``, one C loop per tensor and pass.

The readable step (:meth:`mars_ref.optimizer.MARS._step_group`) and the foreach step
(:mod:`mars_ref.fast`) run the chain

    correction → clip → momentum → precondition → decay + step

as one torch kernel per link, so every link reads and writes whole tensors: about 18 passes over
memory per step. ``fused.c`` (next to this file) computes the whole chain of one element in
registers, in two passes per tensor:

    pass 1   S = Σ c²,  c = g + s·(g − g_prev)       the clipping norm √S (and the finite check)
    pass 2   c·clip → m → v → u → x, and g_prev ← g  (approx) or x_prev ← x (exact)

Pass 1 of *every* tensor of every fused group runs before pass 2 of any (:func:`first_pass`, called
by ``MARS.step`` with the other checks): a NaN or inf gradient makes its ``S`` non-finite, and the
step stops before anything is changed, naming the tensor, exactly as the readable path does.

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``) with
``-O3 -march=native -fopenmp`` and cached in ``$MARS_REF_CACHE/kernels`` (default
``~/.cache/mars_ref/kernels``) under a hash of the source, the compiler and the CPU; it is loaded
with :mod:`ctypes` and called with the tensors' data pointers, on ``torch.get_num_threads()``
OpenMP threads. Without OpenMP (or ``-march=native``) it is compiled without it (one thread).

What it takes: MARS-AdamW and MARS-Lion (MARS-Shampoo's step is Newton–Schulz matrix products:
use ``foreach=True``), float32 CPU tensors that are contiguous (parameters, gradients and state).
Anything else raises an error that names the parameter. On CUDA use ``foreach=True``: there
``torch._foreach_*`` already runs multi-tensor kernels.

State is the readable path's (``step``, ``m``, ``v``, ``g_prev`` / ``x_prev``), so checkpoints move
between the three paths. Results equal the readable path's up to float rounding (the compiler may
fuse a multiply and an add; the norm is summed in another order): tested to 1e-6 over 20 steps.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .fast import begin_step
from .pieces import correction_scale, fallback_lr

SOURCE = Path(__file__).with_name("fused.c")
#: compiler flags, best first: the first set that compiles is used
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas"],
)
PRECONDITIONERS = ("adamw", "lion")


# ---------------------------------------------------------------------------------------- building


def _compiler() -> str:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    for name in (cc, "cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(
        "MARS(fused=True) compiles mars_ref/fused.c with a C compiler, and none was found (tried $CC, cc, "
        "gcc, clang). Install one (e.g. `apt install gcc`) or use foreach=True."
    )


def _machine_tag() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first CPU is enough
    except OSError:
        pass
    return text


def kernel_dir() -> Path:
    from .data import cache_dir

    return cache_dir() / "kernels"


@functools.lru_cache(maxsize=None)
def library() -> tuple[ctypes.CDLL, list[str]]:
    """``fused.c`` compiled (once per machine, cached) and loaded; returns (library, flags used)."""
    lib, flags = build(SOURCE)
    _declare(lib)
    return lib, flags


@functools.lru_cache(maxsize=None)
def build(source: Path) -> tuple[ctypes.CDLL, list[str]]:
    """Compile a C file into a shared library in :func:`kernel_dir` (unless already there) and load it."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    text = source.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(text + repr((cc, version, flags, _machine_tag())).encode()).hexdigest()[:16]
        target = kernel_dir() / f"{source.stem}_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then renamed: atomic
                out = Path(tmp) / target.name
                run = subprocess.run([cc, *flags, "-shared", "-fPIC", str(source), "-o", str(out)],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-500:]}")
                    continue
                os.replace(out, target)
        return ctypes.CDLL(str(target)), flags
    raise RuntimeError(f"MARS(fused=True): could not compile {source}:\n" + "\n".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    P, F, I64, INT = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
    lib.mars_sumsq.argtypes = [P, P, F, I64, INT]
    lib.mars_sumsq.restype = ctypes.c_double
    lib.mars_adamw.argtypes = [P, P, P, P, P, P, I64, INT] + [F] * 9 + [INT]
    lib.mars_adamw.restype = None
    lib.mars_lion.argtypes = [P, P, P, P, P, I64, INT] + [F] * 5 + [INT]
    lib.mars_lion.restype = None


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------- checks


def check_group(group: dict, where: str) -> None:
    """Hyperparameters the fused path cannot take (called when a group is added)."""
    if not group["fused"]:
        return
    if group["foreach"]:
        raise ValueError(f"MARS: fused=True and foreach=True{where}: choose one (as torch.optim.AdamW)")
    if group["preconditioner"] not in PRECONDITIONERS:
        raise ValueError(
            f"MARS: fused=True{where} takes preconditioner 'adamw' or 'lion', not {group['preconditioner']!r}: "
            "MARS-Shampoo's step is Newton–Schulz matrix products; use foreach=True."
        )


def _check_tensors(i: int, j: int, p: Tensor, tensors: list[Tensor | None]) -> None:
    for t in [p, *tensors]:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise RuntimeError(
                f"MARS(fused=True) runs a CPU float32 kernel on contiguous tensors (mars_ref/fused.c); parameter "
                f"group {i}, parameter {j} (shape {tuple(p.shape)}) has a {t.device.type} {t.dtype} tensor"
                f"{'' if t.is_contiguous() else ' that is not contiguous'}: use foreach=True."
            )


# ---------------------------------------------------------------------------------------- the step


def _previous_gradient(opt, p: Tensor, group: dict, g_prev_exact: dict[Tensor, Tensor]) -> Tensor | None:
    """g_prev of the correction: ∇f(x_{t−1}, ξ_t) (exact) or g_{t−1} (approx); None means zero."""
    if group["exact"]:
        return g_prev_exact.get(p)
    return opt.state[p].get("g_prev")  # no state yet: the first step, g_prev = 0


def first_pass(opt, i: int, group: dict, g_prev_exact: dict[Tensor, Tensor]) -> dict[Tensor, float]:
    """Pass 1 of every tensor of a fused group: ``S = Σ c²`` (``Σ g²`` off the MARS path).

    Called by ``MARS.step`` before any group is updated. A non-finite ``S`` means a NaN/inf gradient
    (or, rarely, a float32 overflow of the sum): the readable path's per-tensor check then names the
    tensor and raises; if it finds nothing, ``S`` is recomputed in float64.
    """
    from .optimizer import _on_mars_path

    lib, _ = library()
    threads = torch.get_num_threads()
    s = correction_scale(group["gamma"], group["betas"][0])
    sums: dict[Tensor, float] = {}
    for j, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        state = opt.state[p]
        if _on_mars_path(p, group) and group["clip"] != "none":
            gp, scale = _previous_gradient(opt, p, group, g_prev_exact), s
        else:  # no norm needed: Σ g² is the finite check (g_prev was checked when it was a gradient)
            gp, scale = None, 0.0
        if p.grad.is_sparse:
            opt._check_group_gradients(i, group, None, "")  # raises the readable path's error
        _check_tensors(i, j, p, [p.grad, gp, state.get("m"), state.get("v"), state.get("x_prev")])
        total = lib.mars_sumsq(_ptr(p.grad), _ptr(gp), scale, p.numel(), threads)
        if not math.isfinite(total):
            opt._check_group_gradients(i, group, None, "")
            opt._check_group_gradients(i, group, g_prev_exact, " at the previous point (exact mode)")
            g = p.grad.double()
            c = g + scale * (g - (0.0 if gp is None else gp.double()))
            total = float(torch.linalg.vector_norm(c) ** 2)
        sums[p] = total
    return sums


def step_group(opt, group: dict, g_prev_exact: dict[Tensor, Tensor], sums: dict[Tensor, float]) -> None:
    """Pass 2 for one parameter group: the same result as ``opt._step_group(group, …)``."""
    lib, _ = library()
    threads = torch.get_num_threads()
    beta1, beta2 = group["betas"]
    exact = group["exact"]
    on_path, fallback = begin_step(opt, group)  # state, step counts, and which tensors take which path

    # 2. clip:  c_t ← c_t · min(1, τ/‖c_t‖)   (per tensor, over the group, or not at all)
    tau = group["max_norm"]
    if group["clip"] == "global":
        norm = math.sqrt(sum(sums[p] for p in on_path))
        clips = {p: tau / norm if norm > tau else 1.0 for p in on_path}
    elif group["clip"] == "tensor":
        norms = {p: math.sqrt(sums[p]) for p in on_path}
        clips = {p: tau / norms[p] if norms[p] > tau else 1.0 for p in on_path}
    else:
        clips = {p: 1.0 for p in on_path}

    s = correction_scale(group["gamma"], group["betas"][0])
    for p in on_path:
        state = opt.state[p]
        t = state["step"]
        gp = _previous_gradient(opt, p, group, g_prev_exact)
        x_prev = state["x_prev"] if exact else None
        store_g = 0 if exact else 1
        # 1–5 in one loop: c_t, clip, m_t (and v_t), u_t, x_{t+1}; then g_prev ← g_t or x_prev ← x_t
        if group["preconditioner"] == "lion":
            lib.mars_lion(_ptr(p), _ptr(p.grad), _ptr(gp), _ptr(x_prev), _ptr(state["m"]), p.numel(), store_g,
                          s, clips[p], beta1, group["lr"], group["weight_decay"], threads)
        else:
            lib.mars_adamw(_ptr(p), _ptr(p.grad), _ptr(gp), _ptr(x_prev), _ptr(state["m"]), _ptr(state["v"]),
                           p.numel(), store_g, s, clips[p], beta1, beta2, group["lr"], group["weight_decay"],
                           group["eps"], 1.0 - beta1**t, math.sqrt(1.0 - beta2**t), threads)

    # the AdamW fallback on the raw g_t: the same loop with s = 0, no clipping, no g_prev
    b1, b2 = group["betas_1d"]
    lr_1d = fallback_lr(group["lr"], group["lr_1d"], group["base_lr"])
    for p in fallback:
        state = opt.state[p]
        t = state["step"]
        x_prev = state["x_prev"] if exact else None
        lib.mars_adamw(_ptr(p), _ptr(p.grad), None, _ptr(x_prev), _ptr(state["m"]), _ptr(state["v"]), p.numel(),
                       0, 0.0, 1.0, b1, b2, lr_1d, group["weight_decay_1d"], group["eps"],
                       1.0 - b1**t, math.sqrt(1.0 - b2**t), threads)
