"""ShardedOptimizer inside the clients people use: HF Trainer/Accelerate, Lightning, schedulers, and what those
clients do to parameters and checkpoints.

* HF ``Trainer`` under torchrun (2 gloo ranks, one launch, ``tests/support/hf_trainer_job.py``), adamw and adamod,
  ZeRO-1 and ZeRO-2.  Tolerance: none.  The ZeRO runs must equal ``zero_stage=0`` (the same elementwise update on
  the same DDP-averaged gradients; the shard is only where it runs), and a plain loop doing what Trainer does with
  the same optimizer and batches (the same operations in the same order); a resumed run replays the same
  arithmetic from restored state.  All three are bit-for-bit claims.
* Lightning ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` (one launch, ``lightning_job.py``): ZeRO-2
  with a per-step LambdaLR, plain and under Lookahead; checkpoints per epoch, the resumed fit ends bitwise equal.
* Replaced parameter storage (``p.data = ...``, swap_tensors ``load_state_dict(assign=True)``, plain
  ``assign=True``, casting the model) on 1 and 2 ranks (``client_scenarios.py``): bitwise equal to writing the same
  values in place, and to torch.optim's behaviour (within the 2 sqrt(N) ulp of two independent fp32 walks,
  ALGORITHMS.md 15.1), or a RuntimeError naming the parameter.
* ``state_dict()`` on one rank of a sharded optimizer: ConsolidationError within the timeout; with
  ``consolidate_state_dict`` the result equals the collective one.
* README snippets: executed from the README text by the two launches above.
"""
from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

import sharded_optim as so
from tests.support import client_scenarios as cs
from tests.support.jobs import REPO, job_env, require_module, require_tool
from tests.support.multiproc import free_port, run_ranks
from tests.support.scenarios import Scenarios, zero

ALGORITHMS = ("adamw", "adamod")


