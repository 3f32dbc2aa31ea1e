"""The README's Python example runs as printed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "final minibatch loss" in out
    loss = float(re.search(r"final minibatch loss ([0-9.]+)", out).group(1))
    assert loss < 1.0  # the data are N(0,1) targets: below the variance of Y means it learned
