"""The shared set-up of ``prunebench bench``: synthetic images on the device, fresh models, the two training
loops (prunebench's and a minimal hand-written one), one pruning call and one timed forward pass.

Every figure is measured on one :class:`Workload`, so that the compared variants see the same data, model
and schedule. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from prunebench.commands.bench.config import BenchConfig
from prunebench.data import synthetic_images
from prunebench.datamodule import CIFAR10_MEAN, CIFAR10_STD, Batches, DataModule, TensorSplit
from prunebench.engine import PruneResult, prune_to_target
from prunebench.method import Calibration, PruningMethod
from prunebench.models import create_model
from prunebench.recipe import ModelConfig, PruneConfig, Schedule, TrainOptions
from prunebench.timing import interleaved
from prunebench.train import make_optimizer, prepare_model, resolve_device, to_memory_format, train


class Workload:
    """Data, schedule and training options shared by every figure, and the loops they time."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        n = cfg.batch * cfg.steps
        x, y = synthetic_images(n + cfg.calib_images, 10, 32, seed=0)
        train_split = TensorSplit(x[:n], y[:n], torch.arange(n))
        empty = TensorSplit(x[:0], y[:0], torch.arange(0))
        self.data = DataModule(
            name="synthetic",
            train=train_split.to(self.device),
            val=empty.to(self.device),
            test=empty.to(self.device),
            num_classes=10,
            in_chans=3,
            image_size=32,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            device=self.device,
            augment=True,
            batch_size=cfg.batch,
        )
        self.calib_images = self.data.normalize(x[n:].to(self.device))
        self.sched = Schedule(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
        self.opts = TrainOptions(device=str(self.device))
        self.example = torch.zeros(1, 3, 32, 32, device=self.device)
        self.generator = torch.Generator().manual_seed(0)

    def new_model(self) -> nn.Module:
        """The bench model, freshly initialized with a fixed seed, on the device."""
        torch.manual_seed(0)
        model = create_model(ModelConfig(name=self.cfg.model), num_classes=10)
        return prepare_model(model, self.device, self.opts)

    def epoch(self, _epoch: int = 0) -> Batches:
        """One epoch of augmented training batches from the data module (``steps`` batches)."""
        return self.data.train_batches(self.cfg.batch, self.generator)

    def plain_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The same images, normalized once, un-augmented: what a minimal loop would iterate over."""
        imgs, labels = self.data.train.images, self.data.train.labels
        return [
            (self.data.normalize(imgs[i : i + self.cfg.batch]), labels[i : i + self.cfg.batch])
            for i in range(0, len(labels), self.cfg.batch)
        ]

    def hand_loop(self, model: nn.Module) -> Callable[[], None]:
        """A minimal PyTorch training loop (same precision and memory format as prunebench's on the device)."""
        opt = make_optimizer(model, self.sched)
        loss_fn = nn.CrossEntropyLoss()
        batches = self.plain_batches()
        cuda = self.device.type == "cuda"
        batches = [(to_memory_format(x, self.opts), y) for x, y in batches]

        def run() -> None:
            model.train()
            for x, y in batches:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda and self.opts.amp):
                    loss = loss_fn(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    def pb_loop(
        self, model: nn.Module, method: PruningMethod | None = None, progress: bool = True, steps: int | None = None
    ) -> Callable[[], None]:
        """One epoch of prunebench's :func:`~prunebench.train.train`: ``steps`` steps (default: all of them)."""

        def batches(epoch: int) -> Batches:
            full = self.epoch(epoch)
            if steps is None:
                return full
            return Batches(min(steps, len(full)), lambda: itertools.islice(iter(full), steps))

        def run() -> None:
            with _stderr_to_null():
                train(model, batches, self.sched, method=method, opts=self.opts, desc="bench", quiet=not progress)

        return run

    def hooks_call(self, method: PruningMethod, model: nn.Module) -> Callable[[], None]:
        """One step's worth of the method's hooks: penalty, its backward, after_backward, after_step."""
        params = [p for p in model.parameters() if p.requires_grad]

        def hooks() -> None:
            pen = method.penalty()
            if pen is not None:
                pen.backward()
            method.after_backward()
            method.after_step(self.sched.lr)
            for p in params:
                p.grad = None

        return hooks

    def time(self, fns: dict[str, Callable[[], object]], reps: int | None = None) -> dict[str, list[float]]:
        """:func:`~prunebench.timing.interleaved` with the configured rounds and warm-up."""
        return interleaved(fns, reps or self.cfg.reps, self.cfg.warmup, self.device)

    def calibration(self, dense: nn.Module) -> Calibration:
        """A copy of ``dense`` with the calibration images, for a method that needs them (ThiNet)."""
        return Calibration(copy.deepcopy(dense), list(self.calib_images.split(512)))

    def prune(
        self, dense: nn.Module, method: PruningMethod, calib: Calibration | None, round_to: int | None
    ) -> tuple[nn.Module, PruneResult]:
        """Prune a copy of ``dense`` (the calibration's copy when there is one) to the MACs target."""
        cfg = PruneConfig()
        model = calib.model if calib is not None else copy.deepcopy(dense)
        res = prune_to_target(
            model,
            method,
            self.cfg.target,
            self.example,
            scope=cfg.scope,
            max_layer_ratio=cfg.max_layer_ratio,
            calib=calib,
            round_to=round_to,
        )
        return model, res


def conv_widths(model: nn.Module) -> list[int]:
    """Out-channels of every conv, in module order (what decides the kernels' speed)."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@contextlib.contextmanager
def _stderr_to_null() -> Iterator[None]:
    """The progress bar stays enabled (its cost is part of the loop) but writes nowhere."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield
