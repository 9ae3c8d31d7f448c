"""Data sets (Fashion-MNIST, CIFAR, SVHN, ImageNet, image folders), augmentations, loaders.

The entry points are :func:`build_datasets` and :func:`make_loader`; the facts about each data
set are in :mod:`samkit.data.datasets`, its loader's own constants (e.g. Fashion-MNIST's
``CLASSES``) in its module. Errors: every loader raises :class:`DataNotFoundError` (naming the
paths searched) or a :class:`DataFormatError` (naming the file; ``IDXFormatError`` is the
Fashion-MNIST one).
"""

from samkit.data.cifar import download_cifar, load_cifar
from samkit.data.common import (
    DataFormatError,
    DataNotFoundError,
    UnsafePickleError,
    split_holdout,
)
from samkit.data.fashion_mnist import IDXFormatError, load_fashion_mnist, read_idx
from samkit.data.image_folder import ImageFolderDataset, load_folders
from samkit.data.loader import BatchedLoader, InMemoryDataset, SampleLoader, make_loader
from samkit.data.noise import (
    LabelNoiseRecord,
    apply_label_noise,
    bootstrap_labels,
    load_label_noise,
    save_label_noise,
)
from samkit.data.registry import DATASETS, DatasetInfo, build_datasets
from samkit.data.svhn import download_svhn, load_svhn
from samkit.data.transforms import NORMALIZATION, eval_transform, train_transform

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "BatchedLoader",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetInfo",
    "IDXFormatError",
    "ImageFolderDataset",
    "InMemoryDataset",
    "LabelNoiseRecord",
    "SampleLoader",
    "UnsafePickleError",
    "apply_label_noise",
    "bootstrap_labels",
    "build_datasets",
    "download_cifar",
    "download_svhn",
    "eval_transform",
    "load_cifar",
    "load_fashion_mnist",
    "load_folders",
    "load_label_noise",
    "load_svhn",
    "make_loader",
    "read_idx",
    "save_label_noise",
    "split_holdout",
    "train_transform",
]
