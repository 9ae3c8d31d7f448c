"""``samkit train`` runs every SAM-family method of the registry with its options as flags:
LookSAM (``--looksam-k``, ``--looksam-alpha``), AE-SAM (``--aesam-*``), RST (``--rst-p``,
``--rst-schedule``, ``--rst-p-end``) and late-phase SAM (``--late-sam-start-fraction``).

The flags reach the optimizer (the passes of each step, counted with a forward hook, follow the
flags), the run's length T (``--num-epochs`` x steps per epoch, not ``--max-steps``) reaches the
policies that schedule over it, config.json records the flags, bad values are one line naming
the flag, and a run from before the flags existed resumes (the defaults are its settings)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from train_helpers import FAST, read_json

from samkit.cli import main
from samkit.optim.ascent_policy import AESAM, LateSAM
from samkit.rundir import load_latest_checkpoint
from samkit.train import build
from samkit.train.checks import config_from_values
from samkit.train.config import TrainConfig, settings_differences
from samkit.train.hooks import TrainHooks

# 128 training images in batches of 8: 16 steps per epoch
TINY = [*FAST, "--model-name", "resnet_tiny", "--batch-size", "8", "--amp", "none"]
TINY += ["--no-tensorboard"]
NEW = ["looksam_k", "looksam_alpha", "aesam_delta", "aesam_lambda1", "aesam_lambda2", "rst_p",
       "rst_p_end", "rst_schedule", "late_sam_start_fraction"]  # fmt: skip


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


def run(data, run_dir, *flags, epochs=1, after_step=None):
    """``samkit train`` on the tiny data; the optimizer it built and the forward passes of each
    step (counted with a forward hook on the model)."""
    seen = SimpleNamespace(optimizer=None, passes=[], forwards=0)
    build_model, build_optimizer = build.build_model, build.build_optimizer

    def model_spy(*args, **kwargs):
        model, layers = build_model(*args, **kwargs)
        model.register_forward_hook(lambda *_: setattr(seen, "forwards", seen.forwards + 1))
        return model, layers

    def optimizer_spy(*args, **kwargs):
        seen.optimizer = build_optimizer(*args, **kwargs)
        return seen.optimizer

    def step_done(step):
        seen.passes.append(seen.forwards)
        seen.forwards = 0
        if after_step is not None:
            after_step(step, seen.optimizer)

    argv = [*TINY, "--num-epochs", epochs, "--data-dir", data.dirs["fashion_mnist"]]
    argv += ["--run-dir", run_dir, *flags]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_model", model_spy)
        mp.setattr(build, "build_optimizer", optimizer_spy)
        status = main(["train", *map(str, argv)], train_hooks=TrainHooks(after_step=step_done))
    assert status == 0
    return seen


def test_looksam_k_and_alpha_reach_the_optimizer(data, tmp_path):
    flags = ["--optimizer", "looksam", "--looksam-k", "3", "--looksam-alpha", "0.5"]
    seen = run(data, tmp_path, *flags, "--max-steps", "7")
    assert seen.passes == [2, 1, 1, 2, 1, 1, 2]  # SAM at steps 0, k, 2k
    assert (seen.optimizer.ascent_policy.k, seen.optimizer.alpha) == (3, 0.5)
    config, summary = read_json(tmp_path / "config.json"), read_json(tmp_path / "summary.json")
    assert (config["looksam_k"], config["looksam_alpha"]) == (3, 0.5)
    assert summary["optimizer"] == "LookSAM rho=0.05 k=3 alpha=0.5"
    assert summary["status"] == "max_steps" and summary["skipped_steps"] == 0


def test_late_sam_switches_at_ceil_of_the_fraction_of_the_run(data, tmp_path):
    # T = 2 epochs x 16 steps = 32 (--max-steps does not shorten it): ceil(0.1 T) = ceil(3.2) = 4
    flags = ["--optimizer", "late_sam", "--late-sam-start-fraction", "0.1", "--max-steps", "6"]
    seen = run(data, tmp_path, *flags, epochs=2)
    assert seen.passes == [1, 1, 1, 1, 2, 2]
    policy = seen.optimizer.ascent_policy
    assert type(seen.optimizer) is LateSAM and policy.total_steps == 32 and policy.start() == 4
    config, summary = read_json(tmp_path / "config.json"), read_json(tmp_path / "summary.json")
    assert (config["late_sam_start_fraction"], config["total_steps"]) == (0.1, 32)
    assert summary["optimizer"] == "LateSAM rho=0.05 start=0.1"
    assert math.ceil(0.1 * 32) == 4 and round(0.1 * 32) == 3  # ceil, not round


def test_aesam_schedules_its_threshold_over_the_run(data, tmp_path):
    factors = []

    def after_step(step, opt):  # c_t of the coming step t: (t/T) lambda1 + (1 - t/T) lambda2
        factors.append((step, opt.ascent_policy.threshold_factor()))

    flags = ["--optimizer", "aesam", "--aesam-delta", "0.8", "--aesam-lambda1", "-2"]
    flags += ["--aesam-lambda2", "2", "--max-steps", "4"]
    seen = run(data, tmp_path, *flags, after_step=after_step)
    policy = seen.optimizer.ascent_policy
    assert type(seen.optimizer) is AESAM and policy.total_steps == 16
    assert (policy.delta, policy.lambda1, policy.lambda2) == (0.8, -2.0, 2.0)
    assert factors == [(t, pytest.approx(2.0 - 4.0 * t / 16)) for t in range(1, 5)]
    # mu = 0.2 x, sigma = sqrt(0.2) 0.8 x = 0.358 x, c_0 = 2: the threshold 0.92 x is below x
    assert seen.passes[0] == 2
    assert set(seen.passes) <= {1, 2}
    config, summary = read_json(tmp_path / "config.json"), read_json(tmp_path / "summary.json")
    assert (config["aesam_delta"], config["aesam_lambda1"], config["aesam_lambda2"]) == (
        0.8,
        -2.0,
        2.0,
    )
    assert summary["optimizer"] == "AE-SAM rho=0.05 delta=0.8 c=2->-2"
    _, checkpoint = load_latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint["optimizer"]["samkit"]["ascent_policy"]["steps"] == 4


def test_rst_schedule_and_its_end_value_reach_the_policy(data, tmp_path):
    # piecewise from p = 1 (always SAM) to p_end = 0 (never) at T/2 = 8 of T = 16 steps
    flags = ["--optimizer", "rst", "--rst-p", "1", "--rst-schedule", "piecewise"]
    flags += ["--rst-p-end", "0", "--max-steps", "10"]
    seen = run(data, tmp_path, *flags)
    assert seen.passes == [2] * 8 + [1] * 2
    policy = seen.optimizer.ascent_policy
    assert (policy.p, policy.p_end, policy.schedule, policy.total_steps) == (1, 0, "piecewise", 16)
    config, summary = read_json(tmp_path / "config.json"), read_json(tmp_path / "summary.json")
    assert (config["rst_p"], config["rst_p_end"], config["rst_schedule"]) == (1, 0, "piecewise")
    assert summary["optimizer"] == "RST rho=0.05 p=1->0 piecewise"


def test_rst_constant_probability(data, tmp_path):
    seen = run(data, tmp_path, "--optimizer", "rst", "--rst-p", "0", "--max-steps", "3")
    assert seen.passes == [1, 1, 1]  # never SAM
    assert read_json(tmp_path / "config.json")["rst_p_end"] is None


INTEGER = "is not an integer in [1, 1000000000]"
C_T = "is not a number in [-1000, 1000]"
NO_M = "--sam-m: m-sharpness is not supported with --optimizer"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--looksam-k", "0"], f"argument --looksam-k: '0' {INTEGER}"),
        (["--looksam-k", "2.5"], f"argument --looksam-k: '2.5' {INTEGER}"),
        (["--looksam-alpha", "-0.5"], "argument --looksam-alpha: '-0.5' is not a number in [0, 1"),
        (["--aesam-delta", "1"], "argument --aesam-delta: '1' is not a number in [0, 1)"),
        (["--aesam-lambda1", "1e4"], f"argument --aesam-lambda1: '1e4' {C_T}"),
        (["--aesam-lambda2", "nan"], f"argument --aesam-lambda2: 'nan' {C_T}"),
        (["--rst-p", "1.5"], "argument --rst-p: '1.5' is not a fraction in [0, 1]"),
        (["--rst-p-end", "-0.1"], "argument --rst-p-end: '-0.1' is not a fraction in [0, 1]"),
        (["--rst-schedule", "step"], "argument --rst-schedule: invalid choice: 'step'"),
        (["--late-sam-start-fraction", "2"], "--late-sam-start-fraction: '2' is not a fraction"),
        (["--optimizer", "rst", "--rst-schedule", "linear"], "--rst-schedule linear: moves p_t"),
        (["--optimizer", "rst", "--rst-p-end", "0.1"], "--rst-p-end 0.1: has no effect with"),
        (["--optimizer", "aesam", "--sam-m", "4"], f"{NO_M} aesam"),
        (["--optimizer", "late_sam", "--sam-m", "4"], f"{NO_M} late_sam"),
        (["--optimizer", "rst", "--sam-m", "4"], f"{NO_M} rst"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(argv, message, capsys):
    assert exit_status(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("samkit train: error: ")


def test_the_defaults_are_the_settings_of_runs_from_before_the_flags():
    assert config_from_values({}) == TrainConfig()
    old = TrainConfig().to_dict()
    for key in NEW:
        del old[key]  # a config.json written before these settings existed
    for optimizer in ("looksam", "rst", "sam"):
        cfg = config_from_values({"optimizer": optimizer})
        assert settings_differences({**old, "optimizer": optimizer}, cfg) == []
    cfg = config_from_values({"optimizer": "looksam", "looksam_k": 2})
    assert settings_differences({**old, "optimizer": "looksam"}, cfg) == ["--looksam-k 5 -> 2"]
    # the options of the old runs' classes: LookSAM(k=5, alpha=0.7), RST(p=0.5, constant)
    assert build.optimizer_options(config_from_values({"optimizer": "looksam"})) == {
        "rho": 0.05, "adaptive": False, "k": 5, "alpha": 0.7,
    }  # fmt: skip
    assert build.optimizer_options(config_from_values({"optimizer": "rst"})) == {
        "rho": 0.05, "adaptive": False, "p": 0.5, "p_end": None, "schedule": "constant", "seed": 0,
    }  # fmt: skip


def test_a_looksam_run_from_before_the_flags_resumes(data, tmp_path):
    argv = [*TINY, "--num-epochs", "1", "--data-dir", data.dirs["fashion_mnist"]]
    argv += ["--run-dir", tmp_path, "--optimizer", "looksam"]
    train = lambda *extra: main(["train", *map(str, [*argv, *extra])])  # noqa: E731
    assert train("--max-steps", "2") == 0
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    for key in NEW:
        del config[key]  # as an older samkit wrote it
    config_path.write_text(json.dumps(config))
    assert train("--max-steps", "3") == 0
    assert read_json(tmp_path / "summary.json")["steps"] == 3
    assert train("--max-steps", "4", "--looksam-k", "2") == 2  # another run
