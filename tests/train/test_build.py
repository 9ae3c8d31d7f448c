"""The parts of a training run, built from a TrainConfig alone (no run directory, no data)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from samkit.optim import ESAM, SAM
from samkit.train.build import (
    build_loss,
    build_model,
    build_optimizer,
    describe_optimizer,
    eval_batch_size,
    run_dir_for,
)
from samkit.train.config import TrainConfig

INFO = SimpleNamespace(num_classes=10, in_channels=1)


def params(n: int = 3) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(n)]


def test_the_default_optimizer_is_sam_over_nesterov_sgd():
    opt = build_optimizer(TrainConfig(), params())
    assert type(opt) is SAM and isinstance(opt.base_optimizer, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["rho"], group["adaptive"]) == (0.05, False)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1, 0.9, True, 5e-4,
    )  # fmt: skip


@pytest.mark.parametrize(
    "cfg,kind",
    [
        (TrainConfig(optimizer="sgd", sam_rho=0.0), torch.optim.SGD),
        (TrainConfig(optimizer="sam", sam_rho=0.0), torch.optim.SGD),  # rho 0: plain SGD
        (TrainConfig(optimizer="esam", esam_beta=0.6, run_seed=3), ESAM),
    ],
)
def test_the_registry_builds_the_effective_optimizer(cfg, kind):
    opt = build_optimizer(cfg, params())
    assert type(opt) is kind
    if kind is ESAM:
        assert opt.beta == 0.6 and opt.gamma == 0.5 and opt.sds_criterion == "sharpness"
        reference = torch.Generator().manual_seed(3)  # the weight masks follow --run-seed
        assert torch.equal(opt.generator.get_state(), reference.get_state())


def test_weight_decay_in_the_loss_leaves_it_out_of_the_base_step():
    ps = params()
    cfg = TrainConfig(weight_decay=0.01, weight_decay_mode="loss", label_smoothing=0.1)
    assert build_optimizer(cfg, ps).param_groups[0]["weight_decay"] == 0.0
    outputs = torch.randn(5, 10, dtype=torch.float64)
    targets = torch.arange(5)
    losses = build_loss(cfg, ps)(outputs, targets)
    expected = torch.nn.functional.cross_entropy(
        outputs, targets, reduction="none", label_smoothing=0.1
    ) + 0.5 * 0.01 * sum((p**2).sum() for p in ps)
    assert torch.allclose(losses, expected, rtol=0, atol=1e-12)
    decoupled = build_loss(TrainConfig(weight_decay=0.01), ps)(outputs, targets)
    assert torch.equal(
        decoupled, torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
    )


def test_descriptions_and_run_directories():
    assert describe_optimizer(TrainConfig()) == "SAM rho=0.05"
    assert describe_optimizer(TrainConfig(sam_adaptive=True, sam_m=32)) == "ASAM rho=0.05 m=32"
    assert describe_optimizer(TrainConfig(optimizer="sam", sam_rho=0.0, sam_m=32)) == "SGD"
    esam = TrainConfig(optimizer="esam", esam_beta=0.6, sam_adaptive=True)
    assert describe_optimizer(esam) == "ESAM rho=0.05 beta=0.6 gamma=0.5 adaptive"
    sgd = TrainConfig(optimizer="sgd", sam_rho=0.0, output_dir="out", run_seed=2)
    assert str(run_dir_for(sgd)) == "out/lr_0.1/wd_0.0005/rho_0/seed_2"
    assert str(run_dir_for(TrainConfig(run_dir="here"))) == "here"
    assert (eval_batch_size(None, 64, True), eval_batch_size(None, 64, False)) == (1000, 64)
    assert eval_batch_size(7, 64, True) == 7


def test_the_model_is_seeded_by_the_run_seed():
    cpu = torch.device("cpu")
    a, _ = build_model(TrainConfig(model_name="resnet_tiny", run_seed=1), INFO, cpu, log=print)
    b, _ = build_model(TrainConfig(model_name="resnet_tiny", run_seed=1), INFO, cpu, log=print)
    c, _ = build_model(TrainConfig(model_name="resnet_tiny", run_seed=2), INFO, cpu, log=print)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
