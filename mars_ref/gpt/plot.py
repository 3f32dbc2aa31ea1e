"""Plot training runs:  ``python -m mars_ref.gpt.plot RUN_DIR [RUN_DIR ...] [--out runs.png]``.

Reads each run's ``config.json`` and ``metrics.jsonl`` (written by ``mars_ref.gpt.train``) and
draws, runs overlaid, labelled by optimizer (and exact/approx, learning rate):

1. validation loss against training tokens;
2. validation loss against wall-clock seconds (training time, without the variance probe);
3. if any run logged variance measurements (``--variance-every``): the mean squared error
   to the held-out full gradient of the minibatch gradient ``g``, of the optimizer's
   momentum ``m`` and (MARS) of the corrected, clipped gradient ``c``, log scale;
4. and the scale-free version, ``1 − cos(estimate, ∇F)``, log scale.

See ``mars_ref.course.variance`` for exactly what each curve measures.

A run that cannot be drawn (missing, no records, no evaluation, every validation loss NaN or
infinite) or an ``--out`` that cannot be written is an error: exit status 2, the reason on
stderr, no image. The image is written to a temporary file and renamed onto ``--out``, so an
existing image is only ever replaced by a complete one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .._io import write_atomic

ESTIMATES = {"g": ("minibatch g", ":"), "c": ("corrected c", "--"), "m": ("momentum m", "-")}


class PlotError(ValueError):
    """Runs that cannot be plotted, or an output that cannot be written; the message says which and why."""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_run(run_dir: str | Path) -> tuple[str, list[dict]]:
    """``(label, records)`` of one run directory.

    A missing directory or ``metrics.jsonl`` raises ``FileNotFoundError``, an unreadable one
    ``PlotError``. Lines that are not JSON objects are skipped (a killed run may leave a torn last
    line), with a note on stderr when any other line is skipped. An unreadable ``config.json``
    only costs the label (the directory name is used, with a note).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    hint = "give a directory written by python -m mars_ref.gpt.train (its --out-dir)"
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (metrics.jsonl not found): {hint}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is a file, not a run directory (metrics.jsonl not found): {hint}")
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a mars_ref.gpt.train run directory? ({hint})")
    try:
        lines = metrics.read_bytes().decode("utf-8").splitlines()
    except OSError as e:
        raise PlotError(f"{metrics} cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise PlotError(f"{metrics} is not UTF-8 text (byte {e.start}): the file is damaged") from None
    records, skipped = [], []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            skipped.append(i)
    if skipped and skipped != [len(lines)]:  # more than a torn last line
        print(f"note: {metrics}: skipped {len(skipped)} line(s) that are not JSON records "
              f"(line {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    label = run_dir.name
    config_path = run_dir / "config.json"
    if config_path.is_file():
        try:
            c = json.loads(config_path.read_text(encoding="utf-8"))
            label = f"{c['optimizer']}{' exact' if c.get('exact') else ''} lr={c['lr']:g} ({run_dir.name})"
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"note: {config_path} is unreadable or incomplete ({type(e).__name__}: {e}); the run is labelled "
                  f"by its directory name", file=sys.stderr)
    return label, records


def validation_points(records: list[dict]) -> list[dict]:
    """The evaluations that can be drawn: finite ``val_loss``, ``tokens`` and ``time``."""
    return [r for r in records if r.get("kind") == "eval"
            and all(_finite(r.get(k)) for k in ("val_loss", "tokens", "time"))]


def _nothing_to_plot(run_dir: Path, records: list[dict]) -> str | None:
    """Why a run has no validation loss to draw, or ``None`` if it has some."""
    if validation_points(records):
        return None
    metrics = run_dir / "metrics.jsonl"
    evals = [r for r in records if r.get("kind") == "eval"]
    if not records:
        return f"{metrics} holds no records: the run logged nothing (did it start?)"
    if not evals:
        return (f"{metrics} has {len(records)} record(s) but no evaluation (kind \"eval\"): nothing to plot; "
                "train with --eval-interval > 0")
    losses = [r.get("val_loss") for r in evals]
    if all(v is None for v in losses):
        return f"{metrics}: its {len(evals)} evaluation(s) have no val_loss: nothing to plot"
    return (f"{metrics}: all {len(evals)} validation losses are NaN, infinite or missing ({losses[:3]}"
            f"{' ...' if len(losses) > 3 else ''}): the run diverged or is damaged; nothing to plot")


def _output_format(out: Path, supported: dict) -> str:
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in supported:
        kinds = ", ".join(f".{k}" for k in sorted(supported))
        raise PlotError(f"--out {out}: unknown image format '.{fmt}': use one of {kinds}")
    if out.is_dir():
        raise PlotError(f"--out {out} is a directory: give a file name, for example {out / 'runs.png'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise PlotError(f"--out {out}: {parent} is a file, not a directory: choose another place")
    return fmt


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs in ``run_dirs`` into the PNG ``out``; returns its path.

    Raises ``FileNotFoundError`` for a missing run and ``PlotError`` for runs with nothing to
    draw (no records, no evaluations, every validation loss NaN) or an output that cannot be
    written, before anything is written. The image goes to a temporary file renamed onto ``out``:
    an existing ``out`` is replaced only by a complete image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d) for d in run_dirs]
    problems = [p for d, (_, records) in zip(run_dirs, runs, strict=True)
                if (p := _nothing_to_plot(d, records)) is not None]
    if problems:
        raise PlotError("\n".join(problems) + ("\nleave such runs out of the command" if len(runs) > 1 else ""))
    out = Path(out)
    has_variance = any(r.get("kind") == "variance" for _, records in runs for r in records)
    rows = 2 if has_variance else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    try:
        fmt = _output_format(out, fig.canvas.get_supported_filetypes())
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

        for i, (label, records) in enumerate(runs):
            colour = colours[i % len(colours)]
            evals = validation_points(records)
            axes[0, 0].plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                            color=colour, label=label)
            axes[0, 1].plot([r["time"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                            color=colour, label=label)
            if has_variance:
                probes = [r for r in records if r.get("kind") == "variance"]
                for key, (name, style) in ESTIMATES.items():
                    points = [(r["step"], r[f"mse_{key}"], r[f"cos_err_{key}"]) for r in probes
                              if all(_finite(r.get(k)) for k in ("step", f"mse_{key}", f"cos_err_{key}"))]
                    if not points:
                        continue
                    steps, mse, cos_err = zip(*points, strict=True)
                    axes[1, 0].plot(steps, mse, style, color=colour, label=f"{name}: {label}")
                    axes[1, 1].plot(steps, cos_err, style, color=colour, label=f"{name}: {label}")

        axes[0, 0].set(xlabel="training tokens", ylabel="validation loss", title="Validation loss vs tokens")
        axes[0, 1].set(xlabel="wall-clock seconds", ylabel="validation loss", title="Validation loss vs time")
        if has_variance:
            axes[1, 0].set(xlabel="step", ylabel="MSE to held-out ∇F (per coordinate)", yscale="log",
                           title="Error of the gradient estimates")
            axes[1, 1].set(xlabel="step", ylabel="1 − cos(estimate, ∇F)", yscale="log",
                           title="Scale-free error (direction only)")
        for ax in axes.flat:
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out, fmt)
    finally:
        plt.close(fig)
    return out


def _save(fig, out: Path, fmt: str) -> None:
    """``fig`` into ``out`` through a temporary file beside it, renamed once complete (``_io.write_atomic``)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda f: fig.savefig(f, format=fmt, dpi=110))
    except OSError as e:
        raise PlotError(f"cannot write --out {out} ({e.strerror or e}): choose a writable place"
                        f"{'' if not out.exists() else '; the existing file is unchanged'}") from e


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when the image is written, 2 (with the reason on stderr) when nothing is written."""
    parser = argparse.ArgumentParser(prog="python -m mars_ref.gpt.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default="runs.png", help="PNG file to write (default: runs.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.out)
    except (OSError, PlotError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
