"""Plot training runs:  ``python -m mars_ref.plot RUN_DIR [RUN_DIR ...] [--out runs.png]``.

Reads each run's ``config.json`` and ``metrics.jsonl`` (written by ``mars_ref.train``) and
draws, runs overlaid, labelled by optimizer (and exact/approx, learning rate):

1. validation loss against training tokens;
2. validation loss against wall-clock seconds (training time, without the variance probe);
3. if any run logged variance measurements (``--variance-every``): the mean squared error
   to the held-out full gradient of the minibatch gradient ``g``, of the optimizer's
   momentum ``m`` and (MARS) of the corrected, clipped gradient ``c``, log scale;
4. and the scale-free version, ``1 − cos(estimate, ∇F)``, log scale.

See ``mars_ref.variance`` for exactly what each curve measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ESTIMATES = {"g": ("minibatch g", ":"), "c": ("corrected c", "--"), "m": ("momentum m", "-")}


def load_run(run_dir: str | Path) -> tuple[str, list[dict]]:
    """``(label, records)`` of one run directory."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a mars_ref.train run directory?")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a killed run
    label = run_dir.name
    config_path = run_dir / "config.json"
    if config_path.is_file():
        c = json.loads(config_path.read_text())
        label = f"{c['optimizer']}{' exact' if c.get('exact') else ''} lr={c['lr']:g} ({run_dir.name})"
    return label, records


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs in ``run_dirs`` into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    has_variance = any(r["kind"] == "variance" for _, records in runs for r in records)
    rows = 2 if has_variance else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, (label, records) in enumerate(runs):
        colour = colours[i % len(colours)]
        evals = [r for r in records if r["kind"] == "eval" and r.get("val_loss") is not None]
        axes[0, 0].plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                        color=colour, label=label)
        axes[0, 1].plot([r["time"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                        color=colour, label=label)
        if has_variance:
            probes = [r for r in records if r["kind"] == "variance"]
            for key, (name, style) in ESTIMATES.items():
                points = [(r["step"], r[f"mse_{key}"], r[f"cos_err_{key}"])
                          for r in probes if f"mse_{key}" in r]
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mars_ref.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default="runs.png", help="PNG file to write (default: runs.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
