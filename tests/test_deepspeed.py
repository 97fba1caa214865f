"""ShardedOptimizer as DeepSpeed's client optimizer: 2 ranks through the real ``deepspeed`` launcher on CPU (gloo).

One launcher invocation trains the same tiny 2-group model under ZeRO 0, 1 and 2, fp32 and bf16; one torchrun
invocation trains it with our own ZeRO-2 and no DeepSpeed.  Both use the same data, global batch and kernel.

Tolerance: none; the final parameters are compared bitwise.  Why that holds: the update is the same
elementwise kernel on the same values, whatever the flat layout; the only arithmetic that differs is the
gradient average, DeepSpeed's ``(g0 + g1) / 2`` against our ``g0/2 + g1/2``, and with two ranks both are exact
to the same rounding (halving is exact in binary floating point).  Clipping is off on both sides
(``"gradient_clipping": 0.0``; DeepSpeed's default would clip to 1.0).  bf16: DeepSpeed reduces gradients in bf16,
so the reference sets ``grad_reduce_dtype=torch.bfloat16``.  bf16 at ZeRO-0 goes through DeepSpeed's
``FP16_UnfusedOptimizer``, which takes one step on all-zero gradients at construction (for any client optimizer,
torch.optim included); its reference takes that step too.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.support import deepspeed_job as job
from tests.support.jobs import REPO, job_env, require_module, require_tool

DS_RUNS = ["zero0", "zero1", "zero2", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2-diffmod"]
REFERENCE = {"zero0": "fp32", "zero1": "fp32", "zero2": "fp32", "zero0_bf16": "bf16_zero_step_first",
             "zero1_bf16": "bf16", "zero2_bf16": "bf16", "zero2-diffmod": "fp32-diffmod"}
SCRIPT = str(REPO / "tests" / "support" / "deepspeed_job.py")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    require_module("deepspeed")
    deepspeed_bin, torchrun_bin = require_tool("deepspeed"), require_tool("torchrun")
    out = tmp_path_factory.mktemp("deepspeed")
    _launch([torchrun_bin, "--nproc-per-node", "2", "--master-port", str(_free_port()), SCRIPT, "torchrun",
             str(out), ",".join(sorted(set(REFERENCE.values())))], timeout=240)
    # no C++ extension is built: the job marks DeepSpeed's inference-only shm all-reduce op incompatible
    _launch([deepspeed_bin, "--num_gpus", "2", "--master_port", str(_free_port()), SCRIPT, "deepspeed", str(out),
             ",".join(DS_RUNS)], timeout=420)
    return {f.stem: torch.load(f, weights_only=True) for f in out.glob("*.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("run", DS_RUNS)
def test_deepspeed_matches_our_zero2_under_torchrun(runs, run):
    ds, ref = runs[f"deepspeed_{run}"], runs[f"torchrun_{REFERENCE[run]}"]
    assert ds["eval_losses"][1] < ds["eval_losses"][0], ds["eval_losses"]   # it learned
    assert ds["params"].keys() == ref["params"].keys()
    for name, value in ds["params"].items():
        diff = (value - ref["params"][name]).abs().max().item()
        assert torch.equal(value, ref["params"][name]), f"{run} {name}: max |diff| {diff:.3g}"
    assert ds["losses"] == ref["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("run", DS_RUNS)
def test_step_count_per_group_and_deepspeed_partitions(runs, run):
    ds = runs[f"deepspeed_{run}"]
    stage = int(run[4])
    # DeepSpeed calls step() once per param group with param_groups narrowed to it: each parameter must still
    # count one step per engine step (bf16 at ZeRO-0: plus DeepSpeed's zero-gradient step at construction)
    assert ds["steps"] == [job.STEPS + (run == "zero0_bf16")], ds["steps"]
    # diffmod: previous_grad lives in our flat buffers over DeepSpeed's partition like the other state
    assert ds["state_keys"] == ["exp_avg", "exp_avg_lr", "exp_avg_sq"] + (
        ["previous_grad"] if run.endswith("diffmod") else []) + ["step"]
    if stage == 0:
        assert ds["group_sizes"] == [2, 4]   # the model's weights / biases+norm parameters
        assert ds["wrapper"] == ("FP16_UnfusedOptimizer" if run.endswith("bf16") else "ShardedOptimizer")
        return
    # ZeRO-1/2: DeepSpeed swapped each group's parameters for one flat fp32 partition; we rebuilt around it
    assert ds["group_sizes"] == [1, 1] and ds["wrapper"] == "DeepSpeedZeroOptimizer"
    ref = runs[f"torchrun_{REFERENCE[run]}"]
    for name, (fp32_master, exp_avg) in ds["ds_views"].items():
        # DeepSpeed's own views of the fp32 master and our state follow our buffers (no stale copies)
        param = ds["params"][name]
        master_as_param = fp32_master.bfloat16().float() if run.endswith("bf16") else fp32_master
        assert torch.equal(master_as_param, param), name
        assert torch.equal(exp_avg, ref["exp_avg"][name]), name


# ------------------------------------------------------------------------------ adapter checks (no launcher)
def test_shipped_configs_load_with_what_a_client_optimizer_needs():
    from sharded_optim.deepspeed import load_config
    paths = sorted((REPO / "configs").glob("deepspeed_*.json"))
    assert {p.stem for p in paths} >= {"deepspeed_zero0", "deepspeed_zero1", "deepspeed_zero2",
                                       "deepspeed_zero2_bf16"}
    for path in paths:
        cfg = load_config(path)
        assert cfg["zero_allow_untested_optimizer"] is True and cfg["gradient_clipping"] == 0.0, path.name
        assert cfg == json.loads(path.read_text()), f"{path.name} should already say what load_config adds"


def test_load_config_fills_clipping_and_rejects_what_it_cannot_honour(tmp_path):
    from sharded_optim.deepspeed import load_config
    cfg = load_config({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}})
    assert cfg["gradient_clipping"] == 0.0 and cfg["zero_allow_untested_optimizer"] is True
    assert load_config({"gradient_clipping": 1.0})["gradient_clipping"] == 1.0   # an explicit value is kept
    bad = [({"zero_optimization": {"stage": 3}}, "stage"),
           ({"optimizer": {"type": "Adam"}}, "optimizer"),
           ({"zero_allow_untested_optimizer": False}, "zero_allow_untested_optimizer"),
           ({"gradient_clipping": -1}, "gradient_clipping"),
           ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16")]
    for config, word in bad:
        with pytest.raises(ValueError, match=word):
            load_config(config)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(broken)
    with pytest.raises(FileNotFoundError, match="config"):
        load_config(tmp_path / "missing.json")


def test_client_optimizer_is_local_and_never_skips():
    from sharded_optim.deepspeed import client_optimizer
    p = torch.nn.Parameter(torch.ones(3))
    opt = client_optimizer([p], "adamod", lr=0.1)
    assert opt.zero_stage == 0 and opt.nonfinite_policy == "ignore" and opt.spike_sigma is None
    for kwargs, word in [({"zero_stage": 2}, "zero_stage"), ({"nonfinite_policy": "skip"}, "nonfinite_policy"),
                         ({"spike_sigma": 3.0}, "spike_sigma"), ({"bucket_mb": 4.0}, "bucket_mb")]:
        with pytest.raises(ValueError, match=word):
            client_optimizer([p], **kwargs)


def test_incompatible_deepspeed_fails_at_initialize(monkeypatch):
    require_module("deepspeed")
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from sharded_optim.deepspeed import TESTED_DEEPSPEED, initialize
    assert deepspeed.__version__ in TESTED_DEEPSPEED   # the installed one is a tested one
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "_link_all_hp_params")   # what a DeepSpeed without it looks like
    with pytest.raises(RuntimeError, match="DeepSpeedZeroOptimizer._link_all_hp_params.*Tested with DeepSpeed 0.19.8"):
        initialize(torch.nn.Linear(2, 2), {"train_micro_batch_size_per_gpu": 1})