def _launch(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"


# ------------------------------------------------------------------------------------------------ HF Trainer
@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    require_module("transformers")
    out = tmp_path_factory.mktemp("hf")
    _launch([require_tool("torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
             str(REPO / "tests" / "support" / "hf_trainer_job.py"), str(out)], timeout=480)
    # keyed by scenario name: "adamw zero-1", "adamw zero-1 resumed", "adamw zero-1 plain loop", "snippets"
    return {"results": Scenarios(torch.load(out / "results.pt", weights_only=False)), "out": out}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("stage", [1, 2])
def test_hf_trainer_zero_trains_like_zero0_and_the_plain_loop(hf, algorithm, stage):
    r, name = hf["results"], zero(algorithm, stage)
    run, zero0, plain = r[name], r[zero(algorithm, 0)], r[f"{name} plain loop"]
    losses = run["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.05, f"{name}: {losses}"   # it learns
    assert losses == zero0["losses"], f"{name} against {zero(algorithm, 0)}: {losses} != {zero0['losses']}"
    assert _equal(run["params"], zero0["params"]), f"{name}: parameters differ from {zero(algorithm, 0)}"
    assert _equal(run["params"], plain["params"]), f"{name}: parameters differ from {name} plain loop"
    # Trainer (and accelerate's prepare) move the model after the optimizer was built, replacing every
    # parameter's storage (transformers 5.25, CPU): each one was re-bound, once
    assert run["rebinds"] == len(run["params"]), f"{name}: {run['rebinds']} rebinds of {len(run['params'])}"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("stage", [1, 2])
def test_hf_trainer_checkpoints_and_resumes_bitwise(hf, algorithm, stage):
    r, name = hf["results"], zero(algorithm, stage)
    run, resumed = r[name], r[f"{name} resumed"]
    assert run["checkpoints"] == ["checkpoint-12", "checkpoint-4", "checkpoint-8"], f"{name}: {run['checkpoints']}"
    assert resumed["losses"] == run["losses"][8:], f"{name} resumed: {resumed['losses']} != {run['losses'][8:]}"
    assert _equal(resumed["params"], run["params"]), f"{name} resumed: parameters differ"
    # the file rank 0 wrote holds the full (consolidated) state of every parameter
    saved = torch.load(hf["out"] / f"{algorithm}_z{stage}" / "checkpoint-8" / "optimizer.pt", weights_only=True)
    numel = sorted(p.numel() for p in run["params"].values())
    assert sorted(e["exp_avg"].numel() for e in saved["state"].values()) == numel
    assert {int(e["step"]) for e in saved["state"].values()} == {8}


@pytest.mark.slow
def test_readme_hf_and_plain_loop_snippets_run(hf):
    s = hf["results"]["snippets"]
    assert s["hf_steps"] == 4 and s["hf_opt_sharded"]
    assert s["plain_opt_sharded"] and s["plain_opt_steps"] > 0
    saved = torch.load(hf["out"] / "optimizer.pt", weights_only=True)   # written by rank 0 alone
    assert sorted(e["exp_avg"].numel() for e in saved["state"].values()) == sorted(s["plain_numel"].values())
    for step in (2, 4):
        assert (hf["out"] / "hf_out" / f"checkpoint-{step}" / "optimizer.pt").is_file()


# ------------------------------------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning(tmp_path_factory) -> dict:
    require_module("lightning")
    out = tmp_path_factory.mktemp("lightning")
    _launch([str(require_tool("python")), str(REPO / "tests" / "support" / "lightning_job.py"), str(out)],
            timeout=480)
    return torch.load(out / "lightning.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,optimizer", [("zero2", "ShardedOptimizer"), ("lookahead_zero2", "Lookahead")])
def test_lightning_ddp_trains_checkpoints_and_resumes_bitwise(lightning, name, optimizer):
    r = lightning[name]
    assert r["optimizer"] == optimizer
    epochs = [sum(r["losses"][i:i + 4]) / 4 for i in (0, 4, 8)]
    assert epochs[2] < epochs[1] < epochs[0], epochs   # same batches every epoch: the epoch means fall
    assert r["checkpoints"] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]
    assert r["resumed_losses"] == r["losses"][8:]
    assert _equal(r["resumed_params"], r["params"])


@pytest.mark.slow
def test_readme_lightning_snippet_runs(lightning):
    s = lightning["snippet"]
    assert s["optimizer"] == "ShardedOptimizer" and s["steps"] == 4
    assert len(s["checkpoints"]) == 1 and s["checkpoints"][0].startswith("pl_out/")


# ------------------------------------------------------------------------------------ replaced storage
@pytest.fixture(scope="module")
def storage() -> dict:
    """world -> per-rank results of ``cs.all_scenarios``, keyed by scenario name ("assign zero-2")."""
    return {1: [cs.all_scenarios(0, 1)], 2: run_ranks(cs.all_scenarios, 2)}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _storage_cases(hows: tuple[str, ...]) -> list:
    """(world, scenario name) for every stage the storage scenarios run at, ids naming both."""
    return [pytest.param(world, zero(how, stage), id=f"{zero(how, stage)} world {world}")
            for world in (1, 2) for stage in cs.stages(world) for how in hows]


@pytest.mark.parametrize("world,scenario", _storage_cases(("data", "swap")))
def test_replaced_storage_is_followed_like_an_in_place_write(storage, world, scenario):
    stage = scenario.rsplit("zero-", 1)[1]
    for rank, r in enumerate(storage[world]):
        got, ref = r[scenario], r[zero("in_place", stage)]
        assert _same(got["params"], ref["params"]), f"{scenario} rank {rank}: parameters differ from in_place"
        assert got["rebinds"] == 4 and got["views"], f"{scenario} rank {rank}: {got['rebinds']=} {got['views']=}"


@pytest.mark.parametrize("world,scenario", _storage_cases(("assign",)))
def test_plain_assign_leaves_the_assigned_values(storage, world, scenario):
    """Plain assign=True puts new Parameter objects in the model: the optimizer never sees them (as torch.optim),
    so the model keeps exactly the assigned values."""
    for rank, r in enumerate(storage[world]):
        got = r[scenario]
        assert _same(got["params"], got["switched"]), f"{scenario} rank {rank}: the assigned values moved"
        assert got["rebinds"] == 0, f"{scenario} rank {rank}: rebinds {got['rebinds']}"


@pytest.mark.parametrize("how", ["in_place", "data", "swap"])
def test_replaced_storage_moves_like_torch_optim(storage, how):
    r = storage[1][0]
    ours, torch_ = r[zero(how, 2)]["params"], r[f"{how} torch.optim"]["params"]
    for a, b in zip(ours, torch_):
        # two independent fp32 walks of 4 steps: 2 sqrt(N) ulp(max|p|) (ALGORITHMS.md 15.1); AdamW's decay
        # term rounds differently in torch (15.4), one more ulp per step at most
        tol = 3 * math.sqrt(cs.STEPS) * float(np.spacing(np.float32(np.abs(b).max())))
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{zero(how, 2)} against {how} torch.optim")
    assert not _same(ours, r[zero("in_place", 2)]["switched"]), f"{zero(how, 2)}: did not move after the switch"


def test_plain_assign_is_ignored_by_torch_optim_too(storage):
    r = storage[1][0]["assign torch.optim"]
    assert _same(r["params"], r["switched"]), "assign torch.optim: the assigned values moved"


@pytest.mark.parametrize("world,scenario", _storage_cases(("dtype",)))
def test_cast_after_construction_is_rebuilt_or_refused_by_name(storage, world, scenario):
    for rank, r in enumerate(storage[world]):
        d = r[scenario]
        where = f"{scenario} rank {rank}"
        # before the first step (no gradient hooks): the buffers are rebuilt in float64, exactly as if the
        # model had been cast before the optimizer was built
        assert d["rebuilt"][0].dtype == np.float64 and _same(d["rebuilt"], d["built_double"]), where
        assert "param_groups[0]['params'][" in d["after_steps_error"], f"{where}: {d['after_steps_error']}"
        assert "to cpu/torch.float64 after 1 step(s)" in d["after_steps_error"], f"{where}: {d['after_steps_error']}"
        assert "changed shape from (5,) to (7,)" in d["shape_error"], f"{where}: {d['shape_error']}"
        if world > 1:
            assert "after backward reduced its gradients" in d["hooks_error"], f"{where}: {d['hooks_error']}"


# ---------------------------------------------------------------------------------- saving from one rank
def _equal_state(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            _equal_state(a[key], b[key], f"{where}[{key!r}]")
        elif isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), f"{where}[{key!r}]"
        else:
            assert a[key] == b[key], f"{where}[{key!r}]"


@pytest.mark.parametrize("name", ["ShardedOptimizer", "Lookahead"])
def test_state_dict_on_one_rank_fails_fast_and_consolidation_works(storage, name):
    r = storage[2][0]["state_dict"][name]   # rank 0: the rank that calls state_dict() alone
    error = r["alone_error"]
    assert error.startswith("ConsolidationError") and "consolidate_state_dict(to=0)" in error, error
    assert "only rank(s) [0]" in error and "ShardedOptimizerCallback" in error, error
    assert 2.0 <= r["alone_seconds"] < 10.0, r["alone_seconds"]   # the timeout (2 s), not a hang
    _equal_state(r["consolidated"], r["collective"], f"{name} consolidated against collective")
    assert r["stale_error"].startswith("ConsolidationError"), r["stale_error"]   # a step made the copy stale
    assert "0..1" in storage[2][0]["state_dict"]["bad_to"], storage[2][0]["state_dict"]["bad_to"]


def test_lookahead_slow_weights_stay_sharded(storage):
    r = storage[2][0]["state_dict"]
    assert r["slow_numel"] == r["local_numel"] and r["local_numel"][0] * 2 == r["total_numel"][0], r


# ------------------------------------------------------------------------------------ Lookahead + schedulers
def _lookahead_run(schedule, steps: int = 6, manual=None) -> tuple[list[np.ndarray], so.Lookahead, list]:
    model = cs.make_model()
    la = so.Lookahead(so.ShardedOptimizer(model.parameters(), "adamw", lr=1e-2, kernel="eager"), k=2)
    sched = schedule(la) if schedule is not None else None
    lrs = []
    for step in range(steps):
        if manual is not None:
            la.param_groups[0]["lr"] = manual(step)
        la.zero_grad()
        cs.grads(model, 0, step)
        la.step()
        lrs.append((la.optimizer.param_groups[0]["lr"], la.optimizer.param_groups[0]["betas"]))
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)   # never improves
        elif sched is not None:
            sched.step()
    return [p.detach().numpy().copy() for p in model.parameters()], la, lrs


def test_lookahead_is_an_optimizer_sharing_the_inner_groups():
    _, la, _ = _lookahead_run(None, steps=1)
    assert isinstance(la, torch.optim.Optimizer)
    assert la.param_groups is la.optimizer.param_groups and la.state is la.optimizer.state
    assert la.defaults is la.optimizer.defaults
    calls = []
    la.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    la.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    la.register_state_dict_post_hook(lambda opt, sd: {**sd, "tagged": True})
    la.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load_pre"))
    la.step()
    sd = la.state_dict()
    assert calls == ["pre", "post"] and sd["tagged"]
    la.load_state_dict(sd)
    assert calls[-1] == "load_pre"


def test_lambdalr_drives_the_inner_optimizer_through_lookahead():
    factor = lambda step: 0.5 ** step   # noqa: E731
    scheduled, _, lrs = _lookahead_run(lambda la: torch.optim.lr_scheduler.LambdaLR(la, factor))
    manual, _, _ = _lookahead_run(None, manual=lambda step: 1e-2 * factor(step))
    assert _same(scheduled, manual)
    assert [lr for lr, _ in lrs] == [1e-2 * factor(s) for s in range(6)]


def test_onecycle_cycles_lr_and_beta1_through_lookahead():
    _, _, lrs = _lookahead_run(lambda la: torch.optim.lr_scheduler.OneCycleLR(la, max_lr=1e-2, total_steps=6))
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched, want = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=1e-2, total_steps=6), []
    for _ in range(6):
        want.append((ref.param_groups[0]["lr"], ref.param_groups[0]["betas"]))
        ref.step()
        sched.step()
    assert lrs == want and len({b for _, b in lrs}) > 1   # beta1 cycled too


