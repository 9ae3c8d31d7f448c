"""examples/lightning_sam.py runs as a script (a few steps, CPU, nothing downloaded)."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_sam.py"

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
)


def test_the_example_runs_as_a_script(monkeypatch, capsys):
    argv = [str(EXAMPLE), "--steps", "4", "--batch-size", "8", "--accumulate", "2", "--clip", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("4 SAM steps (0 skipped): mean first-pass loss ")


def test_the_example_trains():
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--steps", "16", "--batch-size", "32"])
    assert result["steps"] == 16 and result["skipped_steps"] == 0
    # chance is log(10) = 2.30; measured: 4.35 over the first 5 batches, 0.94 over the last 5
    assert math.isfinite(result["last_loss"]) and result["last_loss"] < 0.5 * result["first_loss"]
