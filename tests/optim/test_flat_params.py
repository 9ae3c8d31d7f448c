"""``flat=True`` (issue 14): parameters and gradients in one buffer per group, device and dtype.

The reference is the same optimizer without ``flat``. The updates are elementwise, so they agree
exactly; the norms do not sum in the same order (one norm over a buffer against per-tensor norms
then the norm of their stack), so the weights agree to a few ulp: the tests run in float64 and
compare to 1e-12 relative. Everything else (checkpoints, skips, the step helper) is compared the
same way against the per-tensor path.
"""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, AdamW

from samkit.optim import ESAM, SAM, create_optimizer, sam_on_groups
from samkit.train.step import SharpnessAwareStep

STEPS = 5
TOL = dict(rtol=1e-12, atol=1e-14)


def mlp(seed=0, layers=5, width=6, norm=False):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.LayerNorm(width) if norm else nn.Tanh()]
    mods.append(nn.Linear(width, 3, bias=False))
    return nn.Sequential(*mods).double()


def batches(n=STEPS, size=8, width=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, width, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def train(model, opt, data):
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))


def assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    for key, fields in sa["state"].items():
        assert fields.keys() == sb["state"][key].keys()
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb["state"][key][field], **TOL)
            else:
                assert value == sb["state"][key][field]


METHODS = {
    "sam": dict(name="sam", base=SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "sam_adamw": dict(name="sam", base=AdamW, lr=1e-2, weight_decay=1e-2),
    "asam": dict(name="sam", base=SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9),
    "p_inf": dict(name="sam", base=SGD, rho=0.01, norm=math.inf, lr=0.1),
    "ascent_2": dict(name="sam", base=SGD, rho=0.2, ascent_steps=2, lr=0.1),
    "gsam": dict(name="gsam", base=SGD, lr=0.1, momentum=0.9),
    "wsam": dict(name="wsam", base=SGD, lr=0.1),
    "fsam": dict(name="fsam", base=SGD, lr=0.1, momentum=0.9),
    "looksam": dict(name="looksam", base=SGD, lr=0.1, k=2),
    "msam": dict(name="msam", base=SGD, lr=0.1, momentum=0.9),
}


def build(method, model, flat, groups=False):
    kwargs = dict(METHODS[method])
    name, base = kwargs.pop("name"), kwargs.pop("base")
    params = model
    if groups:  # weights and biases apart, with their own learning rate and rho
        named = list(model.named_parameters())
        params = [
            dict(params=[p for n, p in named if n.endswith("weight")]),
            dict(params=[p for n, p in named if n.endswith("bias")], lr=0.05, rho=0.02),
        ]
    return create_optimizer(name, params, base, flat=flat, **kwargs)


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_flat_equals_per_tensor(method, groups):
    data = batches()
    runs = []
    for flat in (False, True):
        model = mlp()
        opt = build(method, model, flat, groups)
        train(model, opt, data)
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])
    flat_opt = runs[1][1]
    # one proxy per param group (one device, one dtype each)
    assert [len(g["params"]) for g in flat_opt.param_groups] == [1] * (2 if groups else 1)
    trained = list(map(id, flat_opt.trained_parameters()))
    assert sorted(trained) == sorted(map(id, runs[1][0].parameters()))
    assert len(trained) == len(set(trained))


def test_sam_on_groups_flat():
    data = batches()
    runs = []
    for flat in (False, True):
        model = mlp(norm=True)
        opt = SAM(sam_on_groups(model), SGD, rho=0.5, lr=0.1, flat=flat)
        train(model, opt, data)
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


