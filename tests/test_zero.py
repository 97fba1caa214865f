"""ZeRO-1/2 on real gloo process groups: equivalence with the single-process optimizer, memory, clipping,
non-finite skipping, gradient accumulation, DDP, bf16 with an fp32 master, and bad input.

Each world size is one spawned group running every scenario (spawning costs seconds here).  Two kinds of check:

* **exact**: every rank sets synthetic gradients ``G_r`` and the single-process reference gets the average the
  ranks compute.  With two ranks that average is ``G_0/2 + G_1/2`` in either order (floating-point addition of two
  terms is commutative), so the sharded update must equal the reference update bit for bit: same eager kernel, same
  inputs, elementwise.
* **real training**: each rank back-propagates the mean loss of its slice of the global batch; the reference trains on
  the whole batch.  The gradients then differ by reduction order (a few ulp relative), which Adam's normalised update
  turns into parameter differences of order ``lr * 1e-6`` per step; 20 steps at lr=1e-3 stay far below the 2e-6
  tolerance used (measured: <= 3e-8).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import sharded_optim as so
from tests.support.multiproc import run_ranks
from tests.support.scenarios import Scenarios, zero

STEPS = 20
LOCAL_BATCH = 4
TINY_BUCKET_MB = 0.0005  # ~130 fp32 elements: several buckets, parameters straddling ranks and buckets
REAL_TRAINING_ATOL = 2e-6
CONFIGS = {  # name -> (algorithm, options)
    "adamw": ("adamw", {}),
    "amsgrad": ("adam", {"amsgrad": True, "weight_decay": 0.01}),
    "adamod": ("adamod", {"weight_decay": 0.01}),
    "radam": ("radam", {}),
    "diffmod": ("diffmod", {"weight_decay": 0.01, "len_memory": 50}),   # previous_grad sharded with the rest
}
EXACT_CONFIGS = {
    **CONFIGS,
    "diffgrad": ("diffgrad", {"weight_decay": 0.1}),
    "adam_l2": ("adam", {"weight_decay": 0.1}),
    "adamax": ("adamax", {}),
    "nadam": ("nadam", {"weight_decay": 0.01}),
    "adabound": ("adabound", {"amsgrad": True}),
}


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    # uneven sizes (13*37, 37, 37*5, 5, 5*3): nothing divides evenly by 2, 3 or 4 ranks
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3, bias=False)).to(dtype)


def global_batch(step: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * LOCAL_BATCH, 13, generator=g)


def synthetic_grad(shape: torch.Size, rank: int, step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + index)
    return torch.randn(shape, generator=g)


def params_np(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().float().numpy().copy() for p in model.parameters()]


def train_real(rank: int, world: int, algorithm: str, options: dict, *, zero_stage: int, ddp: bool = False,
               micro_batches: int = 1, use_no_sync: bool = False, clip: float | None = None,
               overlap_gather: bool = False) -> dict:
    """Train the MLP for STEPS steps on this rank's slice of the global batch."""
    model = make_model()
    module = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = so.ShardedOptimizer(model.parameters(), algorithm=algorithm, zero_stage=zero_stage,
                              bucket_mb=TINY_BUCKET_MB, reduce_grads=not ddp, kernel="eager",
                              overlap_param_gather=overlap_gather, **options)
    if overlap_gather:
        opt.attach_model(model)
    norms = []
    for step in range(STEPS):
        x = global_batch(step, world)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        opt.zero_grad()
        for micro, chunk in enumerate(x.chunk(micro_batches)):
            last = micro == micro_batches - 1
            ctx = opt.no_sync() if (use_no_sync and not last) else _nullcontext()
            with ctx:
                (module(chunk).pow(2).mean() / micro_batches).backward()
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
    opt.wait_params()  # outside a forward, whoever reads the parameters completes an overlapped gather first
    return {"params": params_np(model), "norms": norms, "memory": opt.memory_report()}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def reference_real(algorithm: str, options: dict, world: int, clip: float | None = None) -> dict:
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), algorithm=algorithm, kernel="eager", **options)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        model(global_batch(step, world)).pow(2).mean().backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
    return {"params": params_np(model), "norms": norms}


