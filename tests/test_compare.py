"""``prunebench compare`` on a tracking store logged by hand with the MLflow API (no prunebench run).

The store follows docs/tracking.md (prunebench/tracking/schema.py): an older invocation (one ``random`` cell, no dense
controls), then the latest invocation with 2 methods x 2 seeds x 2 targets, one FAILED cell and the dense
controls (the dense model trained for the same extra epochs: one per seed, plus a repeated, a FAILED and an
orphan one). ``oicsr`` is regularized: its cells log the sparsity diagnostics and ``sparsity_norms.json``.
The expected numbers are computed here from the values that were logged, independently of the code under
test.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from scipy import stats

from prunebench import cli
from prunebench.cli import compare as cli_compare
from prunebench.commands.compare import FORMATS
from prunebench.commands.compare.artifacts import load_norms
from prunebench.commands.compare.reading import select
from prunebench.commands.compare.report import build
from prunebench.errors import UserError

EXPERIMENT = "handmade"
METHODS = ("l1", "oicsr")
SEEDS = (0, 1)
TARGETS = (0.3, 0.6)
LAYERS = [
    ("conv1", "Conv2d", 3, 16),
    ("layer1.0.conv1", "Conv2d", 16, 16),
    ("layer1.0.conv2", "Conv2d", 16, 16),
    ("fc", "Linear", 16, 10),
]
STAGES = {"sparsity": [0, 2], "finetune": [2, 4]}


@dataclass
class Store:
    uri: str
    root: Path
    parent: str
    old_parent: str
    logged: dict[tuple[str, int, float], dict[str, float]] = field(default_factory=dict)
    norms: dict[tuple[str, int, float], dict[str, list[float]]] = field(default_factory=dict)
    controls: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> metrics of the counted run
    control_ids: dict[int, str] = field(default_factory=dict)


def _log_run(
    client: MlflowClient,
    exp_id: str,
    parent: str,
    kind: str,
    params: dict[str, str],
    metrics: dict[str, float],
    seed: int,
) -> str:
    """A child run with params, final and per-epoch metrics (a cell or a dense control); returns its id."""
    run = client.create_run(
        exp_id,
        tags={"prunebench.kind": kind, "mlflow.parentRunId": parent, "prunebench.stage_epochs": json.dumps(STAGES)},
    )
    rid, now = run.info.run_id, int(time.time() * 1000)
    last = STAGES["finetune"][1] - 1  # final metrics sit at the last epoch; final val_top1 = the last epoch's
    epochs = [
        Metric(k, v * 0.8**e, now, e)
        for e in range(last + 1)
        for k, v in {"train_loss": 1.0 - 0.1 * seed, "train_penalty": 0.01, "lr": 0.1}.items()
    ]
    epochs += [Metric("val_top1", metrics["val_top1"] - 0.05 * (last - e), now, e) for e in range(last)]
    final = [Metric(k, v, now, last) for k, v in metrics.items()]
    client.log_batch(
        rid,
        metrics=epochs + final,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("mlflow.runName", f"{params['method']}-s{seed}-t{params.get('target', 'na')}")],
    )
    return rid


def _log_json(client: MlflowClient, rid: str, tmp: Path, name: str, doc: dict) -> None:
    path = tmp / rid / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    client.log_artifact(rid, str(path))


def _log_cell(
    client: MlflowClient,
    exp_id: str,
    parent: str,
    method: str,
    seed: int,
    target: float,
    metrics: dict[str, float],
    tmp: Path,
    status: str = "FINISHED",
    norms: dict[str, list[float]] | None = None,
) -> str:
    """One cell run exactly as the schema describes it (params, final and per-epoch metrics, artifacts)."""
    params = {
        "method": method,
        "method_label": method,
        "seed": str(seed),
        "target": str(target),
        "model": "resnet20",
        "dataset": "cifar10",
        "method.lambda": "0.001",
    }
    rid = _log_run(client, exp_id, parent, "cell", params, metrics, seed)
    keep = 1 - target * (0.8 if method == "oicsr" else 1.0)
    rows = [
        (name, typ, cin, cout, cin if i == 0 else round(cin * keep), cout if typ == "Linear" else round(cout * keep))
        for i, (name, typ, cin, cout) in enumerate(LAYERS)
    ]
    layers = pd.DataFrame(rows, columns=["layer", "type", "in_before", "out_before", "in_after", "out_after"])
    layers = layers.assign(macs_before=1000, macs_after=500)[
        ["layer", "type", "in_before", "out_before", "in_after", "out_after", "macs_before", "macs_after"]
    ]
    path = tmp / rid / "layers.csv"
    path.parent.mkdir(parents=True)
    layers.to_csv(path, index=False)
    client.log_artifact(rid, str(path))
    if norms is not None:
        _log_json(client, rid, tmp, "sparsity_norms.json", norms)
    client.set_terminated(rid, status=status)
    return rid


def _log_control(
    client: MlflowClient, exp_id: str, parent: str, seed: int, metrics: dict[str, float], status: str = "FINISHED"
) -> str:
    """The dense model of ``seed`` trained unpruned for the cells' extra stages: kind control, no target."""
    params = {
        "method": "dense_control",
        "method_label": "dense (same epochs)",
        "seed": str(seed),
        "model": "resnet20",
        "dataset": "cifar10",
    }
    rid = _log_run(client, exp_id, parent, "control", params, metrics, seed)
    client.set_terminated(rid, status=status)
    return rid


