"""Choose a sweep's setting on the holdout, then evaluate only the chosen runs on the test set.

The SAM paper's protocol (Sec. 3.1) for rho: train every candidate on the training set minus a
10% holdout (``use_test_set = false``), pick the one with the lowest holdout error, and only then
evaluate it on the test set. For a sweep of such runs (experiments/rho_holdout.toml)::

    python experiments/select_by_holdout.py SWEEP_DIR [--output DIR] [--reference CELL]

1. **Selection, from the run directories alone.** The candidates are the sweep's cells except the
   reference (``--reference``, default ``sweep.json``'s ``report.baseline``: ``sam_rho=0``, i.e.
   SGD). A completed run's ``summary.json`` holds its final holdout error
   (``final_test_error_rate`` with ``eval_split = "holdout"``). Per seed whose candidates all
   completed, the chosen cell is the one with the lowest holdout error (ties: the first in the
   sweep's order). Also the cell chosen most often (ties: the lower mean holdout error over those
   seeds, then the sweep's order), i.e. the single rho this grid would pick.
2. **Evaluation.** Only then, for each of those seeds, the chosen run, the most often chosen
   cell's run and the reference's run are evaluated on the test set with ``samkit evaluate``'s
   code (their last good checkpoint), written to ``RUN/test_eval.json`` (what ``samkit evaluate
   RUN --split test --output RUN/test_eval.json`` writes; an existing one is reused).
3. ``selection.json`` and ``selection.md`` in ``--output`` (default ``SWEEP_DIR/selection``): per
   seed the chosen cell, every candidate's holdout error and the test error; over seeds the
   mean and Student-t interval (``samkit.report.mean_ci``) of the holdout and test errors of the
   chosen runs, of the most often chosen cell and of the reference, and the paired test-error
   difference chosen minus reference. The Markdown is printed too.

Bad input (no sweep, a run evaluated on the test set during training, no seed with every
candidate completed, ...) is one line on stderr and exit status 2; a chosen run whose weights
are not finite (it diverged), status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from samkit.report import Sweep, load_sweep, mean_ci, paired_difference
from samkit.rundir import read_summary, write_json
from samkit.train.errors import TrainingDivergedError
from samkit.train.evaluate import evaluate_run

FORMAT = "samkit-selection/1"
TEST_EVAL_FILE = "test_eval.json"
PROG = "select_by_holdout"


class SelectionError(ValueError):
    """Input that cannot be selected from; the message is the one line printed."""


# --------------------------------------------------------------------------------------------
# Selection: holdout errors only (summary.json); the test set is not read here
# --------------------------------------------------------------------------------------------


def holdout_errors(sweep: Sweep) -> dict[str, dict[int, float]]:
    """Cell -> seed -> final holdout error of each completed run; a run that evaluated on the
    test set during training is an error (selecting on it would select on the test set)."""
    out: dict[str, dict[int, float]] = {}
    for cell in sweep.cells:
        for run in cell.completed:
            split = read_summary(run.run_dir).get("eval_split")
            if split != "holdout":
                raise SelectionError(
                    f"{run.run_dir}: evaluated on the {split or 'test'} set during training, not "
                    "on a holdout; selection needs runs with use_test_set = false"
                )
        out[cell.name] = cell.values("test_error")  # final_test_error_rate: the holdout's
    return out


def select(sweep: Sweep, reference: str | None) -> dict[str, Any]:
    """Per seed the candidate (every cell but ``reference``) with the lowest holdout error, over
    the seeds whose candidates all completed, and the cell chosen most often."""
    names = [c.name for c in sweep.cells]
    if reference is not None and reference not in names:
        raise SelectionError(f"reference {reference!r} is not a cell of {sweep.path} ({names})")
    candidates = [n for n in names if n != reference]
    if len(candidates) < 2:
        raise SelectionError(f"{sweep.path}: fewer than two cells to choose from ({candidates})")
    holdout = holdout_errors(sweep)
    seeds = sorted({s for c in sweep.cells if c.name in candidates for s in c.seeds})
    chosen: dict[int, str] = {}
    skipped: dict[int, list[str]] = {}
    for seed in seeds:
        missing = [n for n in candidates if seed not in holdout[n]]
        if missing:
            skipped[seed] = missing
            continue
        chosen[seed] = min(candidates, key=lambda n: (holdout[n][seed], candidates.index(n)))
    if not chosen:
        raise SelectionError(
            f"{sweep.path}: no seed has a completed run of every candidate "
            f"({', '.join(candidates)}); run or finish the sweep first"
        )
    counts = Counter(chosen.values())

    def mean_holdout(name: str) -> float:
        return sum(holdout[name][s] for s in chosen) / len(chosen)

    most = min(counts, key=lambda n: (-counts[n], mean_holdout(n), candidates.index(n)))
    return {
        "candidates": candidates,
        "reference": reference,
        "holdout": {n: {s: holdout[n][s] for s in chosen if s in holdout[n]} for n in names},
        "chosen": chosen,
        "skipped": skipped,
        "counts": dict(counts),
        "most_chosen": most,
    }


# --------------------------------------------------------------------------------------------
# Evaluation of the chosen runs on the test set
# --------------------------------------------------------------------------------------------


def run_test_error(run_dir: Path, data_dir: str | None, threads: int | None) -> float:
    """The run's test error from ``RUN/test_eval.json``, evaluating (and writing it) if absent."""
    path = run_dir / TEST_EVAL_FILE
    if path.is_file():
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SelectionError(f"{path}: corrupt file, not valid JSON ({exc})") from None
        if not isinstance(result, dict) or result.get("split") != "test":
            raise SelectionError(
                f"{path}: not a test-set evaluation (samkit evaluate --split test)"
            )
    else:
        result = evaluate_run(run_dir, data_dir=data_dir, split="test", threads=threads)
        write_json(path, result)
    return float(result["test_error_rate"])


