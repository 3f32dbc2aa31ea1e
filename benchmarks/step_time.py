"""Time one optimizer step on GPT-2 small's parameter set, as ratios measured side by side.

    python benchmarks/step_time.py                 # GPT-2 small: 124.5M parameters, 148 tensors
    python benchmarks/step_time.py --small         # a quick smoke run on a tiny parameter set
    python benchmarks/step_time.py --baseline DIR  # also time the MARS of another checkout (before/after)
    python benchmarks/step_time.py --device cuda   # on the GPU (each step timed between two torch.cuda.synchronize())

The parameters are built from GPT-2 small's shapes (nanoGPT layout, GPT-2's own biases: the 148
tensors are wte 50304×768, tied with the head, so no separate lm_head; wpe 1024×768; per layer
ln_1, ln_2 weight and bias 768; attn c_attn 2304×768 + bias, c_proj 768×768 + bias; mlp c_fc
3072×768 + bias, c_proj 768×3072 + bias; ln_f weight and bias. With ``bias=False`` the same model
has 75 tensors and 124.4M parameters). Gradients are random and fixed. All optimizers step the
same parameter tensors (each keeps its own state), one step each in turn, round-robin, so that a
change of machine load hits all of them alike; the table shows medians over ``--repeats`` rounds
after ``--warmup`` rounds, and each time as a multiple of fused AdamW's median.

MARS-Shampoo spends its step in Newton–Schulz (matrix products, seconds per step on CPU), not in
the elementwise work: its two rows are timed in a separate round-robin with at most 2 repeats.

Two more rows measure what the bytes alone cost (``benchmarks/traffic.c``, compiled like
``mars_ref/fused.c``): a loop that reads and writes exactly the arrays of fused AdamW (7 float
arrays per parameter) and one that moves those of fused MARS-AdamW (11: a first pass reading g and
g_prev for the clipping norm, then 5 reads and 4 writes). Their ratio is the floor of "MARS-AdamW
step / AdamW step" on this machine when both are limited by memory bandwidth.

``--baseline DIR`` loads ``DIR/mars_ref`` (another checkout of this repository, e.g. a
``git worktree`` of an older commit) as a second package and adds its readable, foreach and fused
MARS-AdamW rows, interleaved with the others, with per-round ratios "this checkout / baseline".

``--device cuda`` puts the parameters and gradients on the GPU and synchronises before and after each timed step
(CUDA launches are asynchronous); the rows that run C loops on CPU memory (MARS ``fused=True``, the two
memory-traffic rows) are left out there, and ratios are to torch's fused AdamW on the GPU.

``pytorch-optimizer`` (PyPI) is not a dependency of mars_ref: install it for its row
(``pip install pytorch-optimizer``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from mars_ref import fused
from mars_ref.optimizer import MARS

TRAFFIC_C = Path(__file__).with_name("traffic.c")


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50304, block: int = 1024) -> list[tuple]:
    shapes: list[tuple] = [(vocab, n_embd), (block, n_embd)]  # wte (tied with lm_head), wpe
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,)]  # ln_1 weight, bias
        shapes += [(3 * n_embd, n_embd), (3 * n_embd,)]  # attn.c_attn
        shapes += [(n_embd, n_embd), (n_embd,)]  # attn.c_proj
        shapes += [(n_embd,), (n_embd,)]  # ln_2 weight, bias
        shapes += [(4 * n_embd, n_embd), (4 * n_embd,)]  # mlp.c_fc
        shapes += [(n_embd, 4 * n_embd), (n_embd,)]  # mlp.c_proj
    shapes += [(n_embd,), (n_embd,)]  # ln_f weight, bias
    return shapes


def state_bytes_per_param(opt: torch.optim.Optimizer, n_params: int) -> float:
    """Bytes of the optimizer's state tensors (scalar step counters excluded) per parameter."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total / n_params


