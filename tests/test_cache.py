"""Tests of prunebench.cache keys: what makes two recipes share a cached dense model."""

from __future__ import annotations

import torch

from prunebench.cache import dense_key
from prunebench.recipe import Recipe


def _key(tiny_recipe: dict, device: str, seed: int = 0) -> str:
    return dense_key(Recipe.model_validate({**tiny_recipe, "train": {"device": device}}), seed)


def test_dense_key_holds_the_resolved_device_type(tiny_recipe: dict) -> None:
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert _key(tiny_recipe, "auto") == _key(tiny_recipe, here)  # auto on a CPU machine reuses a cpu model
    assert _key(tiny_recipe, "cuda:1") == _key(tiny_recipe, "cuda")  # the device type, not the index
    assert _key(tiny_recipe, "cpu") != _key(tiny_recipe, "cuda")  # never shared between CPU and CUDA
    assert _key(tiny_recipe, "cpu") != _key(tiny_recipe, "cpu", seed=1)
