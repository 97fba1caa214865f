"""``sharded_optim.checkpoint`` on the FSDP2 path: a checkpoint saved from ``fully_shard`` DTensor state on 2 ranks
loads into FSDP2 on 2 ranks (and continues bit for bit), into our own ZeRO-2 on 2 ranks, and into one plain
process: the checkpoint is sharding-agnostic, and every state key comes back exactly."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from sharded_optim import ShardedOptimizer, checkpoint
from tests.support.multiproc import run_ranks
from tests.test_fsdp import batches, local_rows, loss_of, make_model, shard

pytestmark = pytest.mark.slow

KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_lr")
SAVE_AT, TOTAL = 3, 5
ENV = {"SHARDED_OPTIM_KERNEL": "eager"}  # compiling per rank costs ~10 s; the math is the same function


def make_optimizer(model: torch.nn.Module, **kw: Any) -> ShardedOptimizer:
    return ShardedOptimizer(model.parameters(), algorithm="adamod", amsgrad=True, lr=1e-2, weight_decay=1e-3, **kw)


def full_state(model: torch.nn.Module, opt: ShardedOptimizer) -> dict[str, np.ndarray]:
    """Every state tensor and parameter as a full logical array, keyed by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        out[f"{name}/param"] = (value.full_tensor() if hasattr(value, "full_tensor") else value).numpy().copy()
        for key in KEYS:
            t = opt.state[p][key]
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{name}/{key}"] = t.reshape(p.shape).numpy().copy()
        out[f"{name}/step"] = np.array(int(opt.state[p]["step"]))
    return out


def train(model: torch.nn.Module, opt: ShardedOptimizer, data: list[torch.Tensor], rank: int, world: int,
          steps: range) -> None:
    for i in steps:
        opt.zero_grad()
        loss_of(model, local_rows(data[i], rank, world)).backward()
        opt.step()


def save_fsdp(rank: int, world: int, directory: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    data = batches(TOTAL)
    model = shard(make_model(0), mesh)
    opt = make_optimizer(model)
    train(model, opt, data, rank, world, range(SAVE_AT))
    checkpoint.save(os.path.join(directory, f"step_{SAVE_AT:04d}"), model, opt, step=SAVE_AT)
    saved = full_state(model, opt)
    train(model, opt, data, rank, world, range(SAVE_AT, TOTAL))
    return {"saved": saved, "final": full_state(model, opt)}


def load_fsdp(rank: int, world: int, directory: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model = shard(make_model(1), mesh)  # other initial weights: everything must come from the checkpoint
    opt = make_optimizer(model)
    info = checkpoint.load(checkpoint.latest(directory), model, opt)
    loaded = full_state(model, opt)
    train(model, opt, batches(TOTAL), rank, world, range(info["step"], TOTAL))
    return {"loaded": loaded, "final": full_state(model, opt)}


def load_zero2(rank: int, world: int, directory: str) -> dict:
    model = make_model(1)
    opt = make_optimizer(model, zero_stage=2, bucket_mb=0.001)
    checkpoint.load(checkpoint.latest(directory), model, opt)
    return {"loaded": full_state_gathered(model, opt)}


def full_state_gathered(model: torch.nn.Module, opt: ShardedOptimizer) -> dict[str, np.ndarray]:
    sd = opt.state_dict()  # ZeRO: full logical tensors gathered from every rank
    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        out[f"{name}/param"] = p.detach().numpy().copy()
        for key in KEYS:
            out[f"{name}/{key}"] = sd["state"][i][key].reshape(p.shape).numpy().copy()
        out[f"{name}/step"] = np.array(int(sd["state"][i]["step"]))
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys {sorted(set(got) ^ set(want))} in only one of them"
    for key in want:
        assert np.array_equal(got[key], want[key]), f"{what}: {key} differs (max {np.abs(got[key] - want[key]).max()})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    directory = str(tmp_path_factory.mktemp("fsdp_ckpt"))
    return directory, run_ranks(save_fsdp, 2, directory, env=ENV)


def test_fsdp_checkpoint_resumes_bitwise_on_fsdp(saved: tuple[str, list[dict]]) -> None:
    directory, before = saved
    after = run_ranks(load_fsdp, 2, directory, env=ENV)
    for rank in range(2):
        assert_same(after[rank]["loaded"], before[rank]["saved"], f"fsdp 2->2 loaded, rank {rank}")
        assert_same(after[rank]["final"], before[rank]["final"], f"fsdp 2->2 continued, rank {rank}")


def test_fsdp_checkpoint_loads_into_zero2_and_one_process(saved: tuple[str, list[dict]], monkeypatch) -> None:
    directory, before = saved
    want = before[0]["saved"]
    for rank, res in enumerate(run_ranks(load_zero2, 2, directory, env=ENV)):
        assert_same(res["loaded"], want, f"fsdp 2 -> zero-2 on 2 ranks, rank {rank}")
    monkeypatch.setenv("SHARDED_OPTIM_KERNEL", "eager")
    model = make_model(1)
    opt = make_optimizer(model)
    checkpoint.load(checkpoint.latest(directory), model, opt)
    assert_same(full_state_gathered(model, opt), want, "fsdp 2 -> 1 process")
