"""ImageNet-layout folders (``data.name: imagefolder``): too large for device memory, so read by torchvision's
``ImageFolder`` and DataLoader workers behind the :class:`~prunebench.datamodule.DataModule` methods, with
every image's crop and flip drawn from a seed the epoch's generator hands in (no global RNG; batches do not
depend on the number of workers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from prunebench.datamodule import IMAGENET_MEAN, IMAGENET_STD, Batch, Batches, DataModule, Split, expand_path, holdout
from prunebench.errors import UserError
from prunebench.recipe import DataConfig


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

    def _loader(
        self, dataset: Any, bs: int, order: Sequence[Any] | None = None, batches: Sequence[Any] | None = None
    ) -> Any:
        """Batches of ``dataset[key]`` for the keys in ``order`` (default: in order), or the given ``batches``
        of keys.

        The DataLoader draws a worker base seed per iteration: from a fresh generator of its own here,
        not from torch's global RNG (nothing random runs in the workers anyway).
        """
        if batches is not None:
            return DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=self.workers,
                generator=torch.Generator(),
                pin_memory=self.device.type == "cuda",
            )
        return DataLoader(
            dataset,
            batch_size=bs,
            sampler=order,
            num_workers=self.workers,
            generator=torch.Generator(),
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

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
        bs = batch_size or self.batch_size

        def select(positions: Sequence[int]) -> Batches:  # a torchrun rank's batches: only those are read
            chunks = [keys[p * bs : (p + 1) * bs] for p in positions]
            return self._on_device(self._loader(dataset, bs, batches=chunks))

        stream = self._on_device(self._loader(dataset, bs, keys))
        stream.select = select
        return stream

    def _eval_stream(self, split: Split, bs: int) -> Batches:
        dataset = {"train": self.train_plain, "val": self.val, "test": self.test}[split]
        return self._on_device(self._loader(dataset, bs))

    def calibration_batch(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randperm(len(self.train_plain), generator=generator, device=generator.device)[:n].tolist()
        x, _ = next(iter(self._loader(self.train_plain, len(idx), idx)))
        return self.normalize(x.to(self.device))


def load_imagefolder(cfg: DataConfig, device: torch.device) -> DataModule:
    """``<root>/train/<class>/*`` (train + carved val) and ``<root>/val/<class>/*`` (test) via torchvision."""
    if not cfg.root:
        raise UserError("data: imagefolder needs data.root: a folder with train/<class>/ and val/<class>/ subfolders")
    root = expand_path(cfg.root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise UserError(
                f"data: imagefolder: {(root / sub).absolute()} not found; set data.root to a folder with "
                "train/<class>/ and val/<class>/ subfolders (ImageNet layout)"
            )
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
    keep, held = holdout(len(train_raw), cfg.val_split, cfg.split_seed)
    keep_l, held_l = keep.tolist(), held.tolist()
    return ImageFolderData(
        name=cfg.name,
        train=Subset(train_raw, keep_l),
        val=Subset(train_eval, held_l),
        test=test,
        train_plain=Subset(train_eval, keep_l),
        workers=cfg.workers,
        num_classes=len(train_raw.classes),
        in_chans=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
        augment=cfg.augment,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        classes=train_raw.classes,
    )
