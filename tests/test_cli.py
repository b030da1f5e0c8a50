"""End-to-end CLI tests on tiny recipes: exit codes, MLflow contents, determinism, the README plugin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from prunebench.cli import main

CHILD_PARAMS = {"method", "method_label", "seed", "target", "model", "dataset"}
CHILD_METRICS = {
    "test_top1",
    "val_top1",
    "dense_test_top1",
    "macs",
    "macs_conv_fc",
    "macs_dense",
    "macs_reduction",
    "params",
    "params_reduction",
    "latency_ms",
    "speedup",
}


def _runs(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    client = mlflow.MlflowClient()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("prunebench.kind") == "parent"]
    cells = [r for r in runs if r.data.tags.get("prunebench.kind") == "cell"]
    return client, parents, cells


def test_run_end_to_end_logs_the_schema(write_recipe, tiny_recipe, capsys) -> None:
    tiny_recipe["methods"] = [{"name": "l1"}, {"name": "random"}]
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
    out = capsys.readouterr().out
    assert "l1" in out and "random" in out and "MLflow" in out

    client, parents, cells = _runs(f"sqlite:///{Path.cwd()}/mlflow.db", "tiny")
    assert len(parents) == 1 and len(cells) == 2
    for cell in cells:
        assert cell.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert cell.info.status == "FINISHED"
        assert set(cell.data.params) >= CHILD_PARAMS
        assert set(cell.data.metrics) >= CHILD_METRICS
        m = cell.data.metrics
        assert abs(m["macs_reduction"] - 0.4) <= 0.02, m["macs_reduction"]
        assert m["macs"] < m["macs_dense"] and m["params"] < m["params_dense"]
        assert 0 <= m["test_top1"] <= 1
        history = client.get_metric_history(cell.info.run_id, "train_loss")
        assert [h.step for h in history] == [0, 1]  # 1 sparsity + 1 fine-tune epoch
        artifacts = {a.path for a in client.list_artifacts(cell.info.run_id)}
        assert {"layers.csv", "model"} <= artifacts
        layers = Path(client.download_artifacts(cell.info.run_id, "layers.csv")).read_text().splitlines()
        assert layers[0].startswith("layer,type,in_before,out_before,in_after,out_after")
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "mlflow.source.git.commit" in parents[0].data.tags or "version.torch" in parents[0].data.tags
    assert parents[0].data.tags["host_allocator"] != "system default"  # the command line set it (hostmem)


def test_same_seed_same_metrics(write_recipe, tiny_recipe, tmp_path) -> None:
    """Determinism on CPU: the same recipe and seed give the same metrics (fresh dense cache each time)."""
    results = []
    for i in range(2):
        tiny_recipe["workdir"] = str(tmp_path / f"work{i}")
        tiny_recipe["tracking"] = {"uri": f"sqlite:///{tmp_path}/m{i}.db"}
        assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
        _, _, cells = _runs(f"sqlite:///{tmp_path}/m{i}.db", "tiny")
        results.append({k: v for k, v in cells[0].data.metrics.items() if "latency" not in k and "speedup" not in k})
    assert results[0] == results[1]


def test_dense_model_is_cached_across_invocations(write_recipe, tiny_recipe, capsys) -> None:
    path = str(write_recipe(tiny_recipe))
    assert main(["run", path, "-q"]) == 0
    assert main(["run", path, "-o", "methods=[{name: random}]"]) == 0
    assert "dense model from cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "missing.yaml"], "does not exist"),
        (["run", "RECIPE", "-o", "prune.target=2"], "prune.target"),
        (["run", "RECIPE", "-o", "methods=[{name: oicsrr}]"], "unknown method 'oicsrr'"),
        (["run", "RECIPE", "-o", "model.name=resnet21_cifar"], "unknown model"),
        (["run", "RECIPE", "-o", "data={name: cifar10, root: nowhere}"], "nowhere"),
    ],
)
def test_user_errors_exit_2_without_traceback_or_run(write_recipe, tiny_recipe, args, needle, tmp_path) -> None:
    recipe = str(write_recipe(tiny_recipe))
    args = [recipe if a == "RECIPE" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "prunebench", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if "model" in needle or "nowhere" in needle:
        # the run was refused before training: no cell was logged
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        exp = mlflow.get_experiment_by_name("tiny")
        assert exp is None or not mlflow.MlflowClient().search_runs([exp.experiment_id])
    else:
        assert not (tmp_path / "mlflow.db").exists()


def test_dry_run_prints_resolved_recipe(write_recipe, tiny_recipe, capsys) -> None:
    assert main(["run", str(write_recipe(tiny_recipe)), "--dry-run", "-o", "finetune.epochs=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["finetune"]["epochs"] == 3 and resolved["model"]["name"] == "resnet8_cifar"


def test_methods_and_models_commands(capsys) -> None:
    assert main(["methods"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"oicsr", "group_lasso", "slimming", "thinet", "l1", "random"} <= listed
    assert main(["models", "*cifar*"]) == 0
    assert "resnet56_cifar" in capsys.readouterr().out
    assert main(["models", "no_such_model_*"]) == 2


def test_readme_plugin_example_runs(write_recipe, tiny_recipe, tmp_path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plugin-example.*?-->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its plugin example"
    code = block.group(1)
    assert 20 <= len(code.strip().splitlines()) <= 40  # "about 30 lines"
    (tmp_path / "my_method.py").write_text(code)
    tiny_recipe["plugins"] = ["my_method.py"]
    tiny_recipe["methods"] = [{"name": "filter_l2", "lambda": 1e-3}]
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
    _, _, cells = _runs(f"sqlite:///{Path.cwd()}/mlflow.db", "tiny")
    assert cells[0].data.params["method"] == "filter_l2" and cells[0].data.params["method.lambda"] == "0.001"
    client = __import__("mlflow").MlflowClient(f"sqlite:///{Path.cwd()}/mlflow.db")
    penalties = [m.value for m in client.get_metric_history(cells[0].info.run_id, "train_penalty")]
    assert penalties[0] > 0 and penalties[-1] == 0  # sparsity training is penalized, fine-tuning is not
