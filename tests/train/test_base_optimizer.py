"""``--base-optimizer``: the optimizer SAM (or any method of the registry) wraps, SGD or AdamW.

A ``samkit train`` run over AdamW is compared with SAM(AdamW) built by hand on the same model
and batches; every registered method takes a few steps over both bases through the trainer's
own builders; SAM-ON runs end to end; bad values are one line naming the flag; and settings
saved by runs from before these flags existed still resume (their defaults are the old
behaviour, nothing else)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import FAST, final_weights, read_json

from samkit.cli import main
from samkit.optim import SAM, list_optimizers
from samkit.train import SharpnessAwareStep, build
from samkit.train.checks import config_from_values
from samkit.train.config import TrainConfig, settings_differences
from samkit.train.errors import ConfigError
from samkit.train.schedule import CosineSchedule

TINY = [*FAST, "--model-name", "resnet_tiny", "--num-epochs", "1", "--batch-size", "8"]
ADAMW = ["--base-optimizer", "adamw", "--adamw-beta1", "0.8", "--adamw-beta2", "0.99"]
ADAMW += ["--adamw-eps", "1e-6", "--weight-decay", "0.01", "--learning-rate", "0.003"]


def train(*argv) -> int:
    return main(["train", *map(str, argv)])


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


class RecordingStep:
    """The run's training step, recording each batch it is given."""

    def __init__(self, step, batches):
        self._step, self._batches = step, batches

    def __call__(self, x, y):
        self._batches.append((x.detach().clone(), y.detach().clone()))
        return self._step(x, y)

    def __getattr__(self, name):
        return getattr(self._step, name)


def test_a_run_over_adamw_equals_sam_over_adamw_by_hand(data, tmp_path):
    seen = SimpleNamespace(initial=None, optimizer=None, batches=[])
    build_model, build_optimizer, build_step = (
        build.build_model,
        build.build_optimizer,
        build.build_step,
    )

    def model_spy(*args, **kwargs):
        model, layers = build_model(*args, **kwargs)
        seen.initial = copy.deepcopy(model)
        return model, layers

    def optimizer_spy(*args, **kwargs):
        seen.optimizer = build_optimizer(*args, **kwargs)
        return seen.optimizer

    def step_spy(*args, **kwargs):
        return RecordingStep(build_step(*args, **kwargs), seen.batches)

    run_dir = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", run_dir, *ADAMW]
    argv += ["--max-steps", "3", "--amp", "none", "--no-tensorboard"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_model", model_spy)
        mp.setattr(build, "build_optimizer", optimizer_spy)
        mp.setattr(build, "build_step", step_spy)
        assert train(*argv) == 0
    opt = seen.optimizer
    assert type(opt) is SAM and type(opt.base_optimizer) is torch.optim.AdamW
    assert len(seen.batches) == 3

    # by hand: SAM over AdamW on the initial model, the recorded batches, the cosine schedule
    model = seen.initial
    hand = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.003, betas=(0.8, 0.99),
               eps=1e-6, weight_decay=0.01)  # fmt: skip
    schedule = CosineSchedule(hand, 0.003, 16)  # 128 images, batches of 8, one epoch

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    step = SharpnessAwareStep(model, hand, loss_fn, amp="none", bn_stats="first")
    for x, y in seen.batches:
        schedule.apply()
        assert step(x, y).took_step
        schedule.step()
    saved = final_weights(run_dir)
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    config, summary = read_json(run_dir / "config.json"), read_json(run_dir / "summary.json")
    assert (config["base_optimizer"], config["learning_rate"]) == ("adamw", 0.003)
    assert (config["adamw_beta1"], config["adamw_beta2"], config["adamw_eps"]) == (0.8, 0.99, 1e-6)
    assert summary["optimizer"] == "SAM rho=0.05 over AdamW"


def test_the_comparison_tells_adamw_from_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    after = {}
    for base in ("sgd", "adamw"):
        cfg = config_from_values({"base_optimizer": base, "learning_rate": 0.01, "amp": "none"})
        m = copy.deepcopy(model)
        step = build.build_step(cfg, m, build.build_optimizer(cfg, m), torch.device("cpu"))
        step(x, y)
        after[base] = m[0].weight.detach().clone()
    assert (after["sgd"] - after["adamw"]).abs().max() > 1e-4


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8),
        nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list_optimizers())
