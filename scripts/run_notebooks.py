"""Build the notebooks from their sources and execute them in place.

Each notebook is written as a plain Python file in ``notebooks/src/NN_name.py`` with
``# %%`` code cells and ``# %% [markdown]`` cells (the "percent" format), so that
reviews and diffs read like code. This script turns each source into
``notebooks/NN_name.ipynb`` and executes it top to bottom with the current Python
environment, so the committed outputs come from the same code CI runs.

    python scripts/run_notebooks.py            # all notebooks
    python scripts/run_notebooks.py 02 03      # only those whose name starts so (03 also selects 03b)
    python scripts/run_notebooks.py --no-exec  # rebuild cells only
    python scripts/run_notebooks.py --figures notebooks/figures   # `make figures`: export the key figures

``--figures DIR`` executes the notebooks with ``MARS_REF_FIGURES=DIR``, so that every ``style.save(fig, name)``
in them writes ``DIR/name.svg`` and ``DIR/name.png`` (150 dpi, 16:9), and leaves the committed notebooks as
they are.

The build puts :data:`SETUP_CELL` in front of each notebook's first code cell: written once here, it makes
``mars_ref`` importable in a kernel that does not have it, so the sources start with their own code.

A cell marker may carry tags, as in jupytext: ``# %% [markdown] tags=["slide"]`` or ``# %% tags=["slide", "notes"]``.
They go into the cell's ``metadata.tags``. ``slide`` marks a cell for the lecture decks and ``notes`` a cell of speaker
notes (``scripts/course.py slides``, ``make slides``); both stay ordinary cells in the notebook.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"
PATTERN = "[0-9][0-9]*_*.py"  # 01_name.py ... and 03b_name.py (taught between 03 and 04)

# The first code cell of every notebook, verbatim: without `make install` (a fresh Jupyter, a hosted service)
# mars_ref is not importable, and this installs the checkout the notebook sits in into the running kernel.
SETUP_CELL = """\
# Setup: make `mars_ref` importable. Nothing happens when it already is (after `make install` or
# `pip install -e .`); otherwise the checkout around this notebook is installed into this kernel's Python.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

spec = importlib.util.find_spec("mars_ref")
if spec is None or spec.origin is None:  # not installed (a mere folder named mars_ref is no package)
    here = Path.cwd().resolve()
    root = next((p for p in (here, *here.parents, here / "mars_ref") if (p / "mars_ref" / "pieces.py").is_file()),
                None)
    if root is None:
        raise ModuleNotFoundError("mars_ref is not installed and no mars_ref checkout is around this notebook: "
                                  "clone the repository and open the notebook from its notebooks/ folder "
                                  "(notebooks/README.md, 'Opening the notebooks')")
    print(f"mars_ref is not importable: installing the checkout {root} into {sys.executable} with pip ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", str(root)], check=True)
    sys.path.insert(0, str(root))  # new kernels see the editable install; this one needs the path now
    importlib.invalidate_caches()
    print("installed mars_ref and what it needs (torch, numpy, matplotlib, einops, tqdm)")
import mars_ref

print(f"mars_ref {mars_ref.__version__} from {os.path.relpath(Path(mars_ref.__file__).parent)}")"""


class Cell(NamedTuple):
    kind: str  # "code" or "markdown"
    source: str
    tags: tuple[str, ...] = ()


TAGS = re.compile(r"\btags=(\[[^\]]*\])")


def _marker(line: str) -> tuple[str, tuple[str, ...]]:
    """The kind and the tags of a ``# %%`` marker line."""
    kind = "markdown" if "[markdown]" in line else "code"
    found = TAGS.search(line)
    tags = tuple(json.loads(found.group(1))) if found else ()
    if not all(isinstance(tag, str) for tag in tags):
        raise ValueError(f"tags must be a JSON list of strings: {line!r}")
    return kind, tags


def parse_percent(text: str) -> list[Cell]:
    """Split a percent-format source into cells: kind 'code' or 'markdown', source, tags."""
    cells: list[tuple[str, tuple[str, ...], list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind, tags = _marker(line)
            cells.append((kind, tags, []))
            continue
        if not cells:  # a preamble before the first marker is ignored (e.g. a module docstring)
            continue
        kind, _, lines = cells[-1]
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else ("" if line == "#" else line)
        lines.append(line)
    out = []
    for kind, tags, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        out.append(Cell(kind, "\n".join(lines), tags))
    return out


def build(src: Path) -> nbformat.NotebookNode:
    """The notebook of a source: its cells, with :data:`SETUP_CELL` in front of the first code cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = parse_percent(src.read_text())
    first_code = next((i for i, c in enumerate(cells) if c.kind == "code"), len(cells))
    cells.insert(first_code, Cell("code", SETUP_CELL))
    for kind, source, tags in cells:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
        cell["id"] = f"{src.stem.split('_')[0]}-{i:03d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 900) -> None:
    from nbclient import NotebookClient

    # store_widget_state=False: the sliders of a notebook are live only in a frontend; their state is not output
    NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(cwd)}}).execute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="name prefixes to build (default: all)")
    parser.add_argument("--no-exec", action="store_true", help="build cells without executing")
    parser.add_argument("--figures", metavar="DIR", help="export the key figures (SVG + PNG) into DIR; the "
                        "notebooks are executed but not written")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.figures:
        if args.no_exec:
            parser.error("--figures executes the notebooks: it cannot go with --no-exec")
        figures = Path(args.figures).resolve()
        figures.mkdir(parents=True, exist_ok=True)
        os.environ["MARS_REF_FIGURES"] = str(figures)  # the kernels inherit it: style.save() writes there
    sources = sorted(SRC.glob(PATTERN))
    if args.only:
        sources = [s for s in sources if any(s.name.startswith(p) for p in args.only)]
    for src in sources:
        nb = build(src)
        start = time.time()
        if not args.no_exec:
            execute(nb, OUT)
        if args.figures:
            print(f"{src.stem}: figures exported, {time.time() - start:.1f} s")
            continue
        nbformat.write(nb, OUT / f"{src.stem}.ipynb")
        print(f"{src.stem}.ipynb: {len(nb.cells)} cells, {time.time() - start:.1f} s")
    if args.figures:
        files = sorted(Path(os.environ["MARS_REF_FIGURES"]).glob("*.png"))
        print(f"{len(files)} figures in {os.environ['MARS_REF_FIGURES']} (each as .svg and .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
