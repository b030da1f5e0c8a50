"""Shared fixtures: every test runs in its own working directory (MLflow store, caches) with few threads."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"

torch.set_num_threads(min(2, os.cpu_count() or 1))
TIERS = ("unit", "integration", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers (docs/architecture.md): a test not marked ``unit`` or ``slow`` is ``integration``; ``gpu`` tests
    skip without CUDA."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder so mlflow.db, .prunebench/ and reports never touch the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


TINY_RECIPE: dict = {
    "name": "tiny",
    "data": {
        "name": "synthetic",
        "num_samples": 96,
        "image_size": 16,
        "num_classes": 4,
        "val_split": 0.25,
        "batch_size": 32,
        "eval_batch_size": 64,
    },
    "model": {"name": "resnet8_cifar"},
    "dense": {"epochs": 1, "lr": 0.05},
    "sparsity": {"epochs": 1, "lr": 0.01},
    "methods": [{"name": "l1"}],
    "prune": {"target": 0.4, "scope": "internal"},
    "finetune": {"epochs": 1, "lr": 0.01},
    "seeds": 1,
    "measure": {"latency_batch": 8, "warmup": 1, "repeats": 2},
}


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(dict_or_text, name="r.yaml") -> path of a recipe file in the test folder."""

    def write(content: dict | str, name: str = "r.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_recipe() -> dict:
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def one_thread():
    """One torch thread and seed 0 for the test (engine and budget tests compare exact figures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def side_by_side(tmp_path: Path):
    """side_by_side(args, n=2) -> [(process, output)]: ``python -m prunebench ARGS`` started n times at once in
    the test folder (one torch thread each, stderr with stdout), waited for (several workers on one store)."""

    def start(args: list[str], n: int = 2) -> list[tuple[subprocess.Popen, str]]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "prunebench", *args]
        procs = [
            subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(n)
        ]
        return [(p, p.communicate(timeout=600)[0]) for p in procs]

    return start
