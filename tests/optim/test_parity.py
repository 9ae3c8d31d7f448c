"""N-step parity of SAM / ASAM with an independent functional reference (torch.func), and of the
foreach path with the per-tensor loop.

The reference below is written from the papers and from torch's documented update rules of SGD
(momentum, dampening 0, Nesterov, L2 weight decay) and AdamW (decoupled weight decay, bias-corrected
moments); it shares no code with samkit.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.optim import SGD, AdamW

from samkit.optim import ESAM, SAM

F64 = torch.float64
STEPS = 8


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.GELU(), nn.Linear(10, 4)
    ).to(F64)


def batches(n=STEPS, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 6, generator=gen, dtype=F64),
            torch.randint(0, 4, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def is_weight(name):
    return name.endswith("weight")


# ---------------------------------------------------------------- the functional reference


def loss_fn(model, params, x, y):
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def reference_perturbation(params, g, rho, adaptive, eta, norm):
    """SAM / ASAM ascent point, global norm over all tensors."""
    t = {k: params[k].abs() + eta if adaptive[k] else torch.ones_like(params[k]) for k in params}
    if norm == 2.0:
        total = math.sqrt(sum(((t[k] * g[k]) ** 2).sum().item() for k in params))
        return {k: params[k] + rho[k] * t[k] ** 2 * g[k] / total for k in params}
    return {k: params[k] + rho[k] * t[k] * torch.sign(g[k]) for k in params}


class ReferenceSGD:
    """torch.optim.SGD's documented rule: d = g + wd w; b = mu b + d (b = d at first); d = d + mu b
    (Nesterov) or b; w -= lr d."""

    def __init__(self, lr, momentum, nesterov, weight_decay):
        self.lr, self.mu, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.buf = {}

    def step(self, params, g):
        out = {}
        for k, w in params.items():
            d = g[k] + self.wd[k] * w
            self.buf[k] = d.clone() if k not in self.buf else self.mu * self.buf[k] + d
            d = d + self.mu * self.buf[k] if self.nesterov else self.buf[k]
            out[k] = w - self.lr[k] * d
        return out


class ReferenceAdamW:
    """torch.optim.AdamW's documented rule: w *= 1 - lr wd; m, v moments; bias-corrected step."""

    def __init__(self, lr, betas, eps, weight_decay):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.v, self.t = {}, {}, 0

    def step(self, params, g):
        self.t += 1
        out = {}
        for k, w in params.items():
            w = w * (1 - self.lr * self.wd[k])
            self.m[k] = self.b1 * self.m.get(k, torch.zeros_like(w)) + (1 - self.b1) * g[k]
            self.v[k] = self.b2 * self.v.get(k, torch.zeros_like(w)) + (1 - self.b2) * g[k] ** 2
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            out[k] = w - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return out


def reference_run(model, data, base, rho, adaptive, eta=0.01, norm=2.0):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for x, y in data:

        def batch_loss(p, x=x, y=y):
            return loss_fn(model, p, x, y)

        g = grad(batch_loss)(params)
        perturbed = reference_perturbation(params, g, rho, adaptive, eta, norm)
        g_sam = grad(batch_loss)(perturbed)
        params = base.step(params, g_sam)
    return params


def samkit_run(model, data, opt, api):
    for x, y in data:
        if api == "closure":

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    return dict(model.named_parameters())


def split_groups(model, weight_opts, bias_opts):
    named = list(model.named_parameters())
    return [
        dict(params=[p for n, p in named if is_weight(n)], **weight_opts),
        dict(params=[p for n, p in named if not is_weight(n)], **bias_opts),
    ]


