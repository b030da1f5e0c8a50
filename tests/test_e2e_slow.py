"""Long end-to-end runs of the shipped recipes (``make test-slow``; excluded from the default run).

They run exactly what the README and the issues promise: the CIFAR-10-subset recipe with one-epoch
stages on the real images, and the full quickstart demo followed by ``prunebench compare --out``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR_SUBSET, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _cells(db: Path, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("prunebench.kind") == "cell"]


@pytest.mark.skipif(not CIFAR_SUBSET.is_dir(), reason="needs ../shared/data/cifar10-subset")
def test_cifar10_subset_recipe_with_one_epoch_stages(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "prunebench",
        "run",
        str(ROOT / "recipes" / "cifar10subset_resnet20.yaml"),
        "-q",
        "-o",
        f"data.root={CIFAR_SUBSET}",
        "-o",
        "dense.epochs=1",
        "-o",
        "sparsity.epochs=1",
        "-o",
        "sparsity.require_pull=false",
        "-o",
        "finetune.epochs=1",
        "-o",
        "seeds=1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = _cells(tmp_path / "mlflow.db", "cifar10subset_resnet20")
    assert len(cells) == 6  # every method at the recipe's target
    assert "sparsity_pull" in proc.stderr  # the 1-epoch stage is too short for the tuned lambdas: warned
    for c in cells:
        assert c.info.status == "FINISHED"
        assert 0 <= c.data.metrics["macs_reduction"] - float(c.data.params["target"]) <= 0.001  # matched budget


def test_quickstart_demo_and_report(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "prunebench", "run", str(recipe), "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "report"
    cmp = subprocess.run(
        [sys.executable, "-m", "prunebench", "compare", "--experiment", "quickstart", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert table  # rows for the dense model and every method
    for png in ("tradeoff.png", "layers.png", "sparsity_norms.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method_label"]: r for r in table["rows"]}
    assert "dense (same epochs)" in rows
    for name in ("oicsr", "group_lasso", "slimming"):  # the shipped lambdas act (make demo's done-when)
        label = next(k for k in rows if k.split("(")[0] == name)
        assert rows[label]["sparsity_zero_pct"] >= 20, rows[label]
