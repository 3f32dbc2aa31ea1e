"""The layout promises of the package: no import cycles, an optimizer core that loads nothing else, and every file
the code, tests, notebooks and docs cite is in the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mars_ref"
MODULES = {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def imports_of(path: Path, known: set[str] | None = None) -> set[str]:
    """The ``mars_ref`` modules a file imports, at the top or inside functions (``from . import x``,
    ``from .x import y``, ``import mars_ref.x``, ``from mars_ref.x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("mars_ref"):
                base = module.removeprefix("mars_ref").lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import a, b
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mars_ref."))
    return found & (set(MODULES) if known is None else known)


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_import_graph_has_no_cycle():
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for other in sorted(GRAPH[name]):
            visit(other, trail + [name])
        state[name] = "done"
        order.append(name)

    for name in GRAPH:
        visit(name, [])
    assert len(order) == len(GRAPH)


def test_import_checker_sees_imports_inside_functions(tmp_path):
    """The checker itself: a lazy import inside a function counts (else the test above could not fail)."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "c.py").write_text("import mars_ref.a\nfrom mars_ref.b import x\n")
    known = {"a", "b", "c"}
    assert imports_of(tmp_path / "a.py", known) == {"b"} and imports_of(tmp_path / "b.py", known) == {"a"}
    assert imports_of(tmp_path / "c.py", known) == {"a", "b"}


def test_the_optimizer_core_loads_nothing_of_the_application_or_the_course():
    """``from mars_ref import MARS`` loads the optimizer core only: no module of mars_ref.gpt or mars_ref.course,
    and about 1,200 lines of Python in all (the core's promise to a reader and to an engineer's import time)."""
    code = ("import sys; from mars_ref import MARS; "
            "mods = [m for m in sys.modules if m == 'mars_ref' or m.startswith('mars_ref.')]; "
            "print('\\n'.join(f'{m} {sys.modules[m].__file__}' for m in mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    loaded = dict(line.split(" ", 1) for line in out if line)
    assert not [m for m in loaded if m.startswith(("mars_ref.gpt", "mars_ref.course"))], sorted(loaded)
    lines = sum(len(Path(f).read_text().splitlines()) for f in loaded.values())
    assert lines <= 1500, (lines, sorted(loaded))


# Paths inside the repository as the text cites them, e.g. `docs/algorithm.md` or mars_ref/fused.c.
CITED = re.compile(r"(?<![\w/.-])((?:docs|mars_ref|benchmarks|notebooks|tests|scripts)/[\w./-]*\w\.(?:py|md|c|json|"
                   r"png|svg|txt|ipynb|cfg|toml|yml))")
SOURCES = [*PACKAGE.rglob("*.py"), PACKAGE / "fused.c",
           *(p for p in (ROOT / "tests").glob("*.py") if p.name != "test_layout.py"),
           *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*.md"), *(ROOT / "scripts").glob("*.py"),
           *(ROOT / "notebooks" / "src").glob("*.py"), *(ROOT / "notebooks" / "solutions").glob("*.py"),
           *(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "notebooks" / "README.md", ROOT / "Makefile"]


def test_every_cited_file_exists():
    missing = []
    for source in SOURCES:
        if not source.exists():
            continue
        for cited in CITED.findall(source.read_text()):
            if "NN_" not in cited and not (ROOT / cited).exists():  # NN_name: a pattern, not a file
                missing.append(f"{source.relative_to(ROOT)} cites {cited}")
    assert not missing, missing


def test_the_citation_scan_finds_paths():
    text = "see `docs/algorithm.md` §3, mars_ref/fused.c and (notebooks/figures/x.png); not http://a/docs/b.md"
    assert CITED.findall(text) == ["docs/algorithm.md", "mars_ref/fused.c", "notebooks/figures/x.png"]
