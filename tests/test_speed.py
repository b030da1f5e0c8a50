"""Speed figures of ``prunebench run`` end to end (issue 13): every cell times its pruned model against the
dense one in the same rounds, eager and in ONNX Runtime; the exported model computes what the pruned model
does; a model that does not export keeps its cell FINISHED; a disturbed measurement is reported as noisy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from timm.models import register_model
from torch import nn

from prunebench.cli import main
from prunebench.deploy import OrtModel, check_outputs
from prunebench.serialize import load_pruned
from prunebench.tracking import schema


class _SvdTail(nn.Module):
    """resnet8_cifar whose logits pass through an SVD (an operator no ONNX exporter supports)."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.net = timm.create_model("resnet8_cifar", **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y + 0.0 * torch.linalg.svdvals(y).sum()


@register_model  # no "cifar" in the name: tests/test_models.py lists the CIFAR models by that pattern
def svd_tail_resnet8(pretrained: bool = False, **kwargs) -> nn.Module:
    return _SvdTail(**kwargs)


def _cells(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client.search_runs([exp.experiment_id], f"tags.`{schema.KIND_TAG}` = '{schema.CELL_KIND}'")


def _recipe(tiny_recipe: dict, tmp_path: Path, **changes) -> tuple[dict, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny_recipe.update(workdir=str(tmp_path / "work"), tracking={"uri": uri}, **changes)
    return tiny_recipe, uri


def test_every_cell_carries_paired_and_onnx_figures(write_recipe, tiny_recipe, tmp_path) -> None:
    recipe, uri = _recipe(tiny_recipe, tmp_path)
    assert main(["run", str(write_recipe(recipe)), "-q"]) == 0
    (cell,) = _cells(uri, "tiny")
    m = cell.data.metrics
    for key in ("speedup", "speedup_spread", "speedup_b1", "onnx_latency_ms", "onnx_latency_ms_batch", "onnx_speedup"):
        assert m[key] > 0 or (key.endswith("spread") and m[key] == 0), key
    assert m["dense_latency_ms_batch"] / m["latency_ms_batch"] == pytest.approx(m["speedup"], rel=0.5)
    assert schema.ONNX_ERROR_TAG not in cell.data.tags
    client = mlflow.MlflowClient(uri)
    (onnx_file,) = client.list_artifacts(cell.info.run_id, schema.ONNX_ARTIFACT_DIR)
    (pt_file,) = client.list_artifacts(cell.info.run_id, schema.MODEL_ARTIFACT_DIR)
    onnx_path = client.download_artifacts(cell.info.run_id, onnx_file.path, str(tmp_path / "dl"))
    pt_path = client.download_artifacts(cell.info.run_id, pt_file.path, str(tmp_path / "dl"))
    pruned = load_pruned(pt_path, timm.create_model("resnet8_cifar", num_classes=4)).eval()
    assert check_outputs(pruned, OrtModel(onnx_path), (3, 16, 16), batch=3) < 1e-3  # the file is that model


def test_a_model_that_does_not_export_keeps_its_cell_finished(write_recipe, tiny_recipe, tmp_path, capsys) -> None:
    recipe, uri = _recipe(tiny_recipe, tmp_path, model={"name": "svd_tail_resnet8"})
    assert main(["run", str(write_recipe(recipe))]) == 0
    (cell,) = _cells(uri, "tiny")
    assert cell.info.status == "FINISHED" and cell.data.metrics["speedup"] > 0
    assert not any(k.startswith("onnx_") for k in cell.data.metrics)
    assert "svd" in cell.data.tags[schema.ONNX_ERROR_TAG].lower()
    assert "no ONNX Runtime figures" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", uri, "--experiment", "tiny"]) == 0
    assert "have no ONNX Runtime figures" in capsys.readouterr().out


def test_a_disturbed_run_reports_its_speedup_as_noisy(write_recipe, tiny_recipe, tmp_path, capsys) -> None:
    """Three busy-looping processes on the cores while the cell is timed: the rounds disagree."""
    recipe, uri = _recipe(
        tiny_recipe, tmp_path, measure={"latency_batch": 8, "warmup": 1, "repeats": 15, "onnx": False}
    )
    path = write_recipe(recipe)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        assert main(["run", str(path)]) == 0
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    (cell,) = _cells(uri, "tiny")
    spreads = cell.data.metrics["speedup_spread"], cell.data.metrics["speedup_b1_spread"]
    assert max(spreads) > 0.05, spreads
    assert "noisy" in capsys.readouterr().out
