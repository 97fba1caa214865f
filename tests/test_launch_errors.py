"""A user's mistakes and Ctrl-C through the real launch script (launch/torchrun.sh, 2 gloo ranks under torchrun).

* configuration mistakes are caught by the preflight before torchrun starts: one message, exit 2;
* a second run in a run directory is refused (naming --resume, --overwrite, training.run_dir) before torchrun;
* an error inside the distributed run (a checkpoint of another algorithm) prints once, without tracebacks;
* --resume drops the records a run logged past its last checkpoint; --resume of a finished run changes nothing;
* SIGINT to the whole process group (what a terminal's Ctrl-C does) stops cleanly and names the last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.jobs import REPO, TINY_CONFIG, job_env, require_tool

pytestmark = pytest.mark.slow

SCRIPT = str(REPO / "launch" / "torchrun.sh")
NOISE = ("Traceback", "ChildFailedError", "SignalException", "KeyboardInterrupt", "[rank")


def launch(run_dir: Path, *args: str, config: str | Path = TINY_CONFIG, timeout: float = 240) -> tuple[int, str]:
    cmd = ["bash", SCRIPT, "--config", str(config), "--set", f"training.run_dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(NPROC_PER_NODE="2"), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def assert_one_clean_error(output: str) -> None:
    assert output.count("error:") == 1, output
    for word in NOISE:
        assert word not in output, (word, output)


def assert_torchrun_not_started(output: str) -> None:
    # the job's first line names the launcher; torchrun's own lines start with "torchrun:" or a log prefix
    assert "rank(s), backend" not in output and "torchrun:" not in output and "torch/distributed" not in output, output


@pytest.mark.parametrize("args, config, expected", [
    (["--set", "optimizer.algorithm=adamww"], None, "optimizer.algorithm: got 'adamww'"),
    (["--set", "optimizer.lr=-0.001"], None, "invalid configuration on the command line (--set)"),
    ([], "configs/does-not-exist.yaml", "configs/does-not-exist.yaml:\n  cannot read config file"),
])
def test_config_errors_stop_before_torchrun(tmp_path, args, config, expected):
    rc, out = launch(tmp_path / "run", *args, config=config or TINY_CONFIG, timeout=120)
    assert rc == 2, out
    assert expected in out
    assert_one_clean_error(out)
    assert_torchrun_not_started(out)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A 2-rank run stopped at step 6 whose last checkpoint is step 4: like a run killed two steps after it."""
    require_tool("torchrun")
    run_dir = tmp_path_factory.mktemp("stopped")
    rc, out = launch(run_dir, "--set", "training.stop_at=6", "--set", "checkpoint.interval=4")
    assert rc == 0, out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000004"]
    return run_dir


def test_second_run_in_the_same_directory_is_refused_before_torchrun(stopped_run):
    before = {p: p.stat().st_mtime_ns for p in stopped_run.rglob("*")}
    rc, out = launch(stopped_run, "--set", "optimizer.algorithm=adamod", timeout=120)
    assert rc == 2, out
    for word in ("--resume", "--overwrite", "training.run_dir", "checkpoints/step_00000004"):
        assert word in out, (word, out)
    assert_one_clean_error(out)
    assert_torchrun_not_started(out)
    assert {p: p.stat().st_mtime_ns for p in stopped_run.rglob("*")} == before


def test_checkpoint_error_inside_the_run_prints_once(stopped_run):
    rc, out = launch(stopped_run, "--resume", "--set", "optimizer.algorithm=adamax")
    assert rc == 2, out
    assert "saved by algorithm 'adamw'" in out and "'adamax'" in out
    assert_one_clean_error(out)
    assert "torchrun: rank" in out and "exited with status 2" in out  # the launcher's one line


def test_launcher_reports_the_rank_that_printed_the_error_not_a_peer_killed_in_teardown():
    # torchrun's own "first failure" is ordered by whole-second timestamps: a peer that died by a signal in the
    # same second (torchrun SIGTERMs the others once one rank exits) must not hide the reported error (status 2)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from sharded_optim.app.torchrun import _root_cause

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")

    torn_down = ChildFailedError("job", {1: failure(1, -6), 0: failure(0, 2), 2: failure(2, 2)})
    rank, chosen = _root_cause(torn_down)
    assert (rank, chosen.exitcode) == (0, 2)
    crashed = ChildFailedError("job", {1: failure(1, -11)})  # no reported error: torchrun's choice stands
    assert _root_cause(crashed)[0] == 1 and _root_cause(crashed)[1].exitcode == -11


def test_resume_drops_records_past_the_checkpoint_then_a_finished_run_is_left_alone(stopped_run, tmp_path):
    run_dir = shutil.copytree(stopped_run, tmp_path / "run")
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 6  # the first attempt logged steps 5-6, past its checkpoint at 4
    rc, out = launch(run_dir, "--resume", "--set", "checkpoint.interval=4", "--set", "checkpoint.at_end=true")
    assert rc == 0 and "resumed from" in out, out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in records if "loss" in r]
    assert losses == sorted(set(losses)) and losses[-1] == 12, records  # step 6 once, from the resumed run
    summary = (run_dir / "summary.json").read_bytes()
    assert json.loads(summary)["steps"] == 12

    rc, out = launch(run_dir, "--resume", "--set", "checkpoint.interval=4", "--set", "checkpoint.at_end=true",
                     timeout=120)
    assert rc == 0, out
    assert "already finished" in out and "step 12" in out
    assert_torchrun_not_started(out)
    assert (run_dir / "summary.json").read_bytes() == summary


def test_sigint_stops_cleanly_and_names_the_last_checkpoint(tmp_path):
    require_tool("torchrun")
    run_dir = tmp_path / "run"
    cmd = ["bash", SCRIPT, "--config", str(TINY_CONFIG), "--set", f"training.run_dir={run_dir}",
           "--set", "training.steps=100000", "--set", "checkpoint.interval=5", "--set", "training.eval_interval=0"]
    # a new session: the signal goes to the launcher and every rank, as a terminal's Ctrl-C does
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    last = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"the last checkpoint is {run_dir / 'checkpoints' / last}" in out, out
    assert "--resume" in out and "torchrun: stopped by SIGINT" in out
    for word in NOISE:
        assert word not in out, (word, out)
    assert not (run_dir / "summary.json").exists()
