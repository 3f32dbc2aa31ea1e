"""The committed notebooks are built from notebooks/src/*.py and carry outputs; every notebook starts its code
with the setup cell the build puts in and checks every exercise it asks for."""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

from mars_ref.course import exercises

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)

SOURCES = sorted((ROOT / "notebooks" / "src").glob(run_notebooks.PATTERN))
IDS = [s.stem for s in SOURCES]


def test_every_notebook_is_found():
    names = [s.stem.split("_")[0] for s in SOURCES]
    assert names == ["01", "02", "02b", "03", "03b", "04", "05", "06", "07"], names


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_notebook_matches_its_source_and_was_executed(src):
    path = ROOT / "notebooks" / f"{src.stem}.ipynb"
    assert path.exists(), f"{path.name} missing: run `make notebooks`"
    committed = nbformat.read(path, as_version=4)
    built = run_notebooks.build(src)
    def cells(nb):
        return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]

    assert cells(committed) == cells(built), (
        f"{path.name} is out of step with notebooks/src/{src.name}: run `make notebooks`"
    )
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code), f"{path.name} has unexecuted cells: run `make notebooks`"


def test_exercises_are_cells_with_checks():
    asked = {}
    for src in SOURCES:
        text = src.read_text()
        for exercise in re.findall(r'^check\("([0-9]+b?\.[0-9])", (\w+)\)$', text, re.M):
            asked[exercise[0]] = (src.name, exercise[1])
            assert f"def {exercise[1]}(" in text, f"{src.name}: no cell defines {exercise[1]}"
            assert f"# NBVAL_CHECK_OUTPUT\ncheck({exercise[0]!r}".replace("'", '"') in text
    assert sorted(asked) == sorted(exercises.EXERCISES), f"checked in notebooks: {sorted(asked)}"
    for exercise, (name, function) in asked.items():
        assert exercises.EXERCISES[exercise].name == function, (name, exercise, function)
        assert name.startswith(exercise.split(".")[0] + "_"), f"exercise {exercise} is in {name}"


def test_notation_table_has_one_meaning_per_symbol():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    table = readme.split("## Notation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| symbol")]
    symbols = [s for row in rows for s in re.findall(r"\$[^$]+\$|`[^`]+`", row.split("|")[1])]
    assert len(rows) > 30
    assert len(symbols) == len(set(symbols)), sorted(s for s in symbols if symbols.count(s) > 1)


def test_readme_lists_every_notebook_and_the_bibliography():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for src in SOURCES:
        assert f"({src.stem}.ipynb)" in readme, f"notebooks/README.md does not link {src.stem}"
    for link in ("arxiv.org/abs/2411.10438", "arxiv.org/abs/1905.10018", "arxiv.org/abs/1703.00102",
                 "arxiv.org/abs/1807.01695", "arxiv.org/abs/1802.09568", "arxiv.org/abs/2302.06675",
                 "kellerjordan.github.io/posts/muon", "arxiv.org/abs/1711.05101", "proceedings.neurips.cc"):
        assert link in readme, f"the bibliography lacks {link}"


def test_percent_parser_splits_markdown_and_code():
    cells = run_notebooks.parse_percent('"""doc"""\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n')
    assert cells == [("markdown", "# Title\n\ntext", ()), ("code", "x = 1", ())]


def test_percent_parser_reads_cell_tags():
    text = '# %% [markdown] tags=["slide"]\n# $x_t$\n# %% tags=["slide", "notes"]\nplot()\n# %%\ny = 2\n'
    assert [c.tags for c in run_notebooks.parse_percent(text)] == [("slide",), ("slide", "notes"), ()]
    with pytest.raises(ValueError):
        run_notebooks.parse_percent("# %% tags=[1]\nx = 1\n")


def test_build_puts_the_setup_cell_before_the_first_code_cell(tmp_path):
    """A fresh kernel gets mars_ref from the first code cell (tests/test_notebook_fresh_env.py runs it)."""
    src = tmp_path / "09_example.py"
    src.write_text('# %% [markdown]\n# # 09 · Example\n\n# %% tags=["slide"]\nx = 1\n\n# %% [markdown]\n# text\n')
    nb = run_notebooks.build(src)
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        ("markdown", "# 09 · Example"), ("code", run_notebooks.SETUP_CELL), ("code", "x = 1"), ("markdown", "text")]
    assert nb.cells[2].metadata["tags"] == ["slide"] and "tags" not in nb.cells[1].metadata
    assert [c.id for c in nb.cells] == ["09-000", "09-001", "09-002", "09-003"]


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_sources_leave_the_setup_cell_to_the_build(src):
    """The setup cell is written once, in scripts/run_notebooks.py: a source holding a copy would run it twice."""
    assert "importlib.util.find_spec(\"mars_ref\")" not in src.read_text(), f"{src.name} has its own setup cell"
