"""Save a pruned model so that it loads without pickled classes.

A pruned model has the dense model's classes with smaller tensors and smaller channel attributes
(``out_channels``, ``num_features``, ...). torch-pruning's ``tp.state_dict`` keeps those attributes but
stores every module's ``__dict__`` -- submodules included -- so reading it back needs
``weights_only=False``, i.e. unpickling arbitrary classes. Here the file holds only tensors and plain
values: the state dict plus, per module, its plain instance attributes (ints, floats, strings, bools and
tuples or lists of them). :func:`load_pruned` rebuilds the dense model from its constructor (the
caller's job), writes the attributes back, resizes every parameter and buffer to the saved shape and
loads the weights with :func:`prunebench.files.load_torch` (``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench.errors import UserError
from prunebench.files import atomic_save, load_torch

FORMAT = "prunebench.pruned/1"
_PLAIN = (int, float, bool, str, type(None))


def pruned_payload(model: nn.Module) -> dict[str, Any]:
    """What :func:`save_pruned` writes, as a dict (training checkpoints add their own keys to it)."""
    return {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "attributes": {name: _plain_attributes(m) for name, m in model.named_modules()},
    }


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights and per-module shape attributes to ``path`` (no pickled classes)."""
    atomic_save(pruned_payload(model), path)


def load_pruned(path: str | Path, dense_model: nn.Module) -> nn.Module:
    """Reshape ``dense_model`` (a fresh instance of the architecture that was pruned) into the saved
    pruned model and load its weights; returns ``dense_model``, changed in place."""
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a pruned model saved by prunebench (no {FORMAT!r} payload); pass a file written by save_pruned"
        )
    return apply_pruned(payload, dense_model)


def apply_pruned(payload: dict[str, Any], dense_model: nn.Module) -> nn.Module:
    """Reshape ``dense_model`` into the model :func:`pruned_payload` described and load its weights, in place
    (what :func:`load_pruned` does with a file; the other ranks of a ``torchrun`` launch take rank 0's cut
    this way). Returns ``dense_model``."""
    modules = dict(dense_model.named_modules())
    for name, attrs in payload["attributes"].items():
        if name in modules:
            for key, value in attrs.items():
                setattr(modules[name], key, value)
    state = payload["state_dict"]
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        _resize(modules[owner], leaf, tensor)
    dense_model.load_state_dict(state, strict=True)
    return dense_model


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Public instance attributes holding plain values (channel counts, groups, shapes, flags); not the
    train/eval flag, which stays the caller's."""
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and (isinstance(v, _PLAIN) or _is_plain_sequence(v))
    }


def _is_plain_sequence(value: object) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(x, _PLAIN) for x in value)


def _resize(module: nn.Module, name: str, saved: torch.Tensor) -> None:
    """Replace a parameter or buffer by an empty tensor of the saved shape (values come from the state dict)."""
    current = getattr(module, name)
    if current is not None and current.shape == saved.shape:
        return
    fresh = torch.empty(saved.shape, dtype=saved.dtype, device=current.device if current is not None else "cpu")
    if name in module._parameters:
        requires_grad = current.requires_grad if current is not None else True
        module._parameters[name] = nn.Parameter(fresh, requires_grad=requires_grad)
    else:
        module._buffers[name] = fresh
