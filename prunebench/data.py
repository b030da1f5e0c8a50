"""Datasets: train / validation / test splits that yield normalized batches on the device.

Small datasets (CIFAR-10/100, scikit-learn's digits, a synthetic set) live on the device as uint8
tensors ``[N, C, H, W]`` with int64 labels, airbench style: a batch is an index into device memory,
augmentation (random crop with 4-pixel zero padding, horizontal flip) is a handful of batched tensor
ops, and normalization is one fused multiply-add. No PIL, no DataLoader workers, no host round trips.
ImageNet-layout folders (``imagefolder``) are too large for that and go through torchvision's
``ImageFolder`` and DataLoader workers, behind the same methods.

The validation split is carved from the training set with ``data.split_seed`` (fixed across the seeds
of a grid), so tuning and model selection never look at the test split; :attr:`DataModule.test_reads`
counts how often the test split was asked for, which lets tests and the tuner assert it was not.

Randomness: every random choice of an epoch (order, crop offsets, flips) is drawn up front from the
generator passed to :meth:`DataModule.train_batches`, on the generator's own device, so the same
generator state gives the same batches; a CPU generator gives the same batches whether the data sit on
the CPU or a GPU. On the ``imagefolder`` path the generator gives each visit of an image a seed that
fixes its crop and flip, so batches do not depend on ``workers`` either; no path reads or advances
torch's global RNG.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torchvision import datasets

from prunebench.datamodule import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Batch,
    Batches,
    DataModule,
    Split,
    TensorSplit,
    carve,
    channel_stats,
    crop_flip,
    expand_path,
    resolve_device,
)
from prunebench.errors import UserError
from prunebench.imagefolder import ImageFolderData, SeededCrops, load_imagefolder
from prunebench.recipe import DataConfig

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Batch",
    "Batches",
    "DataModule",
    "ImageFolderData",
    "SeededCrops",
    "Split",
    "TensorSplit",
    "carve",
    "channel_stats",
    "crop_flip",
    "load_data",
    "synthetic_images",
]
# --------------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    meta_file: str
    names_key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        "batches.meta",
        "label_names",
        CIFAR10_MEAN,
        CIFAR10_STD,
        10,
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        "test",
        "fine_labels",
        "meta",
        "fine_label_names",
        CIFAR100_MEAN,
        CIFAR100_STD,
        100,
    ),
}


def _cifar_folder(root: Path, layout: _CifarLayout) -> Path:
    """The folder holding the batch files: ``root`` itself when it has them, else ``root/<official name>``."""
    if root.name == layout.folder or (root / layout.train_files[0]).is_file():
        return root
    return root / layout.folder


def _cifar_missing(folder: Path, layout: _CifarLayout) -> list[str]:
    return [f for f in (*layout.train_files, layout.test_file) if not (folder / f).is_file()]


def _download_cifar(root: Path, layout: _CifarLayout, name: str) -> None:
    """Let torchvision fetch and extract the official archive (imported only here: it is slow to import)."""
    target = root.parent if root.name == layout.folder else root
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(target), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"data: downloading {layout.title} into {target.absolute()} failed ({exc}); check the network "
            f"or set data.root to a folder containing {layout.folder}"
        ) from None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files without running code: only NumPy's array reconstruction is allowed.

    The official files hold dicts of bytes, ints, lists and NumPy uint8 arrays (bytes written by Python 3
    pickles go through ``_codecs.encode``); any other global (such as ``os.system`` in a crafted file)
    is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch file)")


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(
            f"data: {path} is not a CIFAR python batch file ({exc}); replace the folder or set data.download: true"
        ) from None


def _read_cifar_batches(folder: Path, files: Sequence[str], label_key: str) -> tuple[Tensor, Tensor]:
    """Concatenate official batch files: rows of 3072 bytes are the R, G, B planes of a 32x32 image."""
    data, labels = [], []
    for name in files:
        d = _read_pickle(folder / name)
        if not isinstance(d, dict) or "data" not in d or label_key not in d:
            raise UserError(
                f"data: {folder / name} lacks 'data' or {label_key!r}; point data.root at an official {folder.name}"
            )
        data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(data)), torch.from_numpy(np.concatenate(labels))


def _cifar_class_names(folder: Path, layout: _CifarLayout) -> list[str] | None:
    meta = folder / layout.meta_file
    if not meta.is_file():
        return None
    names = _read_pickle(meta).get(layout.names_key)
    return list(names) if names and len(names) == layout.num_classes else None


def _load_cifar(cfg: DataConfig, device: torch.device) -> DataModule:
    """Read an existing official python folder directly (no checksum checks: subsets must load too)."""
    layout = _CIFAR[cfg.name]
    root = expand_path(cfg.root or "./data")
    folder = _cifar_folder(root, layout)
    missing = _cifar_missing(folder, layout)
    if missing and cfg.download:
        _download_cifar(root, layout, cfg.name)
        folder = _cifar_folder(root, layout)
        missing = _cifar_missing(folder, layout)
    if missing:
        what = "not found at" if not folder.is_dir() else f"incomplete ({', '.join(missing)} missing) in"
        raise UserError(
            f"data: {layout.title} {what} {folder.absolute()}; set data.download: true or data.root to a folder "
            f"containing {layout.folder}"
        )
    x_train, y_train = _read_cifar_batches(folder, layout.train_files, layout.label_key)
    x_test, y_test = _read_cifar_batches(folder, (layout.test_file,), layout.label_key)
    train = TensorSplit(x_train, y_train, torch.arange(len(y_train)))
    test = TensorSplit(x_test, y_test, torch.arange(len(y_test)))
    classes = _cifar_class_names(folder, layout)
    return DataModule.from_tensors(cfg, train, test, layout.num_classes, device, layout.mean, layout.std, classes)


DIGITS_TEST_FRACTION = 0.2


def _load_digits(cfg: DataConfig, device: torch.device) -> DataModule:
    """scikit-learn's 8x8 digits (values 0..16) as 3x32x32 uint8 images; 20% held out as the test split."""
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.float32)[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train, test = carve(x, y, DIGITS_TEST_FRACTION, cfg.split_seed)
    return DataModule.from_tensors(cfg, train, test, 10, device, classes=[str(int(c)) for c in bunch.target_names])


def synthetic_images(n: int, num_classes: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` learnable random uint8 images ``[n, 3, size, size]`` with balanced int64 labels.

    An image is its class's mean colour plus its class's smooth colour pattern, plus a random colour
    cast per image and pixel noise. The cast makes the mean colour alone ambiguous, so a classifier has
    to pick up the pattern: a linear model on the pixels reaches ~90% in a few epochs, nearest class
    mean ~45% (chance 10%), so training clearly beats chance without being trivial.
    """
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 64 + 96
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g) * 16
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randperm(n, generator=g) % num_classes
    cast = torch.randn(n, 3, 1, 1, generator=g) * 32
    pixels = colours[labels] + patterns[labels] + cast + torch.randn(n, 3, size, size, generator=g) * 48
    return pixels.round().clamp(0, 255).to(torch.uint8), labels


def _load_synthetic(cfg: DataConfig, device: torch.device) -> DataModule:
    """``num_samples`` training images plus ``num_samples // 4`` test images, all fixed by ``split_seed``."""
    k, size = cfg.num_classes or 10, cfg.image_size or 32
    n_test = cfg.num_samples // 4
    x, y = synthetic_images(cfg.num_samples + n_test, k, size, cfg.split_seed)
    n = cfg.num_samples
    train = TensorSplit(x[:n], y[:n], torch.arange(n))
    test = TensorSplit(x[n:], y[n:], torch.arange(n_test))
    return DataModule.from_tensors(cfg, train, test, k, device, classes=[f"class{i}" for i in range(k)])


_SOURCES: dict[str, Callable[[DataConfig, torch.device], DataModule]] = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "imagefolder": load_imagefolder,
}


def load_data(cfg: DataConfig, device: torch.device | str = "cpu") -> DataModule:
    """Load the dataset a recipe's ``data:`` section names, with its validation carve, onto ``device``.

    A missing or incomplete dataset is a :class:`UserError` naming the path and the fix.
    """
    return _SOURCES[cfg.name](cfg, resolve_device(device))
