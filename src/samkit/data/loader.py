"""Data sets held in memory as ``uint8`` tensors, and deterministic loaders for all data sets.

:func:`make_loader` picks one of two loaders:

* :class:`BatchedLoader` for in-memory data sets whose augmentation has a batched form
  (``none`` / ``basic``, with or without cutout): batches are cut from the ``uint8`` tensor and
  augmented as whole batches with tensor ops (one gather for flip + crop), on the device the
  images are on. This is several times faster than per-sample transforms on a 2-core CPU.
* :class:`SampleLoader` otherwise (AutoAugment, ImageNet-like folders, or ``batched=False``): a
  :class:`torch.utils.data.DataLoader` over the per-sample transforms, with ``workers`` worker
  processes.

Both are deterministic given ``(seed, epoch)``: the order is a permutation drawn from a generator
seeded with ``(seed, epoch)``; the batched path draws the augmentation of batch ``k`` from a
generator seeded with ``(seed, epoch, k)``, and the per-sample path seeds the global torch RNG for
every sample from a seed drawn per sample index (inside :func:`torch.random.fork_rng`, so the
caller's RNG is untouched). The augmentation of a sample therefore does not depend on the number
of workers, and an epoch can be resumed at any batch: ``set_epoch(epoch, start_batch=k)`` makes
the next ``__iter__`` yield exactly the batches ``k, k + 1, ...`` that a full pass over that
epoch yields (this is how ``samkit train`` resumes mid-epoch). Every ``__iter__`` starts the next
epoch (``set_epoch`` sets it).

Sharding (``shard=(rank, world_size)``, as ``samkit train`` uses under ``torchrun``): the loader
still walks the global batches of ``batch_size`` in the same order, but yields only rows
``[rank * b / w, (rank + 1) * b / w)`` of each (``b = batch_size``, ``w = world_size``) and loads
and augments only those. The result is bit for bit the same as slicing the unsharded loader's
batch, resumes included: the per-sample path fetches just the share's indices (their seeds depend
on the index only); the batched path makes the draws of the whole global batch (cheap) and applies
them to the share's rows (every batched augmentation acts on each image on its own; see
:class:`~samkit.data.transforms.BatchAugment`). ``batch_size`` must be a multiple of
``world_size`` and every batch full (``drop_last``, or a data set size that is a multiple of
``batch_size``), so that every share has ``batch_size / world_size`` rows.

``indices=True`` (SAF, samkit.train.trajectory): every batch is ``(images, labels, index)``, where
``index`` (int64, on the batch's device) gives each row's position in the data set; the images
and labels are the same as without it, bit for bit.
"""

from __future__ import annotations

import copy
import operator
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from samkit.data.common import generator
from samkit.data.transforms import BatchAugment, batch_augment, eval_transform, train_transform

__all__ = ["BatchedLoader", "InMemoryDataset", "SampleLoader", "make_loader"]

# Stream numbers of derive_seed, so that order and augmentation draws are independent.
_ORDER, _AUGMENT, _WORKERS = 1, 2, 3


