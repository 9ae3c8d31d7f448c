"""The values a training run produces, against independent computations written here: the
learning rate of every step (the cosine formula), the EMA it saves (the closed form over the
weights after each step), the epoch's train loss and error (each batch's first-pass outputs
recomputed from the weights before its step), the parameter norm, and the test metrics (the
saved EMA weights evaluated one example at a time on the raw test images).

One in-process run (SAM, 2 epochs of 16 steps, EMA, top-5, an evaluation batch size that does not
divide the test set) is observed through the step hooks and by wrapping the builders the loop
calls (``samkit.train.build``): the model and optimizer are kept, and the training step records
its batch and the weights it starts from.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from train_helpers import FAST, read_metrics

from samkit.cli import main
from samkit.models import create_model
from samkit.rundir import list_checkpoints
from samkit.train import build
from samkit.train.hooks import TrainHooks

LR0, DECAY, EPOCHS, STEPS_PER_EPOCH = 0.2, 0.8, 2, 16  # 128 images, batches of 8
TOTAL = EPOCHS * STEPS_PER_EPOCH
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's, as in the data-set table


class RecordingStep:
    """The run's training step, recording ``(x, y, weights before the step)`` of each call."""

    def __init__(self, step, model, calls):
        self._step, self._model, self._calls = step, model, calls

    def __call__(self, x, y):
        before = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        self._calls.append((x.detach().clone(), y.detach().clone(), before))
        return self._step(x, y)

    def __getattr__(self, name):
        return getattr(self._step, name)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    seen = SimpleNamespace(model=None, optimizer=None, initial=None, calls=[], after=[], lrs=[])
    build_model, build_optimizer, build_step = (
        build.build_model,
        build.build_optimizer,
        build.build_step,
    )

    def model_spy(*args, **kwargs):
        model, layers = build_model(*args, **kwargs)
        seen.model = model
        seen.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model, layers

    def optimizer_spy(*args, **kwargs):
        seen.optimizer = build_optimizer(*args, **kwargs)
        return seen.optimizer

    def step_spy(cfg, model, *args, **kwargs):
        return RecordingStep(build_step(cfg, model, *args, **kwargs), model, seen.calls)

    def after_step(step: int) -> None:
        # the learning rate this step ran with (set before it, read by the optimizer)
        groups = list(seen.optimizer.param_groups)
        groups += list(getattr(seen.optimizer, "base_optimizer", seen.optimizer).param_groups)
        seen.lrs.append(sorted({g["lr"] for g in groups}))
        seen.after.append({k: v.detach().clone() for k, v in seen.model.state_dict().items()})

    run_dir = tmp_path_factory.mktemp("loop_values") / "run"
    argv = ["train", *FAST, "--dataset", "fashion_mnist"]
    argv += ["--data-dir", str(data.dirs["fashion_mnist"]), "--model-name", "resnet_tiny"]
    argv += ["--num-epochs", str(EPOCHS), "--batch-size", "8", "--learning-rate", str(LR0)]
    argv += ["--optimizer", "sam", "--ema-decay", str(DECAY), "--compute-top-5-error-rate"]
    argv += ["--eval-batch-size", "24", "--image-level-augmentations", "basic"]
    argv += ["--no-tensorboard", "--run-dir", str(run_dir), "--amp", "none"]  # as recomputed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "build_model", model_spy)
        mp.setattr(build, "build_optimizer", optimizer_spy)
        mp.setattr(build, "build_step", step_spy)
        assert main(argv, train_hooks=TrainHooks(after_step=after_step)) == 0
    seen.run_dir = run_dir
    seen.metrics = read_metrics(run_dir)
    seen.checkpoints = {}
    for path in list_checkpoints(run_dir / "checkpoints"):
        state = torch.load(path, weights_only=True)
        seen.checkpoints[state["global_step"]] = state
    seen.test_images = torch.as_tensor(data.fashion_mnist["test_images"])
    seen.test_labels = torch.as_tensor(data.fashion_mnist["test_labels"]).long()
    return seen


def test_the_run_was_observed_at_every_step(run):
    assert len(run.calls) == len(run.after) == len(run.lrs) == TOTAL
    assert [r["step"] for r in run.metrics] == [STEPS_PER_EPOCH, TOTAL]
    assert sorted(run.checkpoints) == [STEPS_PER_EPOCH, TOTAL]  # the two epoch-end checkpoints


