"""Pretrained weights: refuse in seconds a model whose weights are neither cached nor downloadable.

Offline, ``timm.create_model(..., pretrained=True)`` gives up only after the Hugging Face Hub's and urllib's
own timeouts and retries (about a minute here). :func:`check_available` finds where timm would read the
weights (the Hub repo of the model's pretrained config, else its URL), accepts them at once when that file
is in the local cache, and otherwise tries one TCP connection to the host with a short timeout. Behind a
proxy (``HTTPS_PROXY``) the connection is left to the download itself. README ("Recipes", the ImageNet recipe) and
recipes/imagenet_resnet50.yaml say how to provide weights on a machine without network.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from timm.models import get_pretrained_cfg

from prunebench.errors import UserError, one_line
from prunebench.recipe import ModelConfig

CONNECT_TIMEOUT_S = 5
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hub repo, in that order


def check_available(model: ModelConfig) -> None:
    """Raise :class:`UserError` when ``model`` asks for pretrained weights that are not in the local cache and
    whose host does not answer within :data:`CONNECT_TIMEOUT_S`; return at once otherwise."""
    if not model.pretrained:
        return
    name, cache_dir = model.name, model.kwargs.get("cache_dir")
    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.file or cfg.state_dict is not None:  # timm says itself what is wrong, or reads a file
        return
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@", 1)[0]
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        cached = (huggingface_hub.try_to_load_from_cache(repo, f, cache_dir=cache_dir) for f in files)
        if any(isinstance(path, str) for path in cached):
            return
        where, url = f"the Hugging Face Hub ({repo})", hub_constants.ENDPOINT
        if hub_constants.HF_HUB_OFFLINE:
            raise UserError(_missing(name, where, "HF_HUB_OFFLINE is set"))
    elif cfg.url:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return
        where, url = cfg.url, cfg.url
    else:
        return
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or urllib.request.getproxies().get(parts.scheme):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as exc:
        raise UserError(
            _missing(name, where, f"{parts.hostname}:{port} does not answer: {one_line(exc, 80)}")
        ) from None


def _missing(name: str, where: str, why: str) -> str:
    return (
        f"model.pretrained: the weights of {name!r} are not in the local cache and cannot be downloaded from "
        f"{where} ({why}); download them once on a machine with network (timm.create_model({name!r}, "
        "pretrained=True) fills the cache: HF_HOME, or TORCH_HOME for URLs) and copy the cache here, or set "
        "model.pretrained: false and give dense.checkpoint (a state_dict) or dense.epochs"
    )
