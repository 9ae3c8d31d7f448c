"""What samkit knows about each data set, in one table: :data:`DATASET_SPECS`.

One :class:`DatasetSpec` per data set: its shape (classes, channels, image size), the
normalisation statistics and the augmentation choices. The rest of :mod:`samkit.data` reads these
facts from here: :mod:`samkit.data.transforms` (normalisation, crop size, flip, AutoAugment
policy, pipeline) and :mod:`samkit.data.registry` (``DATASETS``, which adds the loaders). A leaf
module: it imports nothing from samkit.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DATASET_SPECS", "DatasetSpec"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The static facts of one data set.

    ``num_classes`` is None where the class folders decide (``image_folder``). ``image_size`` is
    the side of the (square) images, or for ImageNet-like folders the default crop size.
    ``mean`` and ``std`` are per channel, of the training images scaled to [0, 1]. ``flip``: the
    ``basic`` augmentation flips horizontally (folders always flip). ``autoaugment``: the
    torchvision ``AutoAugmentPolicy`` value used by ``autoaugment`` / ``aa-only`` (None for
    folders, which use RandAugment). ``in_memory``: the whole data set is held as ``uint8``
    tensors (False: image folders, decoded image by image with the ImageNet-style pipeline).
    """

    name: str
    num_classes: int | None
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    autoaugment: str | None
    in_memory: bool
    description: str


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> :class:`DatasetSpec`, in the order data sets are listed to users.
#:
#: ``mean`` / ``std`` are population statistics over all pixels of the training split, as
#: published and as the seed system uses:
#:
#: * CIFAR-10 / CIFAR-100: the 50,000 training images. (The often copied CIFAR-10 std
#:   (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the data set's std.)
#: * SVHN: train + extra (604,388 images; the seed's values); ``svhn_core``: train only.
#: * Fashion-MNIST: the 60,000 training images (the seed used MNIST's 0.1307 / 0.3081 by
#:   mistake).
#: * ImageNet: the usual ILSVRC-2012 values (also used for generic image folders).
#:
#: :func:`samkit.data.transforms.channel_stats` recomputes such values from a ``uint8`` tensor.
#: SVHN is not flipped (mirrored digits are other digits or none).
DATASET_SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            flip=True,
            autoaugment="cifar10",
            in_memory=True,
            description="CIFAR-10, python pickle batches",
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            in_channels=3,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            flip=True,
            autoaugment="cifar10",
            in_memory=True,
            description="CIFAR-100 (fine labels)",
        ),
        DatasetSpec(
            name="svhn",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4309, 0.4302, 0.4463),
            std=(0.1976, 0.2003, 0.1981),
            flip=False,
            autoaugment="svhn",
            in_memory=True,
            description="SVHN train + extra (604,388 images)",
        ),
        DatasetSpec(
            name="svhn_core",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            flip=False,
            autoaugment="svhn",
            in_memory=True,
            description="SVHN train only (73,257)",
        ),
        DatasetSpec(
            name="fashion_mnist",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            flip=True,
            autoaugment="cifar10",
            in_memory=True,
            description="Fashion-MNIST, IDX files",
        ),
        DatasetSpec(
            name="imagenet",
            num_classes=1000,
            in_channels=3,
            image_size=224,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            flip=True,
            autoaugment=None,
            in_memory=False,
            description="ImageNet as train/ and val/ class folders",
        ),
        DatasetSpec(
            name="image_folder",
            num_classes=None,
            in_channels=3,
            image_size=224,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            flip=True,
            autoaugment=None,
            in_memory=False,
            description="any train/ + val/ (or test/) class folders",
        ),
    )
}
