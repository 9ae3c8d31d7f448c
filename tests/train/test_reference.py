"""The main job's reference evidence (``samkit.train.reference``, issue 13): a run at the
settings of a committed sweep's cell is shown beside that sweep's result; no other run is."""

from __future__ import annotations

import json
from pathlib import Path

from train_helpers import FAST, read_json

from samkit.cli import main
from samkit.train import reference
from samkit.train.checks import config_from_values

ROOT = Path(__file__).resolve().parents[2]


def fake_reference(settings: dict) -> dict:
    return {
        "source": "experiments/reports/x/report.json",
        "seeds": [0, 1, 2],
        "machine": {"cpu": "test"},
        "settings": {"sam": settings, "sgd": {**settings, "optimizer": "sgd", "sam_rho": 0.0}},
        "test_error": {
            "sgd": {"mean": 0.072, "half_width": 0.002, "n": 3},
            "sam": {"mean": 0.069, "half_width": 0.003, "n": 3},
        },
        "difference": {
            "cell": "sam",
            "baseline": "sgd",
            "mean": -0.003,
            "ci_low": -0.005,
            "ci_high": -0.001,
            "p_value": 0.02,
            "n_pairs": 3,
        },  # fmt: skip
    }


def test_only_the_same_settings_match():
    defaults = config_from_values({}).to_dict()
    ref = fake_reference(reference.settings_of(defaults))
    # what only says where and how a run executes does not matter
    moved = {**defaults, "run_seed": 7, "threads": 1, "run_dir": "/elsewhere", "tensorboard": 0}
    assert reference.compare(moved, 0.07, ref)["method"] == "sam"
    sgd = config_from_values({"optimizer": "sgd"}).to_dict()
    assert reference.compare(sgd, 0.07, ref)["method"] == "sgd"
    for change in ({"num_epochs": 3}, {"sam_rho": 0.1}, {"train_subset": 500}):
        assert reference.compare(config_from_values(change).to_dict(), 0.07, ref) is None
    # a setting newer than the reference: matches at its default only
    older = fake_reference({k: v for k, v in ref["settings"]["sam"].items() if k != "ema_decay"})
    assert reference.compare(defaults, 0.07, older)["method"] == "sam"
    assert reference.compare({**defaults, "ema_decay": 0.9}, 0.07, older) is None
    # under torchrun each replica perturbs with its own batch: another setting
    assert reference.compare(defaults, 0.07, ref, world_size=2) is None


def test_describe_says_the_numbers():
    ref = fake_reference(reference.settings_of(config_from_values({}).to_dict()))
    lines = reference.describe(reference.compare(config_from_values({}).to_dict(), 0.0675, ref))
    text = "\n".join(lines)
    assert "experiments/reports/x/report.json" in text
    assert "sgd: test error 7.20% +- 0.20% (mean +- 95% CI over 3 seeds)" in text
    assert "sam - sgd: -0.30 points, 95% CI [-0.50, -0.10], p = 0.02" in text
    assert "this run (sam): test error 6.75%" in text


def test_the_packaged_reference_is_the_committed_evidence_for_the_main_job():
    ref = reference.load_reference()
    assert ref is not None, "src/samkit/train/main_job_reference.json is missing"
    # the main job (samkit train with no flags) is its "sam" cell
    defaults = config_from_values({}).to_dict()
    assert reference.compare(defaults, 0.07, ref)["method"] == ref["difference"]["cell"] == "sam"
    report = json.loads((ROOT / ref["source"]).read_text())
    for cell in report["cells"]:
        estimate = cell["metrics"]["test_error"]["estimate"]
        assert ref["test_error"][cell["cell"]]["mean"] == estimate["mean"]
        assert ref["test_error"][cell["cell"]]["half_width"] == estimate["half_width"]
    diff = next(d for d in report["differences"] if d["cell"] == "sam")["metrics"]["test_error"]
    assert (ref["difference"]["ci_low"], ref["difference"]["ci_high"]) == (
        diff["ci_low"],
        diff["ci_high"],
    )


def test_a_run_at_the_reference_settings_shows_it(data, tmp_path, monkeypatch, capsys):
    argv = ["--data-dir", data.dirs["fashion_mnist"], "--model-name", "resnet_tiny"]
    argv += ["--num-epochs", "1", "--batch-size", "64", "--amp", "none", *FAST]
    settings = reference.settings_of(
        config_from_values(
            {"data_dir": str(data.dirs["fashion_mnist"]), "model_name": "resnet_tiny",
             "num_epochs": 1, "batch_size": 64, "amp": "none"}
        ).to_dict()
    )  # fmt: skip
    monkeypatch.setattr(reference, "load_reference", lambda: fake_reference(settings))
    assert main(["train", *map(str, argv), "--run-dir", str(tmp_path / "a")]) == 0
    summary = read_json(tmp_path / "a" / "summary.json")
    assert summary["reference"]["method"] == "sam"
    assert summary["reference"]["test_error"] == summary["final_test_error_rate"]
    assert "committed evidence at these settings" in capsys.readouterr().out
    # another setting: nothing
    assert (
        main(["train", *map(str, argv), "--sam-rho", "0.1", "--run-dir", str(tmp_path / "b")]) == 0
    )
    assert "reference" not in read_json(tmp_path / "b" / "summary.json")
    assert "committed evidence" not in capsys.readouterr().out


def test_no_packaged_reference_means_no_comparison(monkeypatch):
    monkeypatch.setattr(reference, "load_reference", lambda: None)
    assert reference.compare(config_from_values({}).to_dict(), 0.07) is None