def train_exact(rank: int, world: int, algorithm: str, options: dict, zero_stage: int) -> list[np.ndarray]:
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), algorithm=algorithm, zero_stage=zero_stage,
                              bucket_mb=TINY_BUCKET_MB, kernel="eager", **options)
    for step in range(5):
        for i, p in enumerate(model.parameters()):
            p.grad = synthetic_grad(p.shape, rank, step, i)
        opt.step()
    return params_np(model)


def reference_exact(algorithm: str, options: dict) -> list[np.ndarray]:
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), algorithm=algorithm, kernel="eager", **options)
    for step in range(5):
        for i, p in enumerate(model.parameters()):
            # what the two ranks compute: each pre-divides by the world size, then the pair is summed
            p.grad = torch.div(synthetic_grad(p.shape, 0, step, i), 2) + torch.div(synthetic_grad(p.shape, 1, step, i), 2)
        opt.step()
    return params_np(model)


# ------------------------------------------------------------------------------------------------ rank workers
def stages_for(world: int, name: str) -> tuple[int, ...]:
    """Both stages everywhere on 2 ranks; on 1 rank they are the same local path; on 3 and 4 ranks ZeRO-2 for every
    algorithm and ZeRO-1 for one (the suite must fit CI's time on 2 cores)."""
    if world == 1:
        return (2,)
    if world == 2 or name == "adamw":
        return (1, 2)
    return (2,)


def scenarios_all_worlds(rank: int, world: int) -> Scenarios:
    """Real training per algorithm and stage, named "adamw zero-2"."""
    out = Scenarios()
    for name, (algorithm, options) in CONFIGS.items():
        for stage in stages_for(world, name):
            out[zero(name, stage)] = train_real(rank, world, algorithm, options, zero_stage=stage)
    return out


def scenarios_two_ranks(rank: int, world: int) -> Scenarios:
    """Every 2-rank scenario, named as it reads: "exact adamw zero-1", "ddp zero-2", "clip", "bf16", ..."""
    out = Scenarios()
    for name, (algorithm, options) in EXACT_CONFIGS.items():
        for stage in (1, 2):
            out[zero(f"exact {name}", stage)] = train_exact(rank, world, algorithm, options, stage)
    for stage in (1, 2):
        out[zero("ddp", stage)] = train_real(rank, world, "adamw", {}, zero_stage=stage, ddp=True)
        out[zero("accum_no_sync", stage)] = train_real(rank, world, "adamw", {}, zero_stage=stage, micro_batches=2,
                                                       use_no_sync=True)
        out[zero("accum_hooks", stage)] = train_real(rank, world, "adamw", {}, zero_stage=stage, micro_batches=2)
    out["clip"] = train_real(rank, world, "adamw", {}, zero_stage=2, clip=0.05)
    out[zero("overlap_gather", 2)] = train_real(rank, world, "adamw", {}, zero_stage=2, overlap_gather=True)
    out[zero("overlap_gather", 1)] = out[zero("overlap_gather", 2)]
    try:
        unattached = so.ShardedOptimizer(make_model().parameters(), overlap_param_gather=True, kernel="eager")
        unattached.step()
        out["unattached_error"] = None
    except RuntimeError as exc:
        out["unattached_error"] = str(exc)
    out["nonfinite"] = nonfinite_scenario(rank)
    out["bf16"] = bf16_scenario(rank, world)
    out["bad_input"] = bad_input_scenario()
    out["state_dict"] = state_dict_scenario(rank, world)
    out["missing_grad"] = missing_grad_scenario(rank)
    return out


