"""prunebench.hostmem: with glibc told to keep freed memory, a repeated CPU forward pass stops page-faulting.

Each case runs in a fresh interpreter: the allocator's settings are per process and cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prunebench import hostmem

FORWARDS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from prunebench.hostmem import keep_freed_memory
    print(keep_freed_memory())
torch.set_num_threads(1)
layers = [m for _ in range(4) for m in (torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())]
net = torch.nn.Sequential(*layers).eval()
x = torch.randn(64, 16, 32, 32)  # 4 MiB activations, as in a CIFAR ResNet's first stage
with torch.inference_mode():
    for _ in range(5):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _default_env() -> dict[str, str]:
    """This environment without the allocator choices :func:`hostmem.keep_freed_memory` would defer to."""
    return {k: v for k, v in os.environ.items() if k not in hostmem.USER_SETTINGS}


def _faults_per_forward(mode: str) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-c", FORWARDS, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=_default_env(),
    ).stdout.splitlines()
    return float(out[-1]), out[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_stops_the_page_faults_of_repeated_forwards() -> None:
    default, _ = _faults_per_forward("default")
    kept, state = _faults_per_forward("kept")
    assert state.startswith("glibc ") and "freed memory kept" in state
    assert default > 1000  # the premise: glibc gives the activations back and faults them in again
    assert kept < default / 20  # at most the odd first touch of a new heap peak


def test_an_allocator_chosen_through_the_environment_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert hostmem._configure() == "left as set by MALLOC_TRIM_THRESHOLD_"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_ray_task_sets_it_up_as_the_command_line_does(tmp_path) -> None:
    """Ray runs cells and tune workers in its own worker processes, which never pass through the CLI."""
    code = f"""
import mlflow
from prunebench.commands.raytasks import TaskEnv, in_task
from prunebench.hostmem import allocator_state
uri = "sqlite:///{tmp_path}/mlflow.db"
mlflow.set_tracking_uri(uri)
experiment = mlflow.create_experiment("hostmem")
print(allocator_state())
with in_task(TaskEnv(cwd="{tmp_path}", uri=uri, experiment_id=experiment, plugins=(), threads=None)):
    print(allocator_state())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_default_env())
    assert out.returncode == 0, out.stderr[-2000:]
    before, during = out.stdout.splitlines()[-2:]
    assert before == "system default" and "freed memory kept" in during