def test_every_step_ran_at_the_cosine_learning_rate(run):
    for t, lrs in enumerate(run.lrs):  # t steps were taken before this one
        want = LR0 * (1 + math.cos(math.pi * t / TOTAL)) / 2
        assert lrs == [pytest.approx(want, rel=1e-12, abs=1e-15)], t
    assert run.lrs[0] == [LR0] and run.lrs[TOTAL // 2] == [pytest.approx(LR0 / 2, rel=1e-12)]
    # the record's learning rate: the schedule's after the epoch's last step
    for record in run.metrics:
        want = LR0 * (1 + math.cos(math.pi * record["step"] / TOTAL)) / 2
        assert record["learning_rate"] == pytest.approx(want, rel=1e-12, abs=1e-15)


def closed_form_ema(initial, after, steps):
    """``d^T w_0 + sum_{t=1..T} (1 - d) d^(T-t) w_t`` (float64) for floats; integers: ``w_T``."""
    out = {}
    for key, w0 in initial.items():
        if not w0.is_floating_point():
            out[key] = after[steps - 1][key]
            continue
        value = DECAY**steps * w0.double()
        for t in range(1, steps + 1):
            value = value + (1 - DECAY) * DECAY ** (steps - t) * after[t - 1][key].double()
        out[key] = value
    return out


@pytest.mark.parametrize("steps", [STEPS_PER_EPOCH, TOTAL])
def test_the_saved_ema_is_the_closed_form_over_the_weights_after_each_step(run, steps):
    saved = run.checkpoints[steps]
    assert saved["ema"].keys() == run.initial.keys()
    want = closed_form_ema(run.initial, run.after, steps)
    for key, value in want.items():
        got = saved["ema"][key]
        assert got.dtype == run.initial[key].dtype, key
        if not value.is_floating_point():
            assert torch.equal(got, value), key
        else:
            torch.testing.assert_close(got.double(), value, rtol=1e-5, atol=1e-6, msg=key)
    # the weights it averages are the trained ones (not the EMA), saved as "model"
    for key, value in saved["model"].items():
        assert torch.equal(value, run.after[steps - 1][key]), key


def test_train_loss_and_error_are_the_first_pass_outputs_of_each_epoch(run):
    model = copy.deepcopy(run.model)
    for epoch, record in enumerate(run.metrics):
        loss, wrong, seen = 0.0, 0, 0
        for x, y, before in run.calls[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]:
            model.load_state_dict(before)
            model.train()  # as the first pass: batch statistics
            with torch.no_grad():
                out = model(x).double()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            wrong += int((out.argmax(1) != y).sum())
            seen += y.numel()
        assert seen == 128
        assert record["train_loss"] == pytest.approx(loss / seen, rel=1e-5)
        assert record["train_error_rate"] == wrong / seen


def test_param_norm_is_the_norm_of_the_trained_parameters(run):
    names = [name for name, _ in run.model.named_parameters()]
    for record in run.metrics:
        weights = run.after[record["step"] - 1]
        norm = math.sqrt(sum(weights[n].double().square().sum().item() for n in names))
        assert record["param_norm"] == pytest.approx(norm, rel=1e-5)


def independent_eval(state, images, labels):
    """The model with ``state``, one raw test image at a time, normalised by the formula."""
    model = create_model("resnet_tiny", num_classes=10, in_channels=1)
    model.load_state_dict(state)
    model.eval()
    loss, wrong, wrong5 = 0.0, 0, 0
    with torch.no_grad():
        for image, label in zip(images, labels.tolist()):
            x = ((image.double() / 255 - MEAN) / STD).float()[None, None]
            logits = model(x)[0].double()
            loss += (torch.logsumexp(logits, 0) - logits[label]).item()
            wrong += int(logits.argmax().item() != label)
            order = sorted(range(10), key=lambda c: -logits[c].item())
            wrong5 += label not in order[:5]
    n = len(labels)
    return loss / n, wrong / n, wrong5 / n


def test_test_metrics_are_the_saved_ema_weights_evaluated_independently(run):
    assert len(run.test_labels) == 64  # batches of 24: 24 + 24 + 16
    for record in run.metrics:
        ema = run.checkpoints[record["step"]]["ema"]
        loss, err, err5 = independent_eval(ema, run.test_images, run.test_labels)
        assert record["test_loss"] == pytest.approx(loss, rel=1e-5)
        assert record["test_error_rate"] == err
        assert record["test_accuracy"] == pytest.approx(1 - err, abs=1e-12)
        assert record["test_top_5_error_rate"] == err5
    # the trained weights (not evaluated: the EMA is) give a loss outside that tolerance
    trained = independent_eval(run.after[-1], run.test_images, run.test_labels)
    assert trained[0] != pytest.approx(run.metrics[-1]["test_loss"], rel=1e-4)
