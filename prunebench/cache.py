"""What ``prunebench run`` keeps on disk under the recipe's ``workdir``, and how it is written and read.

* ``dense/`` -- the dense model of a seed, trained once per (data, model, dense schedule, seed) and reused
  by every method of that seed and by later invocations: the key is a hash of exactly the recipe sections
  that determine the dense weights. A file lock makes concurrent ``prunebench run`` processes train it
  once: the second waits and reuses the first one's file. ``<name>.partial.pt`` is the dense training's
  checkpoint of its last finished epoch (``--resume`` continues from it).
* ``checkpoints/<cell run id>/last.pt`` -- the checkpoint of an unfinished cell (see
  :class:`TrainingCheckpoint`); removed once the cell is FINISHED.
* ``pruned/`` -- the final pruned models.

Every file is written with :func:`prunebench.files.atomic_save` and read with
:func:`prunebench.files.load_cached` (a corrupt cache entry is moved aside and recomputed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunebench.errors import UserError
from prunebench.files import atomic_save, load_cached
from prunebench.recipe import Recipe
from prunebench.serialize import load_pruned, pruned_payload
from prunebench.train import resolve_device

CACHE_VERSION = 2  # bump when the meaning of a cached dense checkpoint changes (2: init drawn after seeding)
CHECKPOINT_VERSION = 1


# -- keys --------------------------------------------------------------------------------------------


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dense_key(recipe: Recipe, seed: int) -> str:
    """Hash of what determines the dense weights (not the methods, targets or fine-tuning).

    The device enters as the type ``train.device`` resolves to (``auto`` -> ``cuda`` or ``cpu``,
    ``cuda:1`` -> ``cuda``): a dense model trained under ``auto`` on a CPU machine is the one a recipe
    saying ``cpu`` reuses, and CPU and CUDA never share one.
    """
    data = recipe.data.model_dump(mode="json", exclude={"eval_batch_size", "workers", "download"})
    payload = {
        "v": CACHE_VERSION,
        "data": data,
        "model": recipe.model.model_dump(mode="json"),
        "dense": recipe.dense.model_dump(mode="json"),
        "seed": seed,
        "device_type": resolve_device(recipe.train.device).type,
    }
    return _hash(payload)


def recipe_key(recipe: Recipe) -> str:
    """Hash of the resolved recipe minus where it is logged: ``--resume`` reopens a parent run with this key."""
    # sparsity.require_pull only checks the recipe: turning it on must not orphan the runs --resume finds
    return _hash(
        {
            "v": CHECKPOINT_VERSION,
            **recipe.model_dump(mode="json", exclude={"tracking": True, "sparsity": {"require_pull"}}),
        }
    )


def cell_key(recipe_hash: str, spec: dict[str, Any], seed: int, target: float) -> str:
    """Identity of one cell of a grid (tagged on its MLflow run, checked against its checkpoint)."""
    return _hash({"recipe": recipe_hash, "method": spec, "seed": seed, "target": target})


# -- paths -------------------------------------------------------------------------------------------


def workdir(recipe: Recipe) -> Path:
    """The recipe's working folder (dense cache, checkpoints, pruned models)."""
    return Path(os.path.expandvars(recipe.workdir)).expanduser()


def dense_path(recipe: Recipe, seed: int) -> Path:
    return workdir(recipe) / "dense" / f"{recipe.model.name}-{dense_key(recipe, seed)}.pt"


def dense_partial_path(recipe: Recipe, seed: int) -> Path:
    """The dense training's checkpoint (last finished epoch) while it is not finished."""
    return dense_path(recipe, seed).with_suffix(".partial.pt")


def cell_checkpoint_path(recipe: Recipe, run_id: str) -> Path:
    return workdir(recipe) / "checkpoints" / run_id / "last.pt"


def check_writable(folder: Path, what: str = "workdir") -> None:
    """Fail now, with a :class:`UserError`, if files cannot be created under ``folder``.

    Creates nothing that stays: the probe is a temporary file in the nearest existing ancestor, so a
    refused run leaves no folder behind.
    """
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {str(folder)!r} cannot be created: {str(probe)!r} is a file; set {what} to a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(
            f"{what} {str(folder)!r} is not writable ({exc.strerror or exc}); set {what} to a writable folder"
        ) from None


# -- RNG state -----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as values ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the random draws then continue exactly as before)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- training checkpoints ---------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """Where a training run stood at the end of an epoch (or of a pruning step), enough to continue it
    so that the rest of the run is bit-for-bit what it would have been on the CPU.

    On disk it is a pruned-model file of :mod:`prunebench.serialize` (weights plus the per-module channel
    counts, so a pruned architecture is rebuilt from the dense constructor) with these fields added. The
    learning rate needs no state: it is a pure function of the schedule and the epoch, and so is the
    data order (``Context.batches_for``).
    """

    kind: str  # "dense" or "cell"
    key: str  # dense key or cell key: a checkpoint is only used for what it was written for
    phase: int  # index of the cell's phase (sparsity, prune steps, fine-tuning); 0 for dense training
    stage: str
    epoch: int  # last finished epoch of the phase; -1 for a pruning step
    step: int  # global epoch of the cell reached (MLflow step)
    run_id: str | None = None
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    def save(self, model: nn.Module, path: Path) -> None:
        """Write the checkpoint (model, optimizer and RNG states) atomically to ``path``."""
        payload = pruned_payload(model)
        payload["checkpoint"] = {
            "version": CHECKPOINT_VERSION,
            "kind": self.kind,
            "key": self.key,
            "phase": self.phase,
            "stage": self.stage,
            "epoch": self.epoch,
            "step": self.step,
            "run_id": self.run_id,
        }
        payload["optimizer"] = self.optimizer
        payload["rng"] = self.rng if self.rng is not None else rng_state()
        atomic_save(payload, path)

    @classmethod
    def read(cls, path: Path) -> TrainingCheckpoint | None:
        """The checkpoint at ``path`` without its weights, or ``None`` when there is none (or an old one)."""
        if not path.is_file():
            return None
        payload = load_cached(path)  # unreadable: moved aside, and the training starts over
        info = payload.get("checkpoint") if isinstance(payload, dict) else None
        if not isinstance(info, dict) or info.get("version") != CHECKPOINT_VERSION:
            return None
        fields = {k: info[k] for k in ("kind", "key", "phase", "stage", "epoch", "step", "run_id")}
        return cls(**fields, optimizer=payload.get("optimizer"), rng=payload.get("rng"))

    @staticmethod
    def load_model(path: Path, fresh: nn.Module) -> nn.Module:
        """Reshape ``fresh`` (a new instance of the dense architecture) into the checkpointed model, in place.

        Resized tensors are created in the default memory format: call ``prepare_model`` again.
        """
        return load_pruned(path, fresh)

    def describe(self) -> str:
        where = f"{self.stage} epoch {self.epoch + 1}" if self.epoch >= 0 else f"{self.stage} (done)"
        return f"checkpoint after {where}"
