"""What one ``prunebench bench`` run measures: :class:`BenchConfig` (``--quick`` shrinks every count).

See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    """Model, batch and repetition counts of one bench run (``quick``: the smoke-test settings)."""

    model: str = "resnet56_cifar"
    batch: int = 128
    steps: int = 3  # training steps per timed repetition
    reps: int = 5  # timed repetitions (after ``warmup``)
    warmup: int = 1
    latency_reps: int = 9
    calib_images: int = 256
    target: float = 0.5
    round_to: int | str = "auto"  # the main plan's prune.round_to: auto (the device's vector width) or a multiple
    device: str = "cpu"
    quick: bool = False
    profile: bool = True
    compile: bool = True  # time torch.compile'd models too (skipped by --quick)

    @classmethod
    def quick_config(cls, device: str, profile: bool, round_to: int | str = "auto") -> BenchConfig:
        return cls(
            model="resnet8_cifar",
            batch=16,
            steps=2,
            reps=2,
            warmup=1,
            latency_reps=2,
            calib_images=32,
            round_to=round_to,
            device=device,
            quick=True,
            profile=profile,
            compile=False,
        )
