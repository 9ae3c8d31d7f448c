"""Exact tests of ESAM: SWP masks, SDS selection, closed forms on a quadratic, parity with SAM."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD

from samkit.optim import ESAM, SAM

F64 = torch.float64


def assert_close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


class Quad:
    """Per-sample ``l_i(w) = 0.5 (x_i . w - y_i)^2 + 0.5 mu ||w||^2`` over several tensors."""

    def __init__(self, seed=0, shapes=((2, 3), (4,), (3,), (2, 2), (5,)), batch=10, mu=0.1):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        n = sum(self.sizes)
        self.X = torch.randn(batch, n, generator=gen, dtype=F64)
        self.y = torch.randn(batch, generator=gen, dtype=F64)
        self.mu = mu
        self.w0 = torch.randn(n, generator=gen, dtype=F64)

    def params(self):
        chunks = self.w0.split(self.sizes)
        return [c.reshape(s).clone().requires_grad_() for c, s in zip(chunks, self.shapes)]

    @staticmethod
    def flat(ps):
        return torch.cat([p.detach().reshape(-1) for p in ps])

    def per_sample(self, ps, index=None):
        w = torch.cat([p.reshape(-1) for p in ps])
        return self.per_sample_w(w, index)

    def per_sample_w(self, w, index=None):
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        return 0.5 * (X @ w - y) ** 2 + 0.5 * self.mu * (w @ w)

    def grad(self, w, index=None):
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        return X.T @ (X @ w - y) / len(y) + self.mu * w

    def tensor_mask(self, keep):
        """Elementwise mask of the flat vector from a per-tensor keep list."""
        return torch.cat([torch.full((n,), float(k), dtype=F64) for n, k in zip(self.sizes, keep)])


def recording_closure(q, ps, log):
    """ESAM closure over the quadratic that logs (index, grad enabled, params) of every call."""

    def closure(index=None):
        log.append(
            dict(
                index=None if index is None else index.clone(),
                grad=torch.is_grad_enabled(),
                w=q.flat(ps),
                requires_grad=[p.requires_grad for p in ps],
            )
        )
        return q.per_sample(ps, index)

    return closure


def masks(seed, n_tensors, beta, steps):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n_tensors, generator=gen) < beta).tolist() for _ in range(steps)]


# ---------------------------------------------------------------- beta = gamma = 1 is SAM


@pytest.mark.parametrize("criterion", ["sharpness", "loss"])
@pytest.mark.parametrize("foreach", [True, False])
def test_beta_gamma_one_matches_sam_closed_form(criterion, foreach):
    q = Quad()
    ps = q.params()
    groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]
    opt = ESAM(
        groups, SGD, rho=0.07, beta=1.0, gamma=1.0, sds_criterion=criterion, lr=0.1, foreach=foreach
    )
    log = []
    loss = opt.step(recording_closure(q, ps, log))
    w = q.w0
    g = q.grad(w)
    e = 0.07 * g / g.norm()
    n1, n2 = sum(q.sizes[:2]), sum(q.sizes[2:])
    lr = torch.cat([torch.full((n1,), 0.1, dtype=F64), torch.full((n2,), 0.03, dtype=F64)])
    assert len(log) == 2 and log[1]["index"] is None
    assert_close(log[1]["w"], w + e)
    assert_close(q.flat(ps), w - lr * q.grad(w + e))
    assert_close(loss, q.per_sample_w(w).mean())


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(F64)


def batches(n, size=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=gen, dtype=F64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("criterion", ["sharpness", "loss"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_beta_gamma_one_reproduces_sam_on_a_network(criterion, adaptive):
    sam_model, esam_model = mlp(), mlp()
    kw = dict(rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9, weight_decay=1e-3)
    sam = SAM(sam_model.parameters(), SGD, **kw)
    esam = ESAM(esam_model.parameters(), SGD, beta=1.0, gamma=1.0, sds_criterion=criterion, **kw)
    calls = [0]
    for x, y in batches(6):

        def sam_closure(x=x, y=y):
            sam.zero_grad()
            loss = F.cross_entropy(sam_model(x), y, reduction="none").mean()
            loss.backward()
            return loss

        def esam_closure(index=None, x=x, y=y):
            calls[0] += 1
            assert index is None
            return F.cross_entropy(esam_model(x), y, reduction="none")

        sam_loss = sam.step(sam_closure)
        esam_loss = esam.step(esam_closure)
        assert torch.equal(sam_loss.detach(), esam_loss)
        for a, b in zip(sam_model.parameters(), esam_model.parameters()):
            assert torch.equal(a, b)
    assert calls[0] == 2 * 6
    for a, b in zip(sam_model.parameters(), esam_model.parameters()):
        assert torch.equal(sam.state[a]["momentum_buffer"], esam.state[b]["momentum_buffer"])


# ---------------------------------------------------------------- SDS


@pytest.mark.parametrize(
    "batch,gamma,k",
    [
        (10, 0.55, 6),
        (10, 0.7, 7),
        (10, 0.5, 5),
        (10, 0.3, 3),
        (10, 0.1, 1),
        (3, 0.1, 1),
        (7, 0.99, 7),
        (8, 0.875, 7),
    ],
)
def test_sds_keeps_ceil_gamma_b_samples(batch, gamma, k):
    w = torch.ones(2, dtype=F64, requires_grad=True)
    x = torch.linspace(0.5, 2.0, batch, dtype=F64)
    for criterion in ("sharpness", "loss"):
        opt = ESAM([w], SGD, rho=0.1, beta=1.0, gamma=gamma, sds_criterion=criterion, lr=0.0)
        assert opt.sds_size(batch) == k
        indices = []

        def closure(index=None, indices=indices):
            if index is not None:
                indices.append(index)
            xs = x if index is None else x[index]
            return xs * (w**2).sum()

        opt.step(closure)
        if k == batch:
            assert indices == []  # the whole batch, no indexing
        else:
            assert len(indices) == 1 and indices[0].numel() == k
            assert indices[0].dtype == torch.int64


class ControlledLosses:
    """``l_i(w) = 0.5 c_i ||w||^2 + d_i``: the sharpness ``l1 - l0 = 0.5 c_i (||w+e||^2 - ||w||^2)``
    ranks by ``c``, the clean loss by ``0.5 c_i ||w||^2 + d_i``, a different order."""

    def __init__(self):
        self.c = torch.tensor([0.3, 2.0, 1.1, 0.2, 1.7, 0.9, 0.5, 1.4, 0.7, 1.0], dtype=F64)
        self.d = torch.tensor([5.0, 0.0, 0.1, 4.0, 0.2, 3.0, 6.0, 0.3, 2.0, 0.4], dtype=F64)
        self.w = torch.tensor([0.6, -0.8, 1.2], dtype=F64, requires_grad=True)
        self.log = []

    def closure(self, index=None):
        c, d = (self.c, self.d) if index is None else (self.c[index], self.d[index])
        losses = 0.5 * c * (self.w**2).sum() + d
        self.log.append(
            dict(
                index=index,
                grad=torch.is_grad_enabled(),
                w=self.w.detach().clone(),
                losses=losses.detach(),
            )
        )
        return losses


@pytest.mark.parametrize("criterion", ["sharpness", "loss"])
def test_sds_selects_the_right_samples_and_calls_closure_minimally(criterion):
    cl = ControlledLosses()
    rho, lr, gamma = 0.3, 0.1, 0.35  # k = ceil(3.5) = 4
    opt = ESAM([cl.w], SGD, rho=rho, beta=1.0, gamma=gamma, sds_criterion=criterion, lr=lr)
    for _ in range(3):
        start = len(cl.log)
        w = cl.w.detach().clone()
        opt.step(cl.closure)
        calls = cl.log[start:]
        assert len(calls) == (3 if criterion == "sharpness" else 2)  # no extra forward for "loss"
        e = rho * w / w.norm()
        l0 = 0.5 * cl.c * (w @ w) + cl.d
        l1 = 0.5 * cl.c * ((w + e) @ (w + e)) + cl.d
        assert calls[0]["index"] is None and calls[0]["grad"] and torch.equal(calls[0]["w"], w)
        assert_close(calls[0]["losses"], l0)
        if criterion == "sharpness":
            assert (
                calls[1]["index"] is None and not calls[1]["grad"]
            )  # the no-grad forward at w + e
            assert_close(calls[1]["w"], w + e)
            assert_close(calls[1]["losses"], l1)
            score = calls[1]["losses"] - calls[0]["losses"]
            truth = torch.topk(cl.c, 4).indices  # l1 - l0 is increasing in c
        else:
            score = calls[0]["losses"]
            truth = torch.topk(l0, 4).indices
        index = calls[-1]["index"]
        assert calls[-1]["grad"]
        assert_close(calls[-1]["w"], w + e)
        expected = torch.topk(score, 4).indices.sort().values
        assert torch.equal(index, expected)
        assert torch.equal(index, truth.sort().values)
        # the base step uses the gradient of the mean loss of the selected samples only
        g_sam = cl.c[index].mean() * (w + e)
        assert_close(cl.w.detach(), w - lr * g_sam)
    if criterion == "sharpness":  # the two criteria disagree here, so the test tells them apart
        assert not torch.equal(
            torch.topk(cl.c, 4).indices.sort().values, torch.topk(l0, 4).indices.sort().values
        )


def test_sds_select_directly():
    opt = ESAM([torch.zeros(1, requires_grad=True)], SGD, gamma=0.3, lr=0.1)
    l0 = torch.tensor([1.0, 5.0, 2.0, 0.0, 3.0, 9.0, 4.0, 8.0, 7.0, 6.0])
    l1 = l0 + torch.tensor([0.5, 0.1, 0.9, 0.0, 0.8, 0.2, 0.3, 0.05, 0.6, 0.4])
    assert opt.sds_select(l0, l1).tolist() == [2, 4, 8]
    with pytest.raises(ValueError, match="sharpness"):
        opt.sds_select(l0)
    opt.sds_criterion = "loss"
    assert opt.sds_select(l0).tolist() == [5, 7, 8]
    opt.gamma = 1.0
    assert opt.sds_select(l0, l1) is None


def test_select_samples_computes_the_perturbed_losses_only_when_needed():
    opt = ESAM([torch.zeros(1, requires_grad=True)], SGD, gamma=0.3, lr=0.1)
    l0 = torch.tensor([1.0, 5.0, 2.0, 0.0, 3.0, 9.0, 4.0, 8.0, 7.0, 6.0])
    l1 = l0 + torch.tensor([0.5, 0.1, 0.9, 0.0, 0.8, 0.2, 0.3, 0.05, 0.6, 0.4])
    calls = []

    def perturbed():
        calls.append(torch.is_grad_enabled())
        return l1

    assert opt.select_samples(l0, perturbed).tolist() == [2, 4, 8]
    assert calls == [False]  # once, without autograd
    with pytest.raises(ValueError, match="sharpness"):
        opt.select_samples(l0)
    opt.sds_criterion = "loss"
    assert opt.select_samples(l0, perturbed).tolist() == [5, 7, 8]
    assert opt.select_samples(l0).tolist() == [5, 7, 8]
    opt.sds_criterion, opt.gamma = "sharpness", 1.0
    assert opt.select_samples(l0, perturbed) is None
    assert calls == [False]


# ---------------------------------------------------------------- SWP


def test_swp_keep_frequency_is_beta():
    params = [torch.zeros(i + 1, requires_grad=True) for i in range(10)]
    beta, draws = 0.3, 2000
    opt = ESAM(params, SGD, beta=beta, lr=0.1, seed=123)
    kept = torch.zeros(10)
    for _ in range(draws):
        with opt.swp() as kept_params:
            ids = {id(p) for p in kept_params}
            flags = [id(p) in ids for p in params]
            assert [p.requires_grad for p in params] == flags  # dropped = requires_grad False
            assert opt.last_kept_fraction == pytest.approx(sum(flags) / 10)
            kept += torch.tensor(flags, dtype=torch.float32)
        assert all(p.requires_grad for p in params)
    n = draws * 10
    assert abs(kept.sum().item() - beta * n) < 5 * math.sqrt(n * beta * (1 - beta))
    per_tensor_tol = 5 * math.sqrt(draws * beta * (1 - beta))
    assert (kept - beta * draws).abs().max().item() < per_tensor_tol


def test_swp_drops_tensors_from_the_first_backward_only():
    torch.manual_seed(0)
    model = mlp()
    frozen = nn.Parameter(torch.ones(3, dtype=F64), requires_grad=False)
    params = list(model.parameters())
    seed, beta, steps = 0, 0.5, 8
    expected_masks = masks(seed, len(params), beta, steps)
    assert all(any(m) for m in expected_masks), "seed must not drop every tensor (see the bug test)"
    assert any(not all(m) for m in expected_masks)
    opt = ESAM(
        [{"params": params[:4]}, {"params": params[4:] + [frozen]}],
        SGD,
        beta=beta,
        gamma=0.5,
        seed=seed,
        lr=0.1,
    )
    computed = {"first": [], "second": []}
    phase = ["first"]
    for i, p in enumerate(params):
        p.register_hook(lambda grad, i=i: computed[phase[0]].append(i))
    seen = []
    original_first_step = opt.first_step

    def first_step(*args, **kwargs):
        seen.append(
            dict(
                grad_none=[p.grad is None for p in params],
                requires_grad=[p.requires_grad for p in params],
            )
        )
        phase[0] = "second"
        return original_first_step(*args, **kwargs)

    opt.first_step = first_step
    for step, (x, y) in enumerate(batches(steps)):
        flags = []
        computed["first"].clear()
        computed["second"].clear()
        phase[0] = "first"

        def closure(index=None, x=x, y=y, flags=flags):
            flags.append([p.requires_grad for p in params])
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure)
        mask = expected_masks[step]
        assert flags[0] == mask  # dropped tensors do not require grad during the first pass
        assert all(all(f) for f in flags[1:])  # ... and do in the others
        assert sorted(computed["first"]) == [i for i, k in enumerate(mask) if k]
        assert sorted(computed["second"]) == list(range(len(params)))  # second pass: all tensors
        assert seen[step]["grad_none"] == [not k for k in mask]
        assert all(seen[step]["requires_grad"])  # restored before the ascent
        assert all(p.requires_grad for p in params) and not frozen.requires_grad
        assert frozen.grad is None
        assert opt.last_kept_fraction == pytest.approx(sum(mask) / len(mask))


@pytest.mark.parametrize("foreach", [True, False])
def test_swp_perturbation_closed_form(foreach):
    """e = rho / beta * g_kept / ||g_kept|| on the kept tensors, 0 elsewhere; then the base step
    with grad L(w + e)."""
    q = Quad(seed=2)
    ps = q.params()
    rho, beta, lr, seed, steps = 0.05, 0.6, 0.1, 4, 6
    expected_masks = masks(seed, len(ps), beta, steps)
    assert all(any(m) for m in expected_masks) and any(not all(m) for m in expected_masks)
    opt = ESAM(
        [{"params": ps[:2]}, {"params": ps[2:]}],
        SGD,
        rho=rho,
        beta=beta,
        gamma=1.0,
        seed=seed,
        lr=lr,
        foreach=foreach,
    )
    w = q.w0.clone()
    for step in range(steps):
        log = []
        opt.step(recording_closure(q, ps, log))
        keep = expected_masks[step]
        assert log[0]["requires_grad"] == keep
        m = q.tensor_mask(keep)
        g_kept = q.grad(w) * m
        e = rho / beta * g_kept / g_kept.norm()
        assert_close(log[1]["w"], w + e)
        dropped = m == 0
        assert torch.equal(log[1]["w"][dropped], log[0]["w"][dropped])  # not perturbed at all
        assert abs(e.norm().item() - rho / beta) < 1e-12
        w = w - lr * q.grad(w + e)
        assert_close(q.flat(ps), w)


@pytest.mark.parametrize("criterion", ["sharpness", "loss"])
def test_swp_and_sds_closed_form(criterion):
    q = Quad(seed=5, batch=12)
    ps = q.params()
    rho, beta, gamma, lr, seed, steps = 0.2, 0.6, 0.5, 0.1, 8, 5
    expected_masks = masks(seed, len(ps), beta, steps)
    assert all(any(m) for m in expected_masks)
    opt = ESAM(ps, SGD, rho=rho, beta=beta, gamma=gamma, sds_criterion=criterion, seed=seed, lr=lr)
    w = q.w0.clone()
    for step in range(steps):
        log = []
        loss = opt.step(recording_closure(q, ps, log))
        l0 = q.per_sample_w(w)
        assert_close(loss, l0.mean())
        g_kept = q.grad(w) * q.tensor_mask(expected_masks[step])
        e = rho / beta * g_kept / g_kept.norm()
        l1 = q.per_sample_w(w + e)
        score = l1 - l0 if criterion == "sharpness" else l0
        index = torch.topk(score, 6).indices.sort().values
        assert torch.equal(log[-1]["index"], index)
        assert_close(log[-1]["w"], w + e)
        w = w - lr * q.grad(w + e, index)
        assert_close(q.flat(ps), w)


def test_same_seed_same_masks_across_replicas():
    """Two data-parallel replicas (same seed, different sub-batches) draw identical masks."""
    a_model, b_model = mlp(), mlp()
    a = ESAM(a_model.parameters(), SGD, beta=0.5, seed=42, lr=0.1, foreach=False)
    b = ESAM(b_model.parameters(), SGD, beta=0.5, seed=42, lr=0.1, foreach=False)
    c = ESAM(mlp().parameters(), SGD, beta=0.5, seed=43, lr=0.1)
    data_a, data_b = batches(10, seed=1), batches(10, seed=2)

    def mask_of(model, opt, batch):
        x, y = batch
        flags = []

        def closure(index=None):
            if not flags:
                flags.append([p.requires_grad for p in model.parameters()])
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure)
        return flags[0]

    seq_a = [mask_of(a_model, a, bt) for bt in data_a]
    seq_b = [mask_of(b_model, b, bt) for bt in data_b]
    assert seq_a == seq_b
    assert seq_a == masks(42, 6, 0.5, 10)
    params_c = [p for g in c.param_groups for p in g["params"]]
    seq_c = []
    for _ in range(10):
        with c.swp() as kept:
            seq_c.append([any(p is k for k in kept) for p in params_c])
    assert seq_c == masks(43, 6, 0.5, 10)
    assert masks(43, 6, 0.5, 10) != masks(42, 6, 0.5, 10)


@pytest.mark.parametrize("foreach", [None, False])
def test_swp_dropping_every_tensor_still_steps(foreach):
    """BUG (ESAM.step -> SAM.first_step -> SAM._ascend -> _base._save_clean ->
    _functional.copy_): when SWP drops every tensor (probability (1 - beta)^n per step), no
    gradient exists in the first pass and, on the default foreach path,
    ``torch._foreach_copy_([], [])`` raises "Tensor list must have at least one tensor". The
    step should go on with e = 0 (a plain base step on the selection)."""
    seed, beta = 0, 0.1
    assert masks(seed, 1, beta, 1) == [[False]]
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], dtype=F64)
    opt = ESAM([w], SGD, rho=0.1, beta=beta, gamma=1.0, seed=seed, lr=0.1, foreach=foreach)
    w0 = w.detach().clone()
    opt.step(lambda index=None: 0.5 * (x @ w) ** 2)
    grad = x.T @ (x @ w0) / 2
    assert_close(w.detach(), w0 - 0.1 * grad)
    assert opt.last_kept_fraction == 0.0 and w.requires_grad


# ---------------------------------------------------------------- API errors


def test_closure_must_return_per_sample_losses():
    w = torch.ones(3, requires_grad=True)
    opt = ESAM([w], SGD, lr=0.1)
    for bad in (
        lambda index=None: (w**2).sum(),
        lambda index=None: (w**2).reshape(3, 1),
        lambda index=None: 1.0,
    ):
        with pytest.raises(ValueError, match="per-sample losses"):
            opt.step(bad)
        assert w.requires_grad  # SWP restored even though the step failed
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_bad_arguments():
    ps = [torch.zeros(2, requires_grad=True)]
    for kw, match in [
        (dict(beta=0.0), "beta"),
        (dict(beta=1.5), "beta"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.01), "gamma"),
        (dict(sds_criterion="random"), "sds_criterion"),
        (dict(ascent_steps=2), "ascent"),
        (dict(rho=-1.0), "rho"),
    ]:
        with pytest.raises(ValueError, match=match):
            ESAM(ps, SGD, lr=0.1, **kw)
