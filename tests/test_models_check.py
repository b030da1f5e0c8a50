"""``prunebench models --check`` (the model-zoo report) and the CIFAR models in timm's registry after a bare
``import prunebench``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from timm.models import _registry
from torch import Tensor, nn

from prunebench.cli import main
from prunebench.cli.models import DEFAULTS
from prunebench.commands.models import ZooConfig, check_models, render_markdown

TINY = ["resnet8_cifar", "mobilenetv3_small_050"]


class _StemOnly(nn.Module):
    """A stem conv and a classifier: nothing the engine may prune."""

    def __init__(self, num_classes: int = 10, **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class _Broken(_StemOnly):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this network cannot run\nsecond line of the message")


@pytest.fixture
def odd_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two models in timm's registry for this test only: one with nothing to prune, one whose forward fails."""

    def stem_only(pretrained: bool = False, **kwargs: object) -> nn.Module:
        return _StemOnly(**kwargs)

    def broken(pretrained: bool = False, **kwargs: object) -> nn.Module:
        return _Broken(**kwargs)

    names = {"zoo_test_stem_only": stem_only, "zoo_test_broken": broken}
    for name, fn in names.items():
        monkeypatch.setitem(_registry._model_entrypoints, name, fn)
    return list(names)


def test_check_writes_report_with_every_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "zoo"
    args = ["models", "--check", *TINY, "--size", "32", "--out", str(out), "--methods", "l1,thinet"]
    assert main([*args, "-q"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in TINY)

    doc = json.loads((out / "models.json").read_text())
    assert doc["command"] == "prunebench " + " ".join(args)
    assert doc["config"]["size"] == 32 and doc["config"]["targets"] == [0.3, 0.5]
    methods = doc["config"]["methods"]
    assert methods == ["l1", "thinet"]  # a global ranking and a calibrated method
    assert [m["model"] for m in doc["models"]] == TINY
    for m in doc["models"]:
        assert m["error"] is None, m
        assert m["params"] > 0 and m["macs"] > 0 and m["groups_seconds"] >= 0
        assert set(m["groups"]) == set(m["reach"]) == {"internal", "all"}
        assert 0 < m["groups"]["internal"] <= m["groups"]["all"]
        assert 0 < m["reach"]["internal"] <= m["reach"]["all"] < 1
        assert {(c["method"], c["target"]) for c in m["cuts"]} == {(x, t) for x in methods for t in (0.3, 0.5)}
        for c in m["cuts"]:  # every cut either landed or says why in words
            assert c["ok"] or (c["error"] and "\n" not in c["error"]), c
            if c["ok"]:
                assert abs(c["reduction"] - c["target"]) <= 0.01 and c["scope"] in ("internal", "all")
    resnet = doc["models"][0]
    assert all(c["ok"] for c in resnet["cuts"]), [c for c in resnet["cuts"] if not c["ok"]]

    md = (out / "models.md").read_text()
    assert f"`{doc['command']}`" in md
    for header in ("## Models", "## Cuts", "## Failures", "groups internal / all", "reach internal", "groups s"):
        assert header in md
    assert "cuts at 30%" in md and "cuts at 50%" in md
    assert md == render_markdown(doc)


def test_failing_models_are_rows_with_reasons(odd_models: list[str]) -> None:
    so_far: list[dict] = []
    cfg = ZooConfig(models=("resnet8_cifar", *odd_models), size=32)  # every registered method
    doc = check_models(cfg, quiet=True, after_each=so_far.append)
    assert [d["summary"]["models"] for d in so_far] == [1, 2, 3] and so_far[-1]["models"] == doc["models"]
    assert "Partial report: 1 of the 3 models done so far" in render_markdown(so_far[0])
    assert "Partial report" not in render_markdown(doc)
    ok, stem_only, broken = doc["models"]
    assert ok["error"] is None and all(c["ok"] for c in ok["cuts"])
    assert stem_only["stage"] == "groups" and "nothing to prune" in stem_only["error"]
    assert broken["stage"] == "build"
    assert broken["error"] == "RuntimeError: this network cannot run"
    n_cuts = 2 * len(doc["config"]["methods"])
    assert doc["summary"] == {"models": 3, "checked": 1, "cuts": n_cuts, "cuts_ok": n_cuts}
    md = render_markdown(doc)
    assert "**zoo_test_broken** (build): RuntimeError: this network cannot run" in md
    assert "FAILED (groups)" in md


def test_warnings_are_counted_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunebench.commands.models import check

    def build_groups(*args, **kwargs):
        logging.getLogger("prunebench.groups").warning("left whole (not pruned): a test group\nmore detail")
        return original(*args, **kwargs)

    original = check.build_groups
    monkeypatch.setattr(check, "build_groups", build_groups)
    doc = check_models(ZooConfig(models=("resnet8_cifar",), size=32, methods=("l1",)), quiet=True)
    assert doc["models"][0]["warnings"] == {"left whole (not pruned): a test group": 1}
    assert "- **resnet8_cifar**: left whole (not pruned): a test group" in render_markdown(doc)


def test_unreachable_target_is_a_reason_not_a_crash() -> None:
    doc = check_models(ZooConfig(models=("resnet8_cifar",), size=32, targets=(0.95,), methods=("l1",)), quiet=True)
    (cut,) = doc["models"][0]["cuts"]
    assert not cut["ok"] and cut["reduction"] is None
    assert "cannot be reached" in cut["error"] and "reaches at most" in cut["error"]


def test_check_input_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--check", "no_such_net_*"]) == 2
    assert main(["models", "--check", "resnet8_cifr"]) == 2
    assert "resnet8_cifar" in capsys.readouterr().err  # did you mean
    assert main(["models", "--check", "resnet8_cifar", "--methods", "l2"]) == 2
    assert main(["models", "--size", "32"]) == 2  # --size without --check
    err = capsys.readouterr().err
    assert "unknown method 'l2'" in err and "only apply with --check" in err


def test_cli_defaults_agree_with_config() -> None:
    assert ZooConfig().size == DEFAULTS["size"]


def test_listing_takes_several_patterns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "resnet8_cifar", "vgg16_cifar", "resnet8_cifar"]) == 0
    assert capsys.readouterr().out.split() == ["resnet8_cifar", "vgg16_cifar"]


