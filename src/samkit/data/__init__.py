"""Data sets held in memory as tensors, and a fast tensor batch loader."""

from samkit.data.fashion_mnist import (
    CLASSES,
    MEAN,
    STD,
    DataNotFoundError,
    FashionMNIST,
    IDXFormatError,
    TensorBatchLoader,
    augment_batch,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
)

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "DataNotFoundError",
    "FashionMNIST",
    "IDXFormatError",
    "TensorBatchLoader",
    "augment_batch",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
]
