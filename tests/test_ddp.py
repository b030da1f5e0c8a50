"""``torchrun --nproc-per-node 2 -m prunebench run``: one cell trained by two CPU processes (gloo) under DDP,
logged once by rank 0 (issue 12, section 1), and the pieces of :mod:`prunebench.distributed` alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prunebench.cli import main
from prunebench.data import load_data
from prunebench.datamodule import Batches
from prunebench.distributed import broadcast_object, is_main, shard, shard_positions, world_size
from prunebench.recipe import DataConfig
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


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.unit
@pytest.mark.parametrize("source", ["synthetic", "imagefolder"])
def test_a_shard_makes_the_same_batches_as_the_whole_epoch(source: str, tmp_path: Path) -> None:
    """A rank's batches (made alone by the data module's ``select``) are the epoch's batches at its positions."""
    if source == "synthetic":
        cfg = DataConfig(name="synthetic", num_samples=80, image_size=8, num_classes=4, batch_size=16)
    else:
        cfg = DataConfig(name="imagefolder", root=str(_folder(tmp_path)), image_size=16, workers=0, batch_size=3)
    dm = load_data(cfg)
    epoch = dm.train_batches(None, torch.Generator().manual_seed(7))
    whole = list(epoch)
    assert epoch.select is not None and len(whole) >= 3
    for positions in ([len(whole) - 1, 0], [1], [0, 2]):
        part = epoch.select(positions)
        assert len(part) == len(positions)
        got = list(part)
        assert len(got) == len(positions)
        for (x, y), p in zip(got, positions, strict=True):
            assert torch.equal(x, whole[p][0]) and torch.equal(y, whole[p][1])


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


