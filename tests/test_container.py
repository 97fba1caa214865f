"""The Dockerfile and the packaging metadata, read as their users meet them (no Docker daemon or registry here).

The container's documented use is ``docker run --gpus all -p 9400-9407:9400-9407 sharded-optim``: "the quickstart on
every visible GPU".  That is true only if the default command's config exists and validates, asks for CUDA (so the
ranks use NCCL), binds its metrics on an address that published ports reach, on the ports the image exposes, and
if the base image carries the torch the suite is tested with.  pip's view of pyproject.toml: the license in the
non-deprecated SPDX form, with a build backend new enough to read it, and no deprecation warning.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

from sharded_optim.app.config import load_config
from tests.support.jobs import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it (pip is in every venv)
    from pip._vendor import tomli as tomllib

MAX_GPUS_PER_NODE = 8


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def only(instruction: str) -> str:
    (args,) = [a for word, a in dockerfile() if word == instruction]
    return args


def constraint_version(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"{package}==([\w.]+)\s*(#.*)?", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"constraints.txt pins no {package}")


def test_base_image_carries_the_tested_torch():
    image = only("FROM")
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn(\d+)-runtime", image)
    assert m, f"FROM {image}: expected an official pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag"
    torch_version = ".".join(m.group(1, 2, 3))
    assert tuple(map(int, m.group(1, 2))) >= (2, 11), f"FROM {image}: torch {torch_version} is older than tested"
    # the suite runs on the pinned torch; the image installs with torch constrained to its own build
    assert torch_version == constraint_version("torch"), (image, constraint_version("torch"))


def test_install_keeps_the_images_torch():
    runs = [a for word, a in dockerfile() if word == "RUN"]
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1 and "-c /tmp/constraints.txt" in install[0] and "torch==" in install[0], install


def default_command() -> list[str]:
    return json.loads(only("CMD"))  # exec form: a JSON array


def default_config() -> str:
    cmd = default_command()
    assert cmd[2:3] == ["--config"] and len(cmd) == 4, cmd  # no --set: the config file says it all
    return cmd[3]


def test_default_command_trains_a_valid_gpu_config():
    cmd = default_command()
    assert cmd[:2] == ["bash", "launch/torchrun.sh"], cmd
    config = default_config()
    assert (REPO / config).is_file(), config
    copied = {a.split()[-1].lstrip("./").rstrip("/") for word, a in dockerfile() if word == "COPY"}
    assert {"launch", "configs", "sharded_optim"} <= copied, copied  # the command's files are in the image
    cfg = load_config(REPO / config)  # raises ConfigError, naming every bad field, if it does not validate
    assert cfg.training.device == "cuda"  # the job picks NCCL for CUDA ranks
    assert cfg.telemetry.enabled and cfg.telemetry.addr == "0.0.0.0", cfg.telemetry
    assert cfg.training.batch_size % (cfg.training.grad_accum * MAX_GPUS_PER_NODE) == 0  # 1, 2, 4 or 8 GPUs
    assert not cfg.data.path, "the default command must run on the shipped corpus"


def test_exposed_and_documented_ports_are_the_metrics_ports():
    cfg = load_config(REPO / default_config())
    metrics = range(cfg.telemetry.base_port, cfg.telemetry.base_port + MAX_GPUS_PER_NODE)  # base + local rank
    exposed = only("EXPOSE")
    lo, _, hi = exposed.partition("-")
    assert range(int(lo), int(hi or lo) + 1) == metrics, exposed
    usage = (REPO / "Dockerfile").read_text()
    published = re.findall(r"docker run --gpus all --rm -p (\d+)-(\d+):(\d+)-(\d+) sharded-optim\s", usage)
    assert published == [(lo, hi, lo, hi)], published


def test_pyproject_license_is_an_spdx_string_that_setuptools_reads_without_warnings(tmp_path):
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    (backend,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert backend == "setuptools>=77", backend  # the first release that reads the SPDX string
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "sharded_optim", tmp_path / "sharded_optim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                           "from setuptools import setup; setup()", "egg_info"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
    pkg_info = (tmp_path / "sharded_optim.egg-info" / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in pkg_info


def test_other_documented_run_commands_name_existing_configs():
    usage = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"docker run --gpus all --rm sharded-optim (.+)", usage):
        argv = shlex.split(line)
        assert argv[:2] == ["bash", "launch/torchrun.sh"], argv
        assert (REPO / argv[argv.index("--config") + 1]).is_file(), argv
