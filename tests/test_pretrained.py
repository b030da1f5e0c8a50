"""``model.pretrained: true`` without network: weights in timm's cache (the Hugging Face Hub layout) are used
offline, and weights neither cached nor downloadable stop ``prunebench run`` in seconds with one exit-2 line
naming the model and how to provide them (prunebench/weights.py). Each case runs in its own process: the
Hub's settings (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE) are read when it is imported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

MODEL = "resnet18.a1_in1k"
REPO = "timm/resnet18.a1_in1k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "http"))}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), **extra}


def _recipe(write_recipe, tiny_recipe: dict) -> Path:
    tiny_recipe["model"] = {"name": MODEL, "pretrained": True}
    tiny_recipe["dense"] = {"epochs": 0}
    tiny_recipe["data"]["image_size"] = 32
    return write_recipe(tiny_recipe)


def test_weights_neither_cached_nor_reachable_are_refused_in_seconds(write_recipe, tiny_recipe, tmp_path) -> None:
    path = _recipe(write_recipe, tiny_recipe)
    env = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")  # a hub that does not answer
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "prunebench", "run", str(path), "-q"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert MODEL in err and "not in the local cache" in err and "dense.checkpoint" in err, err
    assert time.monotonic() - t0 < 45  # the hub's own retries took about a minute
    assert not Path("mlflow.db").exists()  # refused before any run


def test_weights_in_the_hub_cache_are_used_offline(tmp_path: Path) -> None:
    """A checkpoint placed in the Hub cache layout (what a download leaves) is what the model starts from."""
    snapshot = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "snapshots" / ("0" * 40)
    weights.mkdir(parents=True)
    torch.manual_seed(1)
    state = timm.create_model(MODEL, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights / "model.safetensors"))
    torch.save(state["conv1.weight"], tmp_path / "expected.pt")

    code = (
        "import sys, torch; from prunebench.models import create_model; from prunebench.recipe import ModelConfig\n"
        f"m = create_model(ModelConfig(name={MODEL!r}, pretrained=True), num_classes=10)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "sys.exit(0 if torch.equal(m.conv1.weight, expected) and m.fc.out_features == 10 else 1)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(tmp_path, HF_HUB_OFFLINE="1"), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_hub_offline_without_the_weights_says_so(write_recipe, tiny_recipe, tmp_path) -> None:
    path = _recipe(write_recipe, tiny_recipe)
    proc = subprocess.run(
        [sys.executable, "-m", "prunebench", "run", str(path), "-q"],
        env=_env(tmp_path, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
