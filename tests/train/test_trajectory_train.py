"""``samkit train --optimizer saf|mesa`` on tiny Fashion-MNIST (128 images, 16 steps an epoch):
before the start epoch the weights are SGD's bit for bit; a run stopped by --max-steps (at an
epoch end, then mid-epoch) and resumed ends with the weights, metrics, SAF's stored logits and
MESA's teacher of an uninterrupted one; the trajectory term changes the training; bad values
are one line naming the flag (exit status 2). The loss term itself is tested in float64 in
test_trajectory.py."""

from __future__ import annotations

import pytest
import torch
from train_helpers import FAST, assert_same_weights, read_json, read_metrics

from samkit.cli import main
from samkit.rundir import load_latest_checkpoint
from samkit.train.checks import config_from_values

TIMING = {"epoch_seconds", "images_per_sec", "wall_seconds"}
BASE = [*FAST, "--model-name", "resnet_tiny", "--batch-size", "8", "--no-tensorboard"]
BASE += ["--num-epochs", "3", "--image-level-augmentations", "basic"]
# the term from epoch 2 on; SAF's teacher: the logits of the epoch before
TRAJECTORY = ["--trajectory-start-epoch", "1"]
SAF_ONLY = ["--saf-epochs-back", "1"]  # refused with mesa: an option it does not use


def train(data, run_dir, *argv) -> int:
    args = ["train", *BASE, "--data-dir", str(data.dirs["fashion_mnist"]), "--run-dir"]
    return main([*args, str(run_dir), *map(str, argv)])


def state(run_dir) -> dict:
    latest = load_latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    return latest[1]


def metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def sgd(data, tmp_path_factory):
    """SGD runs: one epoch (16 steps) and the whole three."""
    root = tmp_path_factory.mktemp("sgd")
    assert train(data, root / "one", "--optimizer", "sgd", "--max-steps", "16") == 0
    assert train(data, root / "all", "--optimizer", "sgd") == 0
    return state(root / "one")["model"], state(root / "all")["model"]


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_sgd_before_the_start_and_a_resumed_run_continues_exactly(data, tmp_path, sgd, method):
    options = ["--optimizer", method, *TRAJECTORY, *(SAF_ONLY if method == "saf" else [])]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(data, whole, *options) == 0
    # epoch 1 (the plain loss): SGD's weights bit for bit; a checkpoint at its end
    assert train(data, parts, *options, "--max-steps", "16") == 0
    assert read_json(parts / "summary.json")["status"] == "max_steps"
    assert_same_weights(state(parts)["model"], sgd[0])
    assert train(data, parts, *options, "--max-steps", "27") == 0  # stops mid-epoch 2
    assert state(parts)["global_step"] == 27
    assert train(data, parts, *options) == 0
    a, b = state(whole), state(parts)
    assert a["global_step"] == b["global_step"] == 48
    assert_same_weights(a["model"], b["model"])
    ta, tb = a["trajectory"], b["trajectory"]
    assert ta.keys() == tb.keys() and ta["method"] == tb["method"] == method
    if method == "saf":  # the stored logits, and in which epoch each was written
        bank = ("logits", "written")
        assert_same_weights({k: ta[k] for k in bank}, {k: tb[k] for k in bank})
    else:  # the teacher: the EMA of the weights and buffers
        assert_same_weights(ta["ema"], tb["ema"])
    assert metrics(whole) == metrics(parts)
    # the term did train: not SGD's weights
    assert not torch.equal(a["model"]["fc.weight"], sgd[1]["fc.weight"])
    if method == "saf":  # every sample's logits from epoch 3 (0-based 2), from its last step
        assert a["trajectory"]["written"].tolist() == [[2] * 128]
        assert a["trajectory"]["logits"].abs().sum() > 0
    else:
        assert not torch.equal(a["trajectory"]["ema"]["fc.weight"], a["model"]["fc.weight"])
    summary = read_json(whole / "summary.json")
    label = {"saf": "SAF lambda=0.3 tau=5 E=1 from epoch 2"}
    label["mesa"] = "MESA lambda=0.8 tau=5 decay=0.9998 from epoch 2"
    assert summary["optimizer"] == label[method]


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--trajectory-lambda", "-1"], "--trajectory-lambda"),
        (["--trajectory-lambda", "2000"], "--trajectory-lambda"),
        (["--trajectory-tau", "0"], "--trajectory-tau"),
        (["--trajectory-start-epoch", "-1"], "--trajectory-start-epoch"),
        (["--trajectory-start-epoch", "1.5"], "--trajectory-start-epoch"),
        (["--saf-epochs-back", "0"], "--saf-epochs-back"),
        (["--mesa-ema-decay", "1"], "--mesa-ema-decay"),
        (["--mesa-ema-decay", "0"], "--mesa-ema-decay"),
        (["--trajectory-start-epoch", "3"], "--trajectory-start-epoch 3"),  # never starts
        (["--saf-epochs-back", "3"], "--trajectory-start-epoch 1"),  # SAF: no teacher in time
        (["--sam-rho", "0.1"], "--sam-rho"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(data, tmp_path, capsys, argv, flag):
    run = ["train", *BASE, "--data-dir", str(data.dirs["fashion_mnist"]), "--optimizer", "saf"]
    run += ["--trajectory-start-epoch", "1", "--run-dir", str(tmp_path / "run")]
    assert exit_status([*run, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_accepted_under_torchrun(monkeypatch):  # tests/distributed/test_ddp_train.py runs it
    monkeypatch.setenv("WORLD_SIZE", "2")
    for method in ("saf", "mesa"):
        assert config_from_values({"optimizer": method}).optimizer == method


def test_lambda_defaults_per_method_and_old_settings_resume():
    from samkit.train.config import TrainConfig, settings_differences

    assert config_from_values({"optimizer": "saf"}).trajectory_lambda == 0.3
    assert config_from_values({"optimizer": "mesa"}).trajectory_lambda == 0.8
    assert config_from_values({"optimizer": "mesa", "trajectory_lambda": 0.5}).trajectory_lambda
    cfg = config_from_values({"optimizer": "sam"})
    old = {k: v for k, v in cfg.to_dict().items() if "trajectory" not in k and "saf" not in k}
    old.pop("mesa_ema_decay")  # a run from before these settings existed
    assert settings_differences(old, cfg) == [] and cfg.effective_optimizer == "sam"
    assert TrainConfig(optimizer="saf").effective_optimizer == "saf"
    assert TrainConfig(optimizer="sam", sam_rho=0.0).effective_optimizer == "sgd"
