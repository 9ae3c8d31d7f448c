"""The run-directory format: atomic JSON, metrics records, finding and resolving runs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from samkit.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RunDirError,
    append_jsonl,
    find_runs,
    nested_run_dir,
    read_config,
    read_metrics,
    read_summary,
    resolve_run,
    write_json,
    write_jsonl,
)


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})
    replaced = []
    real_replace = os.replace

    def failing_replace(src, dst):
        replaced.append(dst)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert replaced == [path]


def test_write_json_arrays_keeps_numbers_on_one_line_and_nan_as_null(tmp_path):
    path = write_json(
        tmp_path / "r.json", {"x": np.array([1.0, math.nan]), "m": [[1, 2], [3, 4]]}, arrays=True
    )
    text = path.read_text()
    assert "[1.0, null]" in text and "[1, 2]" in text
    assert json.loads(text) == {"x": [1.0, None], "m": [[1, 2], [3, 4]]}


def test_jsonl_round_trip_drops_superseded_partial_epochs(tmp_path):
    write_jsonl(tmp_path / METRICS_FILE, [{"epoch": 1}, {"epoch": 2, "partial_epoch": True}])
    append_jsonl(tmp_path / METRICS_FILE, {"epoch": 2, "test_error_rate": 0.1})
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2, "test_error_rate": 0.1}]
    write_jsonl(tmp_path / METRICS_FILE, [{"epoch": 1}, {"epoch": 2, "partial_epoch": True}])
    assert read_metrics(tmp_path)[-1] == {"epoch": 2, "partial_epoch": True}  # still the last


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(RunDirError, match=rf"{METRICS_FILE}:2: corrupt line"):
        read_metrics(tmp_path)
    (tmp_path / "summary.json").write_text("[1]")
    with pytest.raises(RunDirError, match="expected a JSON object"):
        read_summary(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ValueError, match="corrupt config.json"):
        read_config(tmp_path)
    assert read_summary(tmp_path / "missing") == {}


def test_find_and_resolve_runs(tmp_path):
    a = nested_run_dir(tmp_path, 0.1, 5e-4, 0.05, 0)
    assert a == tmp_path / "lr_0.1" / "wd_0.0005" / "rho_0.05" / "seed_0"
    b = nested_run_dir(tmp_path, 0.1, 5e-4, 0, 1)
    for run in (a, b):
        (run / CHECKPOINT_DIR).mkdir(parents=True)
        write_jsonl(run / METRICS_FILE, [{"epoch": 1}])
    assert find_runs(tmp_path) == sorted([a, b])
    assert find_runs(a) == [a]
    with pytest.raises(RunDirError, match="no metrics.jsonl"):
        find_runs(a / CHECKPOINT_DIR)
    ckpt = a / CHECKPOINT_DIR / "ckpt-000000001-0123456789abcdef.pt"
    ckpt.write_bytes(b"")
    assert resolve_run(a) == (a, None)
    assert resolve_run(a / CHECKPOINT_DIR) == (a, None)
    assert resolve_run(ckpt) == (a, ckpt)
    with pytest.raises(FileNotFoundError):
        resolve_run(tmp_path / "nowhere")
