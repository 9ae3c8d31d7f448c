"""The cached / flat path (issue 14) equals the per-tensor path bit for bit.

With ``foreach`` on (the default) a SAM step reuses a plan of its parameters across steps, keeps
the clean weights in one flat buffer per (device, dtype) and, when the parameters lie back to back
in one storage, backs them up and restores them with one copy each. With ``foreach=False`` every
pass rebuilds its lists and works tensor by tensor: the reference. On the CPU torch's multi-tensor
kernels run the same per-tensor kernels, and the norms are summed in the same order (per-tensor
norms, then the norm of their stack), so the two paths agree exactly (``torch.equal``), through
several steps, with the base optimizer's state included.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, Adam

from samkit.optim import SAM, create_optimizer
from samkit.train.step import SharpnessAwareStep

STEPS = 6


def many_tensor_mlp(seed=0, layers=6, width=8, dtype=torch.float32):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, 3, bias=False))
    return nn.Sequential(*mods).to(dtype)


def batches(n=STEPS, size=8, width=8, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, width, generator=gen, dtype=dtype),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def two_step(model, opt, x, y, poison=None):
    """One raw two-call step; ``poison`` ("first" / "second") puts a NaN into that pass."""
    for name in ("first", "second"):
        loss = F.cross_entropy(model(x), y)
        if poison == name:
            loss = loss * float("nan")
        loss.backward()
        if name == "first":
            opt.first_step(zero_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return opt.second_step(zero_grad=True)


def assert_bitwise(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    state_a = opt_a.state_dict()["state"]
    state_b = opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field, value in state_a[key].items():
            other = state_b[key][field]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (key, field)
            else:
                assert value == other, (key, field)


CONFIGS = {
    "sgd_momentum": dict(base=SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": dict(base=Adam, lr=1e-2, weight_decay=1e-4),
    "asam": dict(base=SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9),
    "p_inf": dict(base=SGD, rho=0.01, norm=math.inf, lr=0.1, momentum=0.9),
    "asam_p_inf": dict(base=SGD, rho=0.01, norm=math.inf, adaptive=True, lr=0.1),
    "ascent_3": dict(base=SGD, rho=0.2, ascent_steps=3, lr=0.1),
}


def build(config, model, foreach, groups=False):
    kwargs = dict(CONFIGS[config])
    base = kwargs.pop("base")
    params = model.parameters()
    if groups:  # weights and biases apart, with their own rho / adaptive
        named = list(model.named_parameters())
        params = [
            dict(params=[p for n, p in named if n.endswith("weight")]),
            dict(params=[p for n, p in named if n.endswith("bias")], rho=0.02, adaptive=False),
        ]
    return SAM(params, base, foreach=foreach, **kwargs)


def run(config, foreach, *, groups=False, step=None):
    model = many_tensor_mlp()
    opt = build(config, model, foreach, groups)
    for i, (x, y) in enumerate(batches()):
        if step is None:
            if CONFIGS[config].get("ascent_steps", 1) > 1:

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                two_step(model, opt, x, y)
        else:
            step(i, model, opt, x, y)
    return model, opt


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_path_equals_per_tensor_path(config, groups):
    fast = run(config, None, groups=groups)
    reference = run(config, False, groups=groups)
    assert_bitwise(*fast, *reference)
    assert fast[1]._plans  # the fast run did reuse a plan


def test_a_skipped_step_in_either_pass_is_the_same_on_both_paths():
    def step(i, model, opt, x, y):
        poison = {1: "first", 3: "second"}.get(i)
        took = two_step(model, opt, x, y, poison=poison)
        assert took == (poison is None)

    fast, reference = run("sgd_momentum", None, step=step), run("sgd_momentum", False, step=step)
    assert fast[1].skipped_steps == reference[1].skipped_steps == 2
    assert_bitwise(*fast, *reference)


def test_parameters_gaining_and_losing_gradients_switch_plans_exactly():
    """The last layer is used only in odd steps and the first-pass set differs from the second
    pass's in step 2: the cached path follows every change."""

    def step(i, model, opt, x, y):
        head, body = model[-1], model[:-1]
        for name in ("first", "second"):
            out = body(x)
            if i % 2 or (i == 2 and name == "second"):
                out = head(out)
            else:
                out = out[:, :3]
            F.cross_entropy(out, y).backward()
            if name == "first":
                opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)

    fast, reference = run("sgd_momentum", None, step=step), run("sgd_momentum", False, step=step)
    assert_bitwise(*fast, *reference)
    assert len(fast[1]._plans) >= 2


def test_add_param_group_mid_training():
    def runner(foreach):
        model, extra = many_tensor_mlp(), nn.Linear(3, 3)
        extra.weight.data.mul_(0.5)
        opt = build("sgd_momentum", model, foreach)
        for i, (x, y) in enumerate(batches()):
            if i == 2:
                opt.add_param_group(dict(params=list(extra.parameters()), lr=0.05, rho=0.1))
            net = nn.Sequential(model, extra) if i >= 2 else model
            two_step(net, opt, x, y)
        return nn.Sequential(model, extra), opt

    assert_bitwise(*runner(None), *runner(False))


