"""The same tiny 2-rank job under torchrun, mpirun (mpi4py) and the deepspeed launcher, through the scripts
in launch/, plus a single process with no launcher, and --resume from a run stopped half-way.

Same seed, same world size, same backend: the math is identical, so the final parameters must be
bitwise identical across launchers.  The single-process run sees the same data (batches are drawn
globally, see sharded_optim.app.data) but sums gradients in a different order, so it agrees closely, not
bitwise.
"""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
import yaml

from tests.support.jobs import REPO, TINY_CONFIG, JobResult, job_env, require_module, require_tool, run_job

pytestmark = pytest.mark.slow

TINY = yaml.safe_load(TINY_CONFIG.read_text())
STEPS = TINY["training"]["steps"]


def check_finished_and_learned(result: JobResult, launcher: str, world_size: int) -> None:
    s = result.summary
    assert s["steps"] == STEPS and s["steps_this_run"] == STEPS, s
    assert s["launcher"] == launcher and s["world_size"] == world_size, s
    # ln(256) = 5.55 is a uniform guess; after 12 steps the byte frequencies alone bring it well below.
    assert s["initial_train_loss"] > 5.0, s
    assert s["final_train_loss"] < s["initial_train_loss"] - 1.0, s
    assert s["final_val_loss"] < s["initial_train_loss"] - 1.0, s
    assert [step for step, _ in s["loss_curve"]][-1] == STEPS


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> JobResult:
    require_tool("torchrun")
    return run_job(["bash", str(REPO / "launch" / "torchrun.sh")], tmp_path_factory.mktemp("torchrun"),
                   env=job_env(NPROC_PER_NODE="2"))


def test_torchrun(torchrun_run: JobResult):
    check_finished_and_learned(torchrun_run, "torchrun", 2)
    assert "summary:" in torchrun_run.output


def test_mpirun_matches_torchrun(torchrun_run: JobResult, tmp_path):
    require_tool("mpirun")
    require_module("mpi4py")
    result = run_job(["bash", str(REPO / "launch" / "mpirun.sh")], tmp_path / "mpi", env=job_env(NP="2"))
    check_finished_and_learned(result, "mpi", 2)
    assert_same_weights(result.weights(), torchrun_run.weights())


def test_deepspeed_launcher_matches_torchrun(torchrun_run: JobResult, tmp_path):
    require_tool("deepspeed")
    result = run_job(["bash", str(REPO / "launch" / "deepspeed.sh")], tmp_path / "ds",
                     env=job_env(NUM_GPUS="2"))
    check_finished_and_learned(result, "deepspeed", 2)
    assert_same_weights(result.weights(), torchrun_run.weights())


def test_single_process_agrees_with_two_ranks(torchrun_run: JobResult, tmp_path):
    result = run_job([sys.executable, "-m", "sharded_optim", "train"], tmp_path / "single")
    check_finished_and_learned(result, "none", 1)
    assert result.summary["backend"] is None
    single, pair = result.weights(), torchrun_run.weights()
    for name in single:
        # Same data and math, different summation order (one 8-sequence mean vs two 4-sequence means).
        torch.testing.assert_close(single[name], pair[name], rtol=1e-3, atol=1e-4, msg=name)
    for (s1, l1), (s2, l2) in zip(result.summary["loss_curve"], torchrun_run.summary["loss_curve"]):
        assert s1 == s2 and abs(l1 - l2) < 1e-3


# --- resume -----------------------------------------------------------------------------------------------

HALF = STEPS // 2


@pytest.fixture(scope="module")
def half_run_dir(tmp_path_factory):
    """A 2-rank run of the same job stopped at HALF (the schedule still spans STEPS), checkpointed there."""
    require_tool("torchrun")
    run_dir = tmp_path_factory.mktemp("half")
    half = run_job(["bash", str(REPO / "launch" / "torchrun.sh")], run_dir, env=job_env(NPROC_PER_NODE="2"),
                   extra_args=["--set", f"training.stop_at={HALF}", "--set", f"checkpoint.interval={HALF}"])
    assert half.summary["steps"] == HALF
    assert (run_dir / "checkpoints" / f"step_{HALF:08d}").is_dir()
    return run_dir


def test_resume_same_world_size_is_exact(torchrun_run: JobResult, half_run_dir, tmp_path):
    run_dir = shutil.copytree(half_run_dir, tmp_path / "run")  # a private copy: tests stay independent
    resumed = run_job(["bash", str(REPO / "launch" / "torchrun.sh")], run_dir, env=job_env(NPROC_PER_NODE="2"),
                      extra_args=["--resume"])
    s, straight = resumed.summary, torchrun_run.summary
    assert s["resumed_from"] == HALF and s["steps"] == STEPS and s["steps_this_run"] == STEPS - HALF
    assert "resumed from" in resumed.output
    assert s["loss_curve"][0] == straight["loss_curve"][0]  # the history travelled in the checkpoint
    assert s["final_val_loss"] == straight["final_val_loss"]
    assert_same_weights(resumed.weights(), torchrun_run.weights())


def test_resume_on_a_different_world_size(torchrun_run: JobResult, half_run_dir, tmp_path):
    run_dir = shutil.copytree(half_run_dir, tmp_path / "run")
    resumed = run_job([sys.executable, "-m", "sharded_optim.app.train"], run_dir, extra_args=["--resume"])
    assert resumed.summary["world_size"] == 1 and resumed.summary["resumed_from"] == HALF
    single, pair = resumed.weights(), torchrun_run.weights()
    for name in single:
        torch.testing.assert_close(single[name], pair[name], rtol=1e-3, atol=1e-4, msg=name)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result = run_job([sys.executable, "-m", "sharded_optim.app.train"], tmp_path / "fresh",
                     extra_args=["--resume", "--set", "training.steps=2", "--set", "training.eval_interval=0",
                                 "--set", "schedule.warmup_steps=1"])
    assert result.summary["steps"] == 2 and result.summary["resumed_from"] == 0
    assert "no checkpoint" in result.output
