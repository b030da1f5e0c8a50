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

import math
import os
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prunebench.errors import UserError
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
    none. Iterating twice gives the same batches (the randomness was drawn when it was made).
    """

    def __init__(self, length: int, make_iter: Callable[[], Iterator[Batch]]) -> None:
        self._length = length
        self._make_iter = make_iter

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


def _holdout(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into (kept, held out) sorted index tensors; ``round(n * fraction)`` are held out.

    A permutation from a CPU generator seeded with ``seed``: the same on every machine and device.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * fraction))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def carve(images: Tensor, labels: Tensor, fraction: float, seed: int) -> tuple[TensorSplit, TensorSplit]:
    """Hold out ``fraction`` of a split (the validation carve of the training set, or a test split)."""
    keep, held = _holdout(len(labels), fraction, seed)
    return TensorSplit(images[keep], labels[keep], keep), TensorSplit(images[held], labels[held], held)


def _resolve_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _expand(path: str) -> Path:
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
        self.device = _resolve_device(device)
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
        dev = _resolve_device(device)
        _, c, h, _ = train.images.shape
        return cls(
            name=cfg.name, train=tr.to(dev), val=val.to(dev), test=test.to(dev), num_classes=num_classes,
            in_chans=c, image_size=h, mean=mean, std=std, device=dev, augment=cfg.augment,
            batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, classes=classes,
        )  # fmt: skip

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
        return (f"{type(self).__name__}({self.name!r}, {sizes}, classes={self.num_classes}, "
                f"shape={self.in_chans}x{self.image_size}x{self.image_size}, device={self.device})")  # fmt: skip

    # ---- in-memory implementation ----------------------------------------------------------------

    def _train_stream(self, perm: Tensor, crops: tuple[Tensor, Tensor] | None, bs: int) -> Batches:
        """Batches in ``perm`` order; ``crops`` holds each position's (shift, flip) when augmenting."""
        perm = perm.to(self.device)
        crops = None if crops is None else (crops[0].to(self.device), crops[1].to(self.device))
        images, labels = self.train.images, self.train.labels

        def batches() -> Iterator[Batch]:
            for start in range(0, len(perm), bs):
                idx = perm[start : start + bs]
                x = images[idx]
                if crops is not None:
                    x = crop_flip(x, crops[0][start : start + bs], crops[1][start : start + bs])
                yield self.normalize(x), labels[idx]

        return Batches(math.ceil(len(perm) / bs), batches)

    def _eval_stream(self, split: Split, bs: int) -> Batches:
        part: TensorSplit = getattr(self, split)

        def batches() -> Iterator[Batch]:
            for start in range(0, len(part), bs):
                yield self.normalize(part.images[start : start + bs]), part.labels[start : start + bs]

        return Batches(math.ceil(len(part) / bs), batches)


class SeededCrops:
    """Map-style dataset over a ``Subset`` of PIL images: item ``(i, seed)`` is image ``i`` random-resized-cropped
    to ``size`` and flipped, with every random choice drawn from ``random.Random(seed)``.

    The crop is torchvision's ``RandomResizedCrop(size)`` (scale 0.08..1, aspect ratio 3/4..4/3, bilinear
    with antialiasing) and then ``RandomHorizontalFlip``, but the randomness comes from the seed the
    sampler hands in with the index rather than from a process's global RNG: an image's augmentation is
    the same in whichever worker (or the main process) decodes it, and the global RNG is left alone.
    """

    SCALE = (0.08, 1.0)
    LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))

    def __init__(self, images: Any, size: int) -> None:
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def crop_box(cls, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop: torchvision's ``RandomResizedCrop.get_params`` with ``rng``."""
        for _ in range(10):
            area = width * height * rng.uniform(*cls.SCALE)
            ratio = math.exp(rng.uniform(*cls.LOG_RATIO))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # fallback: the central crop, its aspect ratio clamped into 3/4..4/3
        w, h = width, height
        if width / height < 3 / 4:
            h = round(width / (3 / 4))
        elif width / height > 4 / 3:
            w = round(height * (4 / 3))
        return (height - h) // 2, (width - w) // 2, h, w

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        from torchvision.transforms import functional as TF

        i, seed = key
        img, label = self.images[i]
        rng = random.Random(seed)
        top, left, h, w = self.crop_box(img.width, img.height, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img), label


class ImageFolderData(DataModule):
    """An ImageNet-layout folder read by DataLoader workers, behind the :class:`DataModule` methods.

    ``train`` is a ``Subset`` of ``<root>/train`` yielding PIL images, augmented per epoch by
    :class:`SeededCrops`; ``train_plain`` the same images with the evaluation transform; ``val`` the
    carved ``Subset`` with the evaluation transform; ``test`` the ``<root>/val`` folder. Workers decode to
    uint8 tensors (4x less host-to-device traffic than float); normalization happens on the device.
    The order and each image's crop seed come from the generator given to :meth:`train_batches`, so
    batches are a function of it alone, the same for ``workers: 0`` and any other number.
    """

    def __init__(self, *, train_plain: Any, workers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_plain = train_plain  # the train subset with the evaluation transform
        self.workers = workers

    def _loader(self, dataset: Any, bs: int, order: Sequence[Any] | None = None) -> Any:
        """Batches of ``dataset[key]`` for the keys in ``order`` (default: in order).

        The DataLoader draws a worker base seed per iteration: from a fresh generator of its own here,
        not from torch's global RNG (nothing random runs in the workers anyway).
        """
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset, batch_size=bs, sampler=order, num_workers=self.workers, generator=torch.Generator(),
            pin_memory=self.device.type == "cuda", drop_last=False,
        )  # fmt: skip

    def _on_device(self, loader: Any) -> Batches:
        def batches() -> Iterator[Batch]:
            for x, y in loader:
                x = x.to(self.device, non_blocking=True)
                yield self.normalize(x), y.to(self.device, non_blocking=True)

        return Batches(len(loader), batches)

    def train_batches(self, batch_size: int | None, generator: torch.Generator, augment: bool | None = None) -> Batches:
        aug = self.augment if augment is None else augment
        n, gdev = len(self.train), generator.device
        order = torch.randperm(n, generator=generator, device=gdev).tolist()  # first, as in memory
        if aug:
            seeds = torch.randint(2**62, (n,), generator=generator, device=gdev).tolist()
            dataset, keys = SeededCrops(self.train, self.image_size), list(zip(order, seeds))
        else:
            dataset, keys = self.train_plain, order
        return self._on_device(self._loader(dataset, batch_size or self.batch_size, keys))

    def _eval_stream(self, split: Split, bs: int) -> Batches:
        dataset = {"train": self.train_plain, "val": self.val, "test": self.test}[split]
        return self._on_device(self._loader(dataset, bs))

    def calibration_batch(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randperm(len(self.train_plain), generator=generator, device=generator.device)[:n].tolist()
        x, _ = next(iter(self._loader(self.train_plain, len(idx), idx)))
        return self.normalize(x.to(self.device))


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
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "labels", "batches.meta", "label_names", CIFAR10_MEAN, CIFAR10_STD, 10,
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", "meta", "fine_label_names",
        CIFAR100_MEAN, CIFAR100_STD, 100,
    ),
}  # fmt: skip


