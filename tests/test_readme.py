"""The README's Python examples run as written (they are the API users copy first)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3  # SAM quick start, ESAM, SharpnessAwareStep
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert namespace["out"].took_step is True


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0] == "```sh"
    assert lines[1] == "bash scripts/setup.sh && .venv/bin/samkit train"
    assert lines[2] == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[2] in ci
