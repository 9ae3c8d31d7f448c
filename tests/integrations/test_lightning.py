"""samkit.integrations.lightning with real Lightning (CPU, tiny models, a few steps).

Every training run is compared with an independent SAM loop written here from the paper's
equations, on the same batches, in float64: ``g = grad L(w)`` (the first pass, which alone
updates the BatchNorm running statistics), ``e = rho g / ||g||_2`` over all parameters,
``g_sam = grad L(w + e)``, optional clipping of ``g_sam`` (by global norm, or by value), then SGD
with momentum (``b = mu b + g_sam``, ``w -= lr b``) from the clean ``w``.
"""

from __future__ import annotations

import math
import warnings

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch import nn  # noqa: E402

from samkit.integrations.lightning import (  # noqa: E402
    PassReplay,
    SAMCallback,
    is_first_pass,
    missing_callback_check,
)
from samkit.optim import ESAM, SAM, create_optimizer, unwrap  # noqa: E402

F64 = torch.float64
RHO, LR, MOMENTUM = 0.3, 0.1, 0.9

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    "ignore:.*litlogger.*",
    # the runs made without SAMCallback on purpose (to show what it fixes): the entry-point
    # check warns there, as it should (tested in test_missing_callback_check_...)
    "ignore:SAM trains with automatic optimisation without samkit's SAMCallback:UserWarning",
)


# -- the model, the data and the independent reference ----------------------------------------


def make_model(bn=False, dropout=0.0, dtype=F64, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).to(dtype)


def make_batches(n, dtype=F64, seed=1, bad=()):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        x = torch.randn(8, 6, generator=gen, dtype=dtype) * 2
        if i in bad:
            x[0, 0] = math.inf  # a non-finite first pass: the step is skipped
        batches.append((x, torch.randint(0, 3, (8,), generator=gen)))
    return batches


def loss_of(model, x, y, autocast=None):
    with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x)
    return F.cross_entropy(out.to(x.dtype), y)


def reference(model, batches, *, clip=None, autocast=None, accumulate=1, plain=()):
    """The SAM steps of the paper on ``model`` (in place); returns it.

    ``clip``: (value, "norm" | "value") for the SAM gradient. ``accumulate``: micro-batches per
    step, each with its own perturbation; the step uses the mean of their SAM gradients. A
    non-finite gradient skips the step (weights, momentum and BatchNorm buffers unchanged).
    ``plain``: the steps without ascent (one pass, the update uses ``g``). ``autocast``: the
    dtype of the forward passes (torch.autocast on the CPU)."""
    params = list(model.parameters())
    momentum = [None] * len(params)
    for start in range(0, len(batches), accumulate):
        buffers = [b.clone() for b in model.buffers()]
        g_sam = [torch.zeros_like(p) for p in params]
        finite = True
        for x, y in batches[start : start + accumulate]:
            g = torch.autograd.grad(loss_of(model, x, y, autocast), params)
            norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
            finite = finite and bool(torch.isfinite(norm))
            if not finite:
                break
            if start // accumulate in plain:
                g_sam = [gi / accumulate for gi in g]
                continue
            clean = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(RHO * gi / norm)
            after_first = [b.clone() for b in model.buffers()]
            g_k = torch.autograd.grad(loss_of(model, x, y, autocast), params)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), after_first):  # BatchNorm: first pass only
                    b.copy_(saved)
                for p, w, total, gi in zip(params, clean, g_sam, g_k):
                    p.copy_(w)
                    total.add_(gi / accumulate)
        with torch.no_grad():
            if not finite:
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
                continue
            if clip is not None and clip[1] == "value":
                g_sam = [gi.clamp(-clip[0], clip[0]) for gi in g_sam]
            elif clip is not None:
                total = torch.sqrt(sum((gi**2).sum() for gi in g_sam))
                if total > clip[0]:
                    g_sam = [gi * (clip[0] / (total + 1e-6)) for gi in g_sam]
            for i, (p, gi) in enumerate(zip(params, g_sam)):
                momentum[i] = gi.clone() if momentum[i] is None else MOMENTUM * momentum[i] + gi
                p.sub_(LR * momentum[i])
    return model


def assert_same_state(actual, expected, tol=1e-10):
    a, b = actual.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


def differs(actual, expected, tol=1e-6):
    a, b = actual.state_dict(), expected.state_dict()
    return any(not torch.allclose(a[k].double(), b[k].double(), rtol=tol, atol=tol) for k in a)