def _cifar_folder(root: Path, layout: _CifarLayout) -> Path:
    """The folder holding the batch files: ``root`` itself when it has them, else ``root/<official name>``."""
    if root.name == layout.folder or (root / layout.train_files[0]).is_file():
        return root
    return root / layout.folder


def _cifar_missing(folder: Path, layout: _CifarLayout) -> list[str]:
    return [f for f in (*layout.train_files, layout.test_file) if not (folder / f).is_file()]


def _download_cifar(root: Path, layout: _CifarLayout, name: str) -> None:
    """Let torchvision fetch and extract the official archive (imported only here: it is slow to import)."""
    from torchvision import datasets

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
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),  # how protocol-2 pickles store bytes
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
    root = _expand(cfg.root or "./data")
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
    from sklearn.datasets import load_digits

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


def _load_imagefolder(cfg: DataConfig, device: torch.device) -> DataModule:
    """``<root>/train/<class>/*`` (train + carved val) and ``<root>/val/<class>/*`` (test) via torchvision."""
    if not cfg.root:
        raise UserError("data: imagefolder needs data.root: a folder with train/<class>/ and val/<class>/ subfolders")
    root = _expand(cfg.root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(
                f"data: imagefolder: {(root / sub).absolute()} not found; set data.root to a folder with "
                "train/<class>/ and val/<class>/ subfolders (ImageNet layout)"
            )
    from torch.utils.data import Subset
    from torchvision import datasets
    from torchvision import transforms as T

    size = cfg.image_size or 224
    eval_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.PILToTensor()])
    try:
        train_raw = datasets.ImageFolder(str(root / "train"))  # PIL images: SeededCrops augments them
        train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
        test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"data: imagefolder {root.absolute()}: {exc}; every class folder needs image files") from None
    if test.classes != train_raw.classes:
        raise UserError(
            f"data: imagefolder {root.absolute()}: train/ and val/ have different class folders "
            f"({len(train_raw.classes)} vs {len(test.classes)}); they must match"
        )
    keep, held = _holdout(len(train_raw), cfg.val_split, cfg.split_seed)
    keep_l, held_l = keep.tolist(), held.tolist()
    return ImageFolderData(
        name=cfg.name, train=Subset(train_raw, keep_l), val=Subset(train_eval, held_l), test=test,
        train_plain=Subset(train_eval, keep_l), workers=cfg.workers, num_classes=len(train_raw.classes),
        in_chans=3, image_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=device, augment=cfg.augment,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, classes=train_raw.classes,
    )  # fmt: skip


_SOURCES: dict[str, Callable[[DataConfig, torch.device], DataModule]] = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "imagefolder": _load_imagefolder,
}


def load_data(cfg: DataConfig, device: torch.device | str = "cpu") -> DataModule:
    """Load the dataset a recipe's ``data:`` section names, with its validation carve, onto ``device``.

    A missing or incomplete dataset is a :class:`UserError` naming the path and the fix.
    """
    return _SOURCES[cfg.name](cfg, _resolve_device(device))