def test_two_dtypes_give_two_buffers_and_the_same_steps():
    def model_of():
        model = mlp()
        model[0].float()  # one layer in float32, the rest in float64
        return model

    data = [(x.float(), y) for x, y in batches()]
    runs = []
    for flat in (False, True):
        model = model_of()
        opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=flat)

        def closure(x=None, y=None, model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model[1:](model[0](x).double()), y)
            loss.backward()
            return loss

        for x, y in data:
            opt.step(lambda x=x, y=y, c=closure: c(x, y))
        runs.append((model, opt))
    assert len(runs[1][1].param_groups[0]["params"]) == 2
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_parameters_and_gradients_are_views_of_the_buffers():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    (proxy,) = opt.param_groups[0]["params"]
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    flat_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(proxy.grad, flat_grad)
    assert torch.equal(proxy.detach(), torch.cat([p.reshape(-1) for p in model.parameters()]))
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == proxy.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == proxy.grad.untyped_storage().data_ptr()
    opt.zero_grad()  # in place: the views stay bound
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_the_restore_exchanges_memory_and_is_exact():
    """Restoring w swaps the buffer's memory with the backup's instead of copying: the same bits,
    seen through every view of the parameters; the optimizer still finds its parameters."""
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    (proxy,) = opt.param_groups[0]["params"]
    row = model[0].weight[0]  # a view taken before: it follows the parameter
    for x, y in batches(3):
        clean = [p.detach().clone() for p in model.parameters()]
        home = proxy.data_ptr()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        assert not torch.equal(model[0].weight, clean[0])  # at w + e
        F.cross_entropy(model(x), y).backward()
        opt.unperturb()
        assert proxy.data_ptr() != home  # exchanged, not copied
        assert all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))
        assert torch.equal(row, clean[0][0])
        storage = proxy.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == storage for p in model.parameters())
        opt.second_step(zero_grad=True)
    model.float()  # moved after an odd number of exchanges: still refused
    with pytest.raises(RuntimeError, match="model.to"):
        train(model, opt, [(x.float(), y) for x, y in batches(1)])


def test_each_group_buffer_is_exchanged_with_its_own_backup():
    """Weight decay on the matrices, none on the biases: two buffers, each restored by an
    exchange with a backup of its own, exactly."""
    model = mlp()
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 1e-2}, {"params": rest}]
    opt = SAM(groups, SGD, lr=0.1, momentum=0.9, flat=True)
    proxies = [g["params"][0] for g in opt.param_groups]
    x, y = batches(1)[0]
    clean = [p.detach().clone() for p in model.parameters()]
    homes = [p.data_ptr() for p in proxies]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.unperturb()
    assert all(p.data_ptr() != home for p, home in zip(proxies, homes))
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))


@pytest.mark.parametrize("flat", [False, True])
def test_a_graph_saved_at_other_weights_is_refused(flat):
    """As per tensor, a backward through a graph saved before the weights moved raises (with
    flat=True the writes go to the buffers, so the parameters' versions are bumped for them)."""
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=flat)
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    opt.first_step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(retain_graph=True)
    loss = F.cross_entropy(model(x), y)  # at w + e
    loss.backward(retain_graph=True)
    opt.second_step()  # the restore and the base step
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gradients_made_outside_the_buffers_are_moved_in():
    """model.zero_grad() frees the gradients: the next backward makes new ones, which the
    post-accumulate hook copies into the buffer before anything reads the proxies (here a
    GradScaler-style unscale on the optimizer's param groups)."""
    data = batches(3)
    ref_model, model = mlp(), mlp()
    ref = SAM(ref_model.parameters(), SGD, lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    for x, y in data:
        for m, o in ((ref_model, ref), (model, opt)):
            m.zero_grad(set_to_none=True)
            (F.cross_entropy(m(x), y) * 4.0).backward()
            with torch.no_grad():  # what GradScaler.unscale_ does: param groups' grads in place
                for g in o.param_groups:
                    for p in g["params"]:
                        p.grad.mul_(0.25)
            o.first_step()
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.second_step()
    assert_same(ref_model, ref, model, opt)


def test_a_gradient_assigned_by_hand_is_synced_before_the_step():
    ref_model, model = mlp(), mlp()
    ref = SAM(ref_model.parameters(), SGD, lr=0.1)
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    for m, o in ((ref_model, ref), (model, opt)):
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        o.first_step()
        for p, g in zip(m.parameters(), grads):
            p.grad = (2 * g).clone()
        o.second_step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, **TOL)


