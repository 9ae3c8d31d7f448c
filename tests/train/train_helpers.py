"""Helpers of the ``samkit train`` tests: reading a run's outputs, comparing weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# One thread: torch's worker threads slow down many times over when another process keeps the
# cores busy; the tests run steadily on one.
FAST = ["--threads", "1", "--no-progress"]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from samkit.rundir import load_latest_checkpoint

    latest = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    assert latest is not None, f"no checkpoint in {run_dir}"
    return latest[1]["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"
