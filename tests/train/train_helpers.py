"""Helpers of the ``samkit train`` tests: data writers (from the other conftest files), reading
a run's outputs, comparing weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def _load(path: Path, name: str):
    """The writers live in other conftest files; load them by path under a unique name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TESTS = Path(__file__).resolve().parents[1]
_idx = _load(_TESTS / "conftest.py", "_samkit_tests_idx_writers")
_formats = _load(_TESTS / "data" / "conftest.py", "_samkit_tests_format_writers")
write_fashion_mnist = _idx.write_fashion_mnist
write_cifar = _formats.write_cifar
write_svhn_mat = _formats.write_svhn_mat
write_image_folder = _formats.write_image_folder

# One thread: torch's worker threads slow down many times over when another process keeps the
# cores busy; the tests run steadily on one.
FAST = ["--threads", "1", "--no-progress"]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from samkit.train.checkpoint import load_latest_checkpoint

    latest = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    assert latest is not None, f"no checkpoint in {run_dir}"
    return latest[1]["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"
