"""The committed evidence for ``samkit train``'s default setting, shown beside a run's result.

The main job (``samkit train`` with no flags) trains SAM once; whether SAM helps at this setting
is a question over seeds, answered by the sweep ``experiments/sam_vs_sgd_full.toml`` (SAM and
SGD, 3 seeds each). ``main_job_reference.json`` (made from that sweep's committed report by
``experiments/main_job_reference.py``) holds each method's settings and test error, and their
paired difference with its confidence interval. A run whose settings are one of those methods'
(every key of ``config.json`` but those that only say how it runs or logs) gets the reference in
its log and in ``summary.json``; any other run gets nothing.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Any

from samkit.train.config import TrainConfig

REFERENCE_FILE = "main_job_reference.json"

#: ``config.json`` keys that say where and how a run executes or logs, not what it trains.
NOT_SETTINGS = frozenset(
    {
        "run_seed",
        "data_dir",
        "workers",
        "output_dir",
        "run_dir",
        "save_progress_seconds",
        "resume",
        "device",
        "threads",
        "tensorboard",
        "progress",
        "dist_timeout",
        "evaluate_every",
        "eval_batch_size",
        "compute_top_5_error_rate",
    }
)


def load_reference() -> dict[str, Any] | None:
    """The packaged reference, or None if this installation has none."""
    try:
        text = resources.files("samkit.train").joinpath(REFERENCE_FILE).read_text()
    except (FileNotFoundError, OSError):
        return None
    return json.loads(text)


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The settings (``TrainConfig`` fields) of a run's ``config.json`` that define what it
    trains."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_SETTINGS
    return {k: v for k, v in config.items() if k in fields}


def same_settings(mine: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Equal settings; a setting the reference lacks (added to samkit after it was made) must be
    at its default here."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return all(mine.get(k) == v for k, v in reference.items()) and all(
        v == defaults.get(k, dataclasses.MISSING) for k, v in mine.items() if k not in reference
    )


def compare(
    config: dict[str, Any],
    test_error: float,
    reference: dict[str, Any] | None = None,
    *,
    world_size: int = 1,
) -> dict[str, Any] | None:
    """This run beside the reference, if its settings are one of the reference's methods' and
    it ran in as many processes (one: under torchrun each replica perturbs with its own batch);
    else None. ``reference``: the packaged one by default."""
    reference = load_reference() if reference is None else reference
    if reference is None or world_size != reference.get("world_size", 1):
        return None
    mine = settings_of(config)
    method = next((m for m, s in reference["settings"].items() if same_settings(mine, s)), None)
    if method is None:
        return None
    return {
        "method": method,
        "test_error": test_error,
        "source": reference["source"],
        "seeds": reference["seeds"],
        "test_error_by_method": reference["test_error"],
        "difference": reference["difference"],
        "machine": reference["machine"],
    }


def describe(comparison: dict[str, Any]) -> list[str]:
    """Log lines for :func:`compare`'s result."""
    lines = [f"committed evidence at these settings ({comparison['source']}):"]
    for method, e in comparison["test_error_by_method"].items():
        lines.append(
            f"  {method}: test error {e['mean']:.2%} +- {e['half_width']:.2%} "
            f"(mean +- 95% CI over {e['n']} seeds)"
        )
    d = comparison["difference"]
    lines.append(
        f"  {d['cell']} - {d['baseline']}: {100 * d['mean']:+.2f} points, 95% CI "
        f"[{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}], p = {d['p_value']:.2g} "
        f"(paired by seed)"
    )
    machine = comparison["machine"]
    lines.append(
        f"  (measured on {machine.get('cpu', '?')}, amp {machine.get('amp_resolved', '?')}, "
        f"torch {machine.get('torch', '?')})"
    )
    lines.append(f"  this run ({comparison['method']}): test error {comparison['test_error']:.2%}")
    return lines
