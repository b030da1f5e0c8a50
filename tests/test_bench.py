"""``prunebench bench``: the reduced run writes a complete report; the target logic and timing helpers.

No test asserts a timing: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from prunebench.budget import resolve_round_to
from prunebench.cli import main
from prunebench.cli.bench import DEFAULTS, parse_round_to
from prunebench.commands.bench import (
    TARGETS,
    BenchConfig,
    check_targets,
    is_noisy,
    paired_ratio,
    render_markdown,
    report_name,
    spread,
    torch_threads,
)
from prunebench.commands.bench.deployment import Deployment, compile_unavailable, deploy_figure
from prunebench.errors import UserError

REQUIRED = (
    "loop_efficiency",
    "reg_overhead",
    "data_headroom",
    "speedup",
    "speedup_efficiency",
    "macs_ratio",
    "engine_s",
    "thinet_s",
    "macs_count_s",
    "machine",
    "plan",
    "onnx_speedup",
    "onnx_speedup_b1",
    "onnx_efficiency",
    "compiled_speedup",
    "compiled_speedup_b1",
)
PER_METHOD = ("reg_overhead", "reg_overhead_step", "speedup", "speedup_b1", "speedup_efficiency", "macs_ratio")
EXACT = ("speedup_exact", "speedup_b1_exact", "speedup_efficiency_exact", "macs_ratio_exact")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One ``prunebench bench --quick`` run shared by the tests below (it takes a few seconds)."""
    out = tmp_path_factory.mktemp("perf")
    assert main(["bench", "--quick", "--out", str(out), "--name", "quick"]) == 0
    return json.loads((out / "quick.json").read_text()), out


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_quick_report_has_every_key_with_finite_numbers(quick_report: tuple[dict, Path]) -> None:
    rep, _ = quick_report
    from prunebench.registry import available_methods

    for key in REQUIRED:
        assert key in rep, key
    for key in ("loop_efficiency", "data_headroom", "engine_s", "thinet_s", "macs_count_s"):
        assert _finite(rep[key]) and rep[key] > 0, (key, rep[key])
    methods = set(available_methods())
    for key in PER_METHOD:
        assert set(rep[key]) == methods, key  # every registered method, none missing
        assert all(_finite(v) and v > 0 for v in rep[key].values()), (key, rep[key])
    for name, cls in available_methods().items():  # hooks cost something; no hooks cost nothing
        assert (rep["reg_overhead"][name] > 1.0) == cls.has_sparsity_training(), name
    for key in EXACT:  # the widths as pruned, beside the main plan (which rounds: auto on this device)
        assert set(rep[key]) == {f"{m}+exact" for m in methods}, key
        assert all(_finite(v) and v > 0 for v in rep[key].values()), (key, rep[key])
    for k, v in rep["speedup_efficiency"].items():  # efficiency is speedup over MACs ratio, key by key
        assert v == pytest.approx(rep["speedup"][k] / rep["macs_ratio"][k])
    assert all(1.5 < v < 3.0 for v in rep["macs_ratio"].values())  # pruned to ~50% fewer MACs
    m = rep["machine"]
    assert m["cpu"] and m["torch"] and m["torch_threads"] >= 1 and "gpu" in m
    assert rep["config"]["quick"] and rep["config"]["model"] == "resnet8_cifar"


def test_quick_report_has_targets_with_pass_fail(quick_report: tuple[dict, Path]) -> None:
    rep, _ = quick_report
    names = {c["name"] for c in rep["checks"]}
    for required in (
        "loop_efficiency",
        "reg_overhead[oicsr]",
        "reg_overhead[group_lasso]",
        "reg_overhead[slimming]",
        "speedup_efficiency[oicsr]",
        "engine_s",
        "thinet_s",
        "macs_count_s",
    ):
        assert required in names
    assert rep["pass"] == {c["name"]: c["pass"] for c in rep["checks"]}
    assert rep["all_pass"] == all(rep["pass"].values())
    assert set(rep["targets"]) == set(TARGETS)
    for c in rep["checks"]:  # every verdict agrees with its bound
        t = TARGETS[c["figure"]]
        assert c["pass"] == (c["value"] >= t.bound if t.at_least else c["value"] <= t.bound)
    missed = [c for c in rep["checks"] if not c["pass"]]
    assert set(rep["profiles"]) <= {c["name"] for c in missed}  # profiles only for misses
    assert {c["figure"] for c in missed} == {c["figure"] for c in missed if c["name"] in rep["profiles"]}


def test_quick_markdown_exists_and_shows_the_figures(quick_report: tuple[dict, Path]) -> None:
    rep, out = quick_report
    md = (out / "quick.md").read_text()
    assert md.startswith("# prunebench bench: resnet8_cifar")
    for heading in (
        "## Targets",
        "## 1. Loop efficiency",
        "## 2. Regularization overhead",
        "## 3. Data pipeline",
        "## 4. Real speedup",
        "## 5. Engine cost",
        "## Machine",
    ):
        assert heading in md
    assert "prunebench bench --quick" in md and "untrained" in md
    assert f"{rep['loop_efficiency']:.3f}" in md