def test_reduce_lr_on_plateau_and_swalr_accept_lookahead():
    _, _, lrs = _lookahead_run(lambda la: torch.optim.lr_scheduler.ReduceLROnPlateau(la, factor=0.5, patience=1))
    assert lrs[0][0] == 1e-2 and lrs[-1][0] < 1e-2   # no improvement: reduced, in the inner optimizer
    _, _, lrs = _lookahead_run(lambda la: torch.optim.swa_utils.SWALR(la, swa_lr=1e-3, anneal_epochs=2))
    assert lrs[-1][0] == pytest.approx(1e-3)


def test_integration_helpers_refuse_double_reduction_under_ddp():
    from sharded_optim.integrations import check_under_ddp, find_sharded
    opt = so.ShardedOptimizer([torch.nn.Parameter(torch.zeros(3))], kernel="eager")

    class Wrapper:  # what AcceleratedOptimizer / LightningOptimizer look like from outside
        def __init__(self, inner):
            self.optimizer = inner

    la = so.Lookahead(opt)
    assert find_sharded(Wrapper(Wrapper(la))) is la and find_sharded(object()) is None
    check_under_ddp(opt, "Trainer")   # one process: not sharded, nothing to refuse
    opt.zero_stage, opt.world_size = 2, 2   # what a sharded optimizer with reduce_grads=True reports
    with pytest.raises(ValueError, match="reduce_grads=False"):
        check_under_ddp(la, "Trainer")