def sam(params, **kw):
    return SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **kw)


class Net(pl.LightningModule):
    """Automatic optimisation: the closure is ``training_step`` + backward."""

    def __init__(self, model, make_optimizer=sam):
        super().__init__()
        self.model = model
        self.make_optimizer = make_optimizer
        self.forwards = 0
        self.first_pass = []  # is_first_pass at each training_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.forwards += 1
        self.first_pass.append(is_first_pass(self))
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def trainer(tmp_path, callbacks=(), **kw):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **options)


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def fit(tmp_path, net, batches, callbacks=None, **kw):
    """Fit ``net`` on ``batches``; ``callbacks`` default to ``[SAMCallback()]``."""
    t = trainer(tmp_path, [SAMCallback()] if callbacks is None else callbacks, **kw)
    t.fit(net, loader(batches))
    return t


# -- automatic optimisation ---------------------------------------------------------------------


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "bare"])
def test_plain_automatic_is_the_papers_sam(tmp_path, with_callback):
    batches = make_batches(5)
    net = Net(make_model())
    t = fit(tmp_path, net, batches, None if with_callback else [])
    assert (t.global_step, net.forwards) == (5, 10)
    assert net.first_pass == ([True, False] * 5 if with_callback else [True] * 10)
    assert_same_state(net.model, reference(make_model(), batches))


def test_batchnorm_statistics_come_from_the_first_pass(tmp_path):
    batches = make_batches(5)
    net = Net(make_model(bn=True))
    fit(tmp_path, net, batches)
    assert net.model[1].num_batches_tracked.item() == 5
    expected = reference(make_model(bn=True), batches)
    assert_same_state(net.model, expected)

    bare = Net(make_model(bn=True))  # what the callback fixes: both passes update the buffers
    fit(tmp_path, bare, batches, callbacks=[])
    assert bare.model[1].num_batches_tracked.item() == 10
    assert differs(bare.model, expected)


