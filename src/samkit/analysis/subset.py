"""The fixed, seeded data subset a trained model is analysed on.

Every analysis command uses the same subset for a given ``seed``: ``n = min(num_samples, len)``
examples of the training set (or the test set) in a seeded random order, with the evaluation
transform (normalisation only, no augmentation), in batches of ``batch_size``::

    train_ds, eval_ds, _ = build_datasets(config["dataset"], data_dir=..., use_test_set=True,
                                          image_level="none", train_subset=config["train_subset"])
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))[:n]
    batches = list(make_loader(train_ds.subset(idx), batch_size, train=False, seed=seed))
"""

from __future__ import annotations

from typing import Any

import torch

from samkit.data import build_datasets, make_loader

__all__ = ["check_model_accepts", "subset_batches"]


def subset_batches(
    config: dict[str, Any],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: Any = None,
) -> tuple[list[tuple[Any, Any]], dict[str, Any]]:
    """The fixed, seeded data subset of the module docstring: ``(batches, description)``.

    ``description`` records the data set, split, size, seed and the chosen ``indices`` (into the
    split, in order). Raises ``ValueError`` for an unknown or empty data set or corrupt files and
    :class:`~samkit.data.DataNotFoundError` (an ``OSError``) for a missing one.
    """
    name = dataset or config.get("dataset")
    if not name:
        raise ValueError("the run's config.json names no dataset; pass --dataset")
    root = data_dir or config.get("data_dir")
    train_subset = config.get("train_subset")
    if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1:
        train_subset = None
    train_ds, eval_ds, _ = build_datasets(
        name,
        data_dir=root,
        use_test_set=True,
        image_level="none",
        train_subset=train_subset if split == "train" else None,
    )
    ds = train_ds if split == "train" else eval_ds
    n = min(num_samples, len(ds))
    if n == 0:
        raise ValueError(f"the {split} split of {name} is empty")
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    loader = make_loader(ds.subset(indices), batch_size, train=False, seed=seed, device=device)
    batches = [(x, y) for x, y in loader]
    description = {
        "dataset": name,
        "data_dir": str(root) if root is not None else None,
        "split": split,
        "num_examples": n,
        "split_size": len(ds),
        "batch_size": batch_size,
        "seed": seed,
        "transform": "eval (normalisation only)",
        "indices": indices.tolist(),
    }
    return batches, description


def check_model_accepts(model: Any, batches: list[tuple[Any, Any]], what: str) -> None:
    """One forward pass on the first batch: a model that cannot take the data (wrong number of
    channels or classes) is bad input, not a crash."""
    x, y = batches[0]
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise ValueError(f"{what}: the model cannot process the data ({exc})") from None
    if out.ndim != 2 or int(y.max()) >= out.shape[1]:
        raise ValueError(
            f"{what}: the model's {tuple(out.shape)[1:]} outputs do not fit labels up to "
            f"{int(y.max())}"
        )