# -- CIFAR models in timm's registry after `import prunebench` (fresh interpreters) --------------------


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Overwriting" not in proc.stderr, proc.stderr  # registered once
    return proc.stdout.strip()


@pytest.mark.parametrize(
    "imports",
    [
        "import prunebench, timm",
        "import timm, prunebench",
        "import prunebench.engine, timm",  # torch-pruning imports timm halfway through its own import
        "import prunebench; import torch_pruning; import timm",
    ],
)
def test_import_prunebench_registers_cifar_models(imports: str) -> None:
    out = _python(
        f"{imports}\n"
        "m = timm.create_model('resnet56_cifar', num_classes=10)\n"
        "print(type(m).__name__, 'resnet20_cifar' in timm.list_models('*_cifar'))"
    )
    assert out == "CifarResNet True"


def test_import_prunebench_stays_light() -> None:
    assert _python("import prunebench, sys; print('torch' in sys.modules, 'timm' in sys.modules)") == "False False"


def test_timm_alone_is_untouched() -> None:
    assert _python("import timm; print(timm.is_model('resnet56_cifar'))") == "False"


def test_timm_itself_keeps_its_loader() -> None:
    out = _python(
        "import prunebench, sys, timm\n"
        "print(type(timm.__loader__).__name__, type(timm.__spec__.loader).__name__, "
        "any(type(f).__name__ == '_RegisterOnImport' for f in sys.meta_path))"
    )
    assert out == "SourceFileLoader SourceFileLoader False"
