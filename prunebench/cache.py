"""Content-hashed cache of dense checkpoints, and atomic, safe checkpoint files.

The dense model of a seed is computed once per (data, model, dense schedule, seed) and reused by every
method of that seed and by later invocations: the key is a hash of exactly the recipe sections that
determine the dense weights. A file lock makes concurrent ``prunebench run`` processes train it once:
the second waits and reuses the first one's file. Files are written atomically (temporary file, fsync,
rename) and read with ``torch.load(weights_only=True)``, so nothing in a checkpoint can run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from prunebench.recipe import Recipe

CACHE_VERSION = 1  # bump when the meaning of a cached dense checkpoint changes


def dense_key(recipe: Recipe, seed: int) -> str:
    """Hash of what determines the dense weights (not the methods, targets or fine-tuning)."""
    data = recipe.data.model_dump(mode="json", exclude={"eval_batch_size", "workers", "download"})
    payload = {
        "v": CACHE_VERSION,
        "data": data,
        "model": recipe.model.model_dump(mode="json"),
        "dense": recipe.dense.model_dump(mode="json"),
        "seed": seed,
        "device_type": "cuda" if recipe.train.device.startswith("cuda") else recipe.train.device,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | Path) -> Any:
    """Load a checkpoint without executing code from it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def workdir(recipe: Recipe) -> Path:
    """The recipe's working folder (dense cache, checkpoints, pruned models)."""
    return Path(os.path.expandvars(recipe.workdir)).expanduser()


def dense_path(recipe: Recipe, seed: int) -> Path:
    return workdir(recipe) / "dense" / f"{recipe.model.name}-{dense_key(recipe, seed)}.pt"


def lock_for(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")
