"""Checkpoints on one process: refused loads change nothing, atomic writes, keep_last/latest, torch.optim
export/import, the inspect command.  (Several ranks: test_checkpoint_reshard.py.)"""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sharded_optim import Lookahead, ShardedOptimizer, checkpoint
from sharded_optim.checkpoint import integrity as ckpt_integrity
from sharded_optim.checkpoint import CheckpointError
from sharded_optim.app.cli import main as cli_main
from tests.support import ckpt_scenarios as S
from tests.support.jobs import job_env

REPO = Path(__file__).resolve().parents[1]


def tiny(algorithm: str = "adamw", out: int = 3, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, out), torch.nn.Tanh(), torch.nn.Linear(out, 2))
    return model, ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=0.05, kernel="eager", **options)


def run(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def memory(model, opt) -> dict:
    """Everything a refused load must leave alone, copied."""
    inner = S.inner(opt)
    out = {"model": {k: v.clone() for k, v in model.state_dict().items()},
           "state": {(i, k): v.clone() for i, e in inner.state_dict()["state"].items() for k, v in e.items()},
           "groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
           "rng": (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()),
           "counters": (inner.steps_attempted, dict(inner.skipped_steps))}
    if isinstance(opt, Lookahead):
        out["slow"] = {i: t.clone() for i, t in opt.slow_state().items()}
        out["la"] = (opt.k, opt.alpha, opt.inner_steps)
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), f"model[{k}] changed"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"state{k} changed"
    assert before["groups"] == after["groups"]
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])
    assert before["counters"] == after["counters"]
    for i, v in before.get("slow", {}).items():
        assert torch.equal(v, after["slow"][i])
    assert before.get("la") == after.get("la")


def edit_meta(path: Path, reseal: bool = True, **changes) -> None:
    """Change fields of meta.json; ``reseal``: with a matching checksum, as a writer with those values would
    have written it (else the edit is damage, refused by the checksum)."""
    meta = json.loads((path / "meta.json").read_text())
    for dotted, value in changes.items():
        node = meta
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    (path / "meta.json").write_text(json.dumps(ckpt_integrity.seal(meta) if reseal else meta))


def reseal_file(path: Path, name: str) -> None:
    """Record the current bytes of ``path/name`` as its checksum (a file written that way on purpose)."""
    meta = json.loads((path / "meta.json").read_text())
    meta["integrity"]["files"][name] = ckpt_integrity.file_entry(path / name)
    (path / "meta.json").write_text(json.dumps(ckpt_integrity.seal(meta)))


def test_roundtrip_restores_everything_including_rng(tmp_path):
    model, opt = tiny("nadam")
    run(model, opt, 3)
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    checkpoint.save(tmp_path / "c", model, opt, step=3, extra={"tokens": [1, 2.5]})
    expected = memory(model, opt)
    model2, opt2 = tiny("nadam", seed=1)
    run(model2, opt2, 1, seed=9)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    info = checkpoint.load(tmp_path / "c", model2, opt2)
    assert info == {"step": 3, "extra": {"tokens": [1, 2.5]}, "world_size": 1, "rng_restored": True}
    assert_unchanged(expected, memory(model2, opt2))


def test_bf16_master_weights_roundtrip(tmp_path):
    model, opt = tiny("adamw")
    model.to(torch.bfloat16)
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=0.01, kernel="eager")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(5, 4, generator=g, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    rt = next(rt for _, rt in opt._all_runtimes())
    assert rt.master is not rt.full and not torch.equal(rt.master[:14].bfloat16().float(), rt.master[:14])
    checkpoint.save(tmp_path / "c", model, opt, step=3)
    model2, _ = tiny("adamw", seed=4)
    model2.to(torch.bfloat16)
    opt2 = ShardedOptimizer(model2.parameters(), algorithm="adamw", lr=0.01, kernel="eager")
    checkpoint.load(tmp_path / "c", model2, opt2)
    rt2 = next(rt for _, rt in opt2._all_runtimes())
    assert torch.equal(rt.master, rt2.master), "the fp32 master copy must survive, not the bf16 rounding"
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k])


