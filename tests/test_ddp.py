"""``torchrun --nproc-per-node 2 -m prunebench run``: one cell trained by two CPU processes (gloo) under DDP,
logged once by rank 0 (issue 12, section 1), and the pieces of :mod:`prunebench.distributed` alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from prunebench.cli import main
from prunebench.datamodule import Batches
from prunebench.distributed import broadcast_object, is_main, shard, shard_positions, world_size
from prunebench.tracking import schema


@pytest.mark.unit
def test_shard_positions_keep_the_seeded_order_and_even_counts() -> None:
    assert [shard_positions(3, r, 2) for r in range(2)] == [[0, 2], [1, 0]]  # rank 1 wraps to the first batch
    assert [shard_positions(4, r, 2) for r in range(2)] == [[0, 2], [1, 3]]
    for n, world in [(5, 3), (7, 4), (9, 2), (2, 2)]:
        shards = [shard_positions(n, r, world) for r in range(world)]
        assert {len(s) for s in shards} == {-(-n // world)}  # every rank makes the same number of steps
        steps = list(zip(*shards, strict=True))  # one optimizer step = one batch from every rank
        assert [i for step in steps for i in step][:n] == list(range(n))  # the single-process order, all of it


@pytest.mark.unit
def test_single_process_is_a_no_op() -> None:
    batches = Batches(3, lambda: iter([]))
    assert world_size() == 1 and is_main()
    assert shard(batches) is batches
    assert broadcast_object({"a": 1}) == {"a": 1}


def test_sync_batchnorm_without_torchrun_exits_2(write_recipe, tiny_recipe, capsys) -> None:
    tiny_recipe["train"] = {"sync_batchnorm": True}
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


def test_torchrun_two_processes(tmp_path: Path, tiny_recipe: dict) -> None:
    db = tmp_path / "mlflow.db"
    recipe = {
        **tiny_recipe,
        "dense_control": False,
        "measure": {"onnx": False, "repeats": 1, "warmup": 0, "latency_batch": 8},
        "tracking": {"uri": f"sqlite:///{db}"},
        "workdir": str(tmp_path / "work"),
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "prunebench", "run", str(path), "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tiny")
    every = client.search_runs([exp.experiment_id])
    parents = [r for r in every if r.data.tags.get(schema.KIND_TAG) == schema.PARENT_KIND]
    cells = [r for r in every if r.data.tags.get(schema.KIND_TAG) == schema.CELL_KIND]
    assert len(parents) == 1 and len(every) == 1 + len(cells)
    assert sorted(r.data.params["target"] for r in cells) == ["0.4"]  # 1 method x 1 seed x 1 target, once
    for run in cells:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params[schema.WORLD_SIZE_PARAM] == "2"
        assert run.data.params[schema.GLOBAL_BATCH_PARAM] == str(2 * recipe["data"]["batch_size"])
        assert 0.0 <= run.data.metrics["test_top1"] <= 1.0 and run.data.metrics["macs_reduction"] >= 0.4
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(history) == 2  # sparsity and fine-tuning epochs, each logged by rank 0 alone
    assert len(list((tmp_path / "work" / "dense").glob("*.pt"))) == 1  # the dense cache, written once
