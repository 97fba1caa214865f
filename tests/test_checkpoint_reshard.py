"""Checkpoints across world sizes (2->3, 3->2, 4->1, 1->2) and resume equivalence, on real gloo ranks.

Every algorithm state key appears (CONFIGS), ZeRO-1 and ZeRO-2, and Lookahead slow weights.  The loaded state
must equal the saved one exactly; a resumed run (fresh process group, fresh objects) must end bitwise equal to
an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import ckpt_scenarios as S
from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.slow


def assert_same(expected: dict, got: dict, what: str) -> None:
    """Bitwise equality of two snapshots (state, hyperparameters, model, Lookahead)."""
    assert sorted(got["state"]) == sorted(expected["state"]), f"{what}: parameters with state differ"
    for i, entry in expected["state"].items():
        assert sorted(got["state"][i]) == sorted(entry), f"{what}: state keys of parameter {i}"
        for key, value in entry.items():
            assert value.dtype == got["state"][i][key].dtype and value.shape == got["state"][i][key].shape, \
                f"{what}: state[{i}][{key!r}] is {got['state'][i][key].dtype} {got['state'][i][key].shape}, " \
                f"saved {value.dtype} {value.shape}"
            assert np.array_equal(value, got["state"][i][key]), f"{what}: state[{i}][{key!r}] differs"
    assert got["groups"] == expected["groups"], f"{what}: hyperparameters differ"
    for key, value in expected["model"].items():
        assert np.array_equal(value, got["model"][key]), f"{what}: model[{key!r}] differs"
    if "slow" in expected:
        assert got["lookahead"] == expected["lookahead"], f"{what}: Lookahead (k, alpha, inner_steps) differ"
        for i, value in expected["slow"].items():
            assert np.array_equal(value, got["slow"][i]), f"{what}: slow weights of parameter {i} differ"


def expected_from(per_rank_saved: list[dict], name: str) -> dict:
    snap = dict(per_rank_saved[0][name])
    snap["state"] = S.union_state([r[name] for r in per_rank_saved])
    return snap


def test_reshard_and_resume(tmp_path):
    torch.set_num_threads(1)
    root = str(tmp_path)
    # world 1 without a process group, in this process
    saved1 = {}
    for name in S.CONFIGS:
        model, opt = S.build(name, seed=1)
        S.train(model, opt, range(4))
        S.checkpoint.save(tmp_path / "w1" / name, model, opt, step=4, extra={"name": name})
        saved1[name] = S.snapshot(model, opt)
    a = run_ranks(S.spawn_a, 2, root)
    b = run_ranks(S.spawn_b, 3, root)
    c = run_ranks(S.spawn_c, 2, root)
    d = run_ranks(S.spawn_d, 4, root)
    cases = {"1->2": ([saved1], a), "2->3": ([r["saved"] for r in a], b), "3->2": ([r["saved"] for r in b], c)}
    for label, (saved, loaded) in cases.items():
        for name in S.CONFIGS:
            expected = expected_from(saved, name)
            for rank, result in enumerate(loaded):
                info = result["loaded"][name]["info"]
                assert info["step"] == 4, f"{label} {name} rank {rank}: step {info['step']}"
                assert info["extra"] == {"name": name}, f"{label} {name} rank {rank}: extra {info['extra']}"
                assert_same(expected, result["loaded"][name]["snapshot"], f"{label} {name} rank {rank}")
    for name in S.CONFIGS:  # 4 -> 1, in this process again
        model, opt = S.build(name, seed=99)
        info = S.checkpoint.load(tmp_path / "w4" / name, model, opt)
        assert info["world_size"] == 4 and not info["rng_restored"], f"4->1 {name}: {info}"
        assert_same(expected_from([r["saved"] for r in d], name), S.snapshot(model, opt), f"4->1 {name}")
    for name in S.RESUME_CONFIGS:
        for rank in range(2):
            assert_same(a[rank]["resume"][name], c[rank]["resume"][name], f"resume {name} rank {rank}")
            # the runs really trained: the state moved away from a fresh optimizer's
            assert a[rank]["resume"][name]["state"], f"resume {name} rank {rank}: no state"
    # keep_last=1 in the resume saves: only the newest checkpoint remains and `latest` names it
    assert sorted(p.name for p in (tmp_path / "resume" / "adamw_z1").iterdir()) == ["latest", "step_20"]