def _refusals(tmp_path: Path):
    """(description, checkpoint path, expected message fragment) of checkpoints that must be refused."""
    model, opt = tiny("adamw")
    run(model, opt, 2)
    good = tmp_path / "good"
    checkpoint.save(good, model, opt, step=2)

    def variant(name: str) -> Path:
        dst = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(dst)], check=True)
        return dst

    other_model, other_opt = tiny("nadam")
    run(other_model, other_opt, 1)
    checkpoint.save(tmp_path / "nadam", other_model, other_opt, step=1)
    wide, wide_opt = tiny("adamw", out=5)
    run(wide, wide_opt, 1)
    checkpoint.save(tmp_path / "wide", wide, wide_opt, step=1)
    ams, ams_opt = tiny("adamw", amsgrad=True)
    run(ams, ams_opt, 1)
    checkpoint.save(tmp_path / "ams", ams, ams_opt, step=1)
    la_model, la_opt = tiny("adamw")
    la = Lookahead(la_opt)
    run(la_model, la, 1)
    checkpoint.save(tmp_path / "la", la_model, la, step=1)

    newer = variant("newer")
    edit_meta(newer, format_version=checkpoint.FORMAT_VERSION + 1)
    bad_lr = variant("bad_lr")
    edit_meta(bad_lr, param_groups__0__lr=-1.0)
    foreign = variant("foreign")
    edit_meta(foreign, param_groups__0__beta3=0.999)
    bad_step = variant("bad_step")
    edit_meta(bad_step, **{"params__0.weight__step": -3})
    truncated = variant("truncated")
    data = truncated / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    no_data = variant("no_data")
    (no_data / "__0_0.distcp").unlink()
    no_meta = variant("no_meta")
    (no_meta / "meta.json").unlink()
    garbage_meta = variant("garbage_meta")
    (garbage_meta / "meta.json").write_text("{not json")
    garbage_dcp = variant("garbage_dcp")
    (garbage_dcp / ".metadata").write_bytes(b"\x80\x04garbage")
    reseal_file(garbage_dcp, ".metadata")  # past the checksum: the unpickler itself must refuse it
    evil = variant("evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    (evil / ".metadata").write_bytes(pickle.dumps(Evil()))
    reseal_file(evil, ".metadata")  # a forged checksum: the allowlisting unpickler is the last line
    evil_unsealed = variant("evil_unsealed")
    (evil_unsealed / ".metadata").write_bytes(pickle.dumps(Evil()))
    return [
        ("other algorithm", tmp_path / "nadam", "saved by algorithm 'nadam'"),
        ("other shape", tmp_path / "wide", "has shape (5, 4) in the checkpoint but (3, 4) here"),
        ("amsgrad differs", tmp_path / "ams", "max_exp_avg_sq"),
        ("lookahead checkpoint into a plain optimizer", tmp_path / "la", "Lookahead"),
        ("newer format", newer, f"format_version {checkpoint.FORMAT_VERSION + 1} is newer"),
        ("invalid hyperparameter", bad_lr, "param group 0: lr must be a finite number >= 0"),
        ("option of another algorithm", foreign, "param group 0: option(s) ['beta3'] that algorithm 'adamw' does "
         "not use"),
        ("invalid step", bad_step, "'0.weight' has step -3"),
        ("truncated data file", truncated, "reading the tensors failed"),
        ("missing data file", no_data, "reading the tensors failed"),
        ("missing meta.json", no_meta, "meta.json is missing"),
        ("corrupted meta.json", garbage_meta, "is corrupted"),
        ("corrupted DCP metadata", garbage_dcp, "DCP metadata"),
        ("pickle with code in the DCP metadata", evil, "posix.mkdir"),
        ("the same, checksum not forged", evil_unsealed, "were written (truncated or extended)"),
        ("no such directory", tmp_path / "nothing", "does not exist"),
    ], marker


def test_refused_loads_change_nothing(tmp_path):
    cases, marker = _refusals(tmp_path)
    model, opt = tiny("adamw", seed=7)
    run(model, opt, 2, seed=3)
    before = memory(model, opt)
    for what, path, fragment in cases:
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path, model, opt)
        assert fragment in str(info.value), f"{what}: {info.value}"
        assert_unchanged(before, memory(model, opt))
    assert not marker.exists(), "the DCP metadata was unpickled with arbitrary globals"
    # the same optimizer still loads a good checkpoint afterwards
    assert checkpoint.load(tmp_path / "good", model, opt)["step"] == 2


def test_refused_into_lookahead_changes_nothing(tmp_path):
    model, opt = tiny("adamw")
    run(model, opt, 2)
    checkpoint.save(tmp_path / "plain", model, opt, step=2)
    la_model, inner = tiny("adamw", seed=3)
    la = Lookahead(inner, k=2)
    run(la_model, la, 3)
    before = memory(la_model, la)
    with pytest.raises(CheckpointError, match="no Lookahead slow weights"):
        checkpoint.load(tmp_path / "plain", la_model, la)
    assert_unchanged(before, memory(la_model, la))
    assert checkpoint.load(tmp_path / "plain", la_model, la, strict=False)["step"] == 2


def test_save_rejects_bad_arguments_and_writes_nothing(tmp_path):
    model, opt = tiny()
    for kwargs, fragment in [({"step": -1}, "step must be"), ({"step": True}, "step must be"),
                             ({"step": 1, "keep_last": 0}, "keep_last must be"),
                             ({"step": 1, "extra": {"x": object()}}, "extra must be JSON")]:
        with pytest.raises((ValueError, TypeError), match=fragment):
            checkpoint.save(tmp_path / "c", model, opt, **kwargs)
    with pytest.raises(TypeError, match="optimizer must be a ShardedOptimizer"):
        checkpoint.save(tmp_path / "c", model, torch.optim.SGD(model.parameters(), lr=1), step=1)
    assert list(tmp_path.iterdir()) == []


