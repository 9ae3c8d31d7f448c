"""Write ``samkit train``'s reference evidence (``src/samkit/train/main_job_reference.json``).

The main job trains SAM at ``samkit train``'s default settings, once. Its log and summary put
that result beside the committed sweep at the same settings (experiments/sam_vs_sgd_full.toml:
SAM, SGD at equal epochs and SGD at twice the epochs, 3 seeds each; ``samkit.train.reference``).
This script copies, from that sweep's report (``samkit report``) and its run directories, each
cell's settings (``config.json``, the ``TrainConfig`` fields that define what a run trains),
its test error over seeds and the paired difference of ``--cell`` against the report's
baseline::

    python experiments/main_job_reference.py experiments/reports/sam_vs_sgd_full/report.json

Only cells with every seed completed are written; a cell whose runs disagree on a setting is an
error (the sweep must vary only the seed within a cell).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from samkit.rundir import write_json
from samkit.train.reference import REFERENCE_FILE, settings_of

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "samkit" / "train" / REFERENCE_FILE


def build(report_path: Path, cell: str) -> dict:
    report = json.loads(report_path.read_text())
    root = report_path.resolve().parents[3]  # the repository (experiments/reports/NAME/...)
    settings, errors, seeds, machine = {}, {}, None, None
    for c in report["cells"]:
        if c["missing"]:
            continue
        configs = [
            json.loads((root / run / "config.json").read_text()) for run in c["run_dirs"].values()
        ]
        per_run = [settings_of(config) for config in configs]
        common = set.intersection(*(set(s) for s in per_run))  # older runs lack newer settings
        if any(s[k] != per_run[0][k] for s in per_run for k in common):
            raise SystemExit(f"cell {c['cell']}: its runs differ in more than the seed")
        settings[c["cell"]] = {k: per_run[0][k] for k in sorted(common)}
        estimate = c["metrics"]["test_error"]["estimate"]
        errors[c["cell"]] = {k: estimate[k] for k in ("mean", "half_width", "n")}
        seeds = sorted(int(s) for s in c["completed"])
        machine = machine or {
            "cpu": configs[0]["device_info"]["cpu"],
            "amp_resolved": configs[0].get("amp_resolved", "none"),  # before --amp auto: none
            "threads": configs[0]["device_info"]["num_threads"],
            "torch": configs[0]["versions"]["torch"],
        }
    difference = next((d for d in report["differences"] if d["cell"] == cell), None)
    if difference is None or cell not in settings:
        raise SystemExit(f"{report_path}: no completed cell {cell!r} with a difference")
    d = difference["metrics"]["test_error"]
    return {
        "format": "samkit-main-job-reference/1",
        "source": str(report_path.resolve().relative_to(root)),
        "seeds": seeds,
        "machine": machine,
        "settings": settings,
        "test_error": errors,
        "difference": {
            "cell": cell,
            "baseline": difference["baseline"],
            **{k: d[k] for k in ("mean", "ci_low", "ci_high", "p_value", "n_pairs")},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a samkit report's report.json")
    parser.add_argument("--cell", default="sam", help="the cell compared with the baseline")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    reference = build(args.report, args.cell)
    write_json(args.output, reference)
    print(f"wrote {args.output}: cells {', '.join(reference['settings'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