def test_every_method_of_the_registry_runs_over_both_bases(name, base):
    cfg = config_from_values({"optimizer": name, "base_optimizer": base, "amp": "none"})
    model = bn_net()
    opt = build.build_optimizer(cfg, model)
    if getattr(opt, "ascent_policy", None) is not None:  # the run's steps, as the loop sets them
        opt.ascent_policy.total_steps = 3
    inner = getattr(opt, "base_optimizer", opt)
    assert type(inner) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[base]
    group = inner.param_groups[0]
    assert group["lr"] == {"sgd": 0.1, "adamw": 0.001}[base]
    if base == "adamw":
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 5e-4)
    else:
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    step = build.build_step(cfg, model, opt, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        assert step(x, y).took_step
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) == len(before)
    state = opt.state_dict()["state"]
    assert state and all(
        ("exp_avg_sq" if base == "adamw" else "momentum_buffer") in s for s in state.values()
    )
    label = build.describe_optimizer(cfg)
    assert label.endswith(" over AdamW") == (base == "adamw" and name != "sgd")
    if name == "sgd":
        assert label == {"sgd": "SGD", "adamw": "AdamW"}[base]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_on_end_to_end(data, tmp_path, base):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", run_dir]
    argv += ["--optimizer", "sam_on", "--base-optimizer", base, "--max-steps", "2"]
    assert train(*argv) == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "max_steps" and summary["steps"] == 2
    assert summary["skipped_steps"] == 0
    want = "SAM-ON rho=0.05" + (" over AdamW" if base == "adamw" else "")
    assert summary["optimizer"] == want
    assert read_json(run_dir / "config.json")["optimizer"] == "sam_on"


def test_sam_on_on_a_model_without_normalisation_layers_names_the_flag():
    cfg = config_from_values({"optimizer": "sam_on"})
    with pytest.raises(ConfigError, match=r"^--optimizer sam_on: SAM-ON: Sequential has"):
        build.build_optimizer(cfg, nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--base-optimizer", "adam"], "argument --base-optimizer: invalid choice: 'adam'"),
        (["--adamw-beta1", "1"], "argument --adamw-beta1: '1' is not a number in [0, 1)"),
        (["--adamw-beta2", "-0.1"], "argument --adamw-beta2: '-0.1' is not a number in [0, 1)"),
        (["--adamw-eps", "0"], "argument --adamw-eps: '0' is not a number in (0, 1]"),
        (["--adamw-eps", "2"], "argument --adamw-eps: '2' is not a number in (0, 1]"),
        (["--optimizer", "sam-on"], "argument --optimizer: invalid choice: 'sam-on'"),
        # a flag the run would ignore
        (
            ["--base-optimizer", "adamw", "--momentum", "0.5"],
            "--momentum: only for --base-optimizer sgd, and this run's base optimizer is adamw",
        ),
        (
            ["--adamw-beta1", "0.8"],
            "--adamw-beta1: only for --base-optimizer adamw, and this run's base optimizer is sgd",
        ),
        (
            ["--optimizer", "sam", "--wsam-gamma", "0.5"],
            "--wsam-gamma: an option of --optimizer wsam, which this run does not use "
            "(--optimizer sam)",
        ),
        (
            ["--optimizer", "sgd", "--sam-adaptive"],
            "--sam-adaptive: an option of --optimizer sam, which this run does not use",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(argv, message, capsys):
    assert exit_status(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("samkit train: error: ")


def test_flags_every_run_uses_are_never_refused_as_without_effect():
    assert config_from_values({"optimizer": "sam", "run_seed": 3}).run_seed == 3
    assert config_from_values({"optimizer": "msam", "sam_rho": 0.1}).sam_rho == 0.1
    with pytest.raises(ConfigError, match="^--momentum: only for --base-optimizer sgd"):
        config_from_values({"base_optimizer": "adamw", "momentum": 0.5, "nesterov": False})


def test_defaults_reproduce_the_old_settings_and_learning_rate_follows_the_base():
    assert config_from_values({}) == TrainConfig()
    cfg = config_from_values({})
    assert (cfg.base_optimizer, cfg.learning_rate) == ("sgd", 0.1)
    assert config_from_values({"base_optimizer": "adamw"}).learning_rate == 0.001
    assert (
        config_from_values({"base_optimizer": "adamw", "learning_rate": 0.5}).learning_rate == 0.5
    )
    # a config.json written before these settings existed has none of them: no difference
    old = TrainConfig().to_dict()
    for key in ("base_optimizer", "adamw_beta1", "adamw_beta2", "adamw_eps"):
        del old[key]
    assert settings_differences(old, TrainConfig()) == []
    assert settings_differences(old, TrainConfig(base_optimizer="adamw")) == [
        "--base-optimizer 'sgd' -> 'adamw'"
    ]


def test_a_run_from_before_the_flags_resumes(data, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", run_dir]
    assert train(*argv, "--max-steps", "2") == 0
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("base_optimizer", "adamw_beta1", "adamw_beta2", "adamw_eps"):
        del config[key]  # as an older samkit wrote it
    config_path.write_text(json.dumps(config))
    assert train(*argv, "--max-steps", "3") == 0
    assert read_json(run_dir / "summary.json")["steps"] == 3
    assert train(*argv, "--max-steps", "4", "--base-optimizer", "adamw") == 2  # another run
