"""SAF and MESA (samkit.train.trajectory), in float64 against references written here from the
paper's formula: the trajectory term ``lambda tau^2 KL(softmax(z / tau) || softmax(f(x) / tau))``
and its gradient, SAF's teacher (each sample's logits from exactly E epochs before, none for a
sample missing then), MESA's teacher (the EMA's closed form over a few steps, run in eval mode),
the plain loss before the start epoch, and the state round trip. The training runs (bit-identical
to SGD before the start, resume mid-training, bad flags) are in test_trajectory_train.py."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samkit.optim import get_optimizer_info
from samkit.train.trajectory import MESA, METHODS, SAF, trajectory_kl


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def reference_term(student, teacher, tau, lmbda):
    """lambda * tau^2 * sum_c p_c (log p_c - log q_c), p = softmax(z / tau) the teacher's, q the
    student's: the paper's trajectory loss of each sample."""
    p, q = softmax(teacher / tau), softmax(student / tau)
    return lmbda * tau**2 * (p * (torch.log(p) - torch.log(q))).sum(dim=1)


def per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_the_term_and_its_gradient_are_the_papers(tau):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    term = trajectory_kl(student, teacher, tau)
    assert term.dtype == torch.float64 and term.shape == (6,)
    torch.testing.assert_close(term, reference_term(student, teacher, tau, 1.0), rtol=1e-12, atol=0)
    # d/dz [tau^2 KL(p || softmax(z / tau))] = tau (softmax(z / tau) - p); none into the teacher
    (grad,) = torch.autograd.grad(term.sum(), student)
    expected = tau * (softmax(student.detach() / tau) - softmax(teacher / tau))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    assert (trajectory_kl(teacher, teacher, tau).abs() < 1e-12).all()  # zero at the teacher


def test_bf16_outputs_are_upcast():
    student = torch.randn(4, 5).to(torch.bfloat16)
    assert trajectory_kl(student, torch.randn(4, 5), 5.0).dtype == torch.float32


def test_the_options_are_the_classes_keywords_with_the_registrys_defaults():
    for name, cls in METHODS.items():
        info = get_optimizer_info(name)
        assert info.cls is None and not info.sharpness_aware  # the base optimizer steps alone
        parameters = inspect.signature(cls.__init__).parameters
        for option in info.options:
            assert parameters[option.name].default == option.default, (name, option.name)
    assert get_optimizer_info("saf").option("lmbda").default == 0.3
    assert get_optimizer_info("mesa").option("lmbda").default == 0.8
    assert get_optimizer_info("mesa").option("decay").default == 0.9998


def epoch_batches(n, batch, epoch, seed=0):
    """A shuffled epoch in full batches (the ragged rest dropped, as samkit's training loader)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [order[k : k + batch] for k in range(0, n - batch + 1, batch)]


def test_saf_teacher_is_each_samples_logits_from_E_epochs_before():
    n, classes, batch, lmbda, tau, start, back = 10, 3, 4, 0.7, 2.0, 2, 2
    torch.manual_seed(0)
    x_all = torch.randn(n, 5, dtype=torch.float64)
    y_all = torch.randint(0, classes, (n,))
    model = nn.Linear(5, classes).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    saf = SAF(
        n, classes, lmbda=lmbda, tau=tau, start_epoch=start, epochs_back=back, dtype=torch.float64
    )
    loss_fn = saf.wrap(per_sample_ce)
    history = {}  # (epoch, sample) -> logits of a step taken
    counts = {"with": 0, "without": 0}
    for epoch in range(6):
        for k, idx in enumerate(epoch_batches(n, batch, epoch)):
            x, y = x_all[idx], y_all[idx]
            saf.prepare(x, idx, epoch)
            out = model(x)
            losses = loss_fn(out, y)
            expected = per_sample_ce(out, y).detach().clone()
            for row, i in enumerate(idx.tolist()):
                teacher = history.get((epoch - back, i))
                if epoch >= start and teacher is not None:
                    term = reference_term(out[row : row + 1], teacher[None], tau, lmbda)
                    expected[row] += term[0].detach()
                    counts["with"] += 1
                else:
                    counts["without"] += 1
            torch.testing.assert_close(losses.detach(), expected, rtol=1e-12, atol=1e-14)
            if epoch < start:  # before the start: the plain loss, bit for bit
                assert torch.equal(losses, per_sample_ce(out, y))
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
            took = not (epoch == 1 and k == 0)  # a skipped step stores nothing
            saf.after_step(model, out.detach(), took)
            if took:
                history.update({(epoch, i): out[r].detach() for r, i in enumerate(idx.tolist())})
    assert counts["with"] > 0 and counts["without"] > 8  # both cases were exercised


def test_saf_refuses_batches_without_valid_indices():
    saf = SAF(4, 2)
    with pytest.raises(ValueError, match="indices=True"):
        saf.prepare(torch.zeros(2, 3), None, 0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        saf.prepare(torch.zeros(2, 3), torch.tensor([0, 4]), 0)
    with pytest.raises(ValueError, match="3 indices for a batch of 2"):
        saf.prepare(torch.zeros(2, 3), torch.tensor([0, 1, 2]), 0)
    for bad in (dict(epochs_back=0), dict(tau=0.0), dict(lmbda=-1.0), dict(start_epoch=-1)):
        with pytest.raises(ValueError):
            SAF(4, 2, **bad)


def bn_net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).double()


def test_mesa_teacher_is_the_ema_closed_form_run_in_eval_mode():
    decay, lmbda, tau, steps = 0.8, 0.5, 3.0, 5
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    mesa = MESA(model, lmbda=lmbda, tau=tau, start_epoch=1, decay=decay)
    assert not any(p.requires_grad for p in mesa.teacher.parameters())
    loss_fn = mesa.wrap(per_sample_ce)
    weights = [copy.deepcopy(model.state_dict())]  # w_0, w_1, ...
    g = torch.Generator().manual_seed(2)
    for t in range(1, steps + 1):
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        epoch = 0 if t <= 2 else 1  # the term from the third step on
        # the teacher: shadow_k = d^k w_0 + (1 - d) sum_{j=1..k} d^(k-j) w_j, k = t - 1 steps
        k = t - 1
        closed = {}
        for key, w0 in weights[0].items():
            if not w0.is_floating_point():
                closed[key] = weights[k][key]
                continue
            avg = decay**k * w0
            for j in range(1, k + 1):
                avg = avg + (1 - decay) * decay ** (k - j) * weights[j][key]
            closed[key] = avg
        for key, value in mesa.teacher.state_dict().items():
            torch.testing.assert_close(value, closed[key], rtol=1e-12, atol=1e-14)
        reference = copy.deepcopy(model).eval()
        reference.load_state_dict(closed)
        mesa.prepare(x, None, epoch)
        model.train()
        out = model(x)
        losses = loss_fn(out, y)
        expected = per_sample_ce(out, y)
        if epoch >= 1:
            with torch.no_grad():
                expected = expected + reference_term(out, reference(x), tau, lmbda)
            torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-14)
        else:
            assert torch.equal(losses, expected)
        opt.zero_grad()
        losses.mean().backward()
        assert mesa.teacher.training is False
        assert all(p.grad is None for p in mesa.teacher.parameters())
        opt.step()
        mesa.after_step(model, out.detach(), True)
        weights.append(copy.deepcopy(model.state_dict()))
    before = copy.deepcopy(mesa.teacher.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    mesa.after_step(model, out.detach(), False)  # a skipped step leaves the teacher alone
    assert all(torch.equal(v, before[k]) for k, v in mesa.teacher.state_dict().items())


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dicts_load_weights_only_and_continue_identically():
    n, classes = 6, 3
    model = nn.Linear(4, classes).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    idx = torch.arange(n)
    saf, mesa = SAF(n, classes, start_epoch=1, epochs_back=1), MESA(model, start_epoch=0)
    for method in (saf, mesa):
        method.prepare(x, idx, 0)
        method.after_step(model, model(x).detach(), True)
        with torch.no_grad():
            model.weight.add_(0.1)
    saf2 = SAF(n, classes, start_epoch=1, epochs_back=1)
    saf2.load_state_dict(round_trip(saf.state_dict()))
    mesa2 = MESA(nn.Linear(4, classes).double(), start_epoch=0)
    mesa2.load_state_dict(round_trip(mesa.state_dict()))
    out = model(x)
    for a, b in ((saf, saf2), (mesa, mesa2)):
        a.prepare(x, idx, 1)
        b.prepare(x, idx, 1)
        assert torch.equal(a.term(out), b.term(out))
    with pytest.raises(ValueError, match="not a saf state"):
        saf2.load_state_dict(mesa.state_dict())
    with pytest.raises(ValueError, match="bank of shape"):
        SAF(n + 1, classes).load_state_dict(saf.state_dict())