def _figures(loop: float = 1.0, reg: float = 1.0, eff: float = 0.9, engine: float = 1.0) -> dict:
    methods = ("oicsr", "group_lasso", "slimming", "thinet", "l1", "random")
    return {
        "loop_efficiency": loop,
        "reg_overhead": {m: reg for m in methods},
        "data_headroom": 50.0,
        "speedup_efficiency": {m: eff for m in methods},
        "speedup_efficiency_exact": {f"{m}+exact": eff for m in methods},
        "engine_s": engine,
        "thinet_s": 5.0,
        "macs_count_s": 0.2,
    }


@pytest.mark.parametrize(
    ("figures", "missed"),
    [
        (_figures(), set()),
        (_figures(loop=0.9), {"loop_efficiency"}),
        (_figures(reg=1.2), {"reg_overhead[oicsr]", "reg_overhead[group_lasso]", "reg_overhead[slimming]"}),
        (_figures(engine=3.5), {"engine_s"}),
        (_figures(loop=float("nan")), {"loop_efficiency"}),  # a failed measurement never passes
    ],
)
def test_check_targets_flags_exactly_the_misses(figures: dict, missed: set[str]) -> None:
    import torch

    rows = check_targets(figures, torch.device("cpu"))
    assert {r["name"] for r in rows if not r["pass"]} == missed
    names = {r["name"] for r in rows}
    assert {f"speedup_efficiency[{m}]" for m in figures["speedup_efficiency"]} <= names  # every method has a target


def test_speedup_misses_are_reported_per_method_of_the_main_plan_only() -> None:
    import torch

    figures = _figures()
    figures["speedup_efficiency"]["thinet"] = 0.5
    figures["speedup_efficiency_exact"]["l1+exact"] = 0.7  # informational: the exact widths have no target
    rows = check_targets(figures, torch.device("cpu"))
    assert {r["name"] for r in rows if not r["pass"]} == {"speedup_efficiency[thinet]"}
    assert not any("exact" in r["name"] for r in rows)


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0
    assert math.isnan(paired_ratio([], []))


def test_noise_flags_disagreeing_repetitions(quick_report: tuple[dict, Path]) -> None:
    rep, _ = quick_report
    assert isinstance(rep["noisy"], bool) and rep["noisy"] == is_noisy(rep["details"]["noise"])
    assert set(rep["details"]["noise"]) == {"loop_spread", "reg_floor_minus_1", "latency_spread"}
    assert spread([1.0, 1.0, 1.0]) == 0.0 and spread([1.0, 1.5, 2.0]) == pytest.approx(1 / 3)
    assert spread([1.0, 1.0, 1.01, 1.0, 3.0]) == 0.0  # one outlier is not noise
    assert not is_noisy({"loop_spread": 0.03, "reg_floor_minus_1": -0.02})
    assert is_noisy({"loop_spread": 0.03, "reg_floor_minus_1": 0.2})
    assert is_noisy({"latency_spread": float("nan")})


