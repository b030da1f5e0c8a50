"""``prunebench compare`` on a tracking store logged by hand with the MLflow API (no prunebench run).

The store follows design.md's tracking schema: an older invocation (one ``random`` cell), then the latest
invocation with 2 methods x 2 seeds x 2 targets and one FAILED cell. The expected numbers are computed
here from the values that were logged, independently of the code under test.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from html.parser import HTMLParser
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prunebench import compare
from prunebench.errors import UserError

pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "handmade"
METHODS = ("l1", "oicsr")
SEEDS = (0, 1)
TARGETS = (0.3, 0.6)
LAYERS = [("conv1", "Conv2d", 3, 16), ("layer1.0.conv1", "Conv2d", 16, 16), ("layer1.0.conv2", "Conv2d", 16, 16),
          ("fc", "Linear", 16, 10)]
STAGES = {"sparsity": [0, 2], "finetune": [2, 4]}


@dataclass
class Store:
    uri: str
    root: Path
    parent: str
    old_parent: str
    logged: dict[tuple[str, int, float], dict[str, float]] = field(default_factory=dict)


def _log_cell(client: MlflowClient, exp_id: str, parent: str, method: str, seed: int, target: float,
              metrics: dict[str, float], tmp: Path, status: str = "FINISHED") -> str:
    """One cell run exactly as the schema describes it (params, final and per-epoch metrics, artifacts)."""
    run = client.create_run(exp_id, tags={"prunebench.kind": "cell", "mlflow.parentRunId": parent,
                                          "prunebench.stage_epochs": json.dumps(STAGES)})
    rid, now = run.info.run_id, int(time.time() * 1000)
    params = {"method": method, "method_label": method, "seed": str(seed), "target": str(target),
              "model": "resnet20", "dataset": "cifar10", "method.lambda": "0.001"}
    last = STAGES["finetune"][1] - 1  # final metrics sit at the last epoch; final val_top1 = the last epoch's
    epochs = [Metric(k, v * 0.8**e, now, e) for e in range(last + 1)
              for k, v in {"train_loss": 1.0 - 0.1 * seed, "train_penalty": 0.01, "lr": 0.1}.items()]
    epochs += [Metric("val_top1", metrics["val_top1"] - 0.05 * (last - e), now, e) for e in range(last)]
    final = [Metric(k, v, now, last) for k, v in metrics.items()]
    client.log_batch(rid, metrics=epochs + final, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("mlflow.runName", f"{method}-s{seed}-t{target}")])
    keep = 1 - target * (0.8 if method == "oicsr" else 1.0)
    rows = [(name, typ, cin, cout, cin if i == 0 else round(cin * keep),
             cout if typ == "Linear" else round(cout * keep)) for i, (name, typ, cin, cout) in enumerate(LAYERS)]
    layers = pd.DataFrame(rows, columns=["layer", "type", "in_before", "out_before", "in_after", "out_after"])
    layers = layers.assign(macs_before=1000, macs_after=500)[
        ["layer", "type", "in_before", "out_before", "in_after", "out_after", "macs_before", "macs_after"]]
    path = tmp / rid / "layers.csv"
    path.parent.mkdir(parents=True)
    layers.to_csv(path, index=False)
    client.log_artifact(rid, str(path))
    client.set_terminated(rid, status=status)
    return rid


def _metrics(rng: np.random.Generator, method: str, seed: int, target: float) -> dict[str, float]:
    dense = 0.90 + 0.01 * seed
    top1 = dense - target * (0.05 if method == "oicsr" else 0.09) + rng.normal(0, 0.004)
    return {"test_top1": top1, "val_top1": top1 + 0.01, "dense_test_top1": dense, "macs": 41e6 * (1 - target),
            "macs_conv_fc": 40e6 * (1 - target), "macs_dense": 41e6, "macs_reduction": target + rng.normal(0, 0.002),
            "params": 0.27e6 * (1 - target), "params_dense": 0.27e6, "params_reduction": target,
            "latency_ms": 2.0 * (1 - target / 2), "latency_ms_batch": 20.0 * (1 - target),
            "speedup": 1 / (1 - target)}


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
                _log_cell(client, exp_id, parent, method, seed, target, m, root)
                s.logged[(method, seed, target)] = m
    _log_cell(client, exp_id, parent, "l1", 2, 0.3, _metrics(rng, "l1", 2, 0.3), root, status="FAILED")
    client.set_terminated(parent)
    return s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunebench")
    compare.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _compare(store: Store, *argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    args = _parser().parse_args(["compare", "--tracking-uri", store.uri, *argv])
    assert compare.run(args) == 0
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


def test_rows_means_and_stds_match_logged_metrics(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    rows = pd.DataFrame(doc["rows"])
    assert len(rows) == len(METHODS) * len(TARGETS) + 1  # + one dense row; the old invocation is not selected
    assert doc["selection"]["parent_run_ids"] == [store.parent]
    assert set(rows["method_label"]) == {*METHODS, "dense"}
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


def test_welch_p_value_equals_scipy(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys)
    tests = pd.DataFrame(doc["significance"])
    assert len(tests) == len(TARGETS)
    for t in tests.itertuples():
        assert t.best == "oicsr" and t.runner_up == "l1"  # oicsr loses less accuracy by construction
        a = [store.logged[("oicsr", s, t.target)]["test_top1"] for s in SEEDS]
        b = [store.logged[("l1", s, t.target)]["test_top1"] for s in SEEDS]
        assert t.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
        assert t.lead_pp == pytest.approx((np.mean(a) - np.mean(b)) * 100)
        row = [r for r in doc["rows"] if r["method_label"] == "oicsr" and r["target"] == t.target][0]
        assert row["rank"] == 1 and row["p_vs_next"] == pytest.approx(t.p_value)
    text = _compare(store, capsys=capsys)
    assert "oicsr *" in text and "Welch" in text and "p = " in text


def test_single_seed_makes_no_significance_statement(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(store, capsys, "--filter", "params.seed = '0'")
    rows = pd.DataFrame(doc["rows"])
    assert (rows["n"] == 1).all() and rows["top1_pct_std"].isna().all()
    assert all(t["p_value"] is None and "no significance statement" in t["verdict"] for t in doc["significance"])
    assert "no significance statement is possible" in _compare(store, "--filter", "params.seed = '0'", capsys=capsys)


@pytest.mark.parametrize("fmt", ["text", "md", "csv", "html", "json"])
def test_every_format_parses(store: Store, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    out = _compare(store, "--format", fmt, capsys=capsys)
    n_rows = len(METHODS) * len(TARGETS) + 1
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
    for name in ("table.md", "table.csv", "table.html", "table.json"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected_curves = {f"curves/{m}_t{t:g}.png" for m in METHODS for t in TARGETS}
    assert set(pngs) == {"tradeoff.png", "layers.png", *expected_curves}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn


def test_all_runs_and_run_id_select_invocations(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    every = _json(store, capsys, "--all-runs")
    assert {r["method_label"] for r in every["rows"]} == {*METHODS, "random", "dense"}
    old = _json(store, capsys, "--run-id", store.old_parent)
    assert {r["method_label"] for r in old["rows"]} == {"random", "dense"}
    assert old["significance"][0]["verdict"].startswith("only one method")


def test_experiment_is_picked_or_must_be_named(store: Store, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    assert _json(store, capsys, "--experiment", EXPERIMENT)["selection"]["experiment"] == EXPERIMENT
    copy = tmp_path / "two.db"
    shutil.copy(store.root / "mlflow.db", copy)
    MlflowClient(f"sqlite:///{copy}").create_experiment("other", artifact_location=(tmp_path / "a").as_uri())
    two = Store(f"sqlite:///{copy}", tmp_path, store.parent, store.old_parent)
    with pytest.raises(UserError, match="2 experiments.*--experiment"):
        _compare(two, capsys=capsys)
    assert _json(two, capsys, "--experiment", EXPERIMENT)["selection"]["experiment"] == EXPERIMENT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "handmad"], "no experiment 'handmad'.*Did you mean 'handmade'"),
        (["--filter", "params.method = 'thinet'"],
         r"no cell runs match \(tracking URI .*experiment 'handmade'.*filter"),
        (["--filter", "params.method === 'l1'"], "MLflow rejected the run filter"),
        (["--run-id", "0123456789abcdef"], "run '0123456789abcdef' not found"),
        (["--layers-target", "0.45"], r"--layers-target 0.45 was not run.*0.3, 0.6"),
        (["--alpha", "5"], "--alpha"),
    ],
)
def test_user_errors_say_what_was_searched(store: Store, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    with pytest.raises(UserError, match=message):
        _compare(store, *argv, capsys=capsys)


def test_missing_store_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = _parser().parse_args(["compare"])
    with pytest.raises(UserError, match=r"no MLflow tracking store at sqlite:///.*mlflow\.db.*does not exist"):
        compare.run(args)
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_exit_status_2_on_empty_selection(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("prunebench.cli")
    status = cli.main(["compare", "--tracking-uri", store.uri, "--filter", "params.method = 'thinet'"])
    assert status == 2


def _cells(values: dict[str, list[float]], target: float = 0.5) -> pd.DataFrame:
    rows = [{"model": "m", "dataset": "d", "method": k, "method_label": k, "target": target, "seed": i,
             "test_top1": v} for k, vs in values.items() for i, v in enumerate(vs)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("values", "p_expected", "verdict"),
    [
        ({"a": [0.91, 0.93, 0.92], "b": [0.80, 0.81, 0.79]}, "scipy", "larger than seed noise"),
        ({"a": [0.91, 0.80, 0.95], "b": [0.90, 0.82, 0.93]}, "scipy", "within seed noise"),
        ({"a": [0.5, 0.5], "b": [0.25, 0.25]}, None, "no seed-to-seed variation"),  # scipy would say p = 0
        ({"a": [0.9], "b": [0.8, 0.7]}, None, "no significance statement"),
        ({"a": [0.9, 0.8]}, None, "only one method"),
    ],
)
def test_significance_verdicts(values: dict[str, list[float]], p_expected: str | None, verdict: str) -> None:
    row = compare.significance(_cells(values)).iloc[0]
    assert row["best"] == "a" and verdict in row["verdict"]
    if p_expected == "scipy":
        assert row["p_value"] == pytest.approx(stats.ttest_ind(values["a"], values["b"], equal_var=False).pvalue)
    else:
        assert np.isnan(row["p_value"])


def test_cells_without_parent_runs_are_all_compared(store: Store, capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    """Another tool may log cells without parent runs: then every finished cell of the experiment counts."""
    copy = tmp_path / "orphans.db"
    shutil.copy(store.root / "mlflow.db", copy)
    client = MlflowClient(f"sqlite:///{copy}")
    for parent in (store.parent, store.old_parent):
        client.delete_run(parent)
    doc = _json(Store(f"sqlite:///{copy}", tmp_path, "", ""), capsys)
    assert doc["selection"]["parent_run_ids"] == []
    assert {r["method_label"] for r in doc["rows"]} == {*METHODS, "random", "dense"}
    assert any("no parent runs" in n for n in doc["notes"])