def nonfinite_scenario(rank: int) -> dict:
    """A NaN on rank 1 only: every rank must skip that step, parameters and state untouched."""
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), algorithm="adamod", bucket_mb=TINY_BUCKET_MB, kernel="eager")
    for step in range(2):
        for i, p in enumerate(model.parameters()):
            p.grad = synthetic_grad(p.shape, rank, step, i)
        opt.step()
    before = params_np(model)
    state_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    for i, p in enumerate(model.parameters()):
        p.grad = synthetic_grad(p.shape, rank, 2, i)
        if rank == 1 and i == 2:
            p.grad[0, 0] = float("nan")
    opt.step()
    after = params_np(model)
    state_after = opt.state[next(model.parameters())]
    return {"unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
            "state_unchanged": all(torch.equal(state_before[k], state_after[k]) for k in state_before),
            "skipped": dict(opt.skipped_steps), "attempted": opt.steps_attempted}


def bf16_scenario(rank: int, world: int) -> dict:
    """bf16 parameters, fp32 master and state, fp32 gradient reduction."""
    model = make_model(torch.bfloat16)
    opt = so.ShardedOptimizer(model.parameters(), algorithm="adamw", bucket_mb=TINY_BUCKET_MB, kernel="eager")
    for step in range(5):
        for i, p in enumerate(model.parameters()):
            p.grad = synthetic_grad(p.shape, rank, step, i).to(torch.bfloat16)
        opt.step()
    sd = opt.state_dict()
    masters = [sd["state"][i]["master_param"].numpy().copy() for i in range(len(sd["state"]))]
    dtypes = {str(t.dtype) for entry in sd["state"].values() for k, t in entry.items() if k != "step"}
    return {"params": params_np(model), "masters": masters, "state_dtypes": sorted(dtypes)}


def bad_input_scenario() -> dict:
    errors = {}
    cpu = torch.nn.Parameter(torch.zeros(3))
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    for name, params in {"wrong_device": [meta], "mixed_devices": [cpu, meta], "duplicate": [cpu, cpu]}.items():
        try:
            so.ShardedOptimizer(params, algorithm="adamw", kernel="eager")
            errors[name] = None
        except (ValueError, TypeError) as exc:
            errors[name] = str(exc)
    return errors


def missing_grad_scenario(rank: int) -> dict:
    """diffgrad with L2 on 2 ranks; the last parameter has no gradient on step 2 on every rank.  Sharded, every
    parameter is updated and a missing gradient counts as zero (FlatParamGroup.collect_grads), so its previous_grad
    becomes the L2 term alone, 0 + wd*p (ARCHITECTURE.md, diffgrad)."""
    model = make_model()
    params = list(model.parameters())
    opt = so.ShardedOptimizer(params, algorithm="diffgrad", weight_decay=0.1, bucket_mb=TINY_BUCKET_MB,
                              kernel="eager")
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = None if (step == 1 and i == len(params) - 1) else synthetic_grad(p.shape, rank, step, i)
        before = params[-1].detach().clone()
        opt.step()
    return {"previous_grad": opt.state_dict()["state"][len(params) - 1]["previous_grad"].numpy().copy(),
            "l2_term": (0.1 * before).numpy(), "step": int(opt.state_dict()["state"][len(params) - 1]["step"])}


