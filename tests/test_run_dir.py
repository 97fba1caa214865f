"""One run per directory (sharded_optim.app.run_dir), in one process: refusal, --overwrite, --resume of a finished run,
metrics.jsonl after a resume, strict-JSON summaries.  The same rules through the launch scripts and torchrun are in
tests/test_launch_errors.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sharded_optim.app import cli
from sharded_optim.app.config import ConfigError, load_config
from sharded_optim.app.run_dir import RunDirError, check_start, clear_run, existing_run, finished_run, truncate_metrics
from tests.support.jobs import REPO, TINY_CONFIG, job_env

# 6 steps, checkpoints at 3 and 6: seconds in one process
SHORT = ["training.steps=6", "training.eval_interval=0", "schedule.warmup_steps=1", "checkpoint.interval=3",
         "checkpoint.at_end=true"]


def strict_json(path: Path):
    """Parse like a strict JSON reader: NaN/Infinity tokens are an error, not a float."""
    def refuse(token: str):
        raise ValueError(f"{path.name} holds the non-JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def train_cli(run_dir: Path, *flags: str, sets: tuple[str, ...] = ()) -> int:
    args = ["train", "--config", str(TINY_CONFIG), *flags]
    for item in (*SHORT, f"training.run_dir={run_dir}", *sets):
        args += ["--set", item]
    return cli.main(args)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints step_00000003 and step_00000006, summary, metrics)."""
    run_dir = tmp_path_factory.mktemp("finished")
    assert train_cli(run_dir) == 0
    return run_dir


def cfg_for(run_dir: Path, *sets: str):
    return load_config(TINY_CONFIG, [*SHORT, f"training.run_dir={run_dir}", *sets])


def test_a_new_run_in_a_directory_holding_one_is_refused(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    # a different algorithm would otherwise silently replace the AdamW run's checkpoints
    assert train_cli(run_dir, sets=("optimizer.algorithm=adamod",)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    for word in ("--resume", "--overwrite", "training.run_dir", "checkpoints/step_00000006", "summary.json"):
        assert word in err, (word, err)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched


def test_an_empty_or_unrelated_directory_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cfg = cfg_for(tmp_path)
    assert existing_run(cfg) == []
    check_start(cfg, resume=False, overwrite=False)  # no error
    with pytest.raises(RunDirError, match="--resume and --overwrite exclude each other"):
        check_start(cfg, resume=True, overwrite=True)


def test_overwrite_deletes_the_old_run_and_nothing_else(finished, tmp_path):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "checkpoints" / "README").write_text("mine too")
    old_summary = strict_json(run_dir / "summary.json")
    # 4 steps, one checkpoint at the end: the old step_00000003/step_00000006 must not survive beside it
    assert train_cli(run_dir, "--overwrite", sets=("training.steps=4", "checkpoint.interval=0")) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["README", "latest", "step_00000004"]
    assert (run_dir / "notes.txt").read_text() == "mine"
    summary = strict_json(run_dir / "summary.json")
    assert summary["steps"] == 4 and old_summary["steps"] == 6
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())][-1] == 4


def test_clear_run_removes_leftovers_of_an_interrupted_save(tmp_path):
    cfg = cfg_for(tmp_path)
    ckpt = cfg.checkpoint_dir
    (ckpt / ".step_00000009.partial").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000009\n")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert existing_run(cfg) == ["checkpoints/.step_00000009.partial", "metrics.jsonl"]
    assert {p.name for p in clear_run(cfg)} == {"metrics.jsonl", ".step_00000009.partial", "latest"}
    assert not ckpt.exists() and existing_run(cfg) == []


def test_resume_of_a_finished_run_leaves_it_untouched(finished, tmp_path, capsys):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    summary_bytes = (run_dir / "summary.json").read_bytes()
    assert train_cli(run_dir, "--resume") == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "step 6" in out and "--overwrite" in out
    assert (run_dir / "summary.json").read_bytes() == summary_bytes
    assert finished_run(cfg_for(run_dir)).step == 6


def test_resume_of_a_finished_run_without_summary_writes_a_real_one(finished, tmp_path):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    old = strict_json(run_dir / "summary.json")
    (run_dir / "summary.json").unlink()  # killed between the last checkpoint and the summary
    assert train_cli(run_dir, "--resume") == 0
    new = strict_json(run_dir / "summary.json")  # no NaN anywhere
    assert new["steps_this_run"] == 0 and new["resumed_from"] == 6 and new["tokens_per_s"] is None
    # the same weights evaluated on the same windows: the same validation loss, not NaN
    assert new["final_val_loss"] == old["final_val_loss"]
    assert new["final_train_loss"] == old["final_train_loss"]


def test_resume_drops_metrics_past_the_checkpoint(finished, tmp_path):
    run_dir = shutil.copytree(finished, tmp_path / "run")
    for name in ("step_00000006", "latest"):  # as if killed after step 6 was logged but before it was saved
        path = run_dir / "checkpoints" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run_dir / "summary.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')  # a record cut short by the kill
    assert train_cli(run_dir, "--resume") == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # step 1 from the first attempt (before the checkpoint at 3); 4 and 6 logged once, by the resumed run
    assert [(r["step"], "loss" in r) for r in records] == [(1, True), (4, True), (6, True), (6, False)], records


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5}\n{"step": 5, "val_loss": 4}\n{"step": 6, "loss": 3}\n{"step": 6')
    assert truncate_metrics(path, 5) == 2
    assert path.read_text() == '{"step": 1, "loss": 5}\n{"step": 5, "val_loss": 4}\n'
    assert truncate_metrics(tmp_path / "absent.jsonl", 5) == 0


def test_set_errors_name_the_command_line_not_the_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, ["optimizer.lr=-0.001"])
    text = str(info.value)
    assert "on the command line" in text and "--set optimizer.lr=-0.001" in text
    assert str(TINY_CONFIG) not in text  # the file is not to blame
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {algorithm: adamww}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["training.steps=0"])
    text = str(info.value)
    assert f"in {bad} and on the command line" in text
    lines = {line.strip().split(":")[0]: line for line in text.splitlines()[1:]}
    assert "got 'adamww'" in lines["optimizer.algorithm"] and "--set" not in lines["optimizer.algorithm"]
    assert lines["training.steps"].endswith("(from the command line: --set training.steps=0)")


def test_python_m_train_prints_one_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sharded_optim.app.train", "--config", str(tmp_path / "missing.yaml")],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "missing.yaml" in proc.stderr and "No such file" in proc.stderr
