"""``--warmup-epochs``: the learning rate against the schedule's closed form, written here (W
warm-up steps of T: step s < W runs at ``lr0 (s + 1) / (W + 1)``, then ``lr0 (1 + cos(pi (s - W)
/ (T - W))) / 2``); no warm-up is the seed's cosine bit for bit; GSAM's rho_t follows the
warmed-up learning rate (read off the perturbation it makes); a run resumed mid-warm-up ends with
the weights of an uninterrupted one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from train_helpers import FAST, assert_same_weights, final_weights, read_json, read_metrics

from samkit.cli import main
from samkit.optim import create_optimizer
from samkit.train import build
from samkit.train.checks import config_from_values
from samkit.train.config import TrainConfig, settings_differences
from samkit.train.hooks import TrainHooks
from samkit.train.schedule import CosineSchedule, cosine_lr, warmup_cosine_lr

LR0 = 0.4


def expected(s: int, total: int, warmup: int, lr0: float = LR0) -> float:
    if s < warmup:
        return lr0 * (s + 1) / (warmup + 1)
    return lr0 * (1 + math.cos(math.pi * min(s - warmup, total - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("total,warmup", [(10, 1), (11, 3), (100, 25), (40, 39)])
def test_the_closed_form(total, warmup):
    values = [warmup_cosine_lr(s, total, LR0, warmup) for s in range(total + 2)]
    for s, value in enumerate(values):
        assert value == pytest.approx(expected(s, total, warmup), rel=1e-12, abs=1e-15), s
    # up in equal steps through the warm-up, the peak at its end, then down to 0
    assert all(b > a for a, b in zip(values[: warmup + 1], values[1 : warmup + 1]))
    assert values[warmup] == LR0 and values[0] == LR0 / (warmup + 1)
    assert all(b < a for a, b in zip(values[warmup : total + 1], values[warmup + 1 : total + 1]))
    assert values[total] == pytest.approx(0.0, abs=1e-15) and values[total + 1] == values[total]


def test_landmarks_by_hand():
    # 3 warm-up steps of 11: 0.1, 0.2, 0.3 (of 0.4), then a cosine over 8 steps
    assert [warmup_cosine_lr(s, 11, LR0, 3) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert warmup_cosine_lr(3, 11, LR0, 3) == LR0
    assert warmup_cosine_lr(7, 11, LR0, 3) == pytest.approx(LR0 / 2, rel=1e-12)  # half-way
    assert warmup_cosine_lr(5, 11, LR0, 3) == pytest.approx(LR0 * (1 + 2**-0.5) / 2, rel=1e-12)


def test_no_warmup_is_the_seeds_cosine_bit_for_bit():
    for total in (1, 7, 937):
        for s in range(total + 2):
            assert warmup_cosine_lr(s, total, LR0, 0) == cosine_lr(s, total, LR0)
    cfg = config_from_values({})
    assert cfg.warmup_epochs == 0.0
    schedule = build.build_schedule(cfg, torch.optim.SGD(nn.Linear(2, 1).parameters()), 50)
    assert (schedule.total_steps, schedule.warmup_steps) == (12 * 50, 0)


@pytest.mark.parametrize(
    "epochs,steps_per_epoch,steps", [(0.5, 15, 8), (0.5, 13, 7), (1.5, 16, 24), (0.3, 10, 3)]
)
def test_warmup_epochs_in_steps_rounded_half_up(epochs, steps_per_epoch, steps):
    cfg = TrainConfig(warmup_epochs=epochs, num_epochs=3)
    assert build.warmup_steps(cfg, steps_per_epoch) == steps
    schedule = build.build_schedule(cfg, torch.optim.SGD(nn.Linear(2, 1).parameters()), 1)
    assert schedule.warmup_steps <= schedule.total_steps  # never past the run


def test_the_schedule_sets_every_group_and_resumes_mid_warmup():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = create_optimizer("sam", model, torch.optim.SGD, lr=LR0)
    schedule = CosineSchedule(opt, LR0, 20, warmup_steps=6)
    for s in range(3):
        lr = schedule.apply()
        assert lr == pytest.approx(expected(s, 20, 6), rel=1e-12)
        assert {g["lr"] for g in opt.param_groups + opt.base_optimizer.param_groups} == {lr}
        schedule.step()
    state = schedule.state_dict()
    assert state == {"steps_done": 3, "base_lr": LR0, "total_steps": 20, "warmup_steps": 6}
    fresh = CosineSchedule(torch.optim.SGD(model.parameters(), lr=LR0), LR0, 20, warmup_steps=6)
    fresh.load_state_dict(state)
    assert fresh.apply() == pytest.approx(expected(3, 20, 6), rel=1e-12)
    fresh.step()
    assert fresh.lr() == pytest.approx(expected(4, 20, 6), rel=1e-12)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        CosineSchedule(opt, LR0, 20, warmup_steps=21)


def test_gsam_perturbs_with_rho_following_the_warmed_up_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    rho, rho_min, total, warmup = 0.1, 0.02, 12, 4
    opt = create_optimizer("gsam", model, torch.optim.SGD, rho=rho, rho_min=rho_min, lr=LR0)
    schedule = CosineSchedule(opt, LR0, total, warmup_steps=warmup)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a: seen.append([p.detach().clone() for p in m.parameters()])
    )
    g = torch.Generator().manual_seed(1)
    for s in range(total):
        x, y = (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        lr = schedule.apply()
        seen.clear()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        schedule.step()
        e = torch.cat([(b - a).flatten() for a, b in zip(*seen)])
        want = rho_min + (rho - rho_min) * expected(s, total, warmup) / LR0  # lr_min = 0
        assert lr == pytest.approx(expected(s, total, warmup), rel=1e-12)
        assert e.norm().item() == pytest.approx(want, rel=1e-9), s


# -- through samkit train -------------------------------------------------------------------------

EPOCHS, STEPS_PER_EPOCH, WARMUP = 2, 16, 24  # 128 images, batches of 8; --warmup-epochs 1.5
TOTAL = EPOCHS * STEPS_PER_EPOCH
RHO, RHO_MIN, LR_RUN = 0.05, 0.01, 0.2


def observed_run(data, run_dir, *extra):
    """A GSAM run with a warm-up; the learning rate of every step, read where the optimizer
    reads it, and the norm of the perturbation of every step."""
    seen = SimpleNamespace(optimizer=None, model=None, lrs=[], forwards=[], rhos=[])
    build_model, build_optimizer = build.build_model, build.build_optimizer

    def model_spy(*args, **kwargs):
        model, layers = build_model(*args, **kwargs)
        seen.model = model
        model.register_forward_pre_hook(
            lambda m, a: seen.forwards.append([p.detach().clone() for p in m.parameters()])
        )
        return model, layers

    def optimizer_spy(*args, **kwargs):
        seen.optimizer = build_optimizer(*args, **kwargs)
        return seen.optimizer

    def before_step(step):
        seen.forwards.clear()

    def after_step(step):
        groups = seen.optimizer.param_groups + seen.optimizer.base_optimizer.param_groups
        seen.lrs.append(sorted({g["lr"] for g in groups}))
        first, second = seen.forwards[:2]
        seen.rhos.append(torch.cat([(b - a).flatten() for a, b in zip(first, second)]).norm())

    argv = ["train", *FAST, "--dataset", "fashion_mnist", "--model-name", "resnet_tiny"]
    argv += ["--data-dir", str(data.dirs["fashion_mnist"]), "--run-dir", str(run_dir)]
    argv += ["--num-epochs", str(EPOCHS), "--batch-size", "8", "--learning-rate", str(LR_RUN)]
    argv += ["--warmup-epochs", "1.5", "--optimizer", "gsam", "--sam-rho", str(RHO)]
    argv += ["--gsam-rho-min", str(RHO_MIN), "--amp", "none", "--no-tensorboard", *extra]
    hooks = TrainHooks(before_step=before_step, after_step=after_step)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_model", model_spy)
        mp.setattr(build, "build_optimizer", optimizer_spy)
        assert main(argv, train_hooks=hooks) == 0
    return seen


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("warmup") / "straight"
    seen = observed_run(data, run_dir)
    seen.run_dir = run_dir
    return seen


def test_a_run_follows_the_warmup_and_gsam_follows_it(straight):
    assert len(straight.lrs) == TOTAL
    for s, (lrs, rho) in enumerate(zip(straight.lrs, straight.rhos)):
        lr = expected(s, TOTAL, WARMUP, LR_RUN)
        assert lrs == [pytest.approx(lr, rel=1e-12, abs=1e-15)], s
        # float32 weights: the difference of two copies carries their rounding
        assert rho.item() == pytest.approx(RHO_MIN + (RHO - RHO_MIN) * lr / LR_RUN, rel=1e-3), s
    assert straight.lrs[0] == [pytest.approx(LR_RUN / 25)]
    assert straight.lrs[WARMUP] == [LR_RUN]
    records = read_metrics(straight.run_dir)
    assert records[0]["learning_rate"] == pytest.approx(expected(16, TOTAL, WARMUP, LR_RUN))
    assert read_json(straight.run_dir / "config.json")["warmup_epochs"] == 1.5


def test_resumed_mid_warmup_it_continues_exactly(data, tmp_path, straight):
    run_dir = tmp_path / "resumed"
    first = observed_run(data, run_dir, "--max-steps", "5")  # stopped in the warm-up
    assert read_json(run_dir / "summary.json")["steps"] == 5
    second = observed_run(data, run_dir)
    assert len(first.lrs) == 5 and len(second.lrs) == TOTAL - 5
    assert first.lrs + second.lrs == straight.lrs
    assert_same_weights(final_weights(run_dir), final_weights(straight.run_dir))


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--warmup-epochs", "-1"],
            "argument --warmup-epochs: '-1' is not a number in [0, 100000]",
        ),
        (["--warmup-epochs", "1e6"], "argument --warmup-epochs: '1e6' is not a number in"),
        (["--warmup-epochs", "12"], "--warmup-epochs 12: must be shorter than --num-epochs 12"),
        (["--warmup-epochs", "2.5", "--epochs", "2"], "--warmup-epochs 2.5: must be shorter"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(argv, message, capsys):
    try:
        status = main(["train", *argv])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("samkit train: error: ")


def test_a_config_from_before_the_flag_is_a_run_without_warmup():
    old = TrainConfig().to_dict()
    del old["warmup_epochs"]
    assert settings_differences(old, TrainConfig()) == []
    assert settings_differences(old, TrainConfig(warmup_epochs=1.0)) == [
        "--warmup-epochs 0.0 -> 1.0"
    ]
