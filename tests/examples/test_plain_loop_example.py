"""examples/plain_loop_sam.py runs as a script: the two-call and closure forms take the same
steps, and SharpnessAwareStep runs with bf16 autocast and gradient accumulation."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_loop_sam.py"


def losses(out: str) -> dict[str, tuple[int, float, float]]:
    found = re.findall(r"^(\S+): (\d+) steps, loss (\S+) -> (\S+)$", out, re.M)
    return {name: (int(n), float(a), float(b)) for name, n, a, b in found}


def test_runs_as_a_script_and_the_two_forms_agree():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3"], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = losses(proc.stdout)
    assert result.keys() == {"two-call", "closure", "step"}
    assert all(n == 3 for n, _, _ in result.values())
    assert result["two-call"] == result["closure"]  # the same SAM steps, two spellings


def test_the_step_helper_with_bf16_and_accumulation(monkeypatch, capsys):
    argv = [str(EXAMPLE), "--form", "step", "--amp", "bf16", "--accumulation-steps", "2",
            "--steps", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    result = losses(capsys.readouterr().out)
    assert list(result) == ["step"] and result["step"][0] == 2
