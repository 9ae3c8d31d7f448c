"""SAM-ON (Mueller et al., NeurIPS 2023) and SAM's per-group ``perturb`` option, against a
reference written here from the paper's rule: ``e`` moves only the normalisation layers' affine
parameters N, ``e_N = rho g_N / ||g_N||`` (the norm over N alone), every other parameter stays
at ``w`` in the second pass, and every parameter is updated with ``grad L(w + e)``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from samkit.optim import SAM, create_optimizer, get_optimizer_info, sam_on_groups
from samkit.train import SharpnessAwareStep

LR, RHO, EPS = 0.1, 0.05, 1e-12
F64 = torch.float64


def net(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    """Linear, BatchNorm, LayerNorm; the norm layers' weights and biases drawn at random (their
    default 1 / 0 would hide a mix-up of the two)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).to(dtype)
    with torch.no_grad():
        for module in (model[1], model[4]):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.3)
    return model


NORM = {"1.weight", "1.bias", "4.weight", "4.bias"}


def batches(n: int = 3, seed: int = 1, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def loss_at(model: nn.Module, w: list[torch.Tensor], x, y) -> torch.Tensor:
    params = dict(zip([n for n, _ in model.named_parameters()], w))
    return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def grad_at(model, w, x, y) -> list[torch.Tensor]:
    w = [t.detach().requires_grad_(True) for t in w]
    return list(torch.autograd.grad(loss_at(model, w, x, y), w))


def reference_step(model, w, x, y, adaptive=False, eta=0.01, perturbed=NORM):
    """One SAM-ON step with plain SGD (no momentum): ``w - lr grad L(w + e)``."""
    names = [n for n, _ in model.named_parameters()]
    g = grad_at(model, w, x, y)
    t = [wi.abs() + eta if adaptive else torch.ones_like(wi) for wi in w]
    on = [n in perturbed for n in names]
    norm = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi, o in zip(t, g, on) if o))
    e = [
        RHO * ti * ti * gi / (norm + EPS) if o else torch.zeros_like(wi)
        for wi, ti, gi, o in zip(w, t, g, on)
    ]
    g_sam = grad_at(model, [wi + ei for wi, ei in zip(w, e)], x, y)
    return [wi - LR * gi for wi, gi in zip(w, g_sam)], e


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_close(a, b, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def two_passes(model, opt, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return opt.second_step(zero_grad=True)


# -- the update ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [None, False])
def test_one_step_is_the_papers_update(adaptive, foreach):
    model = net()
    ref_model = copy.deepcopy(model)
    opt = SAM(sam_on_groups(model), torch.optim.SGD, rho=RHO, adaptive=adaptive, lr=LR,
              foreach=foreach)  # fmt: skip
    seen = []  # the weights each forward ran with
    model.register_forward_pre_hook(lambda m, args: seen.append(weights(m)))
    for x, y in batches():
        w = weights(model)  # each step from where the last left the model
        want, e = reference_step(ref_model, w, x, y, adaptive=adaptive)
        seen.clear()
        assert two_passes(model, opt, x, y)
        # the second pass ran at w + e: the norm parameters moved, the others bit for bit at w
        names = [n for n, _ in model.named_parameters()]
        for name, before, at, ei in zip(names, w, seen[1], e):
            if name in NORM:
                torch.testing.assert_close(at - before, ei, rtol=0, atol=1e-14)
                assert ei.abs().max() > 0
            else:
                assert torch.equal(at, before), name
        if not adaptive:
            moved = torch.cat(
                [(a - b).flatten() for n, a, b in zip(names, seen[1], w) if n in NORM]
            )
            assert moved.norm().item() == pytest.approx(RHO, rel=1e-10)
        assert_close(weights(model), want)


def test_the_comparison_tells_sam_on_from_sam_and_from_sgd():
    model, (x, y) = net(), batches(1)[0]
    w = weights(model)
    sam_on, _ = reference_step(model, w, x, y)
    sam, _ = reference_step(model, w, x, y, perturbed={n for n, _ in model.named_parameters()})
    sgd = [wi - LR * gi for wi, gi in zip(w, grad_at(model, w, x, y))]
    for other in (sam, sgd):
        assert max((a - b).abs().max().item() for a, b in zip(sam_on, other)) > 1e-6
    got = copy.deepcopy(model)
    two_passes(got, SAM(sam_on_groups(got), torch.optim.SGD, rho=RHO, lr=LR), x, y)
    assert_close(weights(got), sam_on)


def test_closure_form_and_explicit_groups_equal_the_two_call_form():
    model = net()
    by_hand = copy.deepcopy(model)
    closure_model = copy.deepcopy(model)
    norm = [p for n, p in by_hand.named_parameters() if n in NORM]
    rest = [p for n, p in by_hand.named_parameters() if n not in NORM]
    hand_opt = SAM([{"params": rest, "perturb": False}, {"params": norm}], torch.optim.SGD,
                   rho=RHO, lr=LR, momentum=0.9)  # fmt: skip
    closure_opt = create_optimizer("sam_on", closure_model, torch.optim.SGD, lr=LR, momentum=0.9)
    opt = SAM(sam_on_groups(model), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for x, y in batches(4):
        two_passes(model, opt, x, y)
        two_passes(by_hand, hand_opt, x, y)

        def closure(x=x, y=y):
            closure_opt.zero_grad()
            loss = nn.functional.cross_entropy(closure_model(x), y)
            loss.backward()
            return loss

        closure_opt.step(closure)
    assert_close(weights(by_hand), weights(model), atol=1e-14)
    for a, b in zip(weights(closure_model), weights(model)):
        assert torch.equal(a, b)


# -- restore, backups ---------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
def test_first_step_moves_only_the_norm_parameters_and_restores_them_exactly(foreach):
    model = net(dtype=torch.float32)
    opt = SAM(sam_on_groups(model), torch.optim.SGD, rho=0.3, lr=LR, foreach=foreach)
    x, y = batches(1, dtype=torch.float32)[0]
    w = weights(model)
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.first_step()
    names = [n for n, _ in model.named_parameters()]
    for name, before, p in zip(names, w, model.parameters()):
        assert torch.equal(p, before) == (name not in NORM), name
    # only the perturbed parameters are backed up
    assert opt._store.numel() == sum(p.numel() for n, p in model.named_parameters() if n in NORM)
    opt.unperturb()
    for before, p in zip(w, model.parameters()):
        assert torch.equal(p, before)


def test_nothing_perturbed_is_the_base_optimizer_with_two_passes():
    model = net()
    opt = SAM([{"params": model.parameters(), "perturb": False}], torch.optim.SGD, lr=LR)
    x, y = batches(1)[0]
    w = weights(model)
    want = [wi - LR * gi for wi, gi in zip(w, grad_at(model, w, x, y))]
    assert two_passes(model, opt, x, y)
    assert_close(weights(model), want, atol=1e-15)


def test_perturb_must_be_a_bool():
    with pytest.raises(ValueError, match="perturb must be True or False"):
        SAM([{"params": net().parameters(), "perturb": "no"}], torch.optim.SGD, lr=LR)


# -- under the training-step helper: BatchNorm, bf16 --------------------------------------------


def test_under_the_step_helper_with_batchnorm_and_bf16():
    model = net(dtype=torch.float32)
    ref = copy.deepcopy(model)

    def make(m):
        return SAM(sam_on_groups(m), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)

    step = SharpnessAwareStep(model, make(model), nn.functional.cross_entropy, amp="bf16")
    ref_opt = make(ref)
    seen, dtypes = [], []
    model.register_forward_pre_hook(lambda m, args: seen.append(weights(m)))
    model[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    names = [n for n, _ in model.named_parameters()]
    for x, y in batches(3, dtype=torch.float32):
        w = weights(model)
        seen.clear()
        assert step(x, y).took_step
        # the manual reference: both passes under autocast, running statistics of the first pass
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        kept = {k: v.clone() for k, v in ref.named_buffers()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.functional.cross_entropy(ref(x), y).backward()
        for k, v in ref.named_buffers():
            v.copy_(kept[k])
        ref_opt.second_step(zero_grad=True)
        for a, b in zip(weights(model), weights(ref)):
            assert torch.equal(a, b)
        for (k, a), b in zip(model.named_buffers(), ref.buffers()):
            assert torch.equal(a, b), k
        second = seen[1]
        moved = [a - b for n, a, b in zip(names, second, w) if n in NORM]
        assert all(torch.equal(a, b) for n, a, b in zip(names, second, w) if n not in NORM)
        norm = torch.cat([m.flatten() for m in moved]).norm().item()
        assert norm == pytest.approx(RHO, rel=1e-5)
    assert set(dtypes) == {torch.bfloat16}
    assert model[1].num_batches_tracked.item() == 3  # the first pass of each step only


@pytest.mark.parametrize("method", ["sam_on", "sam_on_with_policy"])
def test_the_helpers_first_backward_skips_the_weight_gradients_sam_on_does_not_read(method):
    """SharpnessAwareStep runs SAM-ON's first pass with the other parameters frozen: one
    gradient per step for them (the second pass's), two for the normalisation parameters; the
    result is the same (the two-call form computes every gradient). With an ascent policy the
    first pass's gradients may be the update's, so nothing is frozen."""
    model, ref = net(), net()
    groups = sam_on_groups
    if method == "sam_on":
        opt = SAM(groups(model), torch.optim.SGD, rho=RHO, lr=LR)
    else:
        from samkit.optim.ascent_policy import RST

        opt = RST(groups(model), torch.optim.SGD, rho=RHO, p=1.0, lr=LR)
    ref_opt = SAM(groups(ref), torch.optim.SGD, rho=RHO, lr=LR)
    step = SharpnessAwareStep(model, opt, nn.functional.cross_entropy)
    counts = {n: 0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: counts.__setitem__(n, counts[n] + 1))
    for x, y in batches(2):
        assert step(x, y).took_step
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.second_step(zero_grad=True)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    frozen = 1 if method == "sam_on" else 2
    assert {n: c for n, c in counts.items() if n not in NORM} == {
        n: 2 * frozen for n in counts if n not in NORM
    }
    assert all(counts[n] == 4 for n in NORM)
    assert all(p.requires_grad for p in model.parameters())


# -- checkpoints --------------------------------------------------------------------------------


def test_state_dict_resume_is_bit_identical():
    model = net()
    data = batches(5)

    def make(m):
        return SAM(sam_on_groups(m), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                   weight_decay=5e-4, nesterov=True)  # fmt: skip

    straight = copy.deepcopy(model)
    straight_opt = make(straight)
    for x, y in data:
        two_passes(straight, straight_opt, x, y)

    first = copy.deepcopy(model)
    first_opt = make(first)
    for x, y in data[:2]:
        two_passes(first, first_opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = net(seed=9)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    assert [g["perturb"] for g in resumed_opt.param_groups] == [True, False]
    for x, y in data[2:]:
        two_passes(resumed, resumed_opt, x, y)
    for a, b in zip(weights(resumed), weights(straight)):
        assert torch.equal(a, b)


def test_a_state_dict_from_before_the_perturb_option_loads_and_perturbs_everything():
    model = net()
    (x, y), (x2, y2) = batches(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    two_passes(model, opt, x, y)
    old = copy.deepcopy(opt.state_dict())  # its tensors would be shared otherwise
    for group in old["param_groups"]:
        del group["perturb"]  # what SAM wrote before the option existed
    twin = copy.deepcopy(model)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    twin_opt.load_state_dict(old)
    two_passes(model, opt, x2, y2)
    two_passes(twin, twin_opt, x2, y2)
    for a, b in zip(weights(twin), weights(model)):
        assert torch.equal(a, b)


# -- the registry, the groups -------------------------------------------------------------------


def test_registry_entry_builds_the_groups_from_the_model():
    info = get_optimizer_info("sam_on")
    assert info.cls is SAM and info.sharpness_aware and "Mueller" in info.paper
    assert [o.name for o in info.options] == ["rho", "adaptive"]
    assert info.describe({}) == "SAM-ON rho=0.05"
    assert info.describe({"rho": 0.5, "adaptive": True}) == "ASAM-ON rho=0.5"
    model = net()
    opt = create_optimizer("sam_on", model, torch.optim.SGD, rho=0.2, lr=LR)
    by_name = {id(p): n for n, p in model.named_parameters()}
    groups = [([by_name[id(p)] for p in g["params"]], g["perturb"]) for g in opt.param_groups]
    assert groups == [
        (["1.weight", "1.bias", "4.weight", "4.bias"], True),
        (["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias"], False),
    ]
    assert all(g["rho"] == 0.2 for g in opt.param_groups)
    with pytest.raises(ValueError, match="chooses which parameters to perturb"):
        create_optimizer("sam_on", model.parameters(), torch.optim.SGD, lr=LR)
    # other methods take the model as their parameters, in one group
    sam = create_optimizer("sam", model, torch.optim.SGD, lr=LR)
    assert len(sam.param_groups) == 1 and sam.param_groups[0]["perturb"] is True


def test_groups_norm_layer_kinds_subclasses_ties_and_refusal():
    class MyBatchNorm(nn.BatchNorm2d):  # as timm's BatchNormAct2d
        pass

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 4, 3),
            "bn": MyBatchNorm(4),
            "gn": nn.GroupNorm(2, 4),
            "inorm": nn.InstanceNorm2d(4, affine=True),
            "rms": nn.RMSNorm(4),
            "ln_no_affine": nn.LayerNorm(4, elementwise_affine=False),
            "custom": Custom(),
            "holder": nn.Module(),
        }
    )
    model["holder"].register_parameter("tied", model["gn"].weight)  # shared with a norm layer
    norm, other = sam_on_groups(model)
    held = {id(p) for key in ("bn", "gn", "inorm", "rms") for p in model[key].parameters()}
    assert {id(p) for p in norm["params"]} == held and len(norm["params"]) == 7
    assert other["perturb"] is False
    assert len(norm["params"]) + len(other["params"]) == len(list(model.parameters()))
    (only,) = sam_on_groups(nn.LayerNorm(3))  # nothing else: one group
    assert len(only["params"]) == 2
    custom, rest = sam_on_groups(model, norm_types=(Custom,))
    assert custom["params"] == [model["custom"].scale] and len(rest["params"]) == 9
    with pytest.raises(ValueError, match="SAM-ON: Sequential has no parameters in norm"):
        sam_on_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2, elementwise_affine=False)))
