"""Running the training job as a real subprocess (under a real launcher) and reading what it wrote."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent


def job_env(**extra: str) -> dict[str, str]:
    """Environment for a job: this interpreter's bin first on PATH, the checkout importable, 1 thread."""
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)  # a test run inside a launcher must not leak its rendezvous into the child
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _missing(message: str) -> None:
    """A missing dependency is a skip locally but a failure in CI (CI=true)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of an executable (this interpreter's bin directory first)."""
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        _missing(f"{name} not found (install the project's extras: pip install -e '.[mpi,deepspeed]')")
    return path


def require_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        _missing(f"Python module {name} not found (install the project's extras: pip install -e '.[mpi]')")


@dataclass
class JobResult:
    run_dir: Path
    output: str
    summary: dict

    def weights(self) -> dict[str, torch.Tensor]:
        return torch.load(self.run_dir / "final_weights.pt", weights_only=True)


def run_job(cmd: list[str], run_dir: Path, timeout: float = 240, env: dict[str, str] | None = None,
            extra_args: list[str] | None = None) -> JobResult:
    """Run ``cmd`` + the tiny config (+ ``extra_args``) writing to ``run_dir``; fail with the output if it
    does not exit 0 or leaves no summary."""
    full = [*cmd, "--config", str(TINY_CONFIG), "--set", f"training.run_dir={run_dir}", *(extra_args or [])]
    proc = subprocess.run(full, cwd=REPO, env=env or job_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(full)} exited {proc.returncode}:\n{output[-6000:]}"
    summary_file = run_dir / "summary.json"
    assert summary_file.is_file(), f"no summary.json after {' '.join(full)}:\n{output[-4000:]}"
    return JobResult(run_dir, output, json.loads(summary_file.read_text()))
