"""Augmentations and normalisation, per sample (torchvision ``transforms.v2``) and per batch.

Image-level augmentations (``image_level``), as in the seed system:

* ``none``: normalisation only;
* ``basic``: random horizontal flip, reflect-pad 4 px, random crop back to the image size. SVHN
  skips the flip (mirrored digits are other digits or none); Fashion-MNIST keeps it (28 px);
* ``autoaugment``: torchvision's AutoAugment (CIFAR10 policy; SVHN policy for SVHN) and then
  ``basic``. torchvision scales the translations to the image width (150/331 of it), unlike the
  seed's ImageNet-sized constants on 32 px images. On 1-channel Fashion-MNIST it works on the
  1-channel tensor directly (colour operations are no-ops there);
* ``aa-only`` (SVHN, as in the seed): AutoAugment without ``basic``.

For ImageNet-like folders (``imagenet``, ``image_folder``): ``basic`` = inception-style
``RandomResizedCrop`` (area 8-100 %, aspect 3/4-4/3) + flip; ``autoaugment`` (or ``randaugment``)
= the same crop, ``RandAugment(num_ops=2, magnitude=9)``, flip (the seed's order); ``none`` = the
eval transform. Evaluation: resize the short side to 256 (size * 8/7) and centre-crop 224.

Batch-level (``batch_level``): ``cutout`` zeroes one ``cutout_length`` square per image after
normalisation (so it is filled with the mean colour); its centre is uniform over the image and
the square is clipped at the borders. (The seed draws one square for the whole batch; here every
image gets its own, as in the Cutout paper.)

The per-sample transforms take ``uint8 [C, H, W]`` tensors and use the global torch RNG (the
loaders seed it per sample, see :mod:`samkit.data.loader`). The batched versions
(:func:`random_crop_flip_batch`, :func:`cutout_batch`, :class:`BatchAugment`) take
``[B, C, H, W]`` batches on any device and draw from an explicit CPU ``torch.Generator``;
:class:`BatchAugment` can draw for a whole batch and apply the draws to some of its rows only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from samkit.data.datasets import DATASET_SPECS, DatasetSpec

__all__ = [
    "BATCH_LEVEL",
    "IMAGE_LEVEL",
    "NORMALIZATION",
    "AugmentDraws",
    "BatchAugment",
    "Cutout",
    "apply_crop_flip",
    "batch_augment",
    "channel_stats",
    "crop_flip_params",
    "cutout_batch",
    "cutout_params",
    "eval_transform",
    "normalize_batch",
    "random_crop_flip_batch",
    "train_transform",
]

IMAGE_LEVEL = ("none", "basic", "autoaugment", "aa-only", "randaugment")
BATCH_LEVEL = ("none", "cutout")

#: name -> per-channel ``(mean, std)`` of the training images scaled to [0, 1]: a view of
#: :data:`samkit.data.datasets.DATASET_SPECS`, where the values and their sources are.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (spec.mean, spec.std) for name, spec in DATASET_SPECS.items()
}

#: Reflect padding of ``basic``, as in the seed.
CROP_PADDING = 4


def _spec(dataset: str) -> DatasetSpec:
    try:
        return DATASET_SPECS[dataset]
    except KeyError:
        raise ValueError(
            f"no transforms for data set {dataset!r}; known: {', '.join(sorted(DATASET_SPECS))}"
        ) from None


def _check_levels(dataset: str, image_level: str, batch_level: str, folder: bool) -> None:
    if image_level not in IMAGE_LEVEL:
        raise ValueError(f"image_level must be one of {IMAGE_LEVEL}, not {image_level!r}")
    if batch_level not in BATCH_LEVEL:
        raise ValueError(f"batch_level must be one of {BATCH_LEVEL}, not {batch_level!r}")
    if image_level == "aa-only" and folder:
        raise ValueError(f"image_level 'aa-only' is for 32 px data sets, not {dataset!r}")
    if image_level == "randaugment" and not folder:
        raise ValueError(
            f"image_level 'randaugment' is for ImageNet-like folders; for {dataset!r} use "
            "'autoaugment'"
        )


def _normalize(spec: DatasetSpec) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]


def _folder_eval(size: int) -> list[nn.Module]:
    return [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]


def train_transform(
    dataset: str,
    image_level: str = "basic",
    batch_level: str = "none",
    cutout_length: int = 16,
    *,
    image_size: int | None = None,
) -> v2.Compose:
    """The per-sample training transform: ``uint8 [C, H, W]`` -> normalised ``float32``.

    ``image_size`` changes the crop size of ImageNet-like folders (default 224).
    """
    spec = _spec(dataset)
    _check_levels(dataset, image_level, batch_level, folder=not spec.in_memory)
    ops: list[nn.Module] = []
    if not spec.in_memory:
        size = image_size or spec.image_size
        if image_level == "none":
            ops += _folder_eval(size)
        else:
            ops.append(v2.RandomResizedCrop(size, antialias=True))
            if image_level in ("autoaugment", "randaugment"):
                ops.append(v2.RandAugment(num_ops=2, magnitude=9))
            ops.append(v2.RandomHorizontalFlip())
    else:
        if image_level in ("autoaugment", "aa-only"):
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy(spec.autoaugment)))
        if image_level in ("basic", "autoaugment"):
            if spec.flip:
                ops.append(v2.RandomHorizontalFlip())
            ops.append(v2.RandomCrop(spec.image_size, padding=CROP_PADDING, padding_mode="reflect"))
    ops += _normalize(spec)
    if batch_level == "cutout":
        ops.append(Cutout(cutout_length))
    return v2.Compose(ops)


def eval_transform(dataset: str, *, image_size: int | None = None) -> v2.Compose:
    """The per-sample evaluation transform (normalisation; resize + centre crop for folders)."""
    spec = _spec(dataset)
    ops: list[nn.Module] = [] if spec.in_memory else _folder_eval(image_size or spec.image_size)
    return v2.Compose(ops + _normalize(spec))


# --------------------------------------------------------------------------------------------
# Batched augmentation
# --------------------------------------------------------------------------------------------


def crop_flip_params(
    batch: int, generator: torch.Generator | None, padding: int = CROP_PADDING, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random draws of :func:`random_crop_flip_batch` (on the CPU): flip mask ``[B]`` (bool),
    crop offsets ``dy``, ``dx`` ``[B]`` in ``0..2*padding`` into the padded image."""
    if flip:
        flips = torch.rand(batch, generator=generator) < 0.5
    else:
        flips = torch.zeros(batch, dtype=torch.bool)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    return flips, dy, dx


