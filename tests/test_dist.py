"""Process bootstrap: launcher detection, the deepspeed --local_rank flag, threads, the single-process
mode, and a collective timeout turning a hung rank into a clear error on a real 2-rank gloo group."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from sharded_optim import dist as sdist
from tests.support.jobs import REPO, job_env, require_tool


@pytest.mark.parametrize("env, launcher", [
    ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}, "torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0"}, "deepspeed"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "env"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpi"),
    ({"PATH": "/usr/bin"}, "none"),
])
def test_detect_launcher(env, launcher):
    assert sdist.detect_launcher(env) == launcher


def test_strip_launcher_args():
    argv = ["--local_rank=1", "--config", "c.yaml", "--local-rank", "0", "--set", "a.b=1"]
    assert sdist.strip_launcher_args(argv) == ["--config", "c.yaml", "--set", "a.b=1"]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_order(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sdist.set_threads(local_world_size=2, num_threads=3) == 3 and torch.get_num_threads() == 3
    assert sdist.set_threads(local_world_size=2) == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert sdist.set_threads(local_world_size=2) == expected


def test_single_process_has_no_process_group(monkeypatch, restore_threads):
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_RANKID"):
        monkeypatch.delenv(var, raising=False)
    info = sdist.init_distributed(num_threads=1)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "none")
    assert info.backend is None and not info.distributed and info.is_main
    assert not dist.is_initialized()
    sdist.cleanup()  # a no-op without a group


@pytest.mark.parametrize("kwargs, fragment", [
    ({"timeout_s": 0}, "timeout_s: got 0"),
    ({"backend": "mpi"}, "backend: got 'mpi'"),
])
def test_bad_arguments_are_explained(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sdist.init_distributed(**kwargs)


HUNG_RANK_SCRIPT = r'''
import sys, time
from pathlib import Path
import torch, torch.distributed as dist
from sharded_optim.dist import cleanup, describe_timeout, init_distributed

released = Path(sys.argv[1])
info = init_distributed(timeout_s=2.0)
code = 0
if info.rank == 0:
    try:
        dist.all_reduce(torch.ones(4))  # rank 1 never joins
        print("NO ERROR", flush=True)
        code = 1
    except RuntimeError as exc:
        print("EXPLAINED:", describe_timeout(exc, info, 2.0), flush=True)
    released.write_text("done")
else:
    # The "hung" rank: wait (bounded) until rank 0 has seen its error, then leave quietly.
    deadline = time.monotonic() + 120
    while not released.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
cleanup(barrier=False)
sys.exit(code)
'''


@pytest.mark.slow
def test_hung_rank_becomes_a_clear_timeout_error(tmp_path):
    torchrun = require_tool("torchrun")
    script = tmp_path / "hung_rank.py"
    script.write_text(HUNG_RANK_SCRIPT)
    with socket.create_server(("127.0.0.1", 0)) as sock:
        free_port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port), str(script),
                           str(tmp_path / "released")], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next(x for x in out.splitlines() if x.startswith("EXPLAINED:"))
    assert "rank 0/2: a collective did not complete within 2 s" in line
    assert "another rank is probably hung or dead" in line
    assert "Timed out" in line  # the backend's own words are kept


def test_describe_timeout_ignores_other_errors():
    info = sdist.DistInfo(0, 2, 0, 2, "gloo", "torchrun")
    assert sdist.describe_timeout(RuntimeError("shape mismatch"), info, 5.0) is None
    assert "within 5 s" in sdist.describe_timeout(RuntimeError("Timed out waiting 5000ms"), info, 5.0)