def evaluate(
    sweep: Sweep, sel: dict[str, Any], data_dir: str | None = None, threads: int | None = None
) -> dict[str, dict[int, float]]:
    """Test errors per seed: of the chosen runs (``"chosen"``), of the most often chosen cell
    and of the reference (under their cell names). Only these runs are evaluated."""
    runs = {c.name: {r.seed: r for r in c.completed} for c in sweep.cells}
    wanted = {"chosen": dict(sel["chosen"])}  # key -> seed -> cell
    for name in (sel["most_chosen"], sel["reference"]):
        if name is not None:
            wanted[name] = {s: name for s in sel["chosen"] if s in runs[name]}
    cache: dict[tuple[str, int], float] = {}
    out: dict[str, dict[int, float]] = {}
    for key, cells in wanted.items():
        out[key] = {}
        for seed, name in cells.items():
            if (name, seed) not in cache:
                cache[name, seed] = run_test_error(runs[name][seed].run_dir, data_dir, threads)
            out[key][seed] = cache[name, seed]
    return out


# --------------------------------------------------------------------------------------------
# Summary: JSON and Markdown
# --------------------------------------------------------------------------------------------


def summarise(sel: dict[str, Any], tests: dict[str, dict[int, float]], confidence: float):
    def est(values: dict[int, float]) -> dict[str, Any] | None:
        return mean_ci(values.values(), confidence).to_dict() if values else None

    chosen, most, ref = sel["chosen"], sel["most_chosen"], sel["reference"]
    holdout = sel["holdout"]
    rows = {
        "chosen": ({s: holdout[n][s] for s, n in chosen.items()}, tests["chosen"]),
        most: (holdout[most], tests[most]),
    }
    if ref is not None:
        rows[ref] = (holdout.get(ref, {}), tests.get(ref, {}))
    summary = {
        key: {"holdout_error": est(h), "test_error": est(t), "test_error_per_seed": t}
        for key, (h, t) in rows.items()
    }
    difference = None
    if ref is not None and tests.get(ref):
        d = paired_difference(tests["chosen"], tests[ref], confidence)
        difference = {**d.to_dict(), "of": f"chosen - {ref}", "metric": "test_error"}
    return {
        "format": FORMAT,
        "confidence": confidence,
        "candidates": sel["candidates"],
        "reference": ref,
        "most_chosen": most,
        "counts": sel["counts"],
        "seeds": {
            s: {
                "chosen": n,
                "holdout_errors": {c: holdout[c][s] for c in sel["candidates"]},
                "test_error": tests["chosen"][s],
            }
            for s, n in chosen.items()
        },  # fmt: skip
        "skipped_seeds": {s: {"missing": m} for s, m in sel["skipped"].items()},
        "summary": summary,
        "chosen_minus_reference": difference,
    }