class InMemoryDataset(Dataset):
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]`` held in memory.

    ``dataset`` names the normalisation and augmentation (see :mod:`samkit.data.transforms`);
    ``image_level`` / ``batch_level`` / ``cutout_length`` are the training augmentation.
    ``__getitem__`` applies the per-sample training transform if ``train`` else the eval one;
    :meth:`get` chooses explicitly. ``source_indices`` maps each example to its index in the
    file it came from (kept through :meth:`subset`, used to record label noise).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        dataset: str,
        train: bool = False,
        image_level: str = "none",
        batch_level: str = "none",
        cutout_length: int = 16,
        classes: Sequence[str] | None = None,
        source_indices: torch.Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], not {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.dataset = dataset
        self.train = train
        self.image_level = image_level
        self.batch_level = batch_level
        self.cutout_length = cutout_length
        self.classes = list(classes) if classes is not None else None
        self.source_indices = (
            torch.arange(images.shape[0]) if source_indices is None else source_indices
        )
        # Validates the levels now rather than at the first batch.
        batch_augment(dataset, image_level, batch_level, cutout_length)
        self._transforms: dict[bool, Any] = {}
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.labels.shape[0]

    def transform(self, train: bool):
        """The per-sample transform (built once)."""
        if train not in self._transforms:
            self._transforms[train] = (
                train_transform(
                    self.dataset, self.image_level, self.batch_level, self.cutout_length
                )
                if train
                else eval_transform(self.dataset)
            )
        return self._transforms[train]

    def batch_augment(self, train: bool) -> BatchAugment | None:
        """The batched pipeline for training (``None`` if there is none) or evaluation."""
        if train:
            return batch_augment(
                self.dataset, self.image_level, self.batch_level, self.cutout_length
            )
        return batch_augment(self.dataset)

    def get(self, index: int, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(train)(self.images[index]), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(index, train=self.train)

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels on ``device`` (copied once and cached)."""
        if device == self.images.device:
            return self.images, self.labels
        if device not in self._on_device:
            self._on_device[device] = (self.images.to(device), self.labels.to(device))
        return self._on_device[device]

    def _replace(self, **fields: Any) -> InMemoryDataset:
        new = copy.copy(self)
        new.__dict__.update(fields)
        new._transforms = dict(self._transforms)
        new._on_device = {}
        return new

    def subset(self, indices: torch.Tensor | Sequence[int]) -> InMemoryDataset:
        """A new data set of the examples at ``indices`` (images copied)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self._replace(
            images=self.images[idx],
            labels=self.labels[idx],
            source_indices=self.source_indices[idx],
        )

    def with_labels(self, labels: torch.Tensor) -> InMemoryDataset:
        """The same images with other labels (e.g. noisy or bootstrapped ones)."""
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != self.labels.shape:
            raise ValueError(f"need {len(self)} labels, got shape {tuple(labels.shape)}")
        return self._replace(labels=labels)

    def with_augmentation(
        self, image_level: str, batch_level: str = "none", cutout_length: int = 16
    ) -> InMemoryDataset:
        batch_augment(self.dataset, image_level, batch_level, cutout_length)
        new = self._replace(
            image_level=image_level, batch_level=batch_level, cutout_length=cutout_length
        )
        new._transforms = {}
        return new


def _default_drop_last(dataset: Any, batch_size: int, train: bool) -> bool:
    # As the seed: drop the ragged last batch when training, never when evaluating.
    return train and len(dataset) > batch_size


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_shard(
    shard: tuple[int, int] | None, batch_size: int, n: int, drop_last: bool
) -> tuple[int, int] | None:
    """``shard`` as ``(rank, world_size)`` after checking it fits the batches."""
    if shard is None:
        return None
    try:
        rank, world = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (rank, world_size), not {shard!r}") from None
    if isinstance(rank, bool) or isinstance(world, bool):
        raise ValueError(f"shard must be two integers (rank, world_size), not {shard!r}")
    try:
        rank, world = operator.index(rank), operator.index(world)
    except TypeError:
        raise ValueError(f"shard must be two integers (rank, world_size), not {shard!r}") from None
    if world < 1:
        raise ValueError(f"shard: world_size must be >= 1, not {world}")
    if not 0 <= rank < world:
        raise ValueError(f"shard: rank must be in 0..{world - 1} (world_size {world}), not {rank}")
    if batch_size % world:
        raise ValueError(
            f"shard: batch_size {batch_size} is not a multiple of world_size {world}; every rank "
            "gets batch_size / world_size rows of each batch"
        )
    if world > 1 and not drop_last and n % batch_size:
        raise ValueError(
            f"shard: the last batch of {n % batch_size} examples (of {n}) cannot be split into "
            f"{world} equal shares; use drop_last=True or a multiple of batch_size {batch_size}"
        )
    return rank, world


class _EpochMixin:
    """What both loaders share: the batching of a data set into (sharded) epochs."""

    def _init_batching(
        self,
        dataset: Any,
        batch_size: int,
        train: bool,
        seed: int,
        epoch: int,
        drop_last: bool | None,
        shard: tuple[int, int] | None,
        indices: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.drop_last = (
            _default_drop_last(dataset, batch_size, train) if drop_last is None else drop_last
        )
        self.shard = _check_shard(shard, batch_size, len(dataset), self.drop_last)
        self.indices = bool(indices)

    def __len__(self) -> int:
        return _num_batches(len(self.dataset), self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``__iter__`` is epoch ``epoch``, starting at its batch ``start_batch``."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, not {start_batch}")
        self.epoch = epoch
        self._start_batch = start_batch

    def _next_epoch(self) -> tuple[int, int]:
        """``(epoch, first batch)`` of this pass; later passes start at batch 0."""
        epoch, start = self.epoch, getattr(self, "_start_batch", 0)
        self.epoch += 1
        self._start_batch = 0
        return epoch, start

    def _order(self, n: int, epoch: int) -> torch.Tensor | None:
        if not self.train:
            return None
        return torch.randperm(n, generator=generator(self.seed, epoch, _ORDER))

    def _batch_bounds(self, k: int, n: int) -> tuple[int, int, slice]:
        """Positions ``[lo, hi)`` of global batch ``k`` in the epoch's order and this loader's
        rows of it (all of them unless sharded)."""
        batch_size = self.batch_size
        lo, hi = k * batch_size, min(n, (k + 1) * batch_size)
        if self.shard is None:
            return lo, hi, slice(0, hi - lo)
        rank, world = self.shard
        per_rank = batch_size // world  # every batch is full (checked in _check_shard)
        return lo, hi, slice(rank * per_rank, (rank + 1) * per_rank)


class BatchedLoader(_EpochMixin):
    """Batches ``(float images, int64 labels)`` of an :class:`InMemoryDataset`, augmented as whole
    batches on ``device`` (default: where the images are)."""

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool | None = None,
        device: torch.device | str | None = None,
        shard: tuple[int, int] | None = None,
        indices: bool = False,
    ):
        self._init_batching(dataset, batch_size, train, seed, epoch, drop_last, shard, indices)
        augment = dataset.batch_augment(train)
        if augment is None:
            raise ValueError(
                f"image_level {dataset.image_level!r} of {dataset.dataset!r} has no batched form; "
                "use SampleLoader (make_loader picks it)"
            )
        self.augment = augment
        self.device = torch.device(device) if device is not None else dataset.images.device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, start = self._next_epoch()
        images, labels = self.dataset.tensors_on(self.device)
        n = labels.shape[0]
        order = self._order(n, epoch)
        height, width = images.shape[-2:]
        for k in range(start, len(self)):
            lo, hi, rows = self._batch_bounds(k, n)
            a, b = lo + rows.start, lo + rows.stop  # this loader's share of the batch
            if order is None:
                x, y = images[a:b], labels[a:b]
                idx = torch.arange(a, b, device=self.device) if self.indices else None
            else:
                idx = order[a:b].to(self.device)
                x, y = images[idx], labels[idx]
            # One generator per batch: any batch can be reproduced without its predecessors.
            # The draws are made for the whole global batch, so a share is augmented as it would
            # be in the full batch.
            gen = generator(self.seed, epoch, _AUGMENT, k) if self.train else None
            draws = self.augment.draw(hi - lo, height, width, gen)
            if self.shard is not None:
                draws = draws.rows(rows)
            x = self.augment.apply(x, draws)
            yield (x, y, idx) if self.indices else (x, y)


class _SeededView(Dataset):
    """``dataset`` in train or eval mode, each sample transformed under its own RNG seed."""

    def __init__(self, dataset: Any, train: bool, seeds: torch.Tensor | None):
        self.dataset = dataset
        self.train = train
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, index: int) -> Any:
        get = getattr(self.dataset, "get", None)
        return get(index, train=self.train) if get is not None else self.dataset[index]

    def __getitem__(self, index: int) -> Any:
        if self.seeds is None:
            return self._fetch(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(self.seeds[index]))
            return self._fetch(index)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: let the main process decide (``samkit train``
    saves a checkpoint and stops) instead of the workers dying under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SampleLoader(_EpochMixin):
    """Per-sample transforms through a :class:`~torch.utils.data.DataLoader` with ``workers``
    processes; batches are moved to ``device`` if given. Works for any map-style data set (one
    with ``get(index, train=...)`` is put in train / eval mode)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        workers: int = 0,
        drop_last: bool | None = None,
        device: torch.device | str | None = None,
        shard: tuple[int, int] | None = None,
        indices: bool = False,
    ):
        self._init_batching(dataset, batch_size, train, seed, epoch, drop_last, shard, indices)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        self.workers = workers
        self.device = torch.device(device) if device is not None else None

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self._next_epoch()
        n = len(self.dataset)
        order = self._order(n, epoch)
        seeds = None
        if self.train:
            seeds = torch.randint(0, 2**62, (n,), generator=generator(self.seed, epoch, _AUGMENT))
        view = _SeededView(self.dataset, self.train, seeds)
        pin = self.device is not None and self.device.type == "cuda"
        # The indices of every batch from ``start`` on (a resumed epoch skips the first
        # ``start``); sharded: only this loader's share of each. A sample's augmentation depends
        # on its index only (its seed), not on the batch it is fetched with.
        positions = order.tolist() if order is not None else list(range(n))
        batches = []
        for k in range(start, len(self)):
            lo, _, rows = self._batch_bounds(k, n)
            batches.append(positions[lo + rows.start : lo + rows.stop])
        loader = DataLoader(
            view,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=pin,
            # Seeds the workers (base seed) without touching the global RNG.
            generator=generator(self.seed, epoch, _WORKERS),
            worker_init_fn=_ignore_sigint if self.workers else None,
        )
        for positions_k, batch in zip(batches, loader):
            if self.indices:
                batch = [*batch, torch.tensor(positions_k, dtype=torch.int64)]
            if self.device is not None:
                batch = [t.to(self.device, non_blocking=pin) for t in batch]
            yield tuple(batch)


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 0,
    drop_last: bool | None = None,
    device: torch.device | str | None = None,
    batched: bool | None = None,
    shard: tuple[int, int] | None = None,
    indices: bool = False,
) -> BatchedLoader | SampleLoader:
    """A loader of ``(images, labels)`` batches, deterministic given ``(seed, epoch)``.

    ``train``: shuffle and augment (as the data set's ``image_level`` / ``batch_level`` say);
    otherwise the data set's order and the eval transform. ``drop_last`` defaults to dropping
    the ragged last batch when training only. ``batched=None`` picks :class:`BatchedLoader` when
    ``dataset`` is an :class:`InMemoryDataset` whose augmentation has a batched form, else
    :class:`SampleLoader` (``workers`` only matters there); ``True`` / ``False`` force it.
    ``epoch`` is the epoch of the first ``__iter__``; each further one advances it.
    ``shard=(rank, world_size)`` yields only that rank's rows of every batch, loading and
    augmenting only those, bit-identical to slicing the full batch (see the module docstring);
    ``ValueError`` if the rank is out of range, ``world_size < 1``, ``batch_size`` is not a
    multiple of ``world_size`` or a batch would be ragged. ``indices=True``: batches of
    ``(images, labels, index)``, ``index`` each row's position in ``dataset``.
    """
    can_batch = isinstance(dataset, InMemoryDataset) and dataset.batch_augment(train) is not None
    if batched is None:
        batched = can_batch
    if batched:
        if not can_batch:
            raise ValueError("batched=True needs an InMemoryDataset with none/basic augmentation")
        return BatchedLoader(
            dataset,
            batch_size,
            train=train,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
            device=device,
            shard=shard,
            indices=indices,
        )
    return SampleLoader(
        dataset,
        batch_size,
        train=train,
        seed=seed,
        epoch=epoch,
        workers=workers,
        drop_last=drop_last,
        device=device,
        shard=shard,
        indices=indices,
    )
