"""One plotting style for the notebooks: readable on a slide, distinct in colour and in grey, exportable.

    from mars_ref.course import style
    style.use()                                   # fonts of 12 pt and more, a colour-blind-safe cycle
    fig, ax = style.figure()                      # a 16:9 figure, the shape of a slide (or style.figure(1, 2))
    ax.plot(x, y, **style.line("SGD"))            # one colour, line style and marker per method, in every notebook
    style.save(fig, "02_estimator_error")         # SVG + 150-dpi PNG into $MARS_REF_FIGURES, if that is set

Colours are the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies); every
method also has its own line style and marker, so a figure still reads printed in grey. ``save`` writes
nothing unless the environment variable ``MARS_REF_FIGURES`` names a directory (``make figures`` sets it
to ``notebooks/figures``), so a notebook runs the same with and without it and prints nothing either way.
Once :func:`use` has applied the style, it refuses a figure with text below :data:`MIN_FONT` points (a
tick label, a legend, an annotation set smaller by hand), exported or not, so the promise of 12 pt and
more holds for every figure of the notebooks.

Error bars and bands, in every figure of the course: the mean over seeds ± the half-width of its 95%
Student-t interval (``mars_ref.course.toys.t_interval``), named so in the caption.
"""

from __future__ import annotations

import os
from pathlib import Path

# Okabe & Ito (2008), "Color universal design": eight colours that stay apart for most colour-blind readers.
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
GREY = "#7F7F7F"  # references only (a zero line, a prediction), never a method
CYCLE = (BLUE, VERMILION, GREEN, ORANGE, PURPLE, SKY, BLACK)
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)))

SLIDE = (11.0, 6.1875)  # inches, 16:9: full width of a slide at the fonts below
MIN_FONT = 12.0         # points: the smallest text a figure may carry (style.save refuses smaller)
DPI = 150               # exported figures (style.save)
SCREEN_DPI = 110        # figures shown in a notebook: 1210 px wide, more than a notebook column shows

# The same method gets the same look in every notebook.
METHODS: dict[str, dict] = {
    "SGD": dict(color=BLUE, ls="-", marker="o"),
    "SGD, 2B": dict(color=SKY, ls=":", marker="o"),
    "momentum": dict(color=ORANGE, ls="--", marker="s"),
    "exact STORM": dict(color=GREEN, ls="-", marker="^"),
    "approx STORM": dict(color=VERMILION, ls="none", marker="x"),
    "MARS exact": dict(color=GREEN, ls="-", marker="^"),
    "MARS approx": dict(color=VERMILION, ls="-.", marker="v"),
    "MARS gamma=0": dict(color=PURPLE, ls=":", marker="d"),
    "AdamW": dict(color=BLACK, ls="-", marker="o"),
    "Lion": dict(color=PURPLE, ls="--", marker="s"),
    "Muon": dict(color=SKY, ls="-.", marker="D"),
    "MARS-AdamW": dict(color=VERMILION, ls="-", marker="v"),
    "MARS-AdamW exact": dict(color=GREEN, ls="--", marker="^"),
    "MARS-Lion": dict(color=PURPLE, ls="-.", marker="s"),
    "MARS-Shampoo": dict(color=BLUE, ls=":", marker="D"),
    "MARS-M": dict(color=ORANGE, ls=(0, (5, 1, 1, 1)), marker="P"),
}


def rc() -> dict:
    """The rcParams of the style (also usable as ``matplotlib.rc_context(style.rc())``)."""
    from cycler import cycler

    return {
        "figure.figsize": SLIDE, "figure.dpi": SCREEN_DPI, "savefig.dpi": DPI, "figure.constrained_layout.use": True,
        "font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13, "legend.fontsize": 12,
        "xtick.labelsize": 12, "ytick.labelsize": 12, "figure.titlesize": 15, "legend.title_fontsize": 12,
        "lines.linewidth": 2.0, "lines.markersize": 7, "axes.grid": True, "grid.alpha": 0.3,
        "axes.prop_cycle": cycler(color=list(CYCLE)) + cycler(linestyle=list(LINESTYLES)),
        "legend.framealpha": 0.92, "axes.spines.top": False, "axes.spines.right": False,
        "svg.hashsalt": "mars_ref", "svg.fonttype": "path", "image.cmap": "viridis",
    }


def use() -> None:
    """Apply the style to every later figure of this process (a notebook calls it once, at the top)."""
    import matplotlib as mpl

    global _IN_USE
    mpl.rcParams.update(rc())
    _IN_USE = True


_IN_USE = False  # set by use(): from then on save() holds figures to MIN_FONT


def figure(nrows: int = 1, ncols: int = 1, height: float = 1.0, **kwargs):
    """``plt.subplots`` at slide size (16:9; ``height`` scales the height, e.g. 0.7 for a short strip)."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(SLIDE[0], SLIDE[1] * height), **kwargs)


def line(name: str, every: int | float | None = None, **overrides) -> dict:
    """Keyword arguments for ``ax.plot`` that draw method ``name`` in its own colour, style and marker.

    ``every``: put a marker on every ``every``-th point (``markevery``); without it the line has no
    markers (long curves) unless the method is drawn with markers only (``approx STORM``)."""
    look = dict(METHODS[name])
    if every is not None:
        look["markevery"] = every
    elif look["ls"] != "none":
        look["marker"] = None
    look["label"] = name
    look.update(overrides)
    return look


def log_limits(*arrays, pad: float = 1.6) -> tuple[float, float]:
    """Limits of a log axis that just holds the finite, positive values of ``arrays`` (padded by a factor)."""
    import torch

    values = torch.cat([torch.as_tensor(a, dtype=torch.float64).flatten() for a in arrays])
    values = values[torch.isfinite(values) & (values > 0)]
    return values.min().item() / pad, values.max().item() * pad


def small_text(fig) -> list[str]:
    """The visible texts of ``fig`` smaller than :data:`MIN_FONT` points, each as ``'text' (size pt)``."""
    from matplotlib.text import Text

    return [f"{t.get_text()[:40]!r} ({t.get_fontsize():g} pt)" for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT - 1e-9]


def target_dir() -> Path | None:
    """Where :func:`save` writes: ``$MARS_REF_FIGURES``, or ``None`` (the default: nowhere)."""
    value = os.environ.get("MARS_REF_FIGURES", "").strip()
    return Path(value) if value else None


def save(fig, name: str) -> list[Path]:
    """Write ``fig`` as ``name.svg`` and ``name.png`` (150 dpi) into :func:`target_dir`, if it is set.

    Returns the files written (none by default). The SVG carries no date, so the same figure gives the
    same file on every run. After :func:`use`, raises ``ValueError`` naming any text below :data:`MIN_FONT`
    points."""
    small = small_text(fig) if _IN_USE else []
    if small:
        raise ValueError(f"figure {name!r} has text below {MIN_FONT:g} pt: " + ", ".join(small[:5]))
    where = target_dir()
    if where is None:
        return []
    import matplotlib as mpl

    where.mkdir(parents=True, exist_ok=True)
    paths = [where / f"{name}.svg", where / f"{name}.png"]
    with mpl.rc_context({"svg.hashsalt": "mars_ref"}):  # the SVG's element ids, fixed
        fig.savefig(paths[0], format="svg", metadata={"Date": None})
    fig.savefig(paths[1], format="png", dpi=DPI, metadata={"Software": None})
    return paths