def _pct(est: dict[str, Any] | None) -> tuple[str, str]:
    if est is None:
        return "-", ""
    if est["half_width"] is None:
        return f"{100 * est['mean']:.2f}", ""
    ci = f"[{100 * est['ci_low']:.2f}, {100 * est['ci_high']:.2f}]"
    return f"{100 * est['mean']:.2f} ± {100 * est['half_width']:.2f}", ci


def markdown(result: dict[str, Any], sweep_dir: Path) -> str:
    conf = f"{result['confidence']:.0%}"
    lines = [
        f"# Selection on the holdout: {sweep_dir}",
        "",
        f"Candidates: {', '.join(result['candidates'])}; reference: {result['reference'] or '-'}. "
        "Per seed, the candidate with the lowest final holdout error is chosen; only then are the "
        "chosen runs (and the reference and the most often chosen cell) evaluated on the test set.",
        "",
        "| seed | chosen | holdout error (%) | test error (%) |",
        "|---|---|---|---|",
    ]
    for seed, row in result["seeds"].items():
        h = row["holdout_errors"][row["chosen"]]
        lines.append(
            f"| {seed} | {row['chosen']} | {100 * h:.2f} | {100 * row['test_error']:.2f} |"
        )
    lines += [
        "",
        f"| | holdout error (%) | test error (%) | test error {conf} CI |",
        "|---|---|---|---|",
    ]
    most = result["most_chosen"]
    names = {
        "chosen": "chosen per seed on the holdout",
        most: f"{most} (chosen most often, {result['counts'][most]} of {len(result['seeds'])})",
    }
    if result["reference"] is not None:
        names[result["reference"]] = f"{result['reference']} (reference)"
    for key, label in names.items():
        row = result["summary"].get(key)
        if row is None:
            continue
        test, ci = _pct(row["test_error"])
        lines.append(f"| {label} | {_pct(row['holdout_error'])[0]} | {test} | {ci} |")
    d = result["chosen_minus_reference"]
    if d is not None:
        p = "-" if d["p_value"] is None else f"{d['p_value']:.2g}"
        mean, ci = _pct(d)
        lines += ["", f"Test error, chosen minus reference (pp, paired): {mean} {ci}, p = {p}."]
    if result["skipped_seeds"]:
        lines += ["", "Seeds left out (a candidate did not complete):"]
        lines += [f"- {s}: {', '.join(v['missing'])}" for s, v in result["skipped_seeds"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a samkit sweep directory")
    p.add_argument("--output", metavar="DIR", help="default: SWEEP_DIR/selection")
    p.add_argument("--reference", metavar="CELL", help="default: sweep.json's report.baseline")
    p.add_argument("--data-dir", metavar="DIR", help="default: each run's --data-dir")
    p.add_argument("--threads", metavar="N", type=int, help="default: each run's --threads")
    p.add_argument("--confidence", type=float, default=0.95, help="default 0.95")
    args = p.parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        p.error(f"--confidence must lie in (0, 1), got {args.confidence}")
    sweep_dir = Path(args.sweep_dir)
    try:
        sweep = load_sweep(sweep_dir)
        reference = args.reference
        if reference is None:
            baseline = sweep.report.get("baseline")
            reference = baseline if baseline in {c.name for c in sweep.cells} else None
        sel = select(sweep, reference)
        tests = evaluate(sweep, sel, args.data_dir, args.threads)
        result = summarise(sel, tests, args.confidence)
    except (ValueError, OSError) as exc:  # RunDirError, SelectionError, data and checkpoints
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDivergedError as exc:  # a chosen run with no number to report
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output) if args.output else sweep_dir / "selection"
    text = markdown(result, sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "selection.json", result)
    (out / "selection.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
