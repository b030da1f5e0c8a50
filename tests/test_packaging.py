"""Packaging: methods/ installs as prunebench.methods (package-dir mapping), in editable mode and in a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_methods_subpackage_imports() -> None:
    import prunebench.methods as m

    assert Path(m.__file__).resolve().parent == (ROOT / "methods").resolve()


def test_built_wheel_contains_methods(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("prunebench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("prunebench/methods/") and n.endswith(".py")}
    expected = {p.name for p in (ROOT / "methods").glob("*.py")}
    assert expected and expected <= shipped
    assert not any(n.startswith("methods/") for n in names), "a generic top-level 'methods' package must not ship"
    assert any(n.endswith("entry_points.txt") for n in names)


def test_python_dash_m_and_console_script() -> None:
    for cmd in (
        [sys.executable, "-m", "prunebench", "--help"],
        [str(Path(sys.executable).parent / "prunebench"), "methods"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert (
        "run" in subprocess.run([sys.executable, "-m", "prunebench", "--help"], capture_output=True, text=True).stdout
    )