def state_dict_scenario(rank: int, world: int) -> dict:
    model = make_model()
    opt = so.ShardedOptimizer(model.parameters(), algorithm="adamod", amsgrad=True, bucket_mb=TINY_BUCKET_MB,
                              kernel="eager")
    for step in range(3):
        for i, p in enumerate(model.parameters()):
            p.grad = synthetic_grad(p.shape, rank, step, i)
        opt.step()
    sd = opt.state_dict()
    return {i: {k: v.numpy().copy() for k, v in entry.items()} for i, entry in sd["state"].items()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def two_rank_results() -> list[Scenarios]:
    return run_ranks(scenarios_two_ranks, 2)


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda world: f"world {world}")
def all_worlds(request: pytest.FixtureRequest) -> tuple[int, list[Scenarios]]:
    """One spawned group per world size, shared by every algorithm's test (pytest groups the tests by world)."""
    return request.param, run_ranks(scenarios_all_worlds, request.param)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_matches_single_process(all_worlds: tuple[int, list[Scenarios]], name: str) -> None:
    world, results = all_worlds
    algorithm, options = CONFIGS[name]
    ref = reference_real(algorithm, options, world)
    for stage in stages_for(world, name):
        scenario = f"{zero(name, stage)} world {world}"
        for rank, res in enumerate(results):
            for got, want in zip(res[zero(name, stage)]["params"], ref["params"]):
                np.testing.assert_allclose(got, want, rtol=0, atol=REAL_TRAINING_ATOL,
                                           err_msg=f"{scenario} rank {rank}")
        # every rank holds the same parameters after the all-gather, bit for bit
        for rank, res in enumerate(results[1:], start=1):
            for i, (a, b) in enumerate(zip(res[zero(name, stage)]["params"], results[0][zero(name, stage)]["params"])):
                assert np.array_equal(a, b), f"{scenario} rank {rank}: parameter {i} differs from rank 0's"
        # per-rank state is the unsharded state / N up to the alignment padding, exactly
        mems = [res[zero(name, stage)]["memory"] for res in results]
        nkeys = len([k for k in mems[0]["by_key"] if k not in ("master", "grad_shard")])
        unpadded = sum(m["state_bytes"] - m["padding_elements"] * 4 * nkeys for m in mems)
        assert unpadded == mems[0]["unsharded_state_bytes"], f"{scenario}: {unpadded} state bytes over the ranks"
        # equal slices: balanced to the element
        assert len({m["state_bytes"] for m in mems}) == 1, f"{scenario}: per-rank {[m['state_bytes'] for m in mems]}"


@pytest.mark.parametrize("name", list(EXACT_CONFIGS))
def test_update_is_exact_on_two_ranks(two_rank_results: list[dict], name: str) -> None:
    algorithm, options = EXACT_CONFIGS[name]
    want = reference_exact(algorithm, options)
    for stage in (1, 2):
        for rank, res in enumerate(two_rank_results):
            for got, ref in zip(res[zero(f"exact {name}", stage)], want):
                assert np.array_equal(got, ref), f"{name} zero-{stage} rank {rank}: max diff {abs(got - ref).max()}"


def test_overlapped_param_gather_needs_the_model(two_rank_results: list[dict]) -> None:
    assert "attach_model" in (two_rank_results[0]["unattached_error"] or "")


@pytest.mark.parametrize("scenario", ["ddp", "accum_no_sync", "accum_hooks", "overlap_gather"])
def test_ddp_and_gradient_accumulation(two_rank_results: list[dict], scenario: str) -> None:
    ref = reference_real("adamw", {}, 2)
    for stage in (1, 2):
        for rank, res in enumerate(two_rank_results):
            for got, want in zip(res[zero(scenario, stage)]["params"], ref["params"]):
                np.testing.assert_allclose(got, want, rtol=0, atol=REAL_TRAINING_ATOL,
                                           err_msg=f"{zero(scenario, stage)} rank {rank}")


def test_clipping_matches_torch_on_unsharded_model(two_rank_results: list[dict]) -> None:
    ref = reference_real("adamw", {}, 2, clip=0.05)
    assert min(ref["norms"]) > 0.05, "the test must actually clip"
    for rank, res in enumerate(two_rank_results):
        np.testing.assert_allclose(res["clip"]["norms"], ref["norms"], rtol=1e-5, err_msg=f"clip rank {rank}: norms")
        for got, want in zip(res["clip"]["params"], ref["params"]):
            np.testing.assert_allclose(got, want, rtol=0, atol=REAL_TRAINING_ATOL, err_msg=f"clip rank {rank}")


def test_nonfinite_on_one_rank_skips_everywhere(two_rank_results: list[dict]) -> None:
    for rank, res in enumerate(two_rank_results):
        nf = res["nonfinite"]
        assert nf["unchanged"] and nf["state_unchanged"], f"nonfinite rank {rank}: {nf}"
        assert nf["skipped"]["nonfinite"] == 1 and nf["attempted"] == 3, f"nonfinite rank {rank}: {nf}"


