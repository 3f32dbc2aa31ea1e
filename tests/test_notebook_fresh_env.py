"""A student's way in: notebook 01 runs in a fresh Jupyter environment that has never seen mars_ref.

The test makes what a student has after `git clone` and `pip install jupyter` (or a hosted notebook
service): a clean clone of this repository in a temporary directory and a new virtual environment with
only Jupyter's kernel machinery (nbclient, ipykernel, nbformat) and torch, no mars_ref and none of its
other dependencies. It then executes notebook 01 there. The notebook's first cell must find the
checkout around it, install it into the running kernel (`pip install -e <root>`) and go on; every
later cell must run.

The clone is `git clone` of this checkout, with the checkout's uncommitted changes copied over it, so
that the test checks the work as it will be committed (on a clean working tree the copy changes
nothing). It takes one to two minutes (a virtual environment, torch from the local wheel cache, the
notebook itself), so it is marked `slow`; `pytest -m slow tests/test_notebook_fresh_env.py` runs it
alone, and it is skipped where git or a local torch wheel is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build CI installs; pip finds it in the local wheel cache
pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


def _clean_clone(dest: Path) -> Path:
    """`git clone` this checkout into `dest`, then copy over its uncommitted and untracked (not ignored) files."""
    _run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest)])
    listed = _run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
        elif not src.exists() and (dest / rel).exists():  # deleted in the working tree
            (dest / rel).unlink()
    return dest


def _student_env(base: dict) -> dict:
    """The environment a fresh Jupyter would give the kernel: no virtualenv, no PYTHONPATH, no GPU."""
    env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(TQDM_DISABLE="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    return env


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_notebook_01_runs_in_a_fresh_jupyter_environment_from_a_clean_clone(tmp_path):
    clone = _clean_clone(tmp_path / "checkout")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    env = _student_env(os.environ)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "nbclient",
                              "ipykernel", "nbformat", TORCH], capture_output=True, text=True, env=env)
    if install.returncode != 0:
        pytest.skip(f"cannot install Jupyter's packages and {TORCH} here: {install.stderr[-500:]}")
    # (from tmp_path, not from here: `python -c` puts the working directory on sys.path)
    probe = subprocess.run([str(python), "-c", "import mars_ref"], capture_output=True, env=env, cwd=tmp_path)
    assert probe.returncode != 0, "the fresh environment must not have mars_ref to begin with"
    # a kernel spec inside the venv, so that no kernel installed elsewhere on the machine is used
    _run([str(python), "-m", "ipykernel", "install", "--prefix", str(venv), "--name", "fresh"], env=env)
    runner = textwrap.dedent("""
        import sys
        import nbformat
        from nbclient import NotebookClient
        path, out = sys.argv[1], sys.argv[2]
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="fresh", resources={"metadata": {"path": sys.argv[3]}}).execute()
        nbformat.write(nb, out)
    """)
    notebook = clone / "notebooks" / "01_noisy_nonconvex_toys.ipynb"
    executed = tmp_path / "executed.ipynb"
    kernels = str(venv / "share" / "jupyter")
    result = subprocess.run([str(python), "-c", runner, str(notebook), str(executed), str(notebook.parent)],
                            capture_output=True, text=True, env={**env, "JUPYTER_PATH": kernels}, cwd=tmp_path)
    assert result.returncode == 0, f"notebook 01 failed in the fresh environment:\n{result.stderr[-4000:]}"

    import nbformat

    nb = nbformat.read(executed, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    said = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    assert "installing the checkout" in said and str(clone.resolve()) in said, said  # it said what it did
    assert "mars_ref 0.1.0 from ../mars_ref" in said, said                 # and imports the clone's copy
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # the kernel's environment now has mars_ref, installed editable from the clone
    where = _run([str(python), "-c", "import mars_ref, os; print(os.path.dirname(mars_ref.__file__))"], env=env,
                 cwd=tmp_path)
    assert Path(where.stdout.strip()).resolve() == (clone / "mars_ref").resolve()