@pytest.mark.parametrize("algorithm,value", [("norm", 0.05), ("value", 0.01)])
def test_clipping_applies_to_the_sam_gradient_only(tmp_path, algorithm, value):
    batches = make_batches(5)
    net = Net(make_model(bn=True))
    t = fit(tmp_path, net, batches, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    expected = reference(make_model(bn=True), batches, clip=(value, algorithm))
    assert_same_state(net.model, expected)
    assert differs(expected, reference(make_model(bn=True), batches))  # the clipping acts
    assert (t.gradient_clip_val, t.gradient_clip_algorithm) == (value, algorithm)  # given back
    if algorithm == "value":  # Lightning alone also clips the first pass: e changes direction
        bare = Net(make_model())
        fit(tmp_path, bare, batches, callbacks=[], gradient_clip_val=value,
            gradient_clip_algorithm=algorithm)  # fmt: skip
        assert differs(bare.model, reference(make_model(), batches, clip=(value, algorithm)))


def test_bf16_mixed(tmp_path):
    batches = make_batches(5, dtype=torch.float32)
    net = Net(make_model(bn=True, dtype=torch.float32))
    fit(tmp_path, net, batches, precision="bf16-mixed", gradient_clip_val=0.05)
    assert net.model[1].num_batches_tracked.item() == 5
    expected = reference(make_model(bn=True, dtype=torch.float32), batches, clip=(0.05, "norm"),
                         autocast=torch.bfloat16)  # fmt: skip
    assert_same_state(net.model, expected, tol=1e-6)  # measured 1e-9
    # the float32 run is 9e-4 away
    f32 = reference(make_model(bn=True, dtype=torch.float32), batches, clip=(0.05, "norm"))
    assert differs(net.model, f32, 1e-4)


def test_the_same_dropout_masks_in_both_passes(tmp_path):
    masks = []

    def record(module, inputs, output):
        masks.append((output == 0) & (inputs[0] != 0))

    batches = make_batches(4)
    net = Net(make_model(dropout=0.5))
    net.model[2].register_forward_hook(record)
    fit(tmp_path, net, batches)
    assert len(masks) == 8
    for first, second in zip(masks[::2], masks[1::2]):
        assert torch.equal(first, second)
    assert not torch.equal(masks[0], masks[2])  # new masks at each step

    masks.clear()
    bare = Net(make_model(dropout=0.5))
    bare.model[2].register_forward_hook(record)
    fit(tmp_path, bare, batches, callbacks=[])
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_extra_ascent_steps_keep_batchnorm_to_the_first_pass(tmp_path, accumulate):
    net = Net(make_model(bn=True), lambda p: sam(p, ascent_steps=2))
    t = fit(tmp_path, net, make_batches(4), accumulate_grad_batches=accumulate)
    assert t.global_step == 4 // accumulate
    assert (net.forwards, net.model[1].num_batches_tracked.item()) == (12, 4)


def test_a_skipped_step_leaves_batchnorm_alone(tmp_path):
    batches = make_batches(4, bad={1})
    net = Net(make_model(bn=True))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        fit(tmp_path, net, batches)
    assert unwrap(net.trainer.optimizers[0]).skipped_steps == 1
    assert net.model[1].num_batches_tracked.item() == 3
    assert_same_state(net.model, reference(make_model(bn=True), batches))


def test_steps_without_ascent_of_an_ascent_policy(tmp_path):
    # the one pass of such a step is the last one: clipped, BatchNorm updated (once)
    policies = pytest.importorskip("samkit.optim.ascent_policy")

    def make(params):
        opt = sam(params)
        opt.ascent_policy = policies.EveryKPolicy(2)
        return opt

    batches = make_batches(5)
    net = Net(make_model(bn=True), make)
    fit(tmp_path, net, batches, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    assert (net.forwards, net.model[1].num_batches_tracked.item()) == (8, 5)
    expected = reference(make_model(bn=True), batches, clip=(0.01, "value"), plain=(1, 3))
    assert_same_state(net.model, expected)


def test_momentum_sam_takes_one_pass(tmp_path):
    try:
        make = lambda p: create_optimizer("msam", p, torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        make([nn.Parameter(torch.zeros(1))])
    except (KeyError, ValueError):
        pytest.skip("this samkit has no Momentum-SAM")
    net = Net(make_model(bn=True), make)
    t = fit(tmp_path, net, make_batches(4), gradient_clip_val=0.05)
    assert (t.global_step, net.forwards, net.model[1].num_batches_tracked.item()) == (4, 4, 4)


class FailingNet(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and not is_first_pass(self):
            raise ValueError("boom at w + e")
        return super().training_step(batch, batch_idx)


def test_an_exception_leaves_w_and_the_trainer_as_they_were(tmp_path):
    batches = make_batches(3)
    net = FailingNet(make_model(bn=True))
    t = trainer(tmp_path, [SAMCallback()], gradient_clip_val=0.5, gradient_clip_algorithm="value")
    with pytest.raises(ValueError, match="boom"):
        t.fit(net, loader(batches))
    assert (t.gradient_clip_val, t.gradient_clip_algorithm) == (0.5, "value")
    assert net.model[1].track_running_stats  # BatchNorm released
    expected = reference(make_model(bn=True), batches[:1], clip=(0.5, "value"))
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):  # the weights
        # (the second step's first pass updated the BatchNorm buffers before the exception)
        torch.testing.assert_close(net.model.state_dict()[key], expected.state_dict()[key])


# -- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [(), (2,), (3,)], ids=["finite", "inf-first", "inf-last"])
def test_accumulation_gives_each_micro_batch_its_perturbation(tmp_path, bad):
    batches = make_batches(5, bad=bad)  # the last step has one micro-batch (the epoch's end)
    net = Net(make_model(bn=True))
    kw = dict(accumulate_grad_batches=2, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        t = fit(tmp_path, net, batches, **kw)
    assert t.global_step == 3 and net.forwards == 10 - len(bad)
    assert net.first_pass.count(True) == 5  # one per micro-batch
    assert unwrap(t.optimizers[0]).skipped_steps == len(bad)
    assert len([w for w in caught if "non-finite" in str(w.message)]) == len(bad)
    assert net.model[1].num_batches_tracked.item() == 5 - 2 * len(bad)
    expected = reference(make_model(bn=True), batches, clip=(0.01, "value"), accumulate=2)
    assert_same_state(net.model, expected)
    if not bad:  # not the mean SAM gradient of the 12 samples with one perturbation
        merged = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
                  for a, b in zip(batches[:4:2], batches[1:4:2])]  # fmt: skip
        merged = reference(make_model(bn=True), merged, clip=(0.01, "value"))
        assert differs(reference(make_model(bn=True), batches[:4], clip=(0.01, "value"),
                                 accumulate=2), merged)  # fmt: skip
        # without the callback, SAM.step refuses the gradients accumulated outside it
        with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
            fit(tmp_path, Net(make_model()), batches, callbacks=[], accumulate_grad_batches=2)


def fp16_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_fp16_with_automatic_optimisation_is_refused(tmp_path):
    batches = make_batches(2, dtype=torch.float32)
    with pytest.raises(MisconfigurationException, match="16-mixed.*bf16-mixed.*manual"):
        fit(tmp_path, Net(make_model(dtype=torch.float32)), batches, plugins=[fp16_plugin()])
    with pytest.raises(RuntimeError, match="GradScaler"):  # the bare optimizer refuses too
        fit(tmp_path, Net(make_model(dtype=torch.float32)), batches, callbacks=[],
            plugins=[fp16_plugin()])  # fmt: skip


class ClippingNet(Net):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):  # fmt: skip
        self.clip_gradients(optimizer, 1.0, "norm")


@pytest.mark.parametrize(
    "net,kw,match",
    [
        (lambda: Net(make_model(), lambda p: torch.optim.SGD(p, lr=0.1)), {}, "SGD, not a samkit"),
        (lambda: Net(make_model(), lambda p: ESAM(p, torch.optim.SGD, lr=0.1)), {}, "ESAM with"),
        (lambda: ClippingNet(make_model()), {}, "ClippingNet.configure_gradient_clipping"),
        (
            lambda: Net(
                make_model(), lambda p: create_optimizer("wsam", p, torch.optim.SGD, lr=0.1)
            ),  # fmt: skip
            {"accumulate_grad_batches": 2},
            r"accumulate_grad_batches=2\) with WSAM",
        ),
        (
            lambda: Net(
                make_model(), lambda p: create_optimizer("gsam", p, torch.optim.SGD, lr=0.1)
            ),  # fmt: skip
            {"gradient_clip_val": 1.0},
            r"gradient_clip_val=1.0\) with GSAM",
        ),
    ],
    ids=["not-samkit", "esam", "clipping-override", "wsam-accumulation", "gsam-clipping"],
)
def test_refusals_name_the_setting(tmp_path, net, kw, match):
    net = net()
    with pytest.raises(MisconfigurationException, match=match):
        fit(tmp_path, net, make_batches(2), **kw)
    assert net.forwards == 0


def test_the_entry_point_adds_the_check_to_every_trainer(tmp_path):
    # pyproject.toml registers missing_callback_check under lightning.pytorch.callbacks_factory
    t = trainer(tmp_path, [])
    assert any(type(c).__name__ == "_MissingCallbackCheck" for c in t.callbacks)


def test_missing_callback_check_warns_about_what_would_be_wrong(tmp_path):
    batches = make_batches(2)
    with pytest.warns(UserWarning, match="SAM trains .* without samkit's SAMCallback: BatchNorm"):
        fit(tmp_path, Net(make_model(bn=True)), batches, callbacks=missing_callback_check())
    with pytest.warns(UserWarning, match="dropout .*; gradient clipping"):
        fit(tmp_path, Net(make_model(dropout=0.1)), batches, gradient_clip_val=1.0,
            callbacks=missing_callback_check())  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*does not have many workers")
        # with the callback, or with nothing silently wrong (no BatchNorm, dropout, clipping)
        fit(tmp_path, Net(make_model(bn=True)), batches,
            callbacks=[*missing_callback_check(), SAMCallback()])  # fmt: skip
        fit(tmp_path, Net(make_model()), batches, callbacks=missing_callback_check())


# -- manual optimisation ----------------------------------------------------------------------


class ManualNet(pl.LightningModule):
    """The documented recipe (docs/integrations.md, PyTorch Lightning)."""

    def __init__(self, model, make_optimizer=sam):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        replay = PassReplay(self)  # the RNG state of the first forward
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 only
        opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        self.manual_backward(loss)
        if opt.first_step(zero_grad=True, scaler=scaler):  # w -> w + e
            with replay:  # same dropout masks, BatchNorm buffers untouched
                self.manual_backward(F.cross_entropy(self.model(x), y))
        opt.step()  # back to w, base step with grad L(w + e); Lightning counts it
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def test_manual_recipe_counts_steps_skips_and_checkpoints_them(tmp_path):
    batches = make_batches(6, bad={2})
    net = ManualNet(make_model(bn=True))
    with pytest.warns(RuntimeWarning, match="non-finite gradient in the first pass"):
        t = fit(tmp_path, net, batches, max_steps=4)
    assert t.global_step == 4  # max_steps respected: the skipped step counts as a step
    opt = unwrap(t.optimizers[0])
    assert opt.skipped_steps == 1 and net.optimizers().skipped_steps == 1
    assert not opt.awaiting_second_step and "_perturbed" not in net.optimizers().__dict__
    assert_same_state(net.model, reference(make_model(bn=True), batches[:4]))
    t.save_checkpoint(tmp_path / "manual.ckpt")
    ckpt = torch.load(tmp_path / "manual.ckpt", weights_only=False)
    assert ckpt["optimizer_states"][0]["samkit"]["skipped_steps"] == 1

    resumed = ManualNet(make_model(bn=True))
    t2 = trainer(tmp_path, [SAMCallback()], max_steps=6)
    t2.fit(resumed, loader(batches), ckpt_path=tmp_path / "manual.ckpt")
    assert unwrap(t2.optimizers[0]).skipped_steps == 1


def test_manual_recipe_with_fp16_and_a_grad_scaler(tmp_path):
    batches = make_batches(4, dtype=torch.float32)
    net = ManualNet(make_model(bn=True, dtype=torch.float32))
    t = fit(tmp_path, net, batches, plugins=[fp16_plugin()])
    assert t.global_step == 4 and unwrap(t.optimizers[0]).skipped_steps == 0
    assert net.model[1].num_batches_tracked.item() == 4
    expected = reference(make_model(bn=True, dtype=torch.float32), batches, autocast=torch.half)
    assert_same_state(net.model, expected, tol=1e-6)


class ManualESAM(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.automatic_optimization = False
        self.model = model

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        replay = PassReplay(self)
        opt.zero_grad()
        with opt.swp():  # the first pass with ESAM's random subset of weights
            losses = F.cross_entropy(self.model(x), y, reduction="none")
            self.manual_backward(losses.mean())
        if opt.first_step(zero_grad=True):
            with replay:
                index = opt.select_samples(
                    losses.detach(), lambda: F.cross_entropy(self.model(x), y, reduction="none")
                )
            if index is not None:
                x, y = x[index], y[index]
            with replay:
                self.manual_backward(F.cross_entropy(self.model(x), y))
        opt.step()

    def configure_optimizers(self):
        return ESAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR, beta=0.6, gamma=0.5)


def test_manual_esam_recipe_is_esams_step(tmp_path):
    batches = make_batches(4)
    net = ManualESAM(make_model())
    t = fit(tmp_path, net, batches)
    assert t.global_step == 4
    model = make_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, beta=0.6, gamma=0.5)
    for x, y in batches:
        opt.step(lambda index=None, x=x, y=y: F.cross_entropy(
            model(x if index is None else x[index]), y if index is None else y[index],
            reduction="none"))  # fmt: skip
    assert_same_state(net.model, model)
    assert differs(model, reference(make_model(), batches))  # ESAM is not SAM here


# -- checkpoints ------------------------------------------------------------------------------


def test_resume_continues_bit_identically(tmp_path):
    # Checkpoint at an epoch's end: Lightning resumes a plain DataLoader mid-epoch from its first
    # batch again (mid-epoch resumption needs a stateful loader), SAM or not.
    batches = make_batches(3)
    kw = dict(gradient_clip_val=0.05, gradient_clip_algorithm="value")
    whole = Net(make_model(bn=True))
    t = fit(tmp_path, whole, batches, max_epochs=2, **kw)
    half = Net(make_model(bn=True))
    fit(tmp_path, half, batches, max_epochs=1, **kw).save_checkpoint(tmp_path / "half.ckpt")

    resumed = Net(make_model(bn=True, seed=5))  # other initial weights: all come from the file
    t2 = trainer(tmp_path, [SAMCallback()], max_epochs=2, **kw)
    t2.fit(resumed, loader(batches), ckpt_path=tmp_path / "half.ckpt")
    assert t2.global_step == 6 and resumed.forwards == 6
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    a, b = t.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    for i in a["state"]:
        assert torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"])
    expected = reference(make_model(bn=True), batches * 2, clip=(0.05, "value"))
    assert_same_state(resumed.model, expected)