def test_keep_last_and_latest(tmp_path):
    model, opt = tiny()
    assert checkpoint.latest(tmp_path) is None and checkpoint.latest(tmp_path / "missing") is None
    for step in range(1, 6):
        run(model, opt, 1, seed=step)
        checkpoint.save(tmp_path / f"step_{step:04d}", model, opt, step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0004", "step_0005"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_0005"
    (tmp_path / "latest").write_text("step_0009\n")  # a pointer to something gone: fall back to the newest
    assert checkpoint.latest(tmp_path) == tmp_path / "step_0005"
    checkpoint.save(tmp_path / "step_0005", model, opt, step=5, keep_last=2)  # overwrite in place
    assert checkpoint.load(tmp_path / "step_0005", model, opt)["step"] == 5


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from sharded_optim import ShardedOptimizer, checkpoint
    from sharded_optim.checkpoint import saving
    root = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = ShardedOptimizer(model.parameters(), lr=0.1, kernel="eager")
    model(torch.ones(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
    checkpoint.save(f"{root}/step_1", model, opt, step=1, keep_last=1)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{root}/weights_1.pt")
    model(torch.ones(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
    # die the hard way after every file of step_2 is written, before the rename that publishes it
    saving._commit = lambda tmp, path: os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save(f"{root}/step_2", model, opt, step=2, keep_last=1)
""")


def test_crash_between_write_and_rename_keeps_previous(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], env=job_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = tmp_path / ".step_2.partial"
    assert (partial / "meta.json").is_file(), "the crash was meant to happen after all files were written"
    assert checkpoint.latest(tmp_path) == tmp_path / "step_1"
    model = torch.nn.Linear(4, 3)
    opt = ShardedOptimizer(model.parameters(), lr=0.1, kernel="eager")
    assert checkpoint.load(checkpoint.latest(tmp_path), model, opt)["step"] == 1
    for k, v in torch.load(tmp_path / "weights_1.pt", weights_only=True).items():
        assert torch.equal(v, model.state_dict()[k])
    checkpoint.save(tmp_path / "step_3", model, opt, step=3, keep_last=1)
    assert not partial.exists(), "the next save removes what the crash left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3", "weights_1.pt"]


def _grads(n: int, params) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(n)]


def _continue(params, opt, grads) -> None:
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_export_continues_like_torch_adamw(tmp_path, amsgrad):
    model, opt = tiny("adamw", amsgrad=amsgrad, weight_decay=0.05)
    run(model, opt, 5)
    checkpoint.save(tmp_path / "c", model, opt, step=5)
    out = checkpoint.export_torch_optim(tmp_path / "c", tmp_path / "adamw.pt")
    clone = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ref = torch.optim.AdamW(clone, lr=0.05)
    ref.load_state_dict(torch.load(out, weights_only=True))
    assert ref.param_groups[0]["weight_decay"] == 0.05 and ref.param_groups[0]["amsgrad"] is amsgrad
    grads = _grads(10, clone)
    _continue(list(model.parameters()), opt, grads)
    _continue(clone, ref, grads)
    for ours, theirs in zip(model.parameters(), clone):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=2e-6, atol=1e-7)
        assert not torch.equal(theirs.detach(), torch.zeros_like(theirs))


def test_torch_adam_state_imports_and_continues(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    ref = torch.optim.Adam(ref_params, lr=0.05, weight_decay=0.01)
    _continue(ref_params, ref, _grads(5, ref_params))
    torch.save(ref.state_dict(), tmp_path / "adam.pt")
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_params):
            p.copy_(q)
    ours = ShardedOptimizer(model.parameters(), algorithm="adam", lr=0.05, weight_decay=0.01, kernel="eager")
    checkpoint.import_torch_optim(tmp_path / "adam.pt", model, ours)
    assert int(ours.state_dict()["state"][0]["step"]) == 5
    grads = _grads(10, ref_params)
    _continue(ref_params, ref, grads)
    _continue(list(model.parameters()), ours, grads)
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.import_torch_optim(tmp_path / "missing.pt", model, ours)


def test_inspect_command(tmp_path, capsys):
    model, opt = tiny("adamod")
    la = Lookahead(opt, k=2)
    run(model, la, 3)
    checkpoint.save(tmp_path / "run" / "step_3", model, la, step=3, extra={"note": "x"})
    assert cli_main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["algorithm"] == "adamod" and summary["step"] == 3 and summary["lookahead"]["k"] == 2
    assert summary["param_groups"][0]["beta3"] == 0.999
    sd = opt.state_dict()
    for i, (name, p) in enumerate(model.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_lr"):
            t = summary["tensors"][f"optim.{name}.{key}"]
            assert t["shape"] == list(p.shape)
            assert t["norm"] == pytest.approx(float(torch.linalg.vector_norm(sd["state"][i][key].double())))
        assert f"lookahead.{name}.slow_param" in summary["tensors"]
    assert cli_main(["inspect", str(tmp_path / "run" / "step_3")]) == 0
    text = capsys.readouterr().out
    assert "algorithm adamod  step 3" in text and "optim.0.weight.exp_avg_lr" in text
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such file or directory" in capsys.readouterr().err
