"""Nothing silent: damaged checkpoints are refused before anything changes and ``latest=True`` falls back past
them; ranks that disagree refuse to build the optimizer; a full disk, a taken port and a damaged checkpoint
under ``inspect`` give errors that name their cause.  Real files, real 2-rank gloo groups (one spawn for all
multi-rank cases), a real tmpfs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sharded_optim import ShardedOptimizer, checkpoint, telemetry
from sharded_optim.checkpoint import CheckpointCorruptError, CheckpointError
from sharded_optim.app.cli import main as cli_main
from tests.support import silent_scenarios
from tests.support.jobs import REPO, job_env
from tests.support.multiproc import run_ranks
from tests.support.scenarios import Scenarios
from tests.test_checkpoint import assert_unchanged, memory, run, tiny

FIXTURE = REPO / "tests" / "data" / "ckpt_v1"


def _both(rank: int, world: int, root: str) -> Scenarios:
    """"agree": per disagreement case ("order", "lr", ...); "damage": per damage ("shard_bit", ...) and "v1"."""
    return Scenarios(agree=Scenarios(silent_scenarios.disagreements(rank, world)),
                     damage=Scenarios(silent_scenarios.damaged_checkpoints(rank, world, root)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Scenarios]:
    root = tmp_path_factory.mktemp("silent")
    return run_ranks(_both, 2, str(root), timeout=240, collective_timeout_s=30,
                     env={"SHARDED_OPTIM_KERNEL": "eager"})


# ------------------------------------------------------------------------------------------- ranks agree
EXPECTED = {  # case -> fragments of the message every rank raises: the item, rank 0's value, rank 1's value
    "order": ["param_groups[0]['params'][0]: shape", "rank 0 has ((4, 3)", "rank 1 has ((5,)"],
    "order_same_shapes": ["param_groups[0]['params'][0]: values", "rank 0 has (", "rank 1 has ("],
    "count": ["param_groups[0]: number of params", "rank 0 has 2", "rank 1 has 3"],
    "shapes": ["param_groups[0]['params'][0]: shape", "rank 0 has ((4, 3)", "rank 1 has ((3, 4)"],
    "algorithm": ["algorithm", "rank 0 has 'adamw'", "rank 1 has 'adamax'"],
    "lr": ["param_groups[0]['lr']", "rank 0 has 0.001", "rank 1 has 0.002"],
    "betas": ["param_groups[0]['betas']", "rank 0 has (0.9, 0.999)", "rank 1 has (0.9, 0.99)"],
    "add_param_group": ["param_groups[1]['lr']", "rank 0 has 0.001", "rank 1 has 0.005"],
}


def test_ranks_that_agree_build_and_step(two_ranks):
    for rank, result in enumerate(two_ranks):
        agree = result["agree"]
        assert agree["identical"]["error"] is None, f"identical rank {rank}: {agree['identical']}"
        assert agree["stepped"], f"rank {rank}: the agreeing optimizer built after the refusals did not step"


@pytest.mark.parametrize("case", list(EXPECTED))
def test_ranks_that_disagree_refuse_on_every_rank(two_ranks, case):
    fragments = EXPECTED[case]
    for rank, result in enumerate(two_ranks):
        agree = result["agree"]
        message = agree[case]["error"]
        assert message is not None, f"{case} rank {rank}: accepted"
        for fragment in fragments:
            assert fragment in message, f"{case} rank {rank}: {fragment!r} not in {message!r}"
        assert agree[case]["seconds"] < 10, f"{case} rank {rank}: {agree[case]['seconds']} s"
    # the same message on both ranks
    assert two_ranks[0]["agree"][case]["error"] == two_ranks[1]["agree"][case]["error"], \
        f"{case}: the ranks' messages differ"


# ------------------------------------------------------------------------------- damaged checkpoints, 2 ranks
CAUSES = {  # damage -> what the refusal names
    "shard_bit": "__0_0.distcp bytes",
    "metadata_bit": "DCP metadata .metadata: checksum mismatch",
    "meta_json_digit": "meta.json does not match its checksum",
    "rng_bit": "rng/rank_00001.json: checksum mismatch",
    "truncated_shard": "__1_0.distcp bytes",
    "missing_metadata": "cannot read DCP metadata .metadata",
}


@pytest.mark.parametrize("how", list(CAUSES))
def test_damaged_checkpoint_is_refused_and_fallback_loads_the_previous(two_ranks, how):
    cause = CAUSES[how]
    for rank, result in enumerate(two_ranks):
        r = result["damage"][how]
        where = f"{how} rank {rank}"
        assert r["direct"] is not None and cause in r["direct"], f"{where}: {r['direct']}"
        assert r["unchanged"], f"{where}: a refused load changed the model or optimizer"
        assert r["seconds"] < 20, f"{where}: {r['seconds']} s"
        assert r["no_fallback"] and "fallback is off" in r["no_fallback"], f"{where}: {r['no_fallback']}"
        assert r["unchanged_after_no_fallback"], f"{where}: a refused load (fallback off) changed something"
        assert Path(r["path"]).name == "step_2" and r["step"] == 2, f"{where}: {r['path']} step {r['step']}"
        assert [Path(s["path"]).name for s in r["skipped"]] == ["step_4"], f"{where}: {r['skipped']}"
        assert cause in r["skipped"][0]["reason"], f"{where}: {r['skipped']}"
        assert r["equals_step_2"], f"{where}: the fallback did not restore step_2 exactly"


def test_format_1_checkpoint_loads_at_world_size_2_and_1(two_ranks):
    """A checkpoint written before checksums, through ShardedTensor, at world size 2: loads at 2 (RNG too)
    and at 1, equal to the state it was saved from."""
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=0.05, kernel="eager", amsgrad=True)
    info = checkpoint.load(FIXTURE / "step_3", model, opt)
    assert info["step"] == 3 and info["world_size"] == 2 and not info["rng_restored"]
    loaded = [(model.state_dict(), opt.state_dict()["state"], "1 process")]
    for rank, result in enumerate(two_ranks):
        v1 = result["damage"]["v1"]
        assert v1["info"]["rng_restored"] and v1["info"]["extra"] == {"made_by": "format v1"}, \
            f"v1 rank {rank}: {v1['info']}"
        loaded.append(({k: torch.from_numpy(v) for k, v in v1["model"].items()},
                       {i: {k: torch.from_numpy(v) for k, v in e.items()} for i, e in v1["state"].items()},
                       f"2 ranks, rank {rank}"))
    for model_sd, state, where in loaded:
        for k, v in expected["model"].items():
            assert torch.equal(v, model_sd[k]), f"{where}: model[{k}]"
        for i, entry in expected["state"].items():
            for k, v in entry.items():
                assert torch.equal(v, state[i][k]), f"{where}: state[{i}][{k}]"


# --------------------------------------------------------------------------------------- one process
def test_nonfinite_state_is_refused_and_fallback_skips_it(tmp_path):
    model, opt = tiny("adamw")
    run(model, opt, 2)
    checkpoint.save(tmp_path / "step_2", model, opt, step=2)
    opt.state[next(iter(model.parameters()))]["exp_avg"][0, 1] = float("nan")  # as a diverged run would save
    checkpoint.save(tmp_path / "step_3", model, opt, step=3)
    fresh, fresh_opt = tiny("adamw", seed=5)
    run(fresh, fresh_opt, 1)
    before = memory(fresh, fresh_opt)
    with pytest.raises(CheckpointCorruptError, match=r"optimizer state 'exp_avg' of \['0.weight'.* 1 non-finite"):
        checkpoint.load(tmp_path / "step_3", fresh, fresh_opt)
    assert_unchanged(before, memory(fresh, fresh_opt))
    info = checkpoint.load(tmp_path, fresh, fresh_opt, latest=True)
    assert Path(info["path"]).name == "step_2" and "non-finite" in info["skipped"][0]["reason"]
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        checkpoint.load(tmp_path / "empty", fresh, fresh_opt, latest=True)


def test_a_checkpoint_that_does_not_fit_is_not_skipped(tmp_path):
    """Fallback is for damage only: another algorithm's checkpoint raises, it is not skipped for an older one."""
    model, opt = tiny("nadam")
    run(model, opt, 1)
    checkpoint.save(tmp_path / "step_1", model, opt, step=1)
    other, other_opt = tiny("adamw")
    with pytest.raises(CheckpointError, match="saved by algorithm 'nadam'") as info:
        checkpoint.load(tmp_path, other, other_opt, latest=True)
    assert not isinstance(info.value, CheckpointCorruptError)


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharded_optim", "inspect", *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def test_inspect_on_every_damaged_form(tmp_path, capsys):
    run_dir = tmp_path / "run"
    model, opt = tiny("adamw")
    opt.param_groups[0]["lr"] = 0.1 * 3 * 0.001  # 0.00030000000000000003
    for step in (1, 2):
        run(model, opt, 1, seed=step)
        checkpoint.save(run_dir / "checkpoints" / f"step_{step}", model, opt, step=step)
    good = _inspect(str(run_dir))  # the real command on a run directory holding checkpoints/: no warning noise
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"checkpoint {run_dir / 'checkpoints' / 'step_2'}\n"), good.stdout[:300]
    assert "lr=0.0003," in good.stdout and good.stderr == "", good.stderr
    assert cli_main(["inspect", str(run_dir), "--verify"]) == 0  # the same code, in this process from here on
    assert capsys.readouterr().out.rstrip().endswith("OK")
    pristine = run_dir / "checkpoints" / "step_2"
    damages = {
        "missing .metadata": (lambda d: (d / ".metadata").unlink(), "cannot read DCP metadata"),
        "missing meta.json": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
        "garbage meta.json": (lambda d: (d / "meta.json").write_text("{"), "is corrupted"),
        "meta.json a list": (lambda d: (d / "meta.json").write_text("[]"), "holds a list"),
        "flipped shard": (lambda d: silent_scenarios._flip(d / "__0_0.distcp", 0.5), "checksum mismatch"),
        "truncated shard": (lambda d: (d / "__0_0.distcp").write_bytes(b"x"), "bytes where"),
        "missing shard": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp"),
        "flipped .metadata": (lambda d: silent_scenarios._flip(d / ".metadata", 0.5), ".metadata: checksum"),
        "empty directory": (lambda d: [p.unlink() if p.is_file() else shutil.rmtree(p) for p in d.iterdir()],
                            "neither a checkpoint"),
    }
    for what, (damage, fragment) in damages.items():
        target = tmp_path / what.replace(" ", "_")
        shutil.copytree(pristine, target)
        damage(target)
        for extra in ([], ["--verify"], ["--json"]):
            assert cli_main(["inspect", str(target), *extra]) == 2, (what, extra)
            out = capsys.readouterr()
            text = out.out + out.err
            assert "Traceback" not in text and fragment in text, (what, extra, fragment, text)
            assert len(out.err.splitlines()) <= 1, (what, extra, out.err)  # one line, not a dump
    assert cli_main(["inspect", str(FIXTURE), "--verify"]) == 0  # format 1: every check but the checksums
    assert "format v1: no checksums recorded" in capsys.readouterr().out


