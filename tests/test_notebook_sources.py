"""The committed notebooks are built from notebooks/src/*.py and carry outputs."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)

SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_matches_its_source_and_was_executed(src):
    path = ROOT / "notebooks" / f"{src.stem}.ipynb"
    assert path.exists(), f"{path.name} missing: run `make notebooks`"
    committed = nbformat.read(path, as_version=4)
    built = run_notebooks.build(src)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{path.name} is out of step with notebooks/src/{src.name}: run `make notebooks`"
    )
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code), f"{path.name} has unexecuted cells: run `make notebooks`"


def test_percent_parser_splits_markdown_and_code():
    cells = run_notebooks.parse_percent('"""doc"""\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n')
    assert cells == [("markdown", "# Title\n\ntext"), ("code", "x = 1")]
