"""The optimizer comparison experiments (sharded_optim.app.experiments): the CI variant of each runs end to end and
writes its JSON + markdown + PNG, and the robust qualitative facts hold:

* Reddi et al.'s online counterexample: Adam settles at the worst point x = +1, AMSGrad heads to x* = -1;
* L2-regularised Adam and AdamW are different algorithms for the same nonzero weight decay (and the same at 0);
* every algorithm lowers the digits training loss at its default learning rate;
* OneCycleLR really cycles ShardedOptimizer's lr and beta1;
* two ranks (torchrun, ZeRO-2 averaging each rank's half of the batch) give the single-process numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_optim import ALGORITHMS
from sharded_optim.app.experiments import experiments, run_experiment
from sharded_optim.app.experiments.common import Context
from sharded_optim.app.experiments.one_cycle import schedule_trace
from sharded_optim.app.experiments.reddi import simulate
from sharded_optim.app.experiments.tasks import train_digits
from tests.support.jobs import require_tool

REPO = Path(__file__).resolve().parents[1]
CTX = Context("test", out_dir=None)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_outputs(out: Path, name: str) -> dict:
    for ext in ("json", "md", "png"):
        f = out / f"{name}-ci.{ext}"
        assert f.is_file() and f.stat().st_size > 0, f"missing {f.name}"
    assert (out / f"{name}-ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| " in (out / f"{name}-ci.md").read_text()
    payload = json.loads((out / f"{name}-ci.json").read_text())
    assert payload["experiment"] == name and payload["ci"] is True
    assert str(REPO) not in json.dumps(payload), "results must not contain machine paths"
    return payload["results"]


def test_registry_lists_every_experiment():
    assert set(experiments()) == {"reddi", "lr-sensitivity", "warmup", "weight-decay", "one-cycle",
                                  "bias-correction", "state-precision"}


@pytest.mark.parametrize("name", ["lr-sensitivity", "warmup", "weight-decay", "one-cycle", "bias-correction",
                                  "state-precision"])
def test_ci_variant_runs_end_to_end(name, tmp_path):
    results = run_experiment(name, ci=True, out_dir=tmp_path)
    written = _check_outputs(tmp_path, name)
    assert written["summary"], "no summary rows"
    for row in results["summary"]:
        assert all(0.0 <= v <= 1.0 for v in row["val_acc_runs"]), row
        assert row["curve_steps"][0] == 0 and row["curve_steps"][-1] > 0


def test_reddi_online_adam_goes_to_plus_one_amsgrad_to_minus_one(tmp_path):
    res = run_experiment("reddi", ci=True, out_dir=tmp_path)
    _check_outputs(tmp_path, "reddi")
    online = [r for r in res["summary"] if r["kind"] == "online"]
    assert len(online) == 2
    for r in online:
        # averaged over the last 101-step period, so the phase at which T falls does not matter
        assert r["adam_x_last_period_mean"] > 0.9, r
        assert r["amsgrad_x_last_period_mean"] < -0.7, r
        assert r["amsgrad_regret_per_step"] < r["adam_regret_per_step"], r
    # AMSGrad is still moving towards -1 (not stuck): later is lower than a quarter of the way in
    t = res["trace"]["t"]
    quarter = max(i for i, s in enumerate(t) if s <= res["steps"] // 4)
    assert res["trace"]["amsgrad_x"][-1][0] < res["trace"]["amsgrad_x"][quarter][0]


def test_reddi_amsgrad_departs_from_adam_when_v_first_decreases():
    # t = 1: v_max == v, the two coincide exactly; t = 2 (g = -10 after 1010): v shrinks, v_max does not.
    res = simulate(CTX, steps=2)
    (a1, a2), (m1, m2) = res["trace"]["adam_x"], res["trace"]["amsgrad_x"]
    assert a1 == m1
    assert a2[0] < m2[0] < a1[0]  # momentum still points down; AMSGrad's larger denominator: a smaller step


def test_l2_adam_and_adamw_differ_for_nonzero_weight_decay():
    def params(label: str, wd: float) -> list[torch.Tensor]:
        return train_digits(CTX, "mlp", label, 1e-3, 10, 0, weight_decay=wd)["params"]

    l2, decoupled = params("adam", 0.1), params("adamw", 0.1)
    diff = max(float((a - b).abs().max()) for a, b in zip(l2, decoupled))
    assert diff > 1e-5, f"L2-Adam and AdamW gave the same parameters (max |diff| {diff:.3g})"
    same = max(float((a - b).abs().max()) for a, b in zip(params("adam", 0.0), params("adamw", 0.0)))
    assert same <= 1e-7, f"with weight decay 0 the two must coincide, max |diff| {same:.3g}"


@pytest.mark.parametrize("label", sorted(set(ALGORITHMS) | {"amsgrad"}))
def test_every_algorithm_lowers_the_digits_training_loss_at_its_default_lr(label):
    from sharded_optim.app.experiments import common
    if label not in common.OPTIMIZERS:  # adamax, nadam: not in the comparison grids, still must train
        common.OPTIMIZERS.setdefault(label, (label, {}))
    # 300 steps: RAdam (rectification) and AdaMod (beta3 = 0.999 bound) damp their first ~100s of steps by design;
    # DiffMod multiplies AdaMod's damped step by the friction xi (~0.5 while gradients change little): at 300 steps
    # it has only reached 0.81 of the initial loss (AdaMod 0.39), at 600 0.20
    out = train_digits(CTX, "mlp", label, None, 600 if label == "diffmod" else 300, 0)
    assert out["train_loss"] < 0.5 * out["initial_train_loss"], (label, out["initial_train_loss"], out["train_loss"])


def test_one_cycle_cycles_lr_and_beta1_of_the_sharded_optimizer():
    trace = schedule_trace(total_steps=100, max_lr=1e-2)
    lr, b1 = trace["lr"], trace["beta1"]
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert 25 <= peak <= 32  # pct_start 0.3
    assert lr[0] == pytest.approx(1e-2 / 25) and lr[peak] == pytest.approx(1e-2, rel=1e-3)
    assert lr[-1] < lr[0] / 100
    assert b1[0] == pytest.approx(0.95) and b1[peak] == pytest.approx(0.85, abs=1e-3)
    assert b1[-1] == pytest.approx(0.95, abs=1e-3)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(tmp_path):
    """torchrun, 2 ranks, ZeRO-2 (each rank trains on its half of every global batch, the optimizer averages
    the gradients) against this process alone: every optimizer of the lr-sensitivity CI grid."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sharded_optim.app.experiments", "lr-sensitivity", "--ci", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "lr-sensitivity-ci.json").read_text())
    assert payload["environment"]["world_size"] == 2
    assert payload["command"] == ("torchrun --standalone --nproc_per_node 2 -m sharded_optim.app.experiments "
                                  f"lr-sensitivity --ci --out {tmp_path}")
    two = payload["results"]["summary"]
    one = run_experiment("lr-sensitivity", ci=True, out_dir=None)["summary"]
    assert len(one) == len(two) == 2 * 8  # tasks x optimizers, one lr
    for a, b in zip(one, two):
        assert (a["task"], a["label"], a["lr"]) == (b["task"], b["label"], b["lr"])
        for i, (ca, cb) in enumerate(zip(a["curve_train_loss"], b["curve_train_loss"])):
            assert ca == pytest.approx(cb, rel=1e-5, abs=1e-6), (a["task"], a["label"], a["lr"], i)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6), (a["label"], a["lr"])
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1.5 / 360), (a["label"], a["lr"])  # <= 1 image


def test_the_command_says_where_its_files_went_and_records_itself(tmp_path):
    """`sharded-optim experiment` (the installed script) from some directory: the files go to runs/experiments/
    under that directory (not into the package's checkout), the output says so, and the .md and .json record
    the command as it was typed."""
    cmd = [require_tool("sharded-optim"), "experiment", "reddi", "--ci", "--steps", "300"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "experiments"
    assert sorted(p.name for p in out.iterdir()) == ["reddi-ci.json", "reddi-ci.md", "reddi-ci.png"]
    assert "results written to runs/experiments/: reddi-ci.json, reddi-ci.md, reddi-ci.png" in proc.stdout
    typed = "sharded-optim experiment reddi --ci --steps 300"
    assert f"Command: `{typed}`" in (out / "reddi-ci.md").read_text()
    assert json.loads((out / "reddi-ci.json").read_text())["command"] == typed