def _control_metrics(rng: np.random.Generator, seed: int) -> dict[str, float]:
    dense = 0.90 + 0.01 * seed
    top1 = dense + 0.004 + rng.normal(0, 0.003)
    return {
        "test_top1": top1,
        "val_top1": top1 + 0.01,
        "dense_test_top1": dense,
        "macs": 41e6,
        "macs_dense": 41e6,
        "params": 0.27e6,
        "macs_reduction": 0.0,
    }


def _norms(rng: np.random.Generator) -> dict[str, list[float]]:
    start = rng.lognormal(0, 0.3, 40)
    end = start * np.where(rng.random(40) < 0.4, 1e-3, 0.7)  # some channels driven toward zero
    return {"start": start.tolist(), "end": end.tolist()}


def _metrics(rng: np.random.Generator, method: str, seed: int, target: float) -> dict[str, float]:
    dense = 0.90 + 0.01 * seed
    top1 = dense - target * (0.05 if method == "oicsr" else 0.09) + rng.normal(0, 0.004)
    sparsity = (
        {
            "sparsity_zero_frac": 0.2 + 0.5 * target + rng.uniform(0, 0.1),
            "sparsity_pull": rng.uniform(1, 2),
            "penalty_ratio": rng.uniform(0.1, 0.5),
        }
        if method == "oicsr"
        else {}
    )  # regularized methods only
    return {
        **sparsity,
        "test_top1": top1,
        "val_top1": top1 + 0.01,
        "dense_test_top1": dense,
        "macs": 41e6 * (1 - target),
        "macs_conv_fc": 40e6 * (1 - target),
        "macs_dense": 41e6,
        "macs_reduction": target + rng.normal(0, 0.002),
        "params": 0.27e6 * (1 - target),
        "params_dense": 0.27e6,
        "params_reduction": target,
        "latency_ms": 2.0 * (1 - target / 2),
        "latency_ms_batch": 20.0 * (1 - target),
        "speedup": 1 / (1 - target),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    old = client.create_run(exp_id, tags={"prunebench.kind": "parent", "prunebench.recipe": EXPERIMENT}).info.run_id
    _log_cell(client, exp_id, old, "random", 0, 0.3, _metrics(rng, "l1", 0, 0.3), root)
    client.set_terminated(old)
    time.sleep(0.01)  # the latest parent is chosen by start time
    parent = client.create_run(exp_id, tags={"prunebench.kind": "parent", "prunebench.recipe": EXPERIMENT}).info.run_id
    s = Store(uri, root, parent, old)
    for method in METHODS:
        for seed in SEEDS:
            for target in TARGETS:
                m = _metrics(rng, method, seed, target)
                norms = _norms(rng) if method == "oicsr" else None
                _log_cell(client, exp_id, parent, method, seed, target, m, root, norms=norms)
                s.logged[(method, seed, target)] = m
                if norms is not None:
                    s.norms[(method, seed, target)] = norms
    _log_cell(client, exp_id, parent, "l1", 2, 0.3, _metrics(rng, "l1", 2, 0.3), root, status="FAILED")
    _log_control(client, exp_id, parent, 0, _control_metrics(rng, 0))  # superseded by the later run of seed 0
    time.sleep(0.01)
    for seed in SEEDS:
        s.controls[seed] = _control_metrics(rng, seed)
        s.control_ids[seed] = _log_control(client, exp_id, parent, seed, s.controls[seed])
    _log_control(client, exp_id, parent, 1, _control_metrics(rng, 1), status="FAILED")
    _log_control(client, exp_id, parent, 2, _control_metrics(rng, 2))  # seed 2 has no finished cell
    client.set_terminated(parent)
    return s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunebench")
    cli_compare.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _compare(store: Store, *argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    args = _parser().parse_args(["compare", "--tracking-uri", store.uri, *argv])
    assert cli_compare.run(args) == 0
    return capsys.readouterr().out


class _Tables(HTMLParser):
    """Cell texts of every <table> (the standard library's parser: no lxml needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")

    def handle_data(self, data: str) -> None:
        if self.tables and self.tables[-1] and self.tables[-1][-1]:
            self.tables[-1][-1][-1] += data.strip()


def _html_tables(text: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def _json(store: Store, capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    return json.loads(_compare(store, "--format", "json", *argv, capsys=capsys))


CONTROL = "dense (same epochs)"
N_ROWS = len(METHODS) * len(TARGETS) + 2  # + the dense row and the dense-control row


def _seeds(store: Store, method: str, target: float, key: str = "test_top1") -> np.ndarray:
    return np.array([store.logged[(method, s, target)][key] for s in SEEDS])


def _row(doc: dict, label: str, target: float | None = None) -> dict:
    return next(
        r
        for r in doc["rows"]
        if r["method_label"] == label
        and (target is None or (r["target"] is not None and np.isclose(r["target"], target)))
    )


def test_rows_means_and_stds_match_logged_metrics(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    rows = pd.DataFrame(doc["rows"])
    assert len(rows) == N_ROWS  # the old invocation is not selected
    assert doc["selection"]["parent_run_ids"] == [store.parent]
    assert set(rows["method_label"]) == {*METHODS, "dense", CONTROL}
    for method in METHODS:
        for target in TARGETS:
            row = rows[(rows["method_label"] == method) & np.isclose(rows["target"].astype(float), target)].iloc[0]
            top1 = np.array([store.logged[(method, s, target)]["test_top1"] for s in SEEDS]) * 100
            delta = top1 - np.array([store.logged[(method, s, target)]["dense_test_top1"] for s in SEEDS]) * 100
            assert row["n"] == len(SEEDS)
            assert row["top1_pct"] == pytest.approx(top1.mean())
            assert row["top1_pct_std"] == pytest.approx(top1.std(ddof=1))
            assert row["delta_pp"] == pytest.approx(delta.mean())
            assert row["delta_pp_std"] == pytest.approx(delta.std(ddof=1))
            assert row["macs_M"] == pytest.approx(41 * (1 - target))
            achieved = np.mean([store.logged[(method, s, target)]["macs_reduction"] for s in SEEDS]) * 100
            assert row["macs_reduction_pct"] == pytest.approx(achieved)
            assert row["speedup"] == pytest.approx(1 / (1 - target))
    dense = rows[rows["kind"] == "dense"].iloc[0]
    assert dense["n"] == len(SEEDS)
    assert dense["top1_pct"] == pytest.approx(np.mean([90.0, 91.0]))
    assert dense["top1_pct_std"] == pytest.approx(np.std([90.0, 91.0], ddof=1))
    assert dense["latency_ms_batch"] == pytest.approx(20.0)  # pruned latency x speedup
    assert [r["target"] for r in doc["rows"] if r["kind"] == "dense"] == [None]  # no target for the dense row


def test_failed_cell_is_left_out_and_counted(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    assert len(doc["cells"]) == len(METHODS) * len(SEEDS) * len(TARGETS)
    assert all(c["status"] == "FINISHED" for c in doc["cells"])
    assert any("1 FAILED" in n for n in doc["notes"])
    assert "1 FAILED" in _compare(store, capsys=capsys)


def test_paired_t_test_by_seed_equals_scipy(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    tests = pd.DataFrame(doc["significance"])
    assert len(tests) == len(TARGETS)
    for t in tests.itertuples():
        assert t.best == "oicsr" and t.runner_up == "l1"  # oicsr loses less accuracy by construction
        a, b = _seeds(store, "oicsr", t.target), _seeds(store, "l1", t.target)
        expected = stats.ttest_rel(a, b)  # same seeds: paired by seed
        assert t.test == "paired t-test" and t.n == len(SEEDS) == t.n_common and t.df == len(SEEDS) - 1
        assert t.statistic == pytest.approx(expected.statistic)
        assert t.p_value == pytest.approx(expected.pvalue)
        assert t.lead_pp == pytest.approx((np.mean(a) - np.mean(b)) * 100)
        row = _row(doc, "oicsr", t.target)
        assert row["rank"] == 1 and row["p_vs_next"] == pytest.approx(t.p_value)
        assert row["test_vs_next"] == "paired t-test"
    assert "paired t-test" in doc["test"] and "Welch" in doc["test"]
    text = _compare(store, capsys=capsys)
    assert "oicsr *" in text and "paired t-test, n = 2 seeds, t = " in text and "p = " in text


def test_vs_best_is_the_paired_difference_to_the_best(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    for target in TARGETS:
        diff = (_seeds(store, "l1", target) - _seeds(store, "oicsr", target)) * 100
        l1 = _row(doc, "l1", target)
        assert l1["vs_best_pp"] == pytest.approx(diff.mean())
        assert l1["vs_best_pp_std"] == pytest.approx(diff.std(ddof=1))
        assert l1["vs_best_n"] == len(SEEDS)
        best = _row(doc, "oicsr", target)
        assert best["vs_best_pp"] == 0 and best["vs_best_pp_std"] is None
    for kind in ("dense", "control"):
        assert all(r["vs_best_pp"] is None for r in doc["rows"] if r["kind"] == kind)
    text = _compare(store, capsys=capsys)
    assert "vs best (pp)" in text and f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}" in text


def test_dense_control_row_and_vs_control_column(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    control = np.array([store.controls[s]["test_top1"] for s in SEEDS])
    dense = np.array([store.controls[s]["dense_test_top1"] for s in SEEDS])
    assert [r["kind"] for r in doc["rows"][:2]] == ["dense", "control"]  # right after the dense row
    row = doc["rows"][1]
    assert row["method_label"] == CONTROL and row["method"] == "dense_control" and row["target"] is None
    assert row["n"] == len(SEEDS)  # the repeated seed-0 run once, the FAILED run and seed 2 (no cell) not at all
    assert row["top1_pct"] == pytest.approx(control.mean() * 100)
    assert row["top1_pct_std"] == pytest.approx(control.std(ddof=1) * 100)
    assert row["delta_pp"] == pytest.approx(((control - dense) * 100).mean())
    assert row["macs_M"] == pytest.approx(41) and row["macs_reduction_pct"] == 0 and row["rank"] is None
    for method in METHODS:
        for target in TARGETS:
            diff = (_seeds(store, method, target) - control) * 100
            r = _row(doc, method, target)
            assert r["vs_control_pp"] == pytest.approx(diff.mean())
            assert r["vs_control_pp_std"] == pytest.approx(diff.std(ddof=1))
            assert r["vs_control_n"] == len(SEEDS)
    # controls are not cells: no target, no test, not in the cells list
    assert len(doc["cells"]) == len(METHODS) * len(SEEDS) * len(TARGETS)
    assert {c["method"] for c in doc["cells"]} == set(METHODS) and len(doc["significance"]) == len(TARGETS)
    assert sorted(c["run_id"] for c in doc["controls"]) == sorted(store.control_ids.values())
    assert any("1 dense control run(s) not finished" in n for n in doc["notes"])
    assert any("repeated dense control" in n for n in doc["notes"])
    lines = _compare(store, capsys=capsys).splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line)
    assert lines[rule + 1].startswith("dense ") and lines[rule + 2].startswith(CONTROL)
    assert "vs dense (same epochs, pp)" in lines[rule - 1]
    seed0 = _json(store, capsys, "--filter", "params.seed = '0'")
    assert seed0["rows"][1]["n"] == 1 and seed0["rows"][1]["top1_pct"] == pytest.approx(control[0] * 100)


def test_without_control_runs_the_column_is_blank(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    old = _json(store, capsys, "--run-id", store.old_parent)  # an older invocation: no dense controls
    assert [r["kind"] for r in old["rows"]] == ["dense", "pruned"] and old["controls"] == []
    assert old["rows"][1]["vs_control_pp"] is None and old["rows"][1]["vs_control_n"] is None
    text = _compare(store, "--run-id", store.old_parent, capsys=capsys)
    assert "vs dense (same epochs, pp)" in text and "no dense-control runs" in text


def test_sparsity_diagnostics_for_regularized_methods_only(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    for target in TARGETS:
        oicsr = _row(doc, "oicsr", target)
        assert oicsr["sparsity_zero_pct"] == pytest.approx(
            _seeds(store, "oicsr", target, "sparsity_zero_frac").mean() * 100
        )
        assert oicsr["sparsity_pull"] == pytest.approx(_seeds(store, "oicsr", target, "sparsity_pull").mean())
        assert oicsr["penalty_ratio"] == pytest.approx(_seeds(store, "oicsr", target, "penalty_ratio").mean())
        l1 = _row(doc, "l1", target)
        assert l1["sparsity_zero_pct"] is None and l1["sparsity_pull"] is None and l1["penalty_ratio"] is None
    frame = pd.read_csv(io.StringIO(_compare(store, "--format", "csv", capsys=capsys)))
    assert {"sparsity_zero_pct", "sparsity_pull", "penalty_ratio"} <= set(frame.columns)
    lines = _compare(store, capsys=capsys).splitlines()
    header = next(line for line in lines if "zeroed %" in line)
    col = header.index("zeroed %") + len("zeroed %")  # right-aligned column: its last character
    zeroed = {
        line.split()[0]: line[col - 8 : col].strip()
        for line in lines[lines.index(header) + 2 :]
        if line.split() and line.split()[0] in METHODS and "0.30" in line
    }
    assert zeroed["l1"] == "" and zeroed["oicsr"] == f"{_row(doc, 'oicsr', 0.3)['sparsity_zero_pct']:.1f}"
    old = _compare(store, "--run-id", store.old_parent, capsys=capsys)
    assert "zeroed" not in old.split("\n\n")[1]  # no regularized method: the column is left out


def test_single_seed_makes_no_significance_statement(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys, "--filter", "params.seed = '0'")
    rows = pd.DataFrame(doc["rows"])
    assert (rows["n"] == 1).all() and rows["top1_pct_std"].isna().all()
    assert all(
        t["p_value"] is None
        and t["statistic"] is None
        and t["n"] == 1
        and t["test"] == "paired t-test"
        and "n < 2 common seeds: no significance statement" in t["verdict"]
        for t in doc["significance"]
    )
    assert "no significance statement is possible" in _compare(store, "--filter", "params.seed = '0'", capsys=capsys)


@pytest.mark.parametrize("fmt", ["text", "md", "csv", "html", "json"])
def test_every_format_parses(store: Store, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    out = _compare(store, "--format", fmt, capsys=capsys)
    n_rows = N_ROWS
    if fmt == "csv":
        frame = pd.read_csv(io.StringIO(out))
        assert len(frame) == n_rows and {"top1_pct", "top1_pct_std", "n", "macs_M"} <= set(frame.columns)
    elif fmt == "json":
        assert len(json.loads(out)["rows"]) == n_rows
    elif fmt == "html":
        assert "<table" in out and "</table>" in out and out.count("<tr>") >= n_rows + 1
        tables = _html_tables(out)
        assert len(tables[0]) == n_rows + 1 and len({len(r) for r in tables[0]}) == 1  # header + rows, rectangular
    elif fmt == "md":
        table = [line for line in out.splitlines() if line.startswith("|")]
        assert len(table) == n_rows + 2 and len({line.count("|") for line in table}) == 1
    else:
        lines = out.splitlines()
        rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line)
        assert len(lines[rule - 1]) <= len(lines[rule]) and "dense" in lines[rule + 1]


def test_out_dir_writes_tables_and_valid_pngs(store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "report"
    _compare(store, "--out", str(out), "--layers-target", "0.6", capsys=capsys)
    for name in ("table.md", "table.csv", "table.html", "table.json", "report.html"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected_curves = {f"curves/{m}_t{t:g}.png" for m in METHODS for t in TARGETS} | {"curves/dense_same_epochs.png"}
    assert set(pngs) == {"tradeoff.png", "layers.png", "sparsity_norms.png", *expected_curves}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn


def test_norms_plot_reads_the_first_seed_and_is_skipped_without_artifacts(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client = MlflowClient(store.uri)
    comp = build(client, select(client, store.uri))
    norms, notes = load_norms(client, comp.cells[comp.cells["target"] == 0.6])
    assert notes == [] and set(norms["method_label"]) == {"oicsr"} and set(norms["seed"]) == {min(SEEDS)}
    for stage in ("start", "end"):
        values = norms[norms["stage"] == stage].sort_values("rank")["value"].to_numpy()
        assert values == pytest.approx(np.sort(store.norms[("oicsr", min(SEEDS), 0.6)][stage]))
    out = tmp_path / "old"
    _compare(store, "--run-id", store.old_parent, "--out", str(out), capsys=capsys)  # a random cell: no artifact
    assert (out / "layers.png").exists() and not (out / "sparsity_norms.png").exists()
    assert not any("sparsity_norms" in n for n in json.loads((out / "table.json").read_text())["notes"])


def test_all_runs_and_run_id_select_invocations(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    every = _json(store, capsys, "--all-runs")
    assert {r["method_label"] for r in every["rows"]} == {*METHODS, "random", "dense", CONTROL}
    old = _json(store, capsys, "--run-id", store.old_parent)
    assert {r["method_label"] for r in old["rows"]} == {"random", "dense"}
    assert old["significance"][0]["verdict"].startswith("only one method")


def test_experiment_is_picked_or_must_be_named(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _json(store, capsys, "--experiment", EXPERIMENT)["selection"]["experiment"] == EXPERIMENT
    copy = tmp_path / "two.db"
    shutil.copy(store.root / "mlflow.db", copy)
    MlflowClient(f"sqlite:///{copy}").create_experiment("other", artifact_location=(tmp_path / "a").as_uri())
    two = Store(f"sqlite:///{copy}", tmp_path, store.parent, store.old_parent)
    with pytest.raises(UserError, match="2 experiments.*--experiment"):
        _compare(two, capsys=capsys)
    assert _json(two, capsys, "--experiment", EXPERIMENT)["selection"]["experiment"] == EXPERIMENT


def test_a_control_run_is_not_an_invocation(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=f"single dense control.*--run-id {store.parent}"):
        _compare(store, "--run-id", store.control_ids[0], capsys=capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "handmad"], "no experiment 'handmad'.*Did you mean 'handmade'"),
        (
            ["--filter", "params.method = 'thinet'"],
            r"no cell runs match \(tracking URI .*experiment 'handmade'.*filter",
        ),
        (["--filter", "params.method === 'l1'"], "MLflow rejected the run filter"),
        (["--run-id", "0123456789abcdef"], "run '0123456789abcdef' not found"),
        (["--layers-target", "0.45"], r"--layers-target 0.45 was not run.*0.3, 0.6"),
        (["--alpha", "5"], "--alpha"),
    ],
)
def test_user_errors_say_what_was_searched(
    store: Store, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        _compare(store, *argv, capsys=capsys)


def test_missing_store_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = _parser().parse_args(["compare"])
    with pytest.raises(UserError, match=r"no MLflow tracking store at sqlite:///.*mlflow\.db.*does not exist"):
        cli_compare.run(args)
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_exit_status_2_on_empty_selection(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["compare", "--tracking-uri", store.uri, "--filter", "params.method = 'thinet'"])
    assert status == 2


def test_cells_without_parent_runs_are_all_compared(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Another tool may log cells without parent runs: then every finished cell of the experiment counts."""
    copy = tmp_path / "orphans.db"
    shutil.copy(store.root / "mlflow.db", copy)
    client = MlflowClient(f"sqlite:///{copy}")
    for parent in (store.parent, store.old_parent):
        client.delete_run(parent)
    doc = _json(Store(f"sqlite:///{copy}", tmp_path, "", ""), capsys)
    assert doc["selection"]["parent_run_ids"] == []
    assert {r["method_label"] for r in doc["rows"]} == {*METHODS, "random", "dense", CONTROL}
    assert any("no parent runs" in n for n in doc["notes"])


def test_a_dead_tracking_server_fails_fast_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens on the port: exit 2 and one line in seconds, not MLflow's minute of HTTP retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free now that the socket is closed, and nothing listens on it
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    status = cli.main(["compare", "--tracking-uri", uri, "--experiment", EXPERIMENT])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and uri in err and "cannot be reached" in err
    assert elapsed < 15  # a bound on the failure path, not a speed benchmark


def test_the_cli_offers_the_formats_the_command_renders() -> None:
    assert cli_compare.FORMATS == FORMATS


def test_the_files_written_are_logged_after_the_table(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "tables"
    assert cli.main(["compare", "--tracking-uri", store.uri, "--out", str(out), "--no-plots"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2] == f"wrote 5 files to {out}: table.md, table.csv, table.html, table.json, report.html"
    assert lines[-1] == f"logged them to MLflow, parent run {store.parent}"
    assert any(line.startswith("dense ") for line in lines[:-2])  # the table came first
    assert cli.main(["compare", "--tracking-uri", store.uri, "--out", str(out), "--no-plots", "-q"]) == 0
    assert "wrote" not in capsys.readouterr().out
    assert cli.main(["compare", "--tracking-uri", store.uri, "--out", str(out), "--no-plots", "--format", "json"]) == 0
    json.loads(capsys.readouterr().out)  # stdout stays machine-readable


def _fresh_store(root: Path, parent_artifacts: str | None = None) -> Store:
    """A new small store (one invocation: 2 methods x 2 seeds, one target): run ids no other test has used,
    since MLflow caches each run's artifact location by run id. ``parent_artifacts`` moves the parent run's."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={"prunebench.kind": "parent", "prunebench.recipe": EXPERIMENT}).info.run_id
    rng = np.random.default_rng(1)
    for method in METHODS:
        for seed in SEEDS:
            _log_cell(client, exp_id, parent, method, seed, 0.3, _metrics(rng, method, seed, 0.3), root)
    client.set_terminated(parent)
    if parent_artifacts is not None:
        with sqlite3.connect(root / "mlflow.db") as db:
            db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (parent_artifacts, parent))
    return Store(uri, root, parent, "")


def _artifact_files(client: MlflowClient, run_id: str, path: str) -> set[str]:
    """Every file under ``path`` among ``run_id``'s artifacts, recursively."""
    found: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def test_out_files_are_logged_to_the_parent_run_under_compare(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    here = _fresh_store(tmp_path)
    client = MlflowClient(here.uri)
    out = tmp_path / "out"
    _compare(here, "--out", str(out), "--no-log", capsys=capsys)
    assert client.list_artifacts(here.parent, "compare") == []  # --no-log: the files stay on disk only
    assert cli.main(["compare", "--tracking-uri", here.uri, "--out", str(out)]) == 0
    assert f"logged them to MLflow, parent run {here.parent}" in capsys.readouterr().out
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"report.html", "table.md", "tradeoff.png"} <= written and any(w.startswith("curves/") for w in written)
    assert _artifact_files(client, here.parent, "compare") == {f"compare/{w}" for w in written}
    logged = Path(client.download_artifacts(here.parent, "compare/report.html", str(tmp_path)))
    assert logged.read_bytes() == (out / "report.html").read_bytes()


def test_a_store_that_refuses_the_files_is_a_warning_and_a_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # no folder can be made under a file, even by root
    here = _fresh_store(tmp_path, parent_artifacts=(blocker / "artifacts").as_uri())
    out = tmp_path / "out"
    assert cli.main(["compare", "--tracking-uri", here.uri, "--out", str(out), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"could not log the files to parent run {here.parent}" in captured.err
    assert "logged them" not in captured.out
    notes = json.loads((out / "table.json").read_text())["notes"]
    assert any(f"could not log the files to parent run {here.parent}" in n for n in notes)
    assert "could not log the files" in (out / "report.html").read_text()


def test_cells_without_a_parent_run_are_not_logged_and_a_note_says_so(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    copy = tmp_path / "orphans.db"
    shutil.copy(store.root / "mlflow.db", copy)
    client = MlflowClient(f"sqlite:///{copy}")
    for parent in (store.parent, store.old_parent):
        client.delete_run(parent)
    out = tmp_path / "out"
    doc = _json(Store(f"sqlite:///{copy}", tmp_path, "", ""), capsys, "--out", str(out), "--no-plots")
    note = f"the selection has no parent run: the files in {out} were not logged to MLflow"
    assert note in doc["notes"] and note in json.loads((out / "table.json").read_text())["notes"]