def assert_params_close(ours, ref, tol=1e-10):
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k].detach(), ref[k], rtol=tol, atol=tol, msg=k)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("api", ["closure", "two_step"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_sam_sgd_momentum_matches_functional_reference(api, nesterov):
    """Two groups: weights (rho 0.1, wd 5e-3, lr 0.1) and biases (rho 0.02, no wd, lr 0.2)."""
    model, data = mlp(), batches()
    names = [n for n, _ in model.named_parameters()]
    opt = SAM(
        split_groups(model, dict(rho=0.1, weight_decay=5e-3), dict(rho=0.02, lr=0.2)),
        SGD,
        lr=0.1,
        momentum=0.9,
        nesterov=nesterov,
    )
    per = lambda w_val, b_val: {n: w_val if is_weight(n) else b_val for n in names}  # noqa: E731
    base = ReferenceSGD(per(0.1, 0.2), 0.9, nesterov, per(5e-3, 0.0))
    ref = reference_run(mlp(), data, base, per(0.1, 0.02), per(False, False))
    assert_params_close(samkit_run(model, data, opt, api), ref)


@pytest.mark.parametrize("api", ["closure", "two_step"])
def test_sam_adamw_matches_functional_reference(api):
    model, data = mlp(), batches()
    names = [n for n, _ in model.named_parameters()]
    opt = SAM(
        split_groups(model, dict(weight_decay=0.05), dict(weight_decay=0.0)),
        AdamW,
        rho=0.05,
        lr=3e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    wd = {n: 0.05 if is_weight(n) else 0.0 for n in names}
    base = ReferenceAdamW(3e-3, (0.9, 0.99), 1e-8, wd)
    ref = reference_run(mlp(), data, base, dict.fromkeys(names, 0.05), dict.fromkeys(names, False))
    assert_params_close(samkit_run(model, data, opt, api), ref)


@pytest.mark.parametrize("norm", [2.0, math.inf])
def test_asam_weights_only_sgd_matches_functional_reference(norm):
    """ASAM on the weights only (as SamsungLabs/ASAM), plain SAM on the biases, one global norm."""
    model, data = mlp(), batches()
    names = [n for n, _ in model.named_parameters()]
    rho = 0.5 if norm == 2.0 else 0.01
    opt = SAM(
        split_groups(model, dict(adaptive=True), dict(adaptive=False)),
        SGD,
        rho=rho,
        norm=norm,
        adaptive_eta=0.02,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
    )
    base = ReferenceSGD(dict.fromkeys(names, 0.05), 0.9, False, dict.fromkeys(names, 1e-3))
    adaptive = {n: is_weight(n) for n in names}
    ref = reference_run(mlp(), data, base, dict.fromkeys(names, rho), adaptive, eta=0.02, norm=norm)
    assert_params_close(samkit_run(model, data, opt, "closure"), ref)


# ---------------------------------------------------------------- foreach == loop


def _build(kind, model, foreach):
    if kind == "sgd":
        return SAM(
            model.parameters(),
            SGD,
            rho=0.1,
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-3,
            foreach=foreach,
        )
    if kind == "adamw":
        return SAM(model.parameters(), AdamW, rho=0.1, lr=1e-2, weight_decay=0.1, foreach=foreach)
    if kind == "asam_inf":
        return SAM(
            model.parameters(), SGD, rho=0.01, norm=math.inf, adaptive=True, lr=0.1, foreach=foreach
        )
    if kind == "ascent3":
        return SAM(model.parameters(), SGD, rho=0.2, ascent_steps=3, lr=0.1, foreach=foreach)
    if kind == "esam":
        # the SWP seed is chosen so that no step drops every tensor (separate bug, see test_esam.py)
        return ESAM(
            model.parameters(),
            SGD,
            rho=0.1,
            beta=0.7,
            gamma=0.5,
            seed=3,
            lr=0.1,
            momentum=0.9,
            foreach=foreach,
        )
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "asam_inf", "ascent3", "esam"])
def test_foreach_path_equals_loop_path(kind):
    """The base optimizer runs its own (CPU default) implementation in both runs: only SAM's path
    differs."""
    data = batches()
    runs = []
    for foreach in (True, False):
        model = mlp()
        opt = _build(kind, model, foreach)
        for x, y in data:
            if kind == "esam":
                opt.step(
                    lambda index=None, x=x, y=y, model=model: F.cross_entropy(
                        model(x if index is None else x[index]),
                        y if index is None else y[index],
                        reduction="none",
                    )
                )
            else:

                def closure(x=x, y=y, model=model, opt=opt):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