def test_taken_port_names_port_setting_and_a_free_one():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    model, opt = tiny()
    try:
        with pytest.raises(OSError) as info:
            telemetry.start(opt, base_port=port)
    finally:
        taken.close()
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "telemetry.base_port" in text and "already in use" in text, text
    suggested = int(text.split("e.g. ")[1].split(" ")[0])
    assert suggested != port and "or 0 for an ephemeral port" in text, text


# ------------------------------------------------------------------------------------------ disk full
def _small_tmpfs(directory: Path, size: int) -> bool:
    directory.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return proc.returncode == 0


FSIZE_SCRIPT = textwrap.dedent("""
    import resource, signal, sys, torch
    from sharded_optim import ShardedOptimizer, checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = ShardedOptimizer(model.parameters(), lr=0.1, kernel="eager")
    checkpoint.save(sys.argv[1] + "/step_1", model, opt, step=1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    try:
        checkpoint.save(sys.argv[1] + "/step_2", model, opt, step=2)
    except checkpoint.CheckpointError as exc:
        print(exc)
""")


def test_disk_full_names_the_cause_and_leaves_no_partial(tmp_path):
    mnt = tmp_path / "small"
    if not _small_tmpfs(mnt, 512 * 1024):
        # no mount here (not root): a real per-process file size limit instead of a full disk
        proc = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path)], cwd=REPO, env=job_env(),
                              capture_output=True, text=True, timeout=120)
        assert "File too large" in proc.stdout and "step_1 is intact" in proc.stdout, proc.stdout + proc.stderr
        assert not list(tmp_path.glob(".*.partial"))
        return
    try:
        model = torch.nn.Linear(128, 128)  # 66 KB of weights, 3x that with Adam state
        opt = ShardedOptimizer(model.parameters(), lr=0.1, kernel="eager")
        model(torch.ones(2, 128)).sum().backward()
        opt.step()
        checkpoint.save(mnt / "step_1", model, opt, step=1)
        free = shutil.disk_usage(mnt).free
        # fill the disk so that the tensors fit the up-front check but not with DCP's headers and the RNG file
        tensor_bytes = sum(t.numel() * 4 for t in (*model.parameters(), *opt.state_dict()["state"][0].values(),
                                                   *opt.state_dict()["state"][1].values()) if t.dim())
        (mnt / "filler").write_bytes(b"\0" * (free - tensor_bytes - 4096))
        for label in ("mid-write", "up front"):
            with pytest.raises(CheckpointError) as info:
                checkpoint.save(mnt / "step_2", model, opt, step=2)
            text = str(info.value)
            assert "No space left on device" in text and str(mnt / "step_2") in text, (label, text)
            assert f"the previous checkpoint {mnt / 'step_1'} is intact" in text, (label, text)
            assert "bytes of tensors to write" in text and "enforce fail" not in text, (label, text)
            # up front: refused before writing, with the free space; mid-write: DCP failed, the probe named it
            assert ("No space left on device (about" in text) == (label == "mid-write"), (label, text)
            assert not list(mnt.glob(".*.partial")), (label, list(mnt.iterdir()))
            assert checkpoint.latest(mnt) == mnt / "step_1"
            (mnt / "filler").write_bytes(b"\0" * (free - 4096))  # now too little even for the tensors
        fresh = torch.nn.Linear(128, 128)
        fresh_opt = ShardedOptimizer(fresh.parameters(), lr=0.1, kernel="eager")
        assert checkpoint.load(mnt, fresh, fresh_opt, latest=True)["step"] == 1
        assert torch.equal(fresh.weight, model.weight)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_permission_denied_names_the_path(tmp_path):
    model, opt = tiny()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: make the directory a file's child instead
            locked = tmp_path / "a_file"
            locked.write_text("")
        with pytest.raises(CheckpointError) as info:
            checkpoint.save(locked / "step_1", model, opt, step=1)
        text = str(info.value)
        assert str(locked / "step_1") in text and "no earlier checkpoint exists there" in text, text
        assert any(s in text for s in ("Permission denied", "Not a directory")), text
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_meta_json_seal_covers_every_field(tmp_path):
    """A changed value anywhere in meta.json (a hyperparameter, a step, a checksum) is refused."""
    model, opt = tiny()
    run(model, opt, 1)
    checkpoint.save(tmp_path / "c", model, opt, step=1)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    edits = [("param_groups", 0, "lr", 0.5), ("params", "0.weight", "step", 7),
             ("integrity", "files", ".metadata", [0, 1])]
    for *keys, value in edits:
        changed = json.loads(json.dumps(meta))
        node = changed
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        (tmp_path / "c" / "meta.json").write_text(json.dumps(changed))
        with pytest.raises(CheckpointCorruptError, match="meta.json does not match its checksum"):
            checkpoint.load(tmp_path / "c", model, opt)
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))  # the original bytes' values load again
    assert checkpoint.load(tmp_path / "c", model, opt)["step"] == 1
