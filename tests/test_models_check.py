"""``prunebench models --check`` (the model-zoo report) and the CIFAR models in timm's registry after a bare
``import prunebench``."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
