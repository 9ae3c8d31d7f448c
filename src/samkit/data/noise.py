"""Label noise (for the robustness experiments of the SAM paper) and bootstrap relabelling.

:func:`apply_label_noise` flips exactly ``round(fraction * N)`` training labels, each to a class
drawn uniformly among the *other* classes. The test set is never noised. The flipped examples
are recorded in the run directory with :func:`save_label_noise` (``label_noise.json``: indices,
original and noisy labels, and the indices into the original training file), so that a run can
be audited or reproduced; :func:`load_label_noise` reads it back and
:meth:`LabelNoiseRecord.apply` re-applies it, checking that the labels it finds are the ones
recorded.

:func:`bootstrap_labels` turns a finished model's predictions into labels for a new training set
(:meth:`InMemoryDataset.with_labels` / ``ImageFolderDataset.with_labels`` apply them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from samkit.data.common import generator

__all__ = [
    "LABEL_NOISE_FILE",
    "LabelNoiseRecord",
    "apply_label_noise",
    "bootstrap_labels",
    "load_label_noise",
    "save_label_noise",
]

LABEL_NOISE_FILE = "label_noise.json"
_FORMAT = "samkit.label_noise/1"


def apply_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy_labels, flipped)``: a copy of ``labels`` (int64) in which exactly
    ``round(fraction * N)`` labels, chosen uniformly without replacement, are replaced by a class
    drawn uniformly from the ``num_classes - 1`` other classes; ``flipped`` is the bool mask of
    those examples. Deterministic given ``seed`` (and independent of the global RNG).
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, not of shape {tuple(labels.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], not {fraction}")
    n = labels.shape[0]
    labels = labels.to(torch.int64).cpu()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    k = round(fraction * n)
    flipped = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return labels.clone(), flipped
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    gen = generator(seed, 0x1AB3)
    idx = torch.randperm(n, generator=gen)[:k]
    # Adding 1..C-1 modulo C gives each other class with probability 1 / (C - 1).
    shift = torch.randint(1, num_classes, (k,), generator=gen)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + shift) % num_classes
    flipped[idx] = True
    return noisy, flipped


@dataclasses.dataclass
class LabelNoiseRecord:
    """What :func:`apply_label_noise` did to a training set, as stored in ``label_noise.json``.

    ``indices`` index the training set the noise was applied to; ``source_indices`` the same
    examples in the original training file (they differ with a holdout split or a subset).
    """

    fraction: float
    num_classes: int
    seed: int
    num_examples: int
    indices: list[int]
    original_labels: list[int]
    noisy_labels: list[int]
    source_indices: list[int] | None = None

    @classmethod
    def from_noise(
        cls,
        labels: torch.Tensor,
        noisy: torch.Tensor,
        flipped: torch.Tensor,
        *,
        fraction: float,
        num_classes: int,
        seed: int,
        source_indices: torch.Tensor | None = None,
    ) -> LabelNoiseRecord:
        idx = flipped.nonzero().flatten()
        return cls(
            fraction=float(fraction),
            num_classes=int(num_classes),
            seed=int(seed),
            num_examples=int(labels.shape[0]),
            indices=idx.tolist(),
            original_labels=labels[idx].tolist(),
            noisy_labels=noisy[idx].tolist(),
            source_indices=None if source_indices is None else source_indices[idx].tolist(),
        )

    @property
    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.num_examples, dtype=torch.bool)
        m[torch.as_tensor(self.indices, dtype=torch.int64)] = True
        return m

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Re-apply the recorded noise to clean ``labels``, checking that they are the ones the
        record was made from (same count, same original labels at the flipped indices)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (self.num_examples,):
            raise ValueError(
                f"the record is for {self.num_examples} examples, got {labels.shape[0]} labels"
            )
        idx = torch.as_tensor(self.indices, dtype=torch.int64)
        if not torch.equal(labels[idx], torch.as_tensor(self.original_labels, dtype=torch.int64)):
            raise ValueError("labels differ from the originals recorded; not the same data")
        out = labels.clone()
        out[idx] = torch.as_tensor(self.noisy_labels, dtype=torch.int64)
        return out


def save_label_noise(record: LabelNoiseRecord, path: str | os.PathLike[str]) -> Path:
    """Write ``record`` as JSON to ``path`` (a directory gets ``label_noise.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LABEL_NOISE_FILE
    payload: dict[str, Any] = {"format": _FORMAT, **dataclasses.asdict(record)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def load_label_noise(path: str | os.PathLike[str]) -> LabelNoiseRecord:
    """Read a record written by :func:`save_label_noise` (a directory means its
    ``label_noise.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LABEL_NOISE_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a label-noise record ({e})") from e
    if not isinstance(payload, dict) or payload.pop("format", None) != _FORMAT:
        raise ValueError(f"{path}: not a samkit label-noise record")
    fields = {f.name for f in dataclasses.fields(LabelNoiseRecord)}
    try:
        record = LabelNoiseRecord(**{k: v for k, v in payload.items() if k in fields})
    except TypeError as e:
        raise ValueError(f"{path}: incomplete label-noise record ({e})") from e
    if not len(record.indices) == len(record.original_labels) == len(record.noisy_labels):
        raise ValueError(f"{path}: indices and labels differ in length")
    return record


def bootstrap_labels(predictions: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Training labels from a model's predictions: ``[N, C]`` logits or probabilities (their
    argmax) or ``[N]`` class indices; returns ``int64 [N]`` on the CPU.

    Apply them with ``train_set.with_labels(bootstrap_labels(predictions))``; the predictions
    should come from the *unaugmented* training set in its own order
    (``make_loader(train_set, ..., train=False)``).
    """
    predictions = torch.as_tensor(predictions).detach().cpu()
    if predictions.ndim == 2:
        if num_classes is not None and predictions.shape[1] != num_classes:
            raise ValueError(f"predictions have {predictions.shape[1]} classes, not {num_classes}")
        if not torch.isfinite(predictions).all():
            raise ValueError("predictions contain NaN or infinite values")
        return predictions.argmax(dim=1).to(torch.int64)
    if predictions.ndim != 1:
        raise ValueError(f"predictions must be [N, C] or [N], not {tuple(predictions.shape)}")
    if predictions.is_floating_point() and not torch.equal(predictions, predictions.round()):
        raise ValueError("1-D predictions must be class indices")
    labels = predictions.to(torch.int64)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("class indices must be >= 0")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"class index {int(labels.max())} out of range 0..{num_classes - 1}")
    return labels