def test_a_skipped_step_leaves_weights_and_state_untouched():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    data = batches(2)
    train(model, opt, data[:1])
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    x, y = data[1]
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning):
        assert opt.second_step(zero_grad=True) is False
    assert opt.skipped_steps == 1
    for a, b in zip(before[0], model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(
        before[1]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


@pytest.mark.parametrize("method", ["sam_adamw", "looksam", "fsam"])
@pytest.mark.parametrize("save_flat,load_flat", [(True, True), (True, False), (False, True)])
def test_checkpoints_move_between_flat_and_per_tensor(save_flat, load_flat, method):
    """state_dict() is per parameter in both modes (the base optimizer's state, LookSAM's g_v,
    Friendly-SAM's average); a run resumed from it in either mode continues as the uninterrupted
    per-tensor run."""
    data = batches(6)
    ref_model = mlp()
    ref = build(method, ref_model, False)
    train(ref_model, ref, data)

    model = mlp()
    opt = build(method, model, save_flat)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = build(method, resumed, load_flat)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[3:])
    assert_same(ref_model, ref, resumed, opt2)


def test_a_state_dict_for_other_groups_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    train(model, opt, batches(1))
    state = opt.state_dict()
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    other = SAM(mlp().parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    with pytest.raises(ValueError, match="param groups of"):
        other.load_state_dict(state)


def test_add_param_group_gets_its_own_buffer():
    data = batches()
    runs = []
    for flat in (False, True):
        model = mlp()
        params = list(model.parameters())
        opt = SAM(params[:4], SGD, lr=0.1, momentum=0.9, flat=flat)
        opt.add_param_group({"params": params[4:], "lr": 0.05})
        train(model, opt, data)
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])
    assert [len(g["params"]) for g in runs[1][1].param_groups] == [1, 1]
    with pytest.raises(ValueError, match="more than one parameter group"):
        runs[1][1].add_param_group({"params": list(runs[1][0].parameters())[:1]})


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_step_helper_with_m_sharpness_and_accumulation(amp):
    """SharpnessAwareStep swaps gradient tensors in and out between passes (the running sum of
    micro-batches): the buffers adopt or copy them, and the result is the per-tensor one."""
    data = batches(4, size=8)
    runs = []
    for flat in (False, True):
        model = mlp()
        opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=flat)
        step = SharpnessAwareStep(
            model,
            opt,
            nn.CrossEntropyLoss(reduction="none"),
            m=4,
            accumulation_steps=2,
            max_grad_norm=1.0,
            amp=amp,
        )
        for x, y in data:
            step(x, y)
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


def test_rebuilding_the_optimizer_moves_the_parameters_again():
    model = mlp()
    first = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    train(model, first, batches(1))
    second = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=True)
    train(model, second, batches(2))  # the first optimizer's hooks are gone
    (proxy,) = second.param_groups[0]["params"]
    assert proxy.untyped_storage().data_ptr() == model[0].weight.untyped_storage().data_ptr()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        first.zero_grad()


def test_moving_the_model_after_building_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    model.float()
    with pytest.raises(RuntimeError, match="model.to"):
        train(model, opt, [(x.float(), y) for x, y in batches(1)])


def test_freezing_after_building_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, weight_decay=1e-2, flat=True)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="frozen"):
        train(model, opt, batches(1))


def test_refusals():
    model = mlp()
    with pytest.raises(TypeError, match="pass its class"):
        SAM(model.parameters(), SGD(model.parameters(), lr=0.1), flat=True)
    with pytest.raises(ValueError, match="elementwise"):
        SAM(model.parameters(), torch.optim.Adafactor, lr=0.1, flat=True)
    with pytest.raises(ValueError, match="ESAM"):
        ESAM(model.parameters(), SGD, lr=0.1, flat=True)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable leaf parameters"):
        SAM(model.parameters(), SGD, lr=0.1, flat=True)
    emb = nn.Embedding(5, 3, sparse=True)
    SAM(emb.parameters(), SGD, lr=0.1, flat=True)  # the hooks keep its buffers
    emb.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="dense gradients"):
        emb(torch.tensor([1, 2])).sum().backward()


