"""The data module: train / validation / test splits held as tensors on the device and the batches a
training loop consumes (augmentation as batched tensor ops, normalization fused on the device).

Randomness comes only from the generator handed to :meth:`DataModule.train_batches` (docs/fairness.md:
same data order for every method of a seed). Datasets are loaded by :mod:`prunebench.data`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prunebench.recipe import DataConfig

Split = Literal["train", "val", "test"]
Batch = tuple[Tensor, Tensor]

CROP_PAD = 4
"""Pixels of zero padding before the random crop (the standard CIFAR recipe)."""

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# containers


class Batches(Iterable[Batch]):
    """A re-iterable stream of ``(images, labels)`` batches with a known length.

    Progress bars and per-step schedules need ``len()`` before the first batch; a plain generator has
    none. Iterating twice gives the same batches (the randomness was drawn when it was made). ``select``,
    when given, makes the stream of only the batches at some positions without making the others (a
    ``torchrun`` rank's shard: :func:`prunebench.distributed.shard`).
    """

    def __init__(
        self,
        length: int,
        make_iter: Callable[[], Iterator[Batch]],
        select: Callable[[Sequence[int]], Batches] | None = None,
    ) -> None:
        self._length = length
        self._make_iter = make_iter
        self.select = select

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Batch]:
        return self._make_iter()


@dataclass
class TensorSplit:
    """One split of an in-memory dataset.

    ``images`` is uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``, both on the device; ``index``
    (int64, on the CPU) says which images of the source split these are, so the provenance of the
    train/validation carve can be checked and logged.
    """

    images: Tensor
    labels: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels.to(device), self.index)


# --------------------------------------------------------------------------------------------------
# batched augmentation and statistics


def crop_flip(images: Tensor, shifts: Tensor, flips: Tensor, pad: int = CROP_PAD) -> Tensor:
    """Translate each image by ``shifts[b] = (dy, dx)`` (in ``[-pad, pad]``) and mirror it where ``flips[b]``.

    Equivalent to zero-padding by ``pad`` and cropping the original size at offset ``pad + shift``
    (torchvision's ``RandomCrop(size, padding=pad)``), then a horizontal flip; done for the whole batch
    with one padded copy and one gather whose row/column indices carry the per-sample offsets (the flip
    is a reversed column index), so the cost does not grow with Python work per image.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    shifts = shifts.to(dev) + pad
    rows = shifts[:, :1] + torch.arange(h, device=dev)  # [B, H]
    ar_w = torch.arange(w, device=dev)
    cols = shifts[:, 1:] + torch.where(flips.to(dev)[:, None], ar_w.flip(0), ar_w)  # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale.

    Accumulates float64 sums over chunks of images so that a large split is never copied to float
    whole.
    """
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64, device=images.device)
    s2 = torch.zeros_like(s1)
    for x in images.split(chunk):
        xf = x.to(torch.float64) / 255.0
        s1 += xf.sum(dim=(0, 2, 3))
        s2 += xf.square().sum(dim=(0, 2, 3))
    n = max(images.numel() // max(c, 1), 1)
    mean = s1 / n
    std = (s2 / n - mean.square()).clamp_min(1e-6).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def holdout(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into (kept, held out) sorted index tensors; ``round(n * fraction)`` are held out.

    A permutation from a CPU generator seeded with ``seed``: the same on every machine and device.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * fraction))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def carve(images: Tensor, labels: Tensor, fraction: float, seed: int) -> tuple[TensorSplit, TensorSplit]:
    """Hold out ``fraction`` of a split (the validation carve of the training set, or a test split)."""
    keep, held = holdout(len(labels), fraction, seed)
    return TensorSplit(images[keep], labels[keep], keep), TensorSplit(images[held], labels[held], held)


def resolve_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def expand_path(path: str) -> Path:
    """A user path: ``$VARS`` and ``~`` expanded; relative paths are relative to the working directory."""
    return Path(os.path.expanduser(os.path.expandvars(path)))


# --------------------------------------------------------------------------------------------------
# the data module


class DataModule:
    """Train / validation / test splits of one dataset and the batches a training loop consumes.

    This class holds in-memory datasets (splits are :class:`TensorSplit`); :class:`ImageFolderData`
    provides the same methods over image files. ``mean`` and ``std`` are per channel on the 0..1 scale.
    """

    def __init__(
        self,
        *,
        name: str,
        train: Any,
        val: Any,
        test: Any,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.train, self.val, self.test = train, val, test
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device = resolve_device(device)
        self.augment = augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(num_classes))
        self.test_reads = 0
        # normalize(x) = (x / 255 - mean) / std = x * scale + shift, one fused op per batch
        std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    @classmethod
    def from_tensors(
        cls,
        cfg: DataConfig,
        train: TensorSplit,
        test: TensorSplit,
        num_classes: int,
        device: torch.device | str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
    ) -> DataModule:
        """Carve the validation split off ``train`` and move everything to ``device``.

        Without ``mean``/``std`` they are computed from the training images left after the carve (the
        validation images do not leak into the normalization).
        """
        tr, val = carve(train.images, train.labels, cfg.val_split, cfg.split_seed)
        tr.index, val.index = train.index[tr.index], train.index[val.index]
        if mean is None or std is None:
            mean, std = channel_stats(tr.images)
        dev = resolve_device(device)
        _, c, h, _ = train.images.shape
        return cls(
            name=cfg.name,
            train=tr.to(dev),
            val=val.to(dev),
            test=test.to(dev),
            num_classes=num_classes,
            in_chans=c,
            image_size=h,
            mean=mean,
            std=std,
            device=dev,
            augment=cfg.augment,
            batch_size=cfg.batch_size,
            eval_batch_size=cfg.eval_batch_size,
            classes=classes,
        )

    # ---- public API ------------------------------------------------------------------------------

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` on the device -> float32, normalized with the dataset's mean/std."""
        return torch.addcmul(self._shift, images.to(torch.float32), self._scale)

    def split_sizes(self) -> dict[str, int]:
        """Images per split (the validation split may be empty)."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def train_batches(self, batch_size: int | None, generator: torch.Generator, augment: bool | None = None) -> Batches:
        """One shuffled epoch over the train split (the last partial batch included).

        Augmented when ``data.augment`` (or ``augment``) says so; ``batch_size`` None means
        ``data.batch_size``. All randomness is drawn here from ``generator`` (the permutation first, so
        augmented and plain epochs from equal generator states visit the images in the same order).
        """
        bs = batch_size or self.batch_size
        aug = self.augment if augment is None else augment
        n = len(self.train)
        gdev = generator.device
        perm = torch.randperm(n, generator=generator, device=gdev)
        crops = None
        if aug:
            shifts = torch.randint(-CROP_PAD, CROP_PAD + 1, (n, 2), generator=generator, device=gdev)
            crops = (shifts, torch.rand(n, generator=generator, device=gdev) < 0.5)
        return self._train_stream(perm, crops, bs)

    def eval_batches(self, split: Split, batch_size: int | None = None) -> Batches:
        """The split in order, un-augmented and normalized. Asking for ``"test"`` counts in ``test_reads``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'test'")
        if split == "test":
            self.test_reads += 1
        return self._eval_stream(split, batch_size or self.eval_batch_size)

    def calibration_batch(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random training images (all of them if the split is smaller), normalized, un-augmented."""
        idx = torch.randperm(len(self.train), generator=generator, device=generator.device)[:n]
        return self.normalize(self.train.images[idx.to(self.device)])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.split_sizes().items())
        return (
            f"{type(self).__name__}({self.name!r}, {sizes}, classes={self.num_classes}, "
            f"shape={self.in_chans}x{self.image_size}x{self.image_size}, device={self.device})"
        )

    # ---- in-memory implementation ----------------------------------------------------------------

    def _train_stream(self, perm: Tensor, crops: tuple[Tensor, Tensor] | None, bs: int) -> Batches:
        """Batches in ``perm`` order; ``crops`` holds each position's (shift, flip) when augmenting."""
        perm = perm.to(self.device)
        crops = None if crops is None else (crops[0].to(self.device), crops[1].to(self.device))
        images, labels = self.train.images, self.train.labels

        def batch(start: int) -> Batch:
            idx = perm[start : start + bs]
            x = images[idx]
            if crops is not None:
                x = crop_flip(x, crops[0][start : start + bs], crops[1][start : start + bs])
            return self.normalize(x), labels[idx]

        def select(positions: Sequence[int]) -> Batches:
            return Batches(len(positions), lambda: (batch(p * bs) for p in positions))

        return Batches(math.ceil(len(perm) / bs), lambda: (batch(start) for start in range(0, len(perm), bs)), select)

    def _eval_stream(self, split: Split, bs: int) -> Batches:
        part: TensorSplit = getattr(self, split)

        def batches() -> Iterator[Batch]:
            for start in range(0, len(part), bs):
                yield self.normalize(part.images[start : start + bs]), part.labels[start : start + bs]

        return Batches(math.ceil(len(part) / bs), batches)
