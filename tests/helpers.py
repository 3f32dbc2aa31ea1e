"""Small helpers shared by the test files (tests/ is on sys.path under pytest's default import mode)."""

import importlib.util
from pathlib import Path

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def load_solution(name: str):
    """Import ``notebooks/solutions/<name>.py`` (the exercise solutions are plain modules, not a package)."""
    spec = importlib.util.spec_from_file_location(f"solutions_{name}", SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