def test_state_dict_round_trip_continues_bit_for_bit():
    data = batches()

    def uninterrupted(foreach):
        model = many_tensor_mlp()
        opt = build("adam", model, foreach)
        for x, y in data:
            two_step(model, opt, x, y)
        return model, opt

    model = many_tensor_mlp()
    opt = build("adam", model, None)
    for x, y in data[:3]:
        two_step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = many_tensor_mlp(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = build("adam", resumed, None)
    resumed_opt.load_state_dict(saved_opt)
    for x, y in data[3:]:
        two_step(resumed, resumed_opt, x, y)
    assert_bitwise(resumed, resumed_opt, *uninterrupted(False))
    assert_bitwise(*uninterrupted(None), *uninterrupted(False))


@pytest.mark.parametrize("name", ["esam", "gsam", "wsam", "fsam"])
def test_the_variants_cached_path_equals_per_tensor_path(name):
    def runner(foreach):
        model = many_tensor_mlp()
        options = dict(seed=3, beta=0.6) if name == "esam" else {}
        opt = create_optimizer(
            name, model.parameters(), SGD, foreach=foreach, lr=0.1, momentum=0.9, **options
        )
        for x, y in batches():
            if name == "esam":  # random subsets of tensors: a new plan most steps
                opt.step(
                    lambda index=None, x=x, y=y: F.cross_entropy(
                        model(x if index is None else x[index]),
                        y if index is None else y[index],
                        reduction="none",
                    )
                )
            else:
                two_step(model, opt, x, y)
        return model, opt

    assert_bitwise(*runner(None), *runner(False))


def test_m_sharpness_through_the_step_helper():
    """Several first steps (one per chunk of m samples) and restores per update."""

    def runner(foreach):
        model = many_tensor_mlp()
        opt = build("sgd_momentum", model, foreach)
        step = SharpnessAwareStep(model, opt, nn.CrossEntropyLoss(reduction="none"), m=2)
        for x, y in batches():
            step(x, y)
        return model, opt

    assert_bitwise(*runner(None), *runner(False))


# ---------------------------------------------------------------- flat parameters


def flatten_(model):
    """Re-point every parameter into one contiguous buffer, back to back (as apex does)."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def test_flat_parameters_are_backed_up_and_restored_in_one_copy_each():
    model = many_tensor_mlp()
    flat = flatten_(model)
    opt = build("sgd_momentum", model, None)
    reference_model = many_tensor_mlp()
    reference = build("sgd_momentum", reference_model, False)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for x, y in batches():
        two_step(model, opt, x, y)
        two_step(reference_model, reference, x, y)
    (plan,) = opt._plans.values()
    assert plan._flat is not None and len(plan._flat) == 1  # the single-copy path was taken
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # restored in place
    assert flat.data_ptr() == ptrs[0]
    assert_bitwise(model, opt, reference_model, reference)


def test_flat_path_restores_exactly_the_perturbed_weights():
    model = many_tensor_mlp(dtype=torch.float64)
    flatten_(model)
    opt = build("asam", model, None)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1, dtype=torch.float64)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    opt.unperturb()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_parameters_sharing_a_storage_out_of_order_fall_back_to_per_tensor_copies():
    model = many_tensor_mlp()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in reversed(params)])
    offset = flat.numel()
    for p in params:  # back to back, but in the reverse order of the buffer's slots
        offset -= p.numel()
        p.data = flat[offset : offset + p.numel()].view_as(p)
    opt = build("sgd_momentum", model, None)
    reference_model = many_tensor_mlp()
    reference = build("sgd_momentum", reference_model, False)
    for x, y in batches(3):
        two_step(model, opt, x, y)
        two_step(reference_model, reference, x, y)
    (plan,) = opt._plans.values()
    assert plan._flat is None
    assert_bitwise(model, opt, reference_model, reference)


# ---------------------------------------------------------------- the plan follows the model


def test_a_dtype_change_between_steps_makes_a_new_plan_and_exact_backups():
    """``model.double()`` re-points every parameter: the backups are then float64 too, so the
    restore is exact for values float32 cannot hold."""
    model = many_tensor_mlp()
    opt = build("sgd_momentum", model, None)
    x, y = batches(1)[0]
    two_step(model, opt, x, y)
    model.double()
    for p in model.parameters():
        p.data.add_(1e-12)  # not representable next to O(1) values in float32
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x.double()), y).backward()
    opt.first_step(zero_grad=True)
    assert all(b.dtype == torch.float64 for b in opt._perturbed.backups())
    opt.unperturb()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_backup_memory_only_for_parameters_that_had_gradients():
    model = many_tensor_mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = build("sgd_momentum", model, None)
    x, y = batches(1)[0]
    two_step(model, opt, x, y)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt._store.numel() == trained
