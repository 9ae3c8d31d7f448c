"""``evaluate_model``'s loss, error rate and top-5 error rate against an independent computation
written here: one example at a time, cross-entropy by log-sum-exp, the prediction by argmax and
the top 5 by sorting. Batch sizes that do not divide the data set check that the last, partial
batch weighs per example (not per batch). The values of a training run's metrics are checked in
test_loop_values.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samkit.data.loader import InMemoryDataset, make_loader
from samkit.data.transforms import NORMALIZATION
from samkit.train.evaluate import evaluate_model

N, CLASSES = 23, 7


def data() -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    return InMemoryDataset(images, labels, dataset="fashion_mnist", image_level="basic")


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    )


def independent(model: nn.Module, ds: InMemoryDataset) -> dict[str, float]:
    """Per example, in float64: the eval transform by its formula, ``-log softmax[y]``, argmax,
    and whether ``y`` is among the 5 largest logits (by a full sort)."""
    model.eval()
    (mean,), (std,) = NORMALIZATION["fashion_mnist"]
    loss, wrong, wrong5 = 0.0, 0, 0
    with torch.no_grad():
        for image, label in zip(ds.images, ds.labels.tolist()):
            x = (image.double() / 255 - mean) / std
            logits = model(x[None].float())[0].double().tolist()
            top = max(logits)
            log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
            loss += log_sum - logits[label]
            best = max(range(len(logits)), key=lambda c: logits[c])
            wrong += best != label
            top5 = sorted(range(len(logits)), key=lambda c: -logits[c])[:5]
            wrong5 += label not in top5
    return {"loss": loss / N, "error_rate": wrong / N, "top_5_error_rate": wrong5 / N}


@pytest.mark.parametrize("batch_size", [1, 5, 8, 23, 64])  # 23 = 4 * 5 + 3 = 2 * 8 + 7
@pytest.mark.parametrize("batched", [True, False])
def test_metrics_equal_the_independent_computation(batch_size, batched):
    ds, model = data(), net()
    loader = make_loader(ds, batch_size, train=False, batched=batched)
    got = evaluate_model(model, loader, top5=True)
    want = independent(model, ds)
    assert got["num_examples"] == N
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["error_rate"] == want["error_rate"]
    assert got["accuracy"] == 1 - want["error_rate"]
    assert got["top_5_error_rate"] == want["top_5_error_rate"]
    # the model was left in eval mode, its BatchNorm statistics untouched
    assert not model.training


def test_the_test_data_make_every_metric_informative():
    # The metrics above would not see a wrong top-5 (or error rate) if every example were right or
    # every one wrong: these data have some of each.
    want = independent(net(), data())
    assert 0 < want["error_rate"] < 1
    assert 0 < want["top_5_error_rate"] < want["error_rate"]


def test_top5_with_fewer_than_five_classes_counts_nothing_wrong():
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    ds = data()
    ds = ds.with_labels(ds.labels % 3)
    got = evaluate_model(model, make_loader(ds, 6, train=False), top5=True)
    assert got["top_5_error_rate"] == 0.0
    assert "top_5_error_rate" not in evaluate_model(model, make_loader(ds, 6, train=False))
