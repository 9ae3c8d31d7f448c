"""Sweep specs: the cells they expand to, and bad specs as one line naming the file and key."""

from __future__ import annotations

import json

import pytest

from samkit.cli import main
from samkit.sweep import SpecError, load_spec
from samkit.sweep.spec import train_argv

SPEC = """
seeds = [0, 1]
[base]
model_name = "resnet_tiny"
num_epochs = 2
[[variants]]
name = "sgd"
optimizer = "sgd"
[[variants]]
name = "sam"
optimizer = "sam"
sam_m = 8
[grid]
label_noise = [0.2, 0.4]
[report]
baseline = "sgd"
"""


def test_cells_are_variants_times_grid_times_seeds(tmp_path):
    path = tmp_path / "noise.toml"
    path.write_text(SPEC)
    spec = load_spec(path)
    cells = spec.cells()
    assert spec.name == "noise" and len(cells) == 8
    assert [(c.name, c.seed) for c in cells[:4]] == [
        ("sgd-label_noise=0.2", 0),
        ("sgd-label_noise=0.2", 1),
        ("sgd-label_noise=0.4", 0),
        ("sgd-label_noise=0.4", 1),
    ]
    sam = cells[-1]
    assert sam.run_dir == "sam-label_noise=0.4/seed_1"
    assert sam.flags == {
        "model_name": "resnet_tiny",
        "num_epochs": 2,
        "optimizer": "sam",
        "sam_m": 8,
        "label_noise": 0.4,
    }
    assert sam.varying == {"variant": "sam", "label_noise": 0.4}
    assert train_argv({"sam_m": 8, "nesterov": False, "data_dir": None}) == [
        "--sam-m", "8", "--nesterov", "false",
    ]  # fmt: skip


def test_json_spec_and_a_single_unnamed_variant(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"seeds": [3], "grid": {"sam_rho": [0.01, 0.1]}}))
    assert [c.run_dir for c in load_spec(path).cells()] == [
        "sam_rho=0.01/seed_3",
        "sam_rho=0.1/seed_3",
    ]


@pytest.mark.parametrize(
    "text,message",
    [
        ("seeds = [0, 0]", "seeds must be a list of distinct non-negative integers"),
        ("seeds = [-1]", "seeds must be"),
        ("colour = 1", "unknown key 'colour'"),
        ("[base]\nnum_epoch = 3", "'num_epoch' is not a samkit train setting"),
        ("[base]\nrun_seed = 3", "'run_seed' is set by the sweep"),
        ("[base]\nnum_epochs = 0", "--num-epochs: 0 is not an integer in [1, 100000]"),
        ("[base]\nnum_epochs = 'three'", "--num-epochs: 'three' is not an integer"),
        ("[base]\nsam_rho = inf", "--sam-rho: inf is not a number in [0, 1000]"),
        ("[base]\nnesterov = 1", "--nesterov: 1 is not true or false"),
        ("[base]\noptimizer = 'adam'", "--optimizer: invalid choice: 'adam'"),
        ("[grid]\nsam_rho = []", "[grid] sam_rho must be a non-empty list"),
        ("[[variants]]\noptimizer = 'sgd'", "variant 1 needs a name"),
        (
            "[base]\noptimizer = 'sgd'\nsam_rho = 0.1",
            "--sam-rho 0.1: has no effect with --optimizer sgd",
        ),
        ("seeds = [", "not valid TOML"),
    ],
)
def test_bad_specs_are_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=None) as info:
        load_spec(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samkit sweep: error: ") and err.count("\n") == 1
    assert message in err


def test_command_line_sweep_and_dry_run(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "--set", "num_epochs=2", "--grid", "optimizer=sgd,sam", "--seeds", "0", "1",
            "--output", str(out), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"4 cells in {out}"
    assert lines[0] == "optimizer=sgd/seed_0: num_epochs=2 optimizer=sgd"
    assert not out.exists()  # a dry run writes nothing
    assert main(["sweep", "--set", "num_epochs=two"]) == 2
    assert "num_epochs=two: not a valid value of num_epochs" in capsys.readouterr().err


def test_a_finished_cell_is_recognised_even_from_before_a_setting_existed(tmp_path):
    from samkit.rundir import write_json
    from samkit.sweep import is_finished
    from samkit.sweep.spec import check_cell
    from samkit.train.build import resolve_paths

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"seeds": [0], "base": {"num_epochs": 2}}))
    (cell,) = load_spec(path).cells()
    config = resolve_paths(check_cell(cell, "test")).to_dict()
    run = tmp_path / cell.run_dir
    run.mkdir(parents=True)
    assert not is_finished(tmp_path, cell)  # no summary yet
    del config["gsam_alpha"]  # written by a samkit without that setting: its default applied
    write_json(run / "summary.json", {"status": "completed", "config": config})
    assert is_finished(tmp_path, cell)
    write_json(run / "summary.json", {"status": "completed", "config": {**config, "num_epochs": 3}})
    assert not is_finished(tmp_path, cell)  # other settings: not this cell's run


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"name": "../outside"}, "name '../outside' cannot name a directory (a path separator)"),
        ({"name": ".."}, "name '..' cannot name a directory"),
        ({"variants": [{"name": "a"}, {"name": "../b"}]}, "cell '../b' cannot name a directory"),
        ({"variants": [{"name": ".."}], "grid": {}}, "cell '..' cannot name a directory"),
    ],
)
def test_names_that_would_lead_outside_the_sweep_directory_are_refused(tmp_path, spec, problem):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"seeds": [0], "base": {"num_epochs": 1}, **spec}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_seed_in_a_text_setting_is_each_cells_seed(tmp_path):
    for seed in (0, 1):  # first-stage runs to relabel from (checked up front, every seed's)
        (tmp_path / "first" / f"seed_{seed}").mkdir(parents=True)
        (tmp_path / "first" / f"seed_{seed}" / "config.json").write_text("{}")
    path = tmp_path / "second.toml"
    path.write_text(
        f'seeds = [0, 1]\n[base]\nbootstrap_from = "{tmp_path}/first/seed_{{seed}}"\n'
        'dataset = "fashion_mnist"\n'
    )
    cells = load_spec(path).cells()
    assert [c.flags["bootstrap_from"] for c in cells] == [
        f"{tmp_path}/first/seed_0",
        f"{tmp_path}/first/seed_1",
    ]
    assert cells[0].flags["dataset"] == "fashion_mnist"  # other text is left alone
    (tmp_path / "first" / "seed_1" / "config.json").unlink()  # seed 1's is not a run
    with pytest.raises(SpecError, match=r"first/seed_1: not a samkit run directory"):
        load_spec(path)
