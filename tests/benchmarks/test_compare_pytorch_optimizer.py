"""benchmarks/compare_pytorch_optimizer.py: samkit against pytorch_optimizer, weight for weight.

pytorch_optimizer is a comparison tool, not a dependency: without it (as in CI) this is skipped.
The findings the docs state (docs/optimizers.md, "Against pytorch_optimizer") are asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_optimizer")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_pytorch_optimizer.py"


def test_the_comparison_and_its_explanations(tmp_path):
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "4", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    methods = json.loads(out.read_text())["methods"]
    same = {name: m["same_update"] for name, m in methods.items()}
    assert same == {
        "sam": True, "asam": False, "gsam": True, "wsam_decoupled": True, "wsam_coupled": True,
        "looksam": False, "fsam_sigma_1": False, "fsam_sigma_0.5": False,
    }  # fmt: skip
    for name, m in methods.items():
        assert len(m["per_step_max_abs_diff"]) == 4 and m["explanation"], name
        if same[name]:  # the raw difference is pytorch_optimizer's float32 norm, no more
            assert 0 < m["max_abs_weight_diff"] < 1e-8, name
        else:
            assert m["max_abs_weight_diff"] > 1e-6, name
        for check, value in m["checks"].items():
            if check != "pytorch_optimizer with its norm in float64" or same[name]:
                limit = 1e-6 if "1e-8 on ||g_v||" in check else 1e-12
                assert value <= limit, (name, check, value)
    # Friendly-SAM: the first step agrees (d_0 parallel to g_0 in both rules), later ones do not
    for name in ("fsam_sigma_1", "fsam_sigma_0.5"):
        first, *later = methods[name]["per_step_max_abs_diff"]
        assert first < 1e-9 and min(later) > 1e-5
    # LookSAM: samkit 1 + 1/k passes; pytorch_optimizer's documented use 2 on every step
    assert methods["looksam"]["passes_per_step"] == {
        "samkit": [2, 1, 2, 1], "pytorch_optimizer": [2, 2, 2, 2],
    }  # fmt: skip
    assert "... and samkit with adaptive_eta=0" in methods["asam"]["checks"]
    bsam = json.loads(out.read_text())["not_compared"]["bsam"]["restore"]
    moved, rho_g = bsam["max_abs_weight_change_with_lr_1e-12"], bsam["max_abs_rho_g"]
    assert moved == pytest.approx(rho_g, rel=1e-6) and moved > 1e-4  # the perturbation stays