def test_a_flat_model_still_pickles_and_deep_copies():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    train(model, opt, batches(1))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copied = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = batches(1)[0]
        F.cross_entropy(copied(x), y).backward()  # no hook of the original fires
    assert all(p.grad is not None for p in copied.parameters())


def test_gradients_beyond_float32s_norm_range_are_taken_on_the_buffer_too():
    # ||g|| of 2e20-scale gradients overflows float32's sum of squares: the float64 fallback
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = SAM(model.parameters(), SGD, rho=0.05, lr=1e-21, flat=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2e20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite gradient; step skipped"
        assert opt.first_step()
        for p in model.parameters():
            p.grad = torch.full_like(p, 2e20)
        assert opt.second_step(max_grad_norm=1.0)
    assert opt.skipped_steps == 0
    assert math.isfinite(opt.last_grad_norm.item()) and opt.last_grad_norm.item() > 1e20
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_base_optimizers_zero_grad_zeroes_the_buffers():
    """The base optimizer's zero_grad would set the proxies' gradients to None while the model's
    stay bound (and a backward would add to them): with flat=True it zeroes the buffers."""
    data = batches(3)
    runs = []
    for flat in (False, True):
        model = mlp()
        opt = SAM(model.parameters(), SGD, lr=0.1, momentum=0.9, flat=flat)
        for x, y in data:
            opt.base_optimizer.zero_grad()  # set_to_none=True, on the proxies with flat
            F.cross_entropy(model(x), y).backward()
            opt.first_step()
            opt.base_optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


def test_a_dropped_flat_optimizer_leaves_later_training_alone():
    import gc

    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    train(model, opt, batches(1))
    del opt
    gc.collect()
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)  # a linear probe on the last layer, with plain SGD
    probe = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()  # no "frozen" error from the old buffers' hooks
    probe.step()


def test_param_groups_as_torch_takes_them():
    model = mlp()
    with pytest.raises(TypeError, match="ordered collections"):
        SAM([{"params": set(model.parameters())}], SGD, lr=0.1, flat=True)
    weight = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SAM([{"params": weight}], SGD, lr=0.1, flat=True)  # a single tensor
    assert opt.trained_parameters() == [weight] or opt.trained_parameters()[0] is weight


def test_a_proxy_gradient_set_to_none_elsewhere_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), SGD, lr=0.1, flat=True)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    for group in opt.param_groups:  # what code walking the param groups might do
        for p in group["params"]:
            p.grad = None
    F.cross_entropy(model(x), y).backward()  # adds to the model's (still bound) gradients
    with pytest.raises(RuntimeError, match="replaced or set to None"):
        opt.first_step()
    opt.zero_grad()  # zeroing is always fine: the buffers are bound again
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step()


def test_the_base_optimizer_takes_the_one_tensor_path_unless_told():
    """On the buffers the base optimizer runs with foreach=False (one tensor: nothing to batch;
    SAM's own foreach argument is SAM's); a subclass whose __init__ takes none is built as given."""
    model = mlp()
    assert (
        SAM(model.parameters(), SGD, lr=0.1, flat=True).base_optimizer.defaults["foreach"] is False
    )
    model = mlp()
    assert SAM(model.parameters(), SGD, lr=0.1).base_optimizer.defaults["foreach"] is None

    class PlainSGD(SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr, momentum=0.9)

    model = mlp()
    opt = SAM(model.parameters(), PlainSGD, lr=0.1, flat=True)
    train(model, opt, batches(1))
    assert opt.base_optimizer.defaults["foreach"] is None