def _torchrun(folder: Path, recipe: dict, *args: str, quiet: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m prunebench run [-q]`` on ``recipe`` (written into ``folder``)."""
    path = folder / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    clean = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, "-m", "prunebench", "run", str(path), *args, *(["-q"] if quiet else [])],
        cwd=folder,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _recipe(folder: Path, tiny: dict, **changes) -> dict:
    return {
        **tiny,
        "dense_control": False,
        "measure": {"onnx": False, "repeats": 1, "warmup": 0, "latency_batch": 8},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
        "workdir": str(folder / "work"),
        **changes,
    }


def _runs(folder: Path, experiment: str = "tiny") -> tuple[mlflow.MlflowClient, list, list]:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in every if r.data.tags.get(schema.KIND_TAG) == schema.PARENT_KIND]
    cells = [r for r in every if r.data.tags.get(schema.KIND_TAG) == schema.CELL_KIND]
    assert len(every) == len(parents) + len(cells)
    return client, parents, cells


def test_torchrun_two_processes(tmp_path: Path, tiny_recipe: dict) -> None:
    """One cell end to end under torchrun on an ImageFolder read by DataLoader workers (the ImageNet recipe's
    set-up: train/ and val/ folders, a shard of every epoch per rank); the other tests here run in-memory data."""
    recipe = _recipe(tmp_path, tiny_recipe)
    folder = _folder(tmp_path / "images")
    recipe["data"] = {"name": "imagefolder", "root": str(folder), "image_size": 16, "workers": 1}
    recipe["data"] |= {"batch_size": 4, "eval_batch_size": 8, "val_split": 0.2}
    proc = _torchrun(tmp_path, recipe, quiet=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("seed 0: dense test top-1") == 1  # rank 0 alone says what happens
    assert proc.stdout.count("pruned step 1/1") == 1

    client, parents, cells = _runs(tmp_path)
    assert len(parents) == 1
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


def test_a_batch_that_cannot_be_split_over_the_ranks_is_refused(tmp_path: Path, tiny_recipe: dict) -> None:
    recipe = _recipe(tmp_path, tiny_recipe)
    recipe["data"] = {**recipe["data"], "batch_size": 80}  # 72 training images: 1 batch for 2 processes
    proc = _torchrun(tmp_path, recipe)
    assert proc.returncode != 0
    assert "1 training batch(es) for 2 processes; lower data.batch_size" in proc.stderr
    assert proc.stderr.count("prunebench: error: an epoch has 1 training batch") == 2  # each rank, one line
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run


DYING_PLUGIN = """
import os
from pathlib import Path

import torch

from prunebench import PruningMethod, register_method


@register_method("rank1_dies")
class Rank1Dies(PruningMethod):
    description = "test: rank 1 dies at the end of the second sparsity epoch, once"

    def score(self, group):
        return torch.ones(group.size)

    def on_epoch_end(self, epoch):
        state = [t.double().sum().item() for t in self.model.state_dict().values() if t.is_floating_point()]
        with open(Path(os.environ["DIE_MARKER"]).parent / f"weights-rank{os.environ['RANK']}.txt", "a") as f:
            f.write(f"{epoch} {state!r}\\n")  # DDP: every rank holds the same weights after every epoch
        marker = Path(os.environ["DIE_MARKER"])
        if epoch == 1 and os.environ.get("RANK") == "1" and not marker.exists():
            marker.touch()
            os._exit(3)
"""


def test_a_rank_that_dies_stops_the_job_and_resume_finishes_the_cell(tmp_path: Path, tiny_recipe: dict) -> None:
    (tmp_path / "dying.py").write_text(DYING_PLUGIN)
    recipe = _recipe(
        tmp_path,
        tiny_recipe,
        plugins=[str(tmp_path / "dying.py")],
        methods=[{"name": "rank1_dies"}],
        sparsity={"epochs": 3, "lr": 0.01},
    )
    marker = str(tmp_path / "died")
    first = _torchrun(tmp_path, recipe, DIE_MARKER=marker)
    assert first.returncode != 0 and Path(marker).exists()
    _, parents, cells = _runs(tmp_path)
    assert len(parents) == 1 and len(cells) == 1 and cells[0].info.status != "FINISHED"

    second = _torchrun(tmp_path, recipe, "--resume", DIE_MARKER=marker)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    client, parents, cells = _runs(tmp_path)
    assert len(parents) == 1 and len(cells) == 1  # the same parent and cell run, reopened
    assert cells[0].info.status == "FINISHED" and cells[0].data.params[schema.WORLD_SIZE_PARAM] == "2"
    steps = [m.step for m in client.get_metric_history(cells[0].info.run_id, "train_loss")]
    # 3 sparsity epochs and 1 fine-tuning epoch, none lost or repeated: the cell went on from its checkpoint
    assert sorted(steps) == [0, 1, 2, 3]
    ranks = [(tmp_path / f"weights-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[1]) >= 2 and set(ranks[1]) <= set(ranks[0])  # rank 1 died after writing epoch 1


def test_two_nodes_that_share_no_folder(tmp_path: Path, tiny_recipe: dict) -> None:
    """``--nnodes 2``, one process each, as two machines would launch it (static rendezvous on loopback): each
    node has its own folder and recipe copy; the node of rank 0 alone ends up with the MLflow store and files."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    }
    procs = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        recipe = {**_recipe(folder, tiny_recipe), "workdir": "work", "tracking": {"uri": "sqlite:///mlflow.db"}}
        (folder / "ddp.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        cmd += ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        procs.append(
            subprocess.Popen(
                [*cmd, "-m", "prunebench", "run", "ddp.yaml", "-q"],
                cwd=folder,
                env={**clean, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]

    _, parents, cells = _runs(tmp_path / "node0")
    assert len(parents) == 1 and len(cells) == 1 and cells[0].info.status == "FINISHED"
    assert cells[0].data.params[schema.WORLD_SIZE_PARAM] == "2"
    assert len(list((tmp_path / "node0" / "work" / "dense").glob("*.pt"))) == 1
    other = tmp_path / "node1"
    assert not (other / "mlflow.db").exists() and not (other / "mlruns").exists()
    assert not (other / "work").exists() or not any(p.is_file() for p in (other / "work").rglob("*"))
