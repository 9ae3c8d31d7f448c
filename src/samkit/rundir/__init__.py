"""The run directory: the one owner of its format (file names, metric keys, atomic JSON),
its checkpoints, and rebuilding a run's model. ``samkit train`` writes run directories;
``samkit evaluate``, the analysis commands and ``samkit compare`` read them through this package.
"""

from samkit.rundir.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    set_aside,
)
from samkit.rundir.layout import (
    ANALYSIS_DIR,
    BOOTSTRAP_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LABEL_NOISE_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
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
from samkit.rundir.lock import LOCK_FILE, RunDirBusy, RunDirLock
from samkit.rundir.model import LoadedRun, load_run_model

__all__ = [
    "ANALYSIS_DIR",
    "BOOTSTRAP_FILE",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LABEL_NOISE_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CheckpointError",
    "LOCK_FILE",
    "LoadedRun",
    "RunDirBusy",
    "RunDirLock",
    "RunDirError",
    "append_jsonl",
    "find_runs",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_run_model",
    "nested_run_dir",
    "read_config",
    "read_metrics",
    "read_summary",
    "resolve_run",
    "save_checkpoint",
    "set_aside",
    "write_json",
    "write_jsonl",
]
