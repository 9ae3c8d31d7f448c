"""experiments/select_by_holdout.py: rho chosen per seed on the holdout, only then the test set.

Fake sweeps (sweep.json and run directories written directly) for the selection rule, where the
holdout and test orderings disagree; one real tiny sweep of holdout runs for the evaluation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from samkit.cli import main as samkit_main
from samkit.report.aggregate import SWEEP_FILE, SWEEP_FORMAT
from samkit.rundir import layout as keys
from samkit.rundir import read_summary, write_json, write_jsonl

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "select_by_holdout.py"
_spec = importlib.util.spec_from_file_location("select_by_holdout", SCRIPT)
sbh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbh)

REF = "sam_rho=0"


def write_run(run_dir: Path, holdout: float | None, test: float | None, split="holdout") -> None:
    """A completed run whose final evaluation (on ``split``) gave ``holdout``; ``test``: also a
    RUN/test_eval.json as samkit evaluate --split test --output writes it. ``holdout`` None: the
    run has not finished (no summary.json)."""
    run_dir.mkdir(parents=True)
    write_jsonl(run_dir / keys.METRICS_FILE, [{keys.EPOCH: 1, keys.TRAIN_LOSS: 0.5}])
    if holdout is not None:
        summary = {"status": "completed", "eval_split": split}
        write_json(run_dir / keys.SUMMARY_FILE, {**summary, keys.FINAL_TEST_ERROR_RATE: holdout})
    if test is not None:
        write_json(run_dir / sbh.TEST_EVAL_FILE, {"split": "test", "test_error_rate": test})


def write_sweep(sweep_dir: Path, errors: dict[str, dict[int, tuple]], **runs) -> Path:
    """``errors``: cell -> seed -> (holdout error, test error or None)."""
    entries = []
    for cell, seeds in errors.items():
        rho = float(cell.split("=")[1])
        for seed, (holdout, test) in seeds.items():
            write_run(sweep_dir / cell / f"seed_{seed}", holdout, test, **runs)
            entries.append({"cell": cell, "variant": "run", "seed": seed,
                            "flags": {"sam_rho": rho, "use_test_set": False},
                            "varying": {"variant": "run", "sam_rho": rho},
                            "run_dir": f"{cell}/seed_{seed}"})  # fmt: skip
    manifest = {"format": SWEEP_FORMAT, "name": "rho", "cells": entries,
                "report": {"baseline": REF}}  # fmt: skip
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(manifest))
    return sweep_dir


# Holdout and test disagree: on the test set rho 0.2 would always win; on the holdout 0.05
# wins seeds 0 and 2, 0.1 wins seed 1.
DISAGREE = {
    REF: {0: (0.30, 0.31), 1: (0.32, 0.33), 2: (0.31, 0.30)},
    "sam_rho=0.05": {0: (0.10, 0.40), 1: (0.22, 0.41), 2: (0.12, 0.42)},
    "sam_rho=0.1": {0: (0.20, 0.30), 1: (0.11, 0.31), 2: (0.21, 0.32)},
    "sam_rho=0.2": {0: (0.25, 0.01), 1: (0.25, 0.02), 2: (0.25, 0.03)},
}


def test_the_choice_follows_the_holdout_not_the_test_set(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sw", DISAGREE)
    assert sbh.main([str(sweep)]) == 0
    result = json.loads((sweep / "selection" / "selection.json").read_text())
    assert result["format"] == "samkit-selection/1" and result["reference"] == REF
    assert result["candidates"] == ["sam_rho=0.05", "sam_rho=0.1", "sam_rho=0.2"]
    chosen = {s: row["chosen"] for s, row in result["seeds"].items()}
    assert chosen == {"0": "sam_rho=0.05", "1": "sam_rho=0.1", "2": "sam_rho=0.05"}
    assert result["most_chosen"] == "sam_rho=0.05" and result["counts"] == {
        "sam_rho=0.05": 2, "sam_rho=0.1": 1}  # fmt: skip
    # The test errors reported are those of the chosen runs (from their test_eval.json).
    assert {s: r["test_error"] for s, r in result["seeds"].items()} == {
        "0": 0.40, "1": 0.31, "2": 0.42}  # fmt: skip
    assert result["seeds"]["1"]["holdout_errors"] == {
        "sam_rho=0.05": 0.22, "sam_rho=0.1": 0.11, "sam_rho=0.2": 0.25}  # fmt: skip
    summary = result["summary"]
    assert summary["chosen"]["test_error"]["mean"] == pytest.approx((0.40 + 0.31 + 0.42) / 3)
    assert summary["chosen"]["holdout_error"]["mean"] == pytest.approx((0.10 + 0.11 + 0.12) / 3)
    assert summary["chosen"]["test_error"]["n"] == 3
    assert summary["chosen"]["test_error"]["ci_low"] < summary["chosen"]["test_error"]["mean"]
    assert summary["sam_rho=0.05"]["test_error_per_seed"] == {"0": 0.40, "1": 0.41, "2": 0.42}
    assert summary[REF]["test_error"]["mean"] == pytest.approx((0.31 + 0.33 + 0.30) / 3)
    diff = result["chosen_minus_reference"]
    assert diff["differences"] == pytest.approx({"0": 0.09, "1": -0.02, "2": 0.12})
    assert diff["n_pairs"] == 3 and diff["p_value"] is not None
    md = (sweep / "selection" / "selection.md").read_text()
    assert md == capsys.readouterr().out
    assert "| 1 | sam_rho=0.1 | 11.00 | 31.00 |" in md
    assert "| sam_rho=0.05 (chosen most often, 2 of 3) | 14.67 ± 15.97 | 41.00 ± 2.48 |" in md
    assert "sam_rho=0.2" not in md.split("|---|")[-1]  # the test set's favourite: never chosen


def test_only_the_chosen_runs_are_evaluated_after_the_choice(tmp_path, monkeypatch):
    no_test = {c: {s: (h, None) for s, (h, _) in seeds.items()} for c, seeds in DISAGREE.items()}
    sweep = write_sweep(tmp_path / "sw", no_test)
    calls = []

    def fake_evaluate(run_dir, *, data_dir, split, threads):
        calls.append((Path(run_dir).relative_to(sweep).as_posix(), split))
        return {"split": split, "test_error_rate": 0.5}

    monkeypatch.setattr(sbh, "evaluate_run", fake_evaluate)
    assert sbh.main([str(sweep), "--output", str(tmp_path / "out")]) == 0
    expected = {f"{c}/seed_{s}" for c, s in [("sam_rho=0.05", 0), ("sam_rho=0.1", 1),
                                             ("sam_rho=0.05", 2), ("sam_rho=0.05", 1)]}  # fmt: skip
    expected |= {f"{REF}/seed_{s}" for s in (0, 1, 2)}
    assert sorted(c for c, _ in calls) == sorted(expected)  # each once, all on the test set
    assert {split for _, split in calls} == {"test"}
    written = {p.parent.relative_to(sweep).as_posix() for p in sweep.rglob(sbh.TEST_EVAL_FILE)}
    assert written == expected
    assert "sam_rho=0.2/seed_0" not in written
    # A second pass reads the files instead of evaluating again.
    calls.clear()
    assert sbh.main([str(sweep), "--output", str(tmp_path / "out")]) == 0
    assert calls == []


def test_a_seed_without_every_candidate_is_left_out(tmp_path):
    errors = {c: dict(seeds) for c, seeds in DISAGREE.items()}
    errors["sam_rho=0.2"][2] = (None, None)  # seed 2 of rho 0.2 not finished
    sweep = write_sweep(tmp_path / "sw", errors)
    assert sbh.main([str(sweep), "--reference", "sam_rho=0"]) == 0
    result = json.loads((sweep / "selection" / "selection.json").read_text())
    assert list(result["seeds"]) == ["0", "1"]
    assert result["skipped_seeds"] == {"2": {"missing": ["sam_rho=0.2"]}}
    assert "- 2: sam_rho=0.2" in (sweep / "selection" / "selection.md").read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("test_runs", "evaluated on the test set during training, not on a holdout; selection "
                      "needs runs with use_test_set = false"),
        ("none_finished", "no seed has a completed run of every candidate"),
        ("no_sweep", "sweep directory not found"),
        ("bad_reference", "reference 'sgd' is not a cell of"),
        ("bad_test_eval", "not a test-set evaluation (samkit evaluate --split test)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case, message):
    sweep, argv = tmp_path / "sw", []
    if case == "test_runs":
        write_sweep(sweep, DISAGREE, split="test")
    elif case == "none_finished":
        write_sweep(sweep, {**DISAGREE, "sam_rho=0.1": {0: (None, None), 1: (None, None)}})
    elif case == "bad_reference":
        write_sweep(sweep, DISAGREE)
        argv = ["--reference", "sgd"]
    elif case == "bad_test_eval":
        write_sweep(sweep, DISAGREE)
        write_json(sweep / "sam_rho=0.05" / "seed_0" / sbh.TEST_EVAL_FILE, {"split": "holdout"})
    assert sbh.main([str(sweep), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("select_by_holdout: error: ") and err.count("\n") == 1
    assert message in err
    assert not (sweep / "selection").exists()


def test_a_real_sweep_of_holdout_runs_end_to_end(fmnist_dir, tmp_path, capsys):
    """2 rhos x 2 seeds of one epoch (4 steps) each, trained on the training set minus its 10%
    holdout; the script (run as on a clean checkout) evaluates the chosen runs as samkit
    evaluate does."""
    out = tmp_path / "sw"
    argv = ["sweep", "--set", "model_name=resnet_tiny", "--set", "batch_size=16",
            "--set", "tensorboard=false", "--set", f"data_dir={fmnist_dir}",
            "--set", "optimizer=sam", "--set", "use_test_set=false",
            "--set", "num_epochs=1", "--grid", "sam_rho=0.05,0.5", "--seeds", "0", "1",
            "--output", str(out), "--threads", "1", "--workers", "2"]  # fmt: skip
    assert samkit_main(argv) == 0
    capsys.readouterr()
    summaries = {
        (c["cell"], c["seed"]): read_summary(out / c["run_dir"])
        for c in json.loads((out / SWEEP_FILE).read_text())["cells"]
    }
    assert {s["eval_split"] for s in summaries.values()} == {"holdout"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "selection" / "selection.json").read_text())
    assert result["reference"] is None and result["candidates"] == ["sam_rho=0.05", "sam_rho=0.5"]
    for seed, row in result["seeds"].items():
        holdout = {
            c: summaries[c, int(seed)][keys.FINAL_TEST_ERROR_RATE] for c in result["candidates"]
        }
        assert row["holdout_errors"] == holdout
        assert row["chosen"] == min(result["candidates"], key=lambda c: (holdout[c], c))
        run = out / row["chosen"] / f"seed_{seed}"
        saved = json.loads((run / sbh.TEST_EVAL_FILE).read_text())
        assert samkit_main(["evaluate", str(run), "--split", "test"]) == 0
        assert saved == json.loads(capsys.readouterr().out)  # what samkit evaluate prints
        assert saved["split"] == "test" and saved["num_examples"] == 32  # the whole test set
        assert row["test_error"] == saved["test_error_rate"]
    assert "| seed | chosen | holdout error (%) | test error (%) |" in done.stdout