def test_report_name_is_cpu_without_a_gpu() -> None:
    import torch

    assert report_name(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("flag", ["--batch", "--steps", "--reps", "--round-to"])
def test_bad_counts_are_user_errors(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", flag, "0", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "at least 1" in err and "Traceback" not in err


def test_unknown_model_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", "resnet57_cifar", "--out", "x"]) == 2
    assert "resnet57_cifar" in capsys.readouterr().err


def test_help_explains_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for figure in (
        "loop_efficiency",
        "reg_overhead",
        "data_headroom",
        "speedup",
        "engine_s",
        "thinet_s",
        "macs_count_s",
        "round_to",
        "--quick",
    ):
        assert figure in text


def test_markdown_renders_from_a_report_without_profiles(quick_report: tuple[dict, Path]) -> None:
    rep, _ = quick_report
    rep = {**rep, "profiles": {}}
    md = render_markdown(rep)
    assert "## Profiles" not in md and "## Targets" in md


def test_quick_runs_single_threaded_and_restores_the_thread_count(quick_report: tuple[dict, Path]) -> None:
    import torch

    rep, _ = quick_report
    assert rep["machine"]["torch_threads"] == 1  # --quick runs single-threaded
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_option_defaults_are_the_config_defaults() -> None:
    """prunebench/cli/bench.py repeats BenchConfig's defaults (the CLI imports no command to build --help)."""
    assert {k: getattr(BenchConfig(), k) for k in DEFAULTS} == DEFAULTS


def test_quick_report_records_the_main_plan(quick_report: tuple[dict, Path]) -> None:
    import torch

    rep, out = quick_report
    plan = rep["plan"]
    assert rep["config"]["round_to"] == plan["option"] == "auto"  # the recipe default
    assert plan["round_to"] == resolve_round_to("auto", torch.device("cpu")) and plan["exact_variant"]
    assert f"`round_to: auto` = {plan['round_to']}" in (out / "quick.md").read_text()


def test_quick_report_has_onnx_figures_or_a_reason(quick_report: tuple[dict, Path]) -> None:
    rep, out = quick_report
    dep = rep["details"]["deploy"]
    errors = dep["onnx_errors"]
    for k in rep["speedup"]:  # every model of the main plan: an ONNX speedup, or why not
        if "dense" in errors or k in errors:
            assert k not in rep["onnx_speedup"] and (errors.get(k) or errors["dense"])
            continue
        for key in ("onnx_speedup", "onnx_speedup_b1", "onnx_efficiency"):
            assert _finite(rep[key][k]) and rep[key][k] > 0, (key, k)
        assert rep["onnx_efficiency"][k] == pytest.approx(rep["onnx_speedup"][k] / rep["macs_ratio"][k])
        assert all(dep["onnx_ms"][bs][k] > 0 for bs in ("1", str(rep["config"]["batch"])))
    assert not any("exact" in k for k in rep["onnx_speedup"])  # the main plan only
    md = (out / "quick.md").read_text()
    assert "### ONNX Runtime and torch.compile" in md
    assert all(f"- ONNX, {k}: {why}" in md for k, why in errors.items())


def test_quick_skips_compile_and_says_so(quick_report: tuple[dict, Path]) -> None:
    rep, out = quick_report
    dep = rep["details"]["deploy"]
    assert rep["compiled_speedup"] == rep["compiled_speedup_b1"] == {} and not dep["compile_s"]
    assert "--quick" in dep["compile_note"] and dep["compile_note"] in (out / "quick.md").read_text()
    assert rep["config"]["compile"] is False


def test_quick_report_says_where_the_batch1_time_goes(quick_report: tuple[dict, Path]) -> None:
    rep, out = quick_report
    eager = rep["details"]["deploy"]["breakdown_b1"]["eager"]
    assert eager["wall_ms"] > 0 and eager["conv_ms"] > 0 and eager["other_ms"] >= 0
    assert eager["conv_ms"] + eager["other_ms"] + eager["remainder_ms"] == pytest.approx(eager["wall_ms"])
    md = (out / "quick.md").read_text()
    assert "### Where the batch-1 time goes" in md and f"convolutions {eager['conv_ms']:.2f} ms" in md


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("8", 8), (16, 16)])
def test_round_to_is_auto_or_a_count(value: object, parsed: object) -> None:
    assert parse_round_to(value) == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "-8", "x", "8.5", ""])
def test_a_bad_round_to_is_a_user_error(value: str) -> None:
    with pytest.raises(UserError, match="--round-to"):
        parse_round_to(value)


@pytest.mark.parametrize(
    ("argv", "round_to", "compile_"),
    [
        ([], "auto", True),
        (["--round-to", "1"], 1, True),
        (["--round-to", "8", "--no-compile"], 8, False),
        (["--quick"], "auto", False),
        (["--quick", "--round-to", "1"], 1, False),
    ],
)
def test_the_options_reach_the_config(
    argv: list[str], round_to: object, compile_: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prunebench.commands.bench as bench

    seen: list[BenchConfig] = []

    def fake_run(cfg: BenchConfig, **_: object) -> None:
        seen.append(cfg)
        raise UserError("stop")

    monkeypatch.setattr(bench, "run_bench", fake_run)
    assert main(["bench", *argv, "--out", "x"]) == 2
    assert seen[0].round_to == round_to and seen[0].compile is compile_


def test_deploy_figures_pair_each_model_with_its_dense_counterpart() -> None:
    session = SimpleNamespace(providers=["CPUExecutionProvider"])  # only the names and providers are read
    dep = Deployment(onnx=dict.fromkeys(("dense", "l1"), session), onnx_errors={"thinet": "ExportError: no"})  # type: ignore[arg-type]
    times = {b: {"dense": [4.0, 4.0, 4.0], "onnx:dense": [2.0, 3.0, 2.0], "onnx:l1": [1.0, 1.0, 2.0]} for b in (1, 16)}
    fig = deploy_figure(dep, times, {"l1": 2.0, "thinet": 2.0}, {})
    f = fig.figures()
    assert f["onnx_speedup"] == f["onnx_speedup_b1"] == {"l1": 2.0}  # median of 2/1, 3/1, 2/2; no thinet
    assert f["onnx_efficiency"] == {"l1": 1.0} and f["compiled_speedup"] == {}
    assert fig.vs_eager["onnx"][16].speedup == 2.0  # eager dense / ONNX dense
    details = fig.details()
    assert details["onnx_errors"] == {"thinet": "ExportError: no"}
    assert details["onnx_providers"] == ["CPUExecutionProvider"] and details["onnx_ms"]["16"]["l1"] == 1000.0


def test_compile_needs_a_cpp_compiler_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import prunebench.commands.bench.deployment as deployment

    monkeypatch.setattr(deployment.shutil, "which", lambda _name: None)
    assert "C++ compiler" in compile_unavailable(torch.device("cpu"))
    monkeypatch.setattr(deployment.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compile_unavailable(torch.device("cpu")) == ""
