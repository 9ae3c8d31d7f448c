"""Filter-normalised directions, loss surfaces and interpolation curves."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from samkit.analysis import (
    evaluate_loss,
    filter_normalize,
    filter_normalized_direction,
    interpolation_curve,
    loss_surface_1d,
    loss_surface_2d,
    plot_loss_contour,
    plot_loss_curve,
    plot_loss_surface_3d,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    with torch.no_grad():  # non-trivial BatchNorm state
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].num_batches_tracked.fill_(seed + 1)
    return net


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():  # bit-exact, not just close
        assert torch.equal(state[k], v), k


def test_filter_normalised_direction():
    model = conv_net(0)
    with torch.no_grad():
        model[0].weight[2].zero_()  # a dead filter gets a zero direction, not NaN
    d = filter_normalized_direction(model, seed=1)
    params = dict(model.named_parameters())
    assert d.keys() == params.keys()
    for name, w in params.items():
        if w.dim() <= 1:  # conv/linear biases, BatchNorm weight and bias
            assert torch.count_nonzero(d[name]) == 0, name
            continue
        w_norms = w.detach().reshape(w.shape[0], -1).norm(dim=1)
        d_norms = d[name].reshape(w.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(d_norms, w_norms, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(d["0.weight"][2]) == 0
    assert torch.isfinite(torch.cat([v.reshape(-1) for v in d.values()])).all()

    same = filter_normalized_direction(model, seed=1)
    other = filter_normalized_direction(model, seed=2)
    assert all(torch.equal(d[k], same[k]) for k in d)
    assert not torch.equal(d["4.weight"], other["4.weight"])

    with_bn = filter_normalized_direction(model, seed=1, include_bias_bn=True)
    for name in ("0.bias", "1.weight", "1.bias", "4.bias"):
        assert float(with_bn[name].norm()) == pytest.approx(
            float(params[name].detach().norm()), rel=1e-6
        )


def test_filter_normalize_leaves_its_input_alone():
    model = conv_net(0)
    raw = {k: torch.ones_like(v) for k, v in model.named_parameters()}
    d = filter_normalize(raw, model)
    assert all(torch.equal(v, torch.ones_like(v)) for v in raw.values())
    row = model[4].weight[0].detach()
    torch.testing.assert_close(d["4.weight"][0], torch.full_like(row, float(row.norm() / 8.0)))


def test_surfaces_centre_orientation_and_restoration(data):
    model = conv_net(0)
    model.train()
    before = snapshot(model)
    loss_fn = nn.CrossEntropyLoss()
    base = evaluate_loss(model, loss_fn, data)
    assert_same_state(model, before)  # eval mode: BatchNorm running stats untouched
    dx = filter_normalized_direction(model, seed=1)
    dy = filter_normalized_direction(model, seed=2)
    alphas = np.linspace(-1.0, 1.0, 5)
    betas = np.array([-0.5, 0.0, 0.25])
    surf = loss_surface_2d(model, loss_fn, data, dx, dy, alphas, betas)
    assert surf.shape == (3, 5) and surf.dtype == np.float64
    assert surf[1, 2] == base  # the centre is L(w), exactly
    assert_same_state(model, before)
    assert model.training

    # orientation: surf[i, j] = L(w + alphas[j] dx + betas[i] dy)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(dx[name], alpha=0.5).add_(dy[name], alpha=-0.5)
    assert surf[0, 3] == pytest.approx(evaluate_loss(moved, loss_fn, data), rel=1e-6)

    curve = loss_surface_1d(model, loss_fn, data, dx, alphas)
    assert curve.shape == (5,) and curve[2] == base
    np.testing.assert_allclose(curve, surf[1], rtol=1e-12)
    assert_same_state(model, before)


def test_interpolation_endpoints_and_restoration(data):
    loss_fn = nn.CrossEntropyLoss()
    a, b, model = conv_net(1), conv_net(2), conv_net(3)
    state_a, state_b = snapshot(a), snapshot(b)
    before = snapshot(model)
    ts = np.array([0.0, 0.5, 1.0, 1.5])
    curve = interpolation_curve(model, loss_fn, data, state_a, state_b, ts)
    assert curve.shape == (4,)
    assert curve[0] == evaluate_loss(a, loss_fn, data)
    assert curve[2] == evaluate_loss(b, loss_fn, data)
    assert_same_state(model, before)
    # the midpoint interpolates weights AND BatchNorm buffers
    mid = conv_net(3)
    mid.load_state_dict(
        {
            k: 0.5 * state_a[k] + 0.5 * state_b[k] if state_a[k].is_floating_point() else state_a[k]
            for k in state_a
        }
    )
    assert curve[1] == pytest.approx(evaluate_loss(mid, loss_fn, data), rel=1e-6)
    with pytest.raises(KeyError, match="state_b"):
        interpolation_curve(model, loss_fn, data, state_a, {"0.weight": state_b["0.weight"]}, ts)


def test_interpolation_from_the_models_own_state_and_extrapolated_bn_variance(data):
    """``state_a = model.state_dict()`` shares storage with the weights being overwritten: the
    curve must not change because of it. Far outside [0, 1] a running variance extrapolates below
    zero; it is clamped at 0 instead of turning the loss into NaN."""
    loss_fn = nn.CrossEntropyLoss()
    a, b = conv_net(1), conv_net(2)
    with torch.no_grad():
        b[1].running_var.copy_(torch.tensor([0.1, 4.0, 0.5, 1.0]))
        a[1].running_var.copy_(torch.tensor([1.0, 0.2, 0.5, 1.0]))
    ts = np.array([-2.0, 0.0, 0.5, 1.0, 3.0])
    own = interpolation_curve(a, loss_fn, data, a.state_dict(), b.state_dict(), ts)
    copied = interpolation_curve(conv_net(3), loss_fn, data, snapshot(a), snapshot(b), ts)
    assert np.array_equal(own, copied)
    assert own[1] == evaluate_loss(a, loss_fn, data) and own[3] == evaluate_loss(b, loss_fn, data)
    assert np.isfinite(own).all()
    # at t = 3 the variance of channel 0 would be -2 * 1.0 + 3 * 0.1 < 0: clamped to 0
    manual = conv_net(3)
    sa, sb = snapshot(a), snapshot(b)
    extrapolated = {
        k: -2.0 * sa[k] + 3.0 * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa
    }
    extrapolated["1.running_var"] = extrapolated["1.running_var"].clamp(min=0.0)
    assert extrapolated["1.running_var"][0] == 0.0
    manual.load_state_dict(extrapolated)
    assert own[4] == pytest.approx(evaluate_loss(manual, loss_fn, data), rel=1e-6)


def test_plots_are_written(tmp_path):
    alphas, betas = np.linspace(-1, 1, 7), np.linspace(-1, 1, 5)
    surf = 1.0 + np.add.outer(betas**2, 2 * alphas**2)
    paths = [
        plot_loss_curve(alphas, surf[2], tmp_path / "c1.png", title="1-D"),
        plot_loss_curve(alphas, {"sgd": surf[2], "sam": surf[3]}, tmp_path / "c2.png"),
        plot_loss_contour(alphas, betas, surf, tmp_path / "sub" / "contour.png", log_scale=True),
        plot_loss_surface_3d(alphas, betas, surf, tmp_path / "surface.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