def test_bf16_params_keep_fp32_master(two_rank_results: list[dict]) -> None:
    for rank, res in enumerate(two_rank_results):
        bf = res["bf16"]
        assert bf["state_dtypes"] == ["torch.float32"], f"bf16 rank {rank}: {bf['state_dtypes']}"
        for i, (param, master) in enumerate(zip(bf["params"], bf["masters"])):
            # the bf16 parameter is exactly the fp32 master rounded to bf16
            assert np.array_equal(param, torch.from_numpy(master).to(torch.bfloat16).float().numpy()), \
                f"bf16 rank {rank}: parameter {i} is not its master rounded to bf16"
    # and the master follows the fp32 update of the fp32-averaged gradients, bit for bit
    model = make_model(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    opt = so.ShardedOptimizer(ref, algorithm="adamw", kernel="eager")
    for step in range(5):
        for i, p in enumerate(ref):
            g0 = synthetic_grad(p.shape, 0, step, i).to(torch.bfloat16).float()
            g1 = synthetic_grad(p.shape, 1, step, i).to(torch.bfloat16).float()
            p.grad = torch.div(g0, 2) + torch.div(g1, 2)
        opt.step()
    for i, (master, want) in enumerate(zip(two_rank_results[0]["bf16"]["masters"], ref)):
        assert np.array_equal(master, want.detach().numpy()), f"bf16 rank 0: master {i} differs from the fp32 update"


def test_bad_input_is_rejected_clearly(two_rank_results: list[dict]) -> None:
    errors = two_rank_results[0]["bad_input"]
    assert errors["wrong_device"] is not None and "gloo" in errors["wrong_device"]
    assert errors["mixed_devices"] is not None and "mixes devices" in errors["mixed_devices"]
    assert errors["duplicate"] is not None and "more than once" in errors["duplicate"]


def test_state_dict_is_full_and_identical_on_every_rank(two_rank_results: list[dict]) -> None:
    a, b = (res["state_dict"] for res in two_rank_results)
    model = make_model()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert sorted(a) == list(range(len(shapes))), f"state_dict rank 0: parameters {sorted(a)}"
    for i in a:
        assert set(a[i]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_lr"}, \
            f"state_dict rank 0: state[{i}] keys {sorted(a[i])}"
        for key in a[i]:
            assert np.array_equal(a[i][key], b[i][key]), f"state_dict: state[{i}][{key!r}] differs between the ranks"
            if key != "step":
                assert a[i][key].shape == shapes[i], f"state_dict rank 0: state[{i}][{key!r}] {a[i][key].shape}"
        assert int(a[i]["step"]) == 3, f"state_dict rank 0: state[{i}]['step'] {a[i]['step']}"
    # loads into a single-process optimizer, which then holds the same state
    opt = so.ShardedOptimizer(model.parameters(), algorithm="adamod", amsgrad=True, kernel="eager")
    opt.load_state_dict({"state": {i: {k: torch.from_numpy(v) for k, v in e.items()} for i, e in a.items()},
                         "param_groups": opt.state_dict()["param_groups"]})
    for i, p in enumerate(model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_lr"):
            assert np.array_equal(opt.state[p][key].numpy(), a[i][key]), f"state_dict loaded: state[{i}][{key!r}]"


def test_missing_gradient_on_every_rank_counts_as_zero(two_rank_results: list[dict]) -> None:
    for rank, res in enumerate(two_rank_results):
        got = res["missing_grad"]
        assert got["step"] == 2, f"missing_grad rank {rank}: step {got['step']}"
        # g' = 0 + wd*p rounded once (the kernel's fp32 product; wd is the fp32 scalar)
        np.testing.assert_allclose(got["previous_grad"], got["l2_term"], rtol=2 ** -22, atol=0,
                                   err_msg=f"missing_grad rank {rank}")
        assert np.any(got["l2_term"] != 0), f"missing_grad rank {rank}: the L2 term is all zeros"


def test_not_distributed_means_local() -> None:
    assert not dist.is_initialized()
    opt = so.ShardedOptimizer(make_model().parameters(), algorithm="adamw", kernel="eager")
    assert opt.world_size == 1 and not opt.sharded
