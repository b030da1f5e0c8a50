"""Results where users look, on a real local MLflow store: the experiment opens as model training in MLflow 3's
UI, and the parent run of ``prunebench run`` carries the comparison table as its description (docs/tracking.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RECIPE
from prunebench.cli import main
from prunebench.commands.compare.publish import NOTE_MAX_CHARS, fit_note
from prunebench.commands.run.summary import CellResult, RunSummary, parent_note
from prunebench.tracking import store
from prunebench.tracking.schema import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KIND_TAG, NOTE_TAG, PARENT_KIND


@dataclass
class TinyRun:
    uri: str
    recipe: Path
    experiment_id: str
    parent: str


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One ``prunebench run`` of the tiny recipe (one method, one seed, its dense control) in its own store."""
    root = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["workdir"] = str(root / "work")
    recipe["tracking"] = {"uri": uri}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:  # module scope: set up before the per-test working directory
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["run", str(path), "-q"]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(recipe["name"])
    parents = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = '{PARENT_KIND}'")
    assert len(parents) == 1
    return TinyRun(uri, path, exp.experiment_id, parents[0].info.run_id)


def _table_rows(note: str) -> list[str]:
    """The first cell (the method) of each row of the note's Markdown table, header and rule left out."""
    rows = [line for line in note.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip() for row in rows]


def test_a_run_tags_its_experiment_as_model_training(tiny_run: TinyRun) -> None:
    exp = MlflowClient(tiny_run.uri).get_experiment(tiny_run.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_a_kind_the_user_set_is_kept(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'own.db'}"
    client = MlflowClient(uri)
    mine = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    store.connect(uri, "mine")
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    store.connect(uri, "new")  # a new experiment is tagged
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_the_parent_run_description_is_the_comparison_table(tiny_run: TinyRun) -> None:
    note = MlflowClient(tiny_run.uri).get_run(tiny_run.parent).data.tags[NOTE_TAG]
    assert note.startswith("### resnet8_cifar on synthetic: 1 cells, 1 dense control(s), 1 seed(s)")
    assert f"parent run {tiny_run.parent}" in note
    assert _table_rows(note) == ["dense", "dense (same epochs)", "l1 \\*"]  # the only method is the best
    assert "**Best per target**" in note


def test_resume_describes_the_whole_reopened_parent(tiny_run: TinyRun) -> None:
    """Every cell finished earlier: the resumed invocation runs none, and the note still shows them all."""
    client = MlflowClient(tiny_run.uri)
    client.delete_tag(tiny_run.parent, NOTE_TAG)
    assert main(["run", str(tiny_run.recipe), "-q", "--resume"]) == 0
    note = client.get_run(tiny_run.parent).data.tags[NOTE_TAG]
    assert _table_rows(note) == ["dense", "dense (same epochs)", "l1 \\*"]


def test_without_a_finished_cell_the_description_says_so_with_the_closing_table(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'failed.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("failed", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={KIND_TAG: PARENT_KIND}).info.run_id
    cell = client.create_run(exp_id, tags={KIND_TAG: "cell", "mlflow.parentRunId": parent}).info.run_id
    client.log_param(cell, "method", "l1")
    client.set_terminated(cell, "FAILED")
    failed = CellResult("l1", 0, 0.4, cell, status="FAILED", error="DivergedError: loss is nan")
    note = parent_note(RunSummary(parent, "failed", uri, [failed]))
    assert note.startswith("**No comparison table**: none of the 1 matching cell runs finished")
    assert "FAILED: DivergedError: loss is nan" in note and f"parent run {parent}" in note
    client.set_tag(parent, NOTE_TAG, note)  # a valid tag value (MLflow refuses one over 8000 characters)
    assert client.get_run(parent).data.tags[NOTE_TAG] == note


def test_a_long_note_is_cut_at_a_line_to_fit_a_tag() -> None:
    table = "\n".join(f"| method {i:04d} | {i} |" for i in range(1000))  # about 20,000 characters
    note = fit_note(table, "the whole table is `prunebench compare --run-id X`")
    assert len(note) <= NOTE_MAX_CHARS == 8000
    assert note.endswith("the whole table is `prunebench compare --run-id X`)_\n")
    kept = note.split("\n\n_(truncated")[0].splitlines()
    assert kept == table.splitlines()[: len(kept)] and len(kept) > 300  # whole lines, as many as fit
    assert fit_note("short", "never said") == "short"