def _reflect_index(n: int, padding: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis (no edge repeat, like F.pad)."""
    if padding >= n:
        raise ValueError(f"reflect padding {padding} must be smaller than the image size {n}")
    i = torch.arange(-padding, n + padding, device=device).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def apply_crop_flip(
    x: torch.Tensor,
    flips: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    padding: int = CROP_PADDING,
) -> torch.Tensor:
    """Flip the images ``flips`` selects, reflect-pad by ``padding`` and crop at ``(dy, dx)``.

    Equals ``F.pad(flipped, [padding] * 4, mode="reflect")[..., dy:dy + H, dx:dx + W]`` per
    image, computed as one gather on any dtype (uint8 included) without materialising the
    padded batch.
    """
    b, _, h, w = x.shape
    dev = x.device
    flips, dy, dx = flips.to(dev), dy.to(dev), dx.to(dev)
    rows = _reflect_index(h, padding, dev)[dy[:, None] + torch.arange(h, device=dev)]  # [B, H]
    cols = _reflect_index(w, padding, dev)[dx[:, None] + torch.arange(w, device=dev)]  # [B, W]
    cols = torch.where(flips[:, None], w - 1 - cols, cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
    out = x[bidx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop_flip_batch(
    x: torch.Tensor,
    generator: torch.Generator | None,
    padding: int = CROP_PADDING,
    flip: bool = True,
) -> torch.Tensor:
    """``basic`` on a batch ``[B, C, H, W]``: each image its own flip and crop offset."""
    return apply_crop_flip(x, *crop_flip_params(x.shape[0], generator, padding, flip), padding)


def cutout_params(
    batch: int, height: int, width: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cutout centres ``cy``, ``cx`` ``[B]``, uniform over the image (on the CPU)."""
    cy = torch.randint(0, height, (batch,), generator=generator)
    cx = torch.randint(0, width, (batch,), generator=generator)
    return cy, cx


def cutout_batch(
    x: torch.Tensor,
    length: int = 16,
    generator: torch.Generator | None = None,
    centres: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero a ``length`` x ``length`` square per image of ``x`` ``[B, C, H, W]`` (a new tensor).

    The square covers rows ``cy - length // 2`` to ``cy - length // 2 + length - 1`` (columns
    likewise), clipped to the image; ``centres`` overrides the random ``(cy, cx)``.
    """
    b, _, h, w = x.shape
    cy, cx = centres if centres is not None else cutout_params(b, h, w, generator)
    cy, cx = cy.to(x.device), cx.to(x.device)
    y0, x0 = cy - length // 2, cx - length // 2
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (ar_h >= y0[:, None]) & (ar_h < y0[:, None] + length)  # [B, H]
    cols = (ar_w >= x0[:, None]) & (ar_w < x0[:, None] + length)  # [B, W]
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    return x.masked_fill(mask, 0)


class Cutout(nn.Module):
    """Per-sample cutout for ``[C, H, W]`` (or batched ``[B, C, H, W]``) normalised tensors,
    drawing from the global torch RNG; see :func:`cutout_batch`."""

    def __init__(self, length: int = 16):
        super().__init__()
        if length < 1:
            raise ValueError(f"cutout length must be >= 1, not {length}")
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return cutout_batch(x[None], self.length)[0]
        return cutout_batch(x, self.length)

    def extra_repr(self) -> str:
        return f"length={self.length}"


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` -> ``float32`` scaled to [0, 1] and normalised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(m).div_(s)


@dataclasses.dataclass(frozen=True)
class AugmentDraws:
    """The random draws of one :class:`BatchAugment` call, one entry per image of the batch (CPU
    tensors; ``None`` where the pipeline has no such step): flip mask and crop offsets
    (:func:`crop_flip_params`), cutout centres (:func:`cutout_params`)."""

    flips: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    cy: torch.Tensor | None = None
    cx: torch.Tensor | None = None

    def rows(self, index: slice) -> AugmentDraws:
        """The draws of the images ``index`` of the batch (e.g. one process's share)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AugmentDraws(**{k: None if t is None else t[index] for k, t in values.items()})


@dataclasses.dataclass(frozen=True)
class BatchAugment:
    """A batched pipeline: [crop/flip on uint8] -> normalise -> [cutout].

    ``aug(x, generator)`` is ``aug.apply(x, aug.draw(len(x), H, W, generator))``. Every step acts
    on each image on its own (no mixing across images), so the draws of a whole batch can be made
    and applied to some of its rows only: ``aug.apply(x[rows], draws.rows(rows))`` equals
    ``aug(x, generator)[rows]`` bit for bit (how a sharded loader augments its share). A future
    step that mixes images (mixup, cutmix) would break this and need the whole batch.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: bool = False
    flip: bool = False
    padding: int = CROP_PADDING
    cutout_length: int | None = None

    @property
    def _crop_padding(self) -> int:
        return self.padding if self.crop else 0

    def draw(
        self, batch: int, height: int, width: int, generator: torch.Generator | None
    ) -> AugmentDraws:
        """All random draws for a batch of ``batch`` images of ``height`` x ``width``, in the
        order the pipeline makes them (crop/flip, then cutout)."""
        flips = dy = dx = cy = cx = None
        if self.crop or self.flip:
            flips, dy, dx = crop_flip_params(batch, generator, self._crop_padding, self.flip)
        if self.cutout_length is not None:
            # crop/flip keeps the image size, so the cutout is drawn over height x width
            cy, cx = cutout_params(batch, height, width, generator)
        return AugmentDraws(flips, dy, dx, cy, cx)

    def apply(self, x: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """The pipeline on ``x`` ``[B, C, H, W]`` with ``draws`` of ``B`` images."""
        if draws.flips is not None:
            x = apply_crop_flip(x, draws.flips, draws.dy, draws.dx, self._crop_padding)
        x = normalize_batch(x, self.mean, self.std)
        if draws.cy is not None:
            x = cutout_batch(x, self.cutout_length, centres=(draws.cy, draws.cx))
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.apply(x, self.draw(b, h, w, generator))


def batch_augment(
    dataset: str,
    image_level: str = "none",
    batch_level: str = "none",
    cutout_length: int = 16,
) -> BatchAugment | None:
    """The batched equivalent of :func:`train_transform`, or ``None`` where there is none
    (AutoAugment, ImageNet-like folders). ``image_level="none"`` without cutout is the eval
    pipeline of the in-memory data sets."""
    spec = _spec(dataset)
    _check_levels(dataset, image_level, batch_level, folder=not spec.in_memory)
    if not spec.in_memory or image_level not in ("none", "basic"):
        return None
    basic = image_level == "basic"
    return BatchAugment(
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        crop=basic,
        flip=basic and spec.flip,
        cutout_length=cutout_length if batch_level == "cutout" else None,
    )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``uint8 [N, C, H, W]`` images scaled to
    [0, 1], accumulated in float64 over chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for lo in range(0, images.shape[0], chunk):
        x = images[lo : lo + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