def optimizers(params) -> list[tuple[str, object]]:
    """(row name, factory) pairs; a factory returns an optimizer, or raises ImportError."""
    def pytorch_optimizer_mars(**kw):
        from pytorch_optimizer import MARS as PyOptMARS  # noqa: N811

        return PyOptMARS(params, lr=3e-3, **kw)

    return [
        ("torch AdamW fused", lambda: torch.optim.AdamW(params, lr=6e-4, fused=True)),
        ("torch AdamW foreach", lambda: torch.optim.AdamW(params, lr=6e-4, foreach=True)),
        ("MARS-AdamW readable", lambda: MARS(params, lr=3e-3)),
        ("MARS-AdamW foreach", lambda: MARS(params, lr=3e-3, foreach=True)),
        ("MARS-AdamW fused", lambda: MARS(params, lr=3e-3, fused=True)),
        ("MARS-Lion readable", lambda: MARS(params, lr=1e-4, preconditioner="lion")),
        ("MARS-Lion foreach", lambda: MARS(params, lr=1e-4, preconditioner="lion", foreach=True)),
        ("MARS-Lion fused", lambda: MARS(params, lr=1e-4, preconditioner="lion", fused=True)),
        ("pytorch-optimizer MARS", lambda: pytorch_optimizer_mars()),
        ("pytorch-optimizer MARS foreach", lambda: pytorch_optimizer_mars(foreach=True)),
        (TRAFFIC_ADAMW, lambda: Traffic(params, 7)),
        (TRAFFIC_MARS, lambda: Traffic(params, 11)),
    ]


TRAFFIC_ADAMW = "memory traffic only: AdamW's 7 arrays"
TRAFFIC_MARS = "memory traffic only: MARS-AdamW's 11 arrays"


def cpu_only(name: str) -> bool:
    """Rows whose step is a C loop over CPU memory (mars_ref/fused.c, traffic.c): not timed on CUDA."""
    return name.endswith("fused") and "MARS" in name or name in (TRAFFIC_ADAMW, TRAFFIC_MARS)

#: (row, reference row, the target set for it): printed as per-round ratios after the table
TARGETS = [
    ("MARS-AdamW fused", "torch AdamW fused", "   target ≤ 1.5"),
    (TRAFFIC_MARS, TRAFFIC_ADAMW, "   the bandwidth floor of the line above"),
    ("MARS-AdamW fused", TRAFFIC_MARS, "   how far above its own bytes' cost"),
    ("torch AdamW fused", TRAFFIC_ADAMW, "   the same for fused AdamW"),
    ("MARS-Lion fused", "torch AdamW fused", ""),
    ("MARS-AdamW readable", "pytorch-optimizer MARS", "   target ≤ 1"),
]


