"""The run-directory format: file names, metric keys, and how its JSON files are read and written.

A run directory (written by ``samkit train``, read by ``samkit evaluate``, the analysis commands
and ``samkit compare``) holds::

    config.json        every resolved setting, plus model_name, num_classes, in_channels, dataset,
                       model_kwargs (enough to rebuild the model), versions, device, command
    metrics.jsonl      one JSON record per epoch (keys below); a "partial_epoch" record when a
                       run stopped mid-epoch (--max-steps)
    summary.json       the final numbers (keys below) and the config, at the end of the run
    checkpoints/       ckpt-{step:09d}-{sha256[:16]}.pt (samkit.rundir.checkpoint)
    label_noise.json   which labels were flipped (--label-noise)
    bootstrap.json     where the bootstrap labels came from (--bootstrap-from)
    events.out.tfevents.*   TensorBoard scalars under the metric keys' names
    analysis/          the analysis commands' default output directory (hessian.json, ...)

A sweep directory (``samkit sweep``) holds ``sweep.json`` (the spec and its cells), ``logs/`` and
one run directory per cell, ``<cell>/seed_<seed>/``.

This module is the only place that spells those names. JSON files are written atomically (a
temporary file renamed into place), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from samkit.data.noise import LABEL_NOISE_FILE

__all__ = [
    "ANALYSIS_DIR",
    "BOOTSTRAP_FILE",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LABEL_NOISE_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_SCALARS",
    "RunDirError",
    "append_jsonl",
    "find_runs",
    "nested_run_dir",
    "read_config",
    "read_metrics",
    "read_summary",
    "resolve_run",
    "to_jsonable",
    "write_json",
    "write_jsonl",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
BOOTSTRAP_FILE = "bootstrap.json"
ANALYSIS_DIR = "analysis"

# Keys of a metrics.jsonl record (one per epoch). The test_* keys are present only in evaluated
# epochs, test_top_5_error_rate only with --compute-top-5-error-rate.
EPOCH = "epoch"
STEP = "step"
LEARNING_RATE = "learning_rate"
TRAIN_LOSS = "train_loss"
TRAIN_ERROR_RATE = "train_error_rate"
GRADIENT_NORM = "gradient_norm"
PARAM_NORM = "param_norm"
SKIPPED_STEPS = "skipped_steps"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SEC = "images_per_sec"  # training images per second (also a summary key)
PARTIAL_EPOCH = "partial_epoch"
TEST_LOSS = "test_loss"
TEST_ERROR_RATE = "test_error_rate"
TEST_ACCURACY = "test_accuracy"
TEST_TOP_5_ERROR_RATE = "test_top_5_error_rate"
WALL_SECONDS = "wall_seconds"  # since the process started (also a summary key)

#: The metrics also written as TensorBoard scalars (the seed system's names).
TENSORBOARD_SCALARS = (
    TRAIN_LOSS,
    TRAIN_ERROR_RATE,
    GRADIENT_NORM,
    PARAM_NORM,
    LEARNING_RATE,
    TEST_LOSS,
    TEST_ERROR_RATE,
    TEST_TOP_5_ERROR_RATE,
    IMAGES_PER_SEC,
)

# Keys of summary.json (besides config, run_dir, status and the machine's details).
FINAL_TEST_ERROR_RATE = "final_test_error_rate"
FINAL_TEST_ACCURACY = "final_test_accuracy"
FINAL_TEST_LOSS = "final_test_loss"
FINAL_TEST_TOP_5_ERROR_RATE = "final_test_top_5_error_rate"
BEST_TEST_ERROR_RATE = "best_test_error_rate"
BEST_TEST_ACCURACY = "best_test_accuracy"
BEST_TEST_TOP_5_ERROR_RATE = "best_test_top_5_error_rate"
TRAIN_SECONDS = "train_seconds"
EVAL_SECONDS = "eval_seconds"
STATUS = "status"  # COMPLETED, or MAX_STEPS when --max-steps stopped the run
COMPLETED = "completed"
MAX_STEPS = "max_steps"

# samkit hessian's result (in ANALYSIS_DIR, the analysis commands' default output) and its keys.
HESSIAN_FILE = "hessian.json"
LAMBDA_MAX = "lambda_max"
LAMBDA_MAX_OVER_LAMBDA_5 = "lambda_max_over_lambda_5"

# A sweep directory (samkit sweep): SWEEP_FILE lists the spec and every cell, each cell an
# ordinary run directory below it.
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "samkit-sweep/1"


class RunDirError(ValueError):
    """A run directory is missing, has no metrics or holds a corrupt file (named in the message)."""


def nested_run_dir(output_dir: str | os.PathLike, lr: float, wd: float, rho: float, seed: int):
    """``output_dir/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}``: the seed system's layout."""
    return Path(output_dir) / f"lr_{lr:g}" / f"wd_{wd:g}" / f"rho_{rho:g}" / f"seed_{seed}"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy arrays and scalars as lists and numbers, paths as strings and
    non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _compact(obj: Any, indent: int = 0) -> str:
    """Indented JSON with every list of plain numbers on one line (a 2-D array: a row a line)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_compact(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj:
        if all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in obj):
            return json.dumps(obj, allow_nan=False)
        return "[\n" + ",\n".join(inner + _compact(v, indent + 2) for v in obj) + f"\n{pad}]"
    return json.dumps(obj, allow_nan=False)


def _replace(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, arrays: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically. ``arrays=True`` (analysis results): numpy
    values converted, non-finite floats as null, and lists of numbers kept on one line."""
    path = Path(path)
    text = _compact(to_jsonable(obj)) if arrays else json.dumps(obj, indent=2)
    return _replace(path, text + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``records`` as JSON lines, atomically (replacing the file)."""
    return _replace(Path(path), "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir/config.json`` as a dict; a clear error when missing or not valid JSON."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no config.json; is {run_dir} a samkit run directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (at least one), each epoch once: a
    ``partial_epoch`` record that a later record of the same or a later epoch replaces (the run
    was resumed) is dropped. :class:`RunDirError` names the file and line at fault."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunDirError(f"no metrics: {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                snippet = line.strip()[:80]
                raise RunDirError(
                    f"{path}:{lineno}: corrupt line, not valid JSON ({exc.msg}): {snippet!r}"
                ) from None
            if not isinstance(rec, dict):
                kind = type(rec).__name__
                raise RunDirError(
                    f"{path}:{lineno}: corrupt line, expected a JSON object, got {kind}"
                )
            records.append(rec)
    if not records:
        raise RunDirError(f"no metrics: {path} has no records")
    return _drop_superseded_partials(records)


def _epoch_of(record: dict[str, Any]) -> float | None:
    value = record.get(EPOCH)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _drop_superseded_partials(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    epochs = [_epoch_of(r) for r in records]
    kept = []
    for i, (rec, e) in enumerate(zip(records, epochs)):
        later = epochs[i + 1 :]
        if rec.get(PARTIAL_EPOCH) is True and any(
            e is not None and x is not None and x >= e for x in later
        ):
            continue
        kept.append(rec)
    return kept


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir/summary.json``, or ``{}`` for a run that has not finished."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: corrupt file, not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{path}: corrupt file, expected a JSON object")
    return summary


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint file or None for 'the latest')`` from a run directory, its
    ``checkpoints/`` directory or one checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if path.name == CHECKPOINT_DIR and not (path / CONFIG_FILE).exists():
            return path.parent, None
        return path, None
    if path.is_file():
        parent = path.parent
        return (parent.parent if parent.name == CHECKPOINT_DIR else parent), path
    raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")


def find_runs(path: str | os.PathLike) -> list[Path]:
    """``path`` if it is a run directory (it has metrics.jsonl), else every run directory below
    it, sorted. :class:`RunDirError` when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory not found: {path}")
    if (path / METRICS_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob(METRICS_FILE) if p.is_file())
    if not found:
        raise RunDirError(f"{path}: no {METRICS_FILE} in this directory or below")
    return found
