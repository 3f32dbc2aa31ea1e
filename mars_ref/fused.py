r"""The fused MARS step on CPU: ``MARS(..., fused=True)``, one C loop per tensor and pass.

The readable step (:mod:`mars_ref.readable`) and the foreach step (:mod:`mars_ref.foreach`) run
the chain

    correction → clip → momentum → precondition → decay + step

as one torch kernel per link, so every link reads and writes whole tensors: about 18 passes over
memory per step. ``fused.c`` (next to this file) computes the whole chain of one element in
registers, in two passes per tensor:

    pass 1   S = Σ c²,  c = g + s·(g − g_prev)       the clipping norm √S (and the finite check)
    pass 2   c·clip → m → v → u → x, and g_prev ← g  (approx) or x_prev ← x (exact)

These are the two functions every implementation has, with one signature: :func:`correction_norms`
(pass 1, which the optimizer runs for every group before any pass 2: a NaN or inf gradient makes its
``S`` non-finite and the step stops before anything is changed, naming the tensor) and :func:`step`.

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

from ._io import cache_dir

SOURCE = Path(__file__).with_name("fused.c")
#: compiler flags, best first: the first set that compiles is used
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas"],
)
PRECONDITIONERS = ("adamw", "lion")  # and the AdamW fallback


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
    lib.mars_adamw.argtypes = [P, P, P, P, P, P, I64] + [F] * 9 + [INT]
    lib.mars_adamw.restype = None
    lib.mars_lion.argtypes = [P, P, P, P, P, I64] + [F] * 5 + [INT]
    lib.mars_lion.restype = None


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------- checks


def check_tensors(lists) -> None:
    """Refuse tensors the C loops cannot read: every parameter, gradient and state tensor must be a
    contiguous float32 CPU tensor of its parameter's size (the kernel trusts ``numel``)."""
    for i, p in enumerate(lists.params):
        for key, x in (("parameter", p), ("gradient", lists.grads[i]), ("g_prev", lists.g_prevs[i]),
                       ("m", lists.ms[i]), ("v", lists.vs[i]), ("x_prev", lists.x_prevs[i])):
            if x is None:
                continue
            if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or x.shape != p.shape:
                raise RuntimeError(
                    f"MARS(fused=True) runs a CPU float32 kernel on contiguous tensors (mars_ref/fused.c); "
                    f"{lists.names[i]} (shape {tuple(p.shape)}) has a {key} that is a {x.device.type} {x.dtype} "
                    f"tensor of shape {tuple(x.shape)}{'' if x.is_contiguous() else ', not contiguous'}: "
                    "use foreach=True."
                )


# ---------------------------------------------------------------------------------------- the step


def correction_norms(lists, k: float) -> list[Tensor]:
    """Pass 1 (``mars_sumsq``): ``‖c_t‖`` of each tensor on the MARS path, ``‖g_t‖`` of each fallback tensor,
    as float64 0-d tensors (the C loop sums in float within blocks and in double across them)."""
    lib, _ = library()
    threads = torch.get_num_threads()
    norms = []
    for g, gp, branch in zip(lists.grads, lists.g_prevs, lists.branches, strict=True):
        # Σ c², c = g + k·(g − g_prev): g_prev = NULL is zero; the fallback has no correction (k = 0)
        k_ = 0.0 if branch == "fallback" else k
        total = lib.mars_sumsq(_ptr(g), _ptr(None if branch == "fallback" else gp), k_, g.numel(), threads)
        norms.append(math.sqrt(total) if total >= 0 else math.nan)
    return list(torch.tensor(norms, dtype=torch.float64).unbind())


def step(lists, h, clip: list[Tensor | None]) -> None:
    """Pass 2 (``mars_adamw`` / ``mars_lion``): correction, clip, m_t (and v_t), u_t, x_{t+1}, then
    g_prev ← g_t (approx) or x_prev ← x_t (exact), one loop per tensor."""
    lib, _ = library()
    threads = torch.get_num_threads()
    given = [f for f in clip if f is not None]  # None: not clipped
    values = iter(torch.stack(given).tolist() if given else [])  # one host list, not one .item() per tensor
    clip = [1.0 if f is None else next(values) for f in clip]
    lr, lr_1d = float(h.lr), float(h.fallback_lr)  # CPU only: reading a tensor lr costs no device wait
    for i, x in enumerate(lists.params):
        g, gp, m, v, x_prev, n = lists.grads[i], lists.g_prevs[i], lists.ms[i], lists.vs[i], lists.x_prevs[i], \
            x.numel()
        t = lists.steps[i]
        bc1, sqrt_bc2 = 1.0 - h.beta1 ** t, math.sqrt(1.0 - h.beta2 ** t)
        if lists.branches[i] == "lion":
            lib.mars_lion(_ptr(x), _ptr(g), _ptr(gp), _ptr(x_prev), _ptr(m), n, h.k, clip[i],
                          h.beta1, lr, h.weight_decay, threads)
        elif lists.branches[i] == "adamw":
            lib.mars_adamw(_ptr(x), _ptr(g), _ptr(gp), _ptr(x_prev), _ptr(m), _ptr(v), n, h.k,
                           clip[i], h.beta1, h.beta2, lr, h.weight_decay, h.eps, bc1, sqrt_bc2, threads)
        else:  # the AdamW fallback on the raw g_t: the same loop with k = 0, no clip, no g_prev
            b1, b2 = h.beta1_1d, h.beta2_1d
            lib.mars_adamw(_ptr(x), _ptr(g), None, _ptr(x_prev), _ptr(m), _ptr(v), n, 0.0, 1.0, b1, b2, lr_1d,
                           h.weight_decay_1d, h.eps, 1.0 - b1 ** t, math.sqrt(1.0 - b2 ** t), threads)
