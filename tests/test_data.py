"""Tests of prunebench.data: sources, splits, batching, augmentation and the CIFAR reader."""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunebench.data import _read_pickle, load_data
from prunebench.datamodule import CIFAR10_MEAN, IMAGENET_MEAN, DataModule, TensorSplit, crop_flip
from prunebench.errors import UserError
from prunebench.imagefolder import SeededCrops
from prunebench.recipe import DataConfig

pytestmark = pytest.mark.unit

REAL_SUBSET = Path("/work/shared/data/cifar10-subset")


# --------------------------------------------------------------------------------------------------
# fixtures: tiny datasets written by the tests


def _write_cifar(folder: Path, n_per_file: int, cifar100: bool = False, seed: int = 0) -> Path:
    """An official-format python folder: pickled dicts of uint8 N x 3072 rows (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    files = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key, k = ("fine_labels", 100) if cifar100 else ("labels", 10)
    for name in files:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 255, 7, 0  # image 0: R=255, G=7, B=0
        labels = [int(i % k) for i in range(n_per_file)]
        with (folder / name).open("wb") as f:
            pickle.dump({"data": data, key: labels, "batch_label": name}, f)
    meta = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    with (folder / meta[0]).open("wb") as f:
        pickle.dump({meta[1]: [f"c{i}" for i in range(k)]}, f)
    return folder


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    _write_cifar(tmp_path / "cifar-10-batches-py", n_per_file=12)
    return tmp_path


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "imgs"


def _cfg(name: str, **kw) -> DataConfig:
    return DataConfig(name=name, **kw)


@pytest.fixture(scope="module")
def digits() -> DataModule:
    return load_data(_cfg("digits"))


@pytest.fixture(scope="module")
def synthetic() -> DataModule:
    return load_data(_cfg("synthetic", num_samples=200))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# every source


SOURCES = {
    "digits": (dict(), 10, 32),
    "synthetic": (dict(num_samples=64, num_classes=4, image_size=16), 4, 16),
    "cifar10": (dict(), 10, 32),
    "cifar100": (dict(), 100, 32),
    "imagefolder": (dict(image_size=32, workers=0, val_split=0.25), 2, 32),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_sources_load_with_shapes_dtypes_and_classes(name: str, tmp_path: Path, imagefolder_root: Path) -> None:
    kw, k, size = SOURCES[name]
    if name.startswith("cifar"):
        folder = "cifar-100-python" if name == "cifar100" else "cifar-10-batches-py"
        _write_cifar(tmp_path / "c" / folder, n_per_file=40 if name == "cifar100" else 8, cifar100=name == "cifar100")
        kw = {**kw, "root": str(tmp_path / "c")}
    if name == "imagefolder":
        kw = {**kw, "root": str(imagefolder_root)}
    dm = load_data(_cfg(name, **kw))
    assert (dm.name, dm.num_classes, dm.in_chans, dm.image_size) == (name, k, 3, size)
    assert len(dm.mean) == len(dm.std) == 3 and all(s > 0 for s in dm.std)
    sizes = dm.split_sizes()
    assert sizes["train"] > 0 and sizes["test"] > 0 and sizes["val"] >= 0
    if name != "imagefolder":
        for split in (dm.train, dm.val, dm.test):
            assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
            assert split.images.shape[1:] == (3, size, size) and split.images.shape[0] == len(split.labels)
            assert int(split.labels.min()) >= 0 and int(split.labels.max()) < k
    x, y = next(iter(dm.train_batches(8, _gen(0))))
    assert x.dtype == torch.float32 and x.shape == (min(8, sizes["train"]), 3, size, size)
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    xe, ye = next(iter(dm.eval_batches("test")))
    assert xe.dtype == torch.float32 and xe.shape[1:] == (3, size, size) and ye.dtype == torch.int64


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_computed_normalization_gives_zero_mean_unit_std(name: str, digits: DataModule, synthetic: DataModule) -> None:
    dm = {"digits": digits, "synthetic": synthetic}[name]
    x = torch.cat([b for b, _ in dm.eval_batches("train")])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    # a non-augmented training batch is exactly (x / 255 - mean) / std of the stored images
    xb, _ = next(iter(dm.eval_batches("train", batch_size=4)))
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, (dm.train.images[:4].float() / 255 - mean) / std)


def test_digits_is_the_sklearn_set_upscaled(digits: DataModule) -> None:
    sizes = digits.split_sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(1797 * 0.2)
    assert sizes["val"] == round((1797 - sizes["test"]) * 0.1)
    im = digits.train.images
    assert torch.equal(im[:, 0], im[:, 1]) and torch.equal(im[:, 0], im[:, 2])  # grey, replicated
    assert int(im.max()) == 255 and int(im.min()) == 0
    assert set(digits.test.labels.tolist()) == set(range(10))


def test_synthetic_is_deterministic_and_learnable() -> None:
    a = load_data(_cfg("synthetic", num_samples=400, split_seed=3))
    b = load_data(_cfg("synthetic", num_samples=400, split_seed=3))
    c = load_data(_cfg("synthetic", num_samples=400, split_seed=4))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.split_sizes() == {"train": 360, "val": 40, "test": 100}
    # a nearest-class-mean classifier fit on train beats chance (10%) clearly on test
    xtr, xte = a.train.images.float().flatten(1), a.test.images.float().flatten(1)
    centroids = torch.stack([xtr[a.train.labels == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xte, centroids).argmin(1) == a.test.labels).float().mean().item()
    assert acc > 0.25


# --------------------------------------------------------------------------------------------------
# batching: determinism, lengths, augmentation


def _epoch(dm: DataModule, seed: int, bs: int = 64, augment: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dm.train_batches(bs, _gen(seed), augment=augment))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_train_batches_deterministic_given_generator(digits: DataModule) -> None:
    x1, y1 = _epoch(digits, 0)
    x2, y2 = _epoch(digits, 0)
    x3, y3 = _epoch(digits, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(y1, y3) and not torch.equal(x1, x3)
    # an epoch visits every training image once: the labels are a permutation of the split's
    assert torch.equal(y1.sort().values, digits.train.labels.sort().values)


def test_augmentation_changes_images_not_order_or_shapes(digits: DataModule) -> None:
    xa, ya = _epoch(digits, 5, augment=True)
    xp, yp = _epoch(digits, 5, augment=False)
    assert xa.shape == xp.shape and torch.equal(ya, yp)  # same permutation -> same labels
    changed = (xa != xp).flatten(1).any(1).float().mean().item()
    assert changed > 0.8
    # the un-augmented epoch is the stored images in a shuffled order: sums per image match a permutation
    sums = torch.sort(xp.sum(dim=(1, 2, 3))).values
    ref = torch.sort(torch.cat([x for x, _ in digits.eval_batches("train")]).sum(dim=(1, 2, 3))).values
    torch.testing.assert_close(sums, ref)


def test_augmentation_keeps_label_alignment_and_constant_interior() -> None:
    """Image i is constant with value 10 + 20 * label: after crop + flip the interior still is."""
    n = 50
    labels = torch.arange(n) % 10
    images = (10 + 20 * labels).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    split = TensorSplit(images, labels, torch.arange(n))
    dm = DataModule(
        name="const",
        train=split,
        val=split,
        test=split,
        num_classes=10,
        in_chans=3,
        image_size=32,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        augment=True,
    )
    batches = dm.train_batches(16, _gen(0))
    assert len(batches) == math.ceil(n / 16)
    seen = 0
    for x, y in batches:
        value = ((10 + 20 * y).float() / 255).view(-1, 1, 1, 1)
        interior = x[:, :, 4:-4, 4:-4]
        torch.testing.assert_close(interior, value.expand_as(interior))
        seen += len(y)
        border_zero = (x == 0).flatten(1).any(1)  # zero padding shows at the border of shifted images
        assert border_zero.any()
    assert seen == n


def test_crop_flip_matches_pad_crop_flip_reference() -> None:
    x = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8, generator=_gen(0))
    shifts = torch.tensor([[0, 0], [-4, 4], [4, -4], [1, -2], [-3, 0], [2, 3]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(x, shifts, flips, pad=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for b in range(6):
        dy, dx = shifts[b].tolist()
        ref = padded[b, :, 4 + dy : 4 + dy + 8, 4 + dx : 4 + dx + 10]
        assert torch.equal(out[b], ref.flip(-1) if flips[b] else ref)
    assert torch.equal(crop_flip(x, torch.zeros(6, 2, dtype=torch.long), torch.zeros(6, dtype=torch.bool)), x)


@pytest.mark.parametrize("bs", [3, 50, 64, 5000])
def test_lengths_of_batch_iterables(synthetic: DataModule, bs: int) -> None:
    sizes = synthetic.split_sizes()
    train = synthetic.train_batches(bs, _gen(0))
    batches = list(train)
    assert len(train) == len(batches) == math.ceil(sizes["train"] / bs)
    assert sum(len(y) for _, y in batches) == sizes["train"]  # the last partial batch is kept
    for split in ("train", "val", "test"):
        ev = synthetic.eval_batches(split, batch_size=bs)
        got = list(ev)
        assert len(ev) == len(got) == math.ceil(sizes[split] / bs)
        assert sum(len(y) for _, y in got) == sizes[split]
    ev = synthetic.eval_batches("val", batch_size=bs)
    assert [y for _, y in ev][0].tolist() == synthetic.val.labels[:bs].tolist()  # in order


def test_eval_batch_size_defaults_to_config() -> None:
    dm = load_data(_cfg("synthetic", num_samples=100, eval_batch_size=30, batch_size=40, val_split=0))
    assert len(dm.eval_batches("train")) == math.ceil(100 / 30)
    assert len(dm.train_batches(None, _gen(0))) == math.ceil(100 / 40)


def test_calibration_batch(digits: DataModule) -> None:
    a = digits.calibration_batch(32, _gen(0))
    b = digits.calibration_batch(32, _gen(0))
    c = digits.calibration_batch(32, _gen(1))
    assert a.shape == (32, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert digits.calibration_batch(10**6, _gen(0)).shape[0] == len(digits.train)  # clamps to the split


# --------------------------------------------------------------------------------------------------
# validation split and test accounting


def test_val_split_is_disjoint_fixed_and_seeded() -> None:
    a = load_data(_cfg("synthetic", num_samples=200, val_split=0.2, split_seed=0))
    b = load_data(_cfg("synthetic", num_samples=200, val_split=0.2, split_seed=0))
    c = load_data(_cfg("synthetic", num_samples=200, val_split=0.2, split_seed=1))
    full = load_data(_cfg("synthetic", num_samples=200, val_split=0.0, split_seed=0))
    tr, va = set(a.train.index.tolist()), set(a.val.index.tolist())
    assert not tr & va and tr | va == set(range(200)) and len(va) == 40
    assert torch.equal(a.val.index, b.val.index) and torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.index, c.val.index)
    # the indices say which images of the full training set each split holds
    assert torch.equal(full.train.images[a.val.index], a.val.images)
    assert torch.equal(full.train.labels[a.train.index], a.train.labels)
    # the test split does not depend on the carve
    assert torch.equal(a.test.images, full.test.images)


def test_val_split_zero_is_empty() -> None:
    dm = load_data(_cfg("digits", val_split=0))
    assert dm.split_sizes()["val"] == 0
    batches = dm.eval_batches("val")
    assert len(batches) == 0 and list(batches) == []


def test_test_reads_counts_only_test(synthetic: DataModule) -> None:
    dm = load_data(_cfg("synthetic", num_samples=64))
    assert dm.test_reads == 0
    list(dm.train_batches(16, _gen(0)))
    dm.eval_batches("val")
    dm.eval_batches("train")
    dm.calibration_batch(4, _gen(0))
    assert dm.test_reads == 0
    dm.eval_batches("test")
    list(dm.eval_batches("test", batch_size=7))
    assert dm.test_reads == 2
    with pytest.raises(ValueError):
        dm.eval_batches("valid")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the CIFAR reader


def test_cifar_reader_layout_and_root_forms(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # reading an existing folder never imports it
    dm = load_data(_cfg("cifar10", root=str(cifar_root), val_split=0))
    assert dm.split_sizes() == {"train": 60, "test": 12, "val": 0}
    assert (dm.mean, dm.classes[0]) == (CIFAR10_MEAN, "c0")
    # R, G, B planes in that order; files concatenated in order (image 12 is file 2's first image)
    for i in (0, 12):
        assert dm.train.images[i, :, 5, 9].tolist() == [255, 7, 0]
    assert dm.train.labels[:12].tolist() == [i % 10 for i in range(12)]
    # root naming the folder itself; a relative root with $VARS resolved against the working directory
    direct = load_data(_cfg("cifar10", root=str(cifar_root / "cifar-10-batches-py"), val_split=0))
    assert torch.equal(direct.train.images, dm.train.images)
    monkeypatch.chdir(cifar_root.parent)
    monkeypatch.setenv("CIFAR_DIR", cifar_root.name)
    rel = load_data(_cfg("cifar10", root="$CIFAR_DIR", val_split=0))
    assert torch.equal(rel.test.labels, dm.test.labels)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-100-python", n_per_file=150, cifar100=True)
    dm = load_data(_cfg("cifar100", root=str(tmp_path), val_split=0))
    assert dm.num_classes == 100 and dm.split_sizes()["train"] == 150
    assert dm.train.labels.tolist() == [i % 100 for i in range(150)]


@pytest.mark.skipif(not REAL_SUBSET.is_dir(), reason="real CIFAR-10 subset not present")
def test_real_cifar10_subset() -> None:
    dm = load_data(_cfg("cifar10", root=str(REAL_SUBSET)))
    sizes = dm.split_sizes()
    assert sizes["train"] + sizes["val"] == 5170 and sizes["test"] == 1017
    assert sizes["val"] == round(5170 * 0.1)
    assert dm.num_classes == 10 and set(dm.test.labels.tolist()) == set(range(10))
    assert dm.classes[0] == "airplane"
    # real photos: normalized with the CIFAR-10 statistics the batches are roughly centred
    x = torch.cat([b for b, _ in dm.eval_batches("test")])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.2


def test_cifar_missing_folder_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_data(_cfg("cifar10", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data.download: true" in msg and "\n" not in msg


def test_cifar_incomplete_folder_is_user_error(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError) as err:
        load_data(_cfg("cifar10", root=str(cifar_root)))
    msg = str(err.value)
    assert "data_batch_3" in msg and str(cifar_root / "cifar-10-batches-py") in msg and "data.download" in msg


def test_cifar_corrupt_file_is_user_error(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test_batch"):
        load_data(_cfg("cifar10", root=str(cifar_root)))


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        _write_cifar(Path(root) / "cifar-10-batches-py", n_per_file=4)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    dm = load_data(_cfg("cifar10", root=str(tmp_path / "dl"), download=True, val_split=0))
    assert calls == [(str(tmp_path / "dl"), True)]
    assert dm.split_sizes()["train"] == 20


# --------------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_splits_and_batches(imagefolder_root: Path) -> None:
    dm = load_data(_cfg("imagefolder", root=str(imagefolder_root), image_size=32, workers=0, val_split=0.25))
    assert dm.split_sizes() == {"train": 9, "val": 3, "test": 4}
    assert dm.classes == ("cat", "dog") and dm.mean == IMAGENET_MEAN
    train_idx, val_idx = set(dm.train.indices), set(dm.val.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 12
    batches = dm.train_batches(4, _gen(0))
    got = list(batches)
    assert len(batches) == len(got) == 3 and sum(len(y) for _, y in got) == 9
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in got)
    # evaluation is deterministic (resize + centre crop) and in order
    e1 = torch.cat([x for x, _ in dm.eval_batches("test", batch_size=3)])
    e2 = torch.cat([x for x, _ in dm.eval_batches("test")])
    torch.testing.assert_close(e1, e2)
    assert dm.test_reads == 2
    labels = torch.cat([y for _, y in dm.eval_batches("val")])
    assert labels.tolist() == [dm.val.dataset.targets[i] for i in dm.val.indices]
    assert dm.calibration_batch(5, _gen(0)).shape == (5, 3, 32, 32)


# --------------------------------------------------------------------------------------------------
# augmentation is a function of the generator alone (every method of a seed sees the same batches)


def _one_image_module(kind: str, tmp_path: Path, workers: int = 0) -> DataModule:
    """12 training copies of one random image, so batches differ only by augmentation (and labels by order)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    if kind == "memory":
        x = torch.from_numpy(image).permute(2, 0, 1).contiguous().expand(12, -1, -1, -1).contiguous()
        split = TensorSplit(x, torch.arange(12) % 2, torch.arange(12))
        return DataModule(
            name="one",
            train=split,
            val=split,
            test=split,
            num_classes=2,
            in_chans=3,
            image_size=40,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
        )
    from PIL import Image

    for split, n in (("train", 6), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "one" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(image).save(tmp_path / "one" / split / cls / f"{i}.png")
    return load_data(_cfg("imagefolder", root=str(tmp_path / "one"), image_size=24, workers=workers, val_split=0))


def _batches(dm: DataModule, seed: int, augment: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(dm.train_batches(5, _gen(seed), augment=augment))


@pytest.mark.parametrize(("kind", "workers"), [("memory", 0), ("imagefolder", 0), ("imagefolder", 2)])
def test_augmentation_depends_on_the_generator_only(kind: str, workers: int, tmp_path: Path) -> None:
    dm = _one_image_module(kind, tmp_path, workers)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = _batches(dm, 7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither read into nor advanced
    torch.manual_seed(12345)  # another method of the seed ran in between and used the global RNG
    torch.rand(1000)
    b = _batches(dm, 7)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # bit-identical
    x, y = torch.cat([x for x, _ in a]), torch.cat([y for _, y in a])
    assert len({t.numpy().tobytes() for t in x}) == len(x)  # every visit of the image has its own crop
    # another generator seed: other crops and flips (every training image is the same one)
    x2 = torch.cat([x for x, _ in _batches(dm, 8)])
    assert not any(torch.equal(x[i], x2[i]) for i in range(len(x)))
    # equal generators visit the images in the same order with augmentation off
    plain = _batches(dm, 7, augment=False)
    assert torch.equal(torch.cat([y for _, y in plain]), y)
    assert all(torch.equal(p, plain[0][0][0]) for p in torch.cat([x for x, _ in plain]))


def test_imagefolder_batches_do_not_depend_on_workers(tmp_path: Path) -> None:
    one = _one_image_module("imagefolder", tmp_path, workers=0)
    two = load_data(_cfg("imagefolder", root=str(tmp_path / "one"), image_size=24, workers=2, val_split=0))
    for (x0, y0), (x2, y2) in zip(_batches(one, 3), _batches(two, 3), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    state = torch.get_rng_state()
    two.eval_batches("test")
    list(two.eval_batches("train"))
    two.calibration_batch(3, _gen(0))
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves the global RNG alone too


def test_seeded_crops_follow_torchvision_random_resized_crop() -> None:
    """Crop boxes lie inside the image, with RandomResizedCrop's distribution of area, aspect ratio and place."""
    import random

    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    def stats(boxes: list[tuple[int, int, int, int]], width: int, height: int) -> tuple[float, ...]:
        area = sum(h * w for _, _, h, w in boxes) / len(boxes) / (width * height)
        ratio = sum(w / h for _, _, h, w in boxes) / len(boxes)
        place = sum((t + h / 2) / height + (lft + w / 2) / width for t, lft, h, w in boxes) / len(boxes)
        return area, ratio, place

    for width, height in ((48, 40), (200, 20), (20, 200), (7, 9)):  # wide and tall: mostly the fallback
        rng = random.Random(0)
        ours = [SeededCrops.crop_box(width, height, rng) for _ in range(4000)]
        assert all(
            h > 0 and w > 0 and t + h <= height and lft + w <= width and min(t, lft) >= 0 for t, lft, h, w in ours
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            img = Image.new("RGB", (width, height))
            ref = [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
        for a, b in zip(stats(ours, width, height), stats(ref, width, height), strict=True):
            assert abs(a - b) < 0.03 * max(1.0, abs(b))
    assert SeededCrops.crop_box(48, 40, random.Random(5)) == SeededCrops.crop_box(48, 40, random.Random(5))


def test_imagefolder_missing_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=str(tmp_path / "none" / "train")):
        load_data(_cfg("imagefolder", root=str(tmp_path / "none")))
    with pytest.raises(UserError, match="data.root"):
        load_data(_cfg("imagefolder"))


def test_cifar_reader_refuses_code_in_pickles(tmp_path) -> None:
    """A crafted batch file that would run code on unpickling is refused, and the code does not run."""
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="refusing to load"):
        _read_pickle(path)
    assert not marker.exists()