def baseline_optimizers(params, checkout: Path) -> list[tuple[str, object]]:
    """The MARS-AdamW rows of another checkout's ``mars_ref``, imported under the name ``mars_baseline``."""
    init = checkout / "mars_ref" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {checkout}: no mars_ref/__init__.py there (give a checkout of this repository)")
    spec = importlib.util.spec_from_file_location("mars_baseline", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mars_baseline"] = module
    spec.loader.exec_module(module)
    Baseline = module.MARS  # noqa: N806
    return [
        ("baseline MARS-AdamW readable", lambda: Baseline(params, lr=3e-3)),
        ("baseline MARS-AdamW foreach", lambda: Baseline(params, lr=3e-3, foreach=True)),
        ("baseline MARS-AdamW fused", lambda: Baseline(params, lr=3e-3, fused=True)),
    ]


BASELINE_TARGETS = [(f"MARS-AdamW {impl}", f"baseline MARS-AdamW {impl}", "   this checkout / baseline")
                    for impl in ("readable", "foreach", "fused")]


class Traffic:
    """A pseudo-optimizer whose ``step`` moves an optimizer's arrays through memory and does nothing else."""

    def __init__(self, params, arrays: int):
        self.lib, _ = fused.build(TRAFFIC_C)
        P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.traffic_adamw.argtypes = [P, P, P, P, I64, INT]
        self.lib.traffic_mars.argtypes = [P, P, P, P, P, I64, INT]
        self.lib.traffic_mars.restype = ctypes.c_float
        self.params, self.arrays = params, arrays
        # its own x (it writes x) and state; the gradients are the shared ones
        names = ["x", "m", "v"] + (["g_prev"] if arrays == 11 else [])
        self.buffers = {p: {k: p.detach().clone() if k == "x" else torch.zeros_like(p) for k in names} for p in params}
        self.state: dict = {}  # nothing to report as optimizer state

    def step(self):
        threads = torch.get_num_threads()
        for p in self.params:
            b = self.buffers[p]
            if self.arrays == 7:
                self.lib.traffic_adamw(b["x"].data_ptr(), p.grad.data_ptr(), b["m"].data_ptr(), b["v"].data_ptr(),
                                       p.numel(), threads)
            else:
                self.lib.traffic_mars(b["x"].data_ptr(), p.grad.data_ptr(), b["g_prev"].data_ptr(),
                                      b["m"].data_ptr(), b["v"].data_ptr(), p.numel(), threads)


def shampoo_optimizers(params):
    return [
        ("MARS-Shampoo readable", lambda: MARS(params, lr=3e-3, preconditioner="shampoo")),
        ("MARS-Shampoo foreach", lambda: MARS(params, lr=3e-3, preconditioner="shampoo", foreach=True)),
    ]


def round_robin(rows, warmup: int, repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Step every optimizer once per round, in turn; return the step times (s) after warm-up. On CUDA each step is
    timed from a synchronised device to a synchronised device."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for r in range(warmup + repeats):
        for name, opt in rows:
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (state allocation, caches)")
    ap.add_argument("--small", action="store_true", help="a tiny parameter set (2 layers × 64, vocab 512)")
    ap.add_argument("--no-shampoo", action="store_true", help="skip the two MARS-Shampoo rows")
    ap.add_argument("--baseline", type=Path, help="another checkout whose MARS-AdamW rows to time beside these")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the parameters live and the steps run (default cpu)")
    ap.add_argument("--rows", help="time only the rows whose name matches this regular expression (each row keeps "
                                   "its own state: ~1-2 GB on GPT-2 small; fused AdamW, the reference, is kept)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: CUDA is not available here (torch {torch.__version__})")

    torch.manual_seed(0)
    shapes = gpt2_shapes(2, 64, 512, 128) if args.small else gpt2_shapes()
    params = [torch.nn.Parameter(torch.randn(s).to(args.device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    where = (f"CUDA ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if args.device == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"parameter set: {'small' if args.small else 'GPT-2 small'}, {len(params)} tensors, "
          f"{n / 1e6:.2f}M parameters, float32, {where}, torch {torch.__version__}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")

    def build(pairs):
        rows = []
        for name, factory in pairs:
            try:
                rows.append((name, factory()))
            except (ImportError, TypeError) as e:
                print(f"skipped {name}: {type(e).__name__}: {e}")
        return rows

    pairs = optimizers(params)
    if args.baseline:
        pairs += baseline_optimizers(params, args.baseline)
    if args.rows:
        pairs = [(name, f) for name, f in pairs if name == "torch AdamW fused" or re.search(args.rows, name)]
    if args.device == "cuda":
        for name, _ in pairs:
            if cpu_only(name):
                print(f"skipped {name}: a C loop over CPU memory")
        pairs = [(name, f) for name, f in pairs if not cpu_only(name)]
    rows = build(pairs)
    times = round_robin(rows, args.warmup, args.repeats, args.device)
    if not args.no_shampoo:
        shampoo_rows = build(shampoo_optimizers(params))
        times.update(round_robin(shampoo_rows, min(args.warmup, 1), min(args.repeats, 2), args.device))
        rows += shampoo_rows
    if load:
        after = os.getloadavg()
        print(f"load average after:  {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")

    ref = statistics.median(times["torch AdamW fused"])
    print()
    print("| optimizer step | ms (median) | min–max ms | × fused AdamW | state bytes/param |")
    print("|---|---|---|---|---|")
    for name, opt in rows:
        ts = times[name]
        med = statistics.median(ts)
        state = "–" if isinstance(opt, Traffic) else f"{state_bytes_per_param(opt, n):.2f}"
        print(f"| {name} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f} | {med / ref:.2f} | {state} |")
    print("\nthe targets, as ratios within each round (the optimizers of one round ran back to back, "
          "under the same load):")
    for name, base, target in TARGETS + (BASELINE_TARGETS if args.baseline else []):
        if name in times and base in times:
            ratios = [x / y for x, y in zip(times[name], times[base], strict=True)]
            wins = sum(r <= 1.0 for r in ratios)
            print(f"  {name} / {base}: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max "
                  f"{max(ratios):.2f}; ≤ 1 in {wins} of {len(ratios)} rounds){target}")
    print(f"\n{args.repeats} timed rounds after {args.warmup} warm-up rounds (Shampoo rows: "
          f"{min(args.repeats, 2)} after {min(args.warmup, 1)}), optimizers interleaved round-robin.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
