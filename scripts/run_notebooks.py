"""Build the notebooks from their sources and execute them in place.

Each notebook is written as a plain Python file in ``notebooks/src/NN_name.py`` with
``# %%`` code cells and ``# %% [markdown]`` cells (the "percent" format), so that
reviews and diffs read like code. This script turns each source into
``notebooks/NN_name.ipynb`` and executes it top to bottom with the current Python
environment, so the committed outputs come from the same code CI runs.

    python scripts/run_notebooks.py            # all notebooks
    python scripts/run_notebooks.py 02 03      # only those whose name starts so
    python scripts/run_notebooks.py --no-exec  # rebuild cells only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"


def parse_percent(text: str) -> list[tuple[str, str]]:
    """Split a percent-format source into (kind, source) cells, kind 'code' or 'markdown'."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
            continue
        if not cells:  # a preamble before the first marker is ignored (e.g. a module docstring)
            continue
        kind, lines = cells[-1]
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else ("" if line == "#" else line)
        lines.append(line)
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        out.append((kind, "\n".join(lines)))
    return out


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in parse_percent(src.read_text()):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
        cell["id"] = f"{src.stem[:2]}-{i:03d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 900) -> None:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="name prefixes to build (default: all)")
    parser.add_argument("--no-exec", action="store_true", help="build cells without executing")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if args.only:
        sources = [s for s in sources if any(s.name.startswith(p) for p in args.only)]
    for src in sources:
        nb = build(src)
        start = time.time()
        if not args.no_exec:
            execute(nb, OUT)
        nbformat.write(nb, OUT / f"{src.stem}.ipynb")
        print(f"{src.stem}.ipynb: {len(nb.cells)} cells, {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
