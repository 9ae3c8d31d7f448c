"""ImageNet and generic image folders, loaded image by image through a DataLoader.

Layout (torchvision ``ImageFolder`` convention, one subfolder per class)::

    <root>/train/<class>/<image>.{jpg,jpeg,png,...}
    <root>/val/<class>/...        (or <root>/test/<class>/...)

Classes are the subfolders of ``train/`` in sorted order; the evaluation split uses the same
class indices (a class missing from ``val/`` is fine, a class absent from ``train/`` is an
error). For ImageNet the raw validation set is one flat folder: sort it into the 1,000 class
folders first (for instance with the widely used ``valprep.sh``).

Images are decoded by PIL (as torchvision's default loader does; ``torchvision.io`` decoding is
deprecated) to ``uint8 [3, H, W]`` RGB tensors; an undecodable or truncated file raises
:class:`DataFormatError` naming it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from samkit.data.common import DataFormatError, locate
from samkit.data.transforms import eval_transform, train_transform

__all__ = ["EVAL_SPLITS", "ImageFolderDataset", "find_image_folder", "load_image", "load_folders"]

#: Names accepted for the evaluation split, in order of preference.
EVAL_SPLITS = ("val", "test")


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """The image at ``path`` as ``uint8 [3, H, W]`` RGB (decoded by PIL, any format it knows)."""
    path = str(path)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # OSError (truncated), UnidentifiedImageError, DecompressionBomb...
        raise DataFormatError(
            f"{path}: cannot decode image, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(ImageFolder):
    """One split of an image folder; ``get(i, train=...)`` applies the training or eval transform.

    ``class_to_idx`` fixes the class indices (the evaluation split takes the training split's).
    ``labels`` is the ``int64`` tensor of targets.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dataset: str = "image_folder",
        train: bool = False,
        class_to_idx: dict[str, int] | None = None,
        image_level: str = "basic",
        batch_level: str = "none",
        cutout_length: int = 16,
        image_size: int | None = None,
        allow_empty: bool = False,
    ):
        self._fixed_classes = class_to_idx
        try:
            super().__init__(str(root), loader=load_image, allow_empty=allow_empty)
        except FileNotFoundError as e:
            raise DataFormatError(f"{root}: {e}") from e
        self.dataset = dataset
        self.train = train
        self.image_level = image_level
        self.batch_level = batch_level
        self.cutout_length = cutout_length
        self.image_size = image_size
        self.source_indices = torch.arange(len(self.samples))
        # Build (and so validate) the transforms now.
        self._transforms = {
            True: train_transform(
                dataset, image_level, batch_level, cutout_length, image_size=image_size
            ),
            False: eval_transform(dataset, image_size=image_size),
        }

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        if self._fixed_classes is None:
            return found, {c: i for i, c in enumerate(found)}
        unknown = sorted(set(found) - set(self._fixed_classes))
        if unknown:
            raise DataFormatError(
                f"{directory}: class folder(s) {unknown[:10]} are not in the training split"
            )
        classes = sorted(self._fixed_classes, key=self._fixed_classes.__getitem__)
        return classes, dict(self._fixed_classes)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.targets, dtype=torch.int64)

    def transform_for(self, train: bool):
        return self._transforms[train]

    def get(self, index: int, *, train: bool) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self._transforms[train](self.loader(path)), target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(index, train=self.train)

    def _replace(self, samples: list[tuple[str, int]], source: torch.Tensor) -> ImageFolderDataset:
        new = copy.copy(self)
        new.samples = samples
        new.imgs = samples
        new.targets = [t for _, t in samples]
        new.source_indices = source
        return new

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self._replace([self.samples[i] for i in idx.tolist()], self.source_indices[idx])

    def with_labels(self, labels: torch.Tensor | Sequence[int]) -> ImageFolderDataset:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (len(self.samples),):
            raise ValueError(f"need {len(self.samples)} labels, got shape {tuple(labels.shape)}")
        samples = [(p, int(t)) for (p, _), t in zip(self.samples, labels.tolist())]
        return self._replace(samples, self.source_indices)


def _splits(directory: Path) -> tuple[Path, Path] | None:
    if not (directory / "train").is_dir():
        return None
    for name in EVAL_SPLITS:
        if (directory / name).is_dir():
            return directory / "train", directory / name
    return None


def find_image_folder(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder with ``train/`` and ``val/`` (or ``test/``) for data set ``name``."""
    how = (
        "Pass --data-dir pointing at a folder with train/<class>/... and val/<class>/... "
        "(or test/<class>/...)."
    )
    if name == "imagenet":
        how += (
            " For ImageNet (ILSVRC-2012) extract the training archive into train/ (one folder "
            "per synset) and sort the validation images into val/<synset>/."
        )
    return locate(
        name,
        data_dir,
        lambda d: d if _splits(d) is not None else None,
        what="train/ and val/ (or test/) class folders",
        how_to_get=how,
    )


def load_folders(
    name: str = "image_folder",
    data_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The training and evaluation splits (``kwargs`` go to :class:`ImageFolderDataset`)."""
    root = find_image_folder(name, data_dir)
    splits = _splits(root)
    assert splits is not None
    train_dir, eval_dir = splits
    train = ImageFolderDataset(train_dir, dataset=name, train=True, **kwargs)
    evaluation = ImageFolderDataset(
        eval_dir,
        dataset=name,
        train=False,
        class_to_idx=train.class_to_idx,
        allow_empty=True,
        **kwargs,
    )
    return train, evaluation
