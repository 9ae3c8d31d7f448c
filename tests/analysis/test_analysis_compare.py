"""Run comparison: tables, curves and clear errors for broken run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samkit.analysis import (
    RunDirError,
    compare_runs,
    comparison_table,
    load_run,
    load_runs,
    plot_run_curves,
    run_row,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run: Path, records: list[dict], summary: dict | None = None) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    sgd = write_run(
        tmp_path / "sgd",
        [
            dict(
                epoch=e,
                test_error_rate=t,
                train_loss=l,
                learning_rate=lr,
                images_per_sec=i,
                elapsed_sec=s,
            )
            for e, t, l, lr, i, s in [
                (1, 0.2, 1.0, 0.1, 1000, 4.0),
                (2, 0.1, 0.5, 0.05, 1100, 8.0),
                (3, 0.12, 0.3, 0.0, 1200, 12.34),
            ]
        ],
        dict(
            final_test_error_rate=0.12,
            best_test_error_rate=0.1,
            total_time_sec=12.34,
            images_per_sec=1100.4,
            config={"learning_rate": 0.1, "sam_rho": 0.0},
        ),
    )
    # no summary.json, no learning rate nor speed: the table falls back on the metrics or "-"
    sam = write_run(
        tmp_path / "sam",
        [
            dict(epoch=1, test_error_rate=0.09, train_loss=0.8),
            dict(epoch=2, test_error_rate=0.0875, train_loss=0.6, elapsed_sec=20.04),
        ],
    )
    return [sgd, sam]


def test_markdown_and_text_tables(two_runs):
    runs = load_runs(two_runs)
    assert [r.name for r in runs] == ["sgd", "sam"]
    assert comparison_table(runs) == (
        "| run | final test error (%) | best test error (%) | time (s) | images/s |\n"
        "|:---|---:|---:|---:|---:|\n"
        "| sgd | 12.00 | 10.00 | 12.3 | 1100 |\n"
        "| sam | 8.75 | 8.75 | 20.0 | - |\n"
    )
    assert comparison_table(runs, fmt="text") == (
        "run  final test error (%)  best test error (%)  time (s)  images/s\n"
        "---  --------------------  -------------------  --------  --------\n"
        "sgd                 12.00                10.00      12.3      1100\n"
        "sam                  8.75                 8.75      20.0         -\n"
    )
    with pytest.raises(ValueError, match="fmt"):
        comparison_table(runs, fmt="html")


def test_samkit_train_key_names_and_missing_keys(tmp_path):
    """The keys ``samkit train`` writes (accuracies, wall_seconds, images_per_sec)."""
    run = write_run(
        tmp_path / "run",
        [
            dict(epoch=1, test_error_rate=0.2, images_per_sec=900.0, wall_seconds=50.0),
            dict(epoch=2, test_error_rate=0.1, images_per_sec=1100.0, wall_seconds=99.0),
        ],
        dict(final_test_accuracy=0.9, best_test_accuracy=0.93, wall_seconds=100.0),
    )
    row = run_row(load_run(run))
    assert row["final_test_error"] == pytest.approx(0.1)
    assert row["best_test_error"] == pytest.approx(0.07)
    assert row["time_sec"] == 100.0 and row["images_per_sec"] == 1000.0
    bare = write_run(tmp_path / "bare", [{"epoch": 1, "note": "nothing else"}], {"config": {}})
    assert comparison_table(load_runs([bare])).splitlines()[-1] == "| bare | - | - | - | - |"


def test_alternative_key_spellings_and_partial_epochs(tmp_path):
    """Per-epoch accuracy only, ``lr``, ``images_per_sec`` per epoch; a partial epoch record
    replaced by the resumed run's full record of that epoch is not counted twice."""
    run = write_run(
        tmp_path / "run",
        [
            dict(epoch=1, test_accuracy=0.7, lr=0.1, images_per_sec=100.0, wall_seconds=5.0),
            dict(epoch=2, test_accuracy=0.1, lr=0.05, images_per_sec=1.0, partial_epoch=True),
            dict(epoch=2, test_accuracy=0.8, lr=0.05, images_per_sec=300.0, wall_seconds=20.0),
        ],
    )
    data = load_run(run)
    assert len(data.metrics) == 2
    assert data.curve("test_error_rate") == ([1.0, 2.0], [pytest.approx(0.3), pytest.approx(0.2)])
    assert data.curve("learning_rate") == ([1.0, 2.0], [0.1, 0.05])
    row = run_row(data)
    assert row["final_test_error"] == pytest.approx(0.2)
    assert row["best_test_error"] == pytest.approx(0.2)
    assert row["images_per_sec"] == 200.0 and row["time_sec"] == 20.0
    assert set(plot_run_curves([data], tmp_path / "png")) == {"test_error_rate", "learning_rate"}
    # a partial last epoch (stopped, not resumed) is kept: it is the latest information
    stopped = write_run(
        tmp_path / "stopped",
        [
            dict(epoch=1, test_error_rate=0.3),
            dict(epoch=2, test_error_rate=0.25, partial_epoch=True),
        ],
    )
    assert run_row(load_run(stopped))["final_test_error"] == 0.25


def test_names_are_made_unique(tmp_path):
    a = write_run(tmp_path / "rho_0" / "seed_0", [{"epoch": 1}])
    b = write_run(tmp_path / "rho_0.05" / "seed_0", [{"epoch": 1}])
    assert [r.name for r in load_runs([a, b])] == ["rho_0/seed_0", "rho_0.05/seed_0"]
    assert [r.name for r in load_runs([a, b], names=["sgd", "sam"])] == ["sgd", "sam"]


def test_curves_and_compare_runs(two_runs, tmp_path):
    out = tmp_path / "report"
    report = compare_runs(two_runs, out)
    assert set(report.plots) == {"test_error_rate", "train_loss", "learning_rate"}
    for name in ("test_error.png", "train_loss.png", "learning_rate.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "comparison.md").read_text() == report.table
    assert [r["name"] for r in report.rows] == ["sgd", "sam"]
    json.dumps(report.to_dict())
    # a metric no run has is skipped, not drawn empty
    only = plot_run_curves(load_runs(two_runs), tmp_path / "x", metrics=["test_loss"])
    assert only == {}


def test_errors_name_the_file(tmp_path, two_runs):
    sgd = two_runs[0]
    with (sgd / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 4, "test_error_rate": 0.1\n')  # truncated
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:4: corrupt line"):
        load_run(sgd)

    not_object = write_run(tmp_path / "list", [{"epoch": 1}])
    (not_object / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(RunDirError, match=r"list/metrics\.jsonl:2: .*JSON object"):
        load_run(not_object)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=r"no metrics: .*empty/metrics\.jsonl does not exist"):
        load_run(empty)
    (empty / "metrics.jsonl").write_text("\n")
    with pytest.raises(RunDirError, match=r"empty/metrics\.jsonl has no records"):
        load_run(empty)

    with pytest.raises(RunDirError, match="run directory not found: .*nowhere"):
        load_runs([tmp_path / "nowhere"])

    bad_summary = write_run(tmp_path / "bad", [{"epoch": 1}])
    (bad_summary / "summary.json").write_text("{oops")
    with pytest.raises(RunDirError, match=r"bad/summary\.json: corrupt"):
        load_run(bad_summary)
