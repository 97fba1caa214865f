"""Optimizer-health statistics from the sharded pass equal the same quantities computed directly, in float64,
on the unsharded tensors; and two ranks report the same global statistics as one process."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sharded_optim as so
from sharded_optim.telemetry.fields import EFF_LR_EDGES, FIELD_INDEX
from tests.support.multiproc import run_ranks
from tests.support.scenarios import Scenarios

F = FIELD_INDEX
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.01
SHAPES = [(7, 5), (5,), (3, 7)]


def make_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def grads_for(step: int, rank: int | None = None) -> list[torch.Tensor]:
    """Per-step gradients; with ``rank`` given, that rank's half of an average (sum over ranks = full grad)."""
    g = torch.Generator().manual_seed(77 + step)
    full = [torch.randn(s, generator=g) for s in SHAPES]
    full[0][0, :2] = 0.0  # exact zeros for the zero-ratio statistic
    full[1][:] = 1e-12    # tiny gradients: sqrt(v_hat) below eps for these elements
    if rank is None:
        return full
    return [x * 2 if rank == 0 else torch.zeros_like(x) for x in full]  # averaged over 2 ranks -> full


def expected_stats(kind: str, params_new: list[torch.Tensor], grads: list[torch.Tensor],
                   m_prev: list[torch.Tensor], state: list[dict[str, torch.Tensor]], t: int,
                   g_prev: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Direct float64 computation on whole tensors from the update equations (not the kernel code).

    ``g_prev``: diffGrad's previous gradient before the step (the state after it holds this step's)."""
    cat = lambda xs: torch.cat([x.double().reshape(-1) for x in xs])  # noqa: E731
    g, mp, p = cat(grads), cat(m_prev), cat(params_new)
    m, v = cat([s["exp_avg"] for s in state]), cat([s["exp_avg_sq"] for s in state])
    bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
    if kind == "adamw":
        sqrt_vhat = v.sqrt() / math.sqrt(bc2)
        eta = (LR / bc1) / (sqrt_vhat + EPS)
    elif kind == "amsgrad":
        vmax = cat([s["max_exp_avg_sq"] for s in state])
        sqrt_vhat = vmax.sqrt() / math.sqrt(bc2)
        eta = (LR / bc1) / (sqrt_vhat + EPS)
    elif kind == "diffgrad":  # E0 step size times the friction xi = sigmoid(|g_prev - g|) (ALGORITHMS.md 10)
        sqrt_vhat = v.sqrt()
        eta = (LR * math.sqrt(bc2) / bc1) / (sqrt_vhat + EPS)
    else:  # adamod, diffmod (authors' code): eta = (lr*sqrt(bc2)/bc1)/(sqrt(v)+eps), bounded by its EMA s
        s = cat([st["exp_avg_lr"] for st in state])
        sqrt_vhat = v.sqrt()
        raw = (LR * math.sqrt(bc2) / bc1) / (sqrt_vhat + EPS)
        eta = torch.minimum(raw, s)
    xi = None
    if kind in ("diffgrad", "diffmod"):
        xi = 1.0 / (1.0 + torch.exp(-(cat(g_prev) - cat([st["previous_grad"] for st in state])).abs()))
        eta = eta * xi
    delta = eta * m
    out = {"numel": g.numel(), "grad_sumsq": float((g * g).sum()), "mom_grad_dot": float((mp * g).sum()),
           "mom_sumsq": float((mp * mp).sum()), "zero_grad": int((g == 0).sum()), "nonfinite_grad": 0,
           "param_sumsq": float((p * p).sum()), "update_sumsq": float((delta * delta).sum()),
           "unit_update_sumsq": float(((delta / LR) ** 2).sum()), "eff_lr_sum": float(eta.sum()),
           "eps_dominated": int((sqrt_vhat < EPS).sum())}
    if kind == "amsgrad":
        out["amsgrad_max_active"] = int((vmax > v).sum())
    if kind in ("adamod", "diffmod"):
        out["adamod_clipped"] = int((s < raw).sum())
    if xi is not None:
        out["friction_sum"] = float(xi.sum())
        out["friction_near_half"] = int((xi <= 0.51).sum())
    for i, edge in enumerate(EFF_LR_EDGES):
        out[f"eff_lr_le_{i}"] = int((eta <= edge).sum())
    return out


CONFIGS = {"adamw": ("adamw", {}), "amsgrad": ("adamw", {"amsgrad": True}), "adamod": ("adamod", {}),
           "diffgrad": ("diffgrad", {"decoupled_weight_decay": True}), "diffmod": ("diffmod", {})}
# (diffgrad: L2 decay would lift the 1e-12 gradients of SHAPES[1] out of eps dominance)


def run_and_capture(kind: str, rank: int | None = None, steps: int = 3, kernel: str = "eager") -> dict:
    algorithm, options = CONFIGS[kind]
    params = make_params()
    opt = so.ShardedOptimizer(params, algorithm=algorithm, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                              kernel=kernel, stats_interval=1, bucket_mb=0.0002, **options)
    reports = []
    opt.add_report_hook(reports.append)
    captured = {}
    for step in range(steps):
        full_grads = grads_for(step)
        for p, g in zip(params, grads_for(step, rank)):
            p.grad = g.clone()
        m_prev = [opt.state[p]["exp_avg"].clone() if opt.state[p] else torch.zeros_like(p) for p in params]
        g_prev = [opt.state[p]["previous_grad"].clone() if "previous_grad" in opt.state[p] else torch.zeros_like(p)
                  for p in params]
        if rank is not None:  # sharded: take the full logical state from state_dict (gathered)
            sd = opt.state_dict()
            m_prev = [sd["state"][i]["exp_avg"].clone() if i in sd["state"] else torch.zeros_like(p)
                      for i, p in enumerate(params)]
            g_prev = [sd["state"][i]["previous_grad"].clone() if "previous_grad" in sd["state"].get(i, {})
                      else torch.zeros_like(p) for i, p in enumerate(params)]
        opt.step()
        sd = opt.state_dict()
        captured = {"params": [p.detach().clone() for p in params], "grads": full_grads, "m_prev": m_prev,
                    "state": [sd["state"][i] for i in range(len(params))], "t": step + 1, "g_prev": g_prev}
    # one process: each report carries its own step's statistics; sharded, the next step's report does and
    # flush_stats() hands over the last ones
    flushed = opt.flush_stats()
    stats_step, stats = flushed if flushed is not None else (reports[-1].stats_step, reports[-1].stats)
    assert stats_step == steps
    captured["stats"] = stats[0]
    captured["stats_steps"] = [r.stats_step for r in reports]
    # a statistics step's norm pass is the statistics pass itself (kernels.stats.pre_sums): its norms must be
    # those of the whole gradient, padding and all
    captured["norms"] = [(r.grad_norm, r.shard_grad_norm) for r in reports]
    captured["direct_norms"] = [float(torch.cat([x.double().reshape(-1) for x in grads_for(step)]).norm())
                                for step in range(steps)]
    # the statistics of the step before the last, from a report (sharded: made global by the norm all-reduce)
    captured["prev_stats"] = next(r.stats[0] for r in reports if r.stats_step == steps - 1)
    return captured


def assert_stats_match(got: torch.Tensor, want: dict[str, float]) -> None:
    for name, value in want.items():
        # sums over <= 100 elements accumulated in float64 from fp32 inputs: relative 1e-5 covers the fp32
        # rounding of the inputs the kernel saw; counts must be exact
        if name in ("numel", "zero_grad", "nonfinite_grad", "eps_dominated", "amsgrad_max_active",
                    "adamod_clipped", "friction_near_half") or name.startswith("eff_lr_le"):
            assert int(got[F[name]]) == value, name
        else:
            assert float(got[F[name]]) == pytest.approx(value, rel=1e-5, abs=1e-12), name


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_statistics_equal_direct_computation(kind: str, kernel: str) -> None:
    c = run_and_capture(kind, kernel=kernel)
    want = expected_stats(kind, c["params"], c["grads"], c["m_prev"], c["state"], c["t"], c["g_prev"])
    assert want["eps_dominated"] > 0 and want["zero_grad"] == 2  # the checks below can fail
    if kind.startswith("diff"):  # xi really spread: some elements near 0.5, the mean well above it
        assert 0 < want["friction_near_half"] < want["numel"] and want["friction_sum"] > 0.6 * want["numel"]
    assert_stats_match(c["stats"], want)
    assert [n for n, _ in c["norms"]] == pytest.approx(c["direct_norms"], rel=1e-6)


def two_rank_worker(rank: int, world: int) -> Scenarios:
    """Per algorithm: "adamw stats" (the last step's), "adamw stats of the step before", "adamw norms"."""
    out = Scenarios()
    for kind in CONFIGS:
        c = run_and_capture(kind, rank)
        out[f"{kind} stats"] = c["stats"].numpy()
        out[f"{kind} stats of the step before"] = c["prev_stats"].numpy()
        out["stats_steps"] = c["stats_steps"]
        out[f"{kind} norms"] = c["norms"]
        out["direct_norms"] = c["direct_norms"]
    return out


def test_two_ranks_report_the_single_process_statistics() -> None:
    results = run_ranks(two_rank_worker, 2)
    # sharded, a step's statistics are made global inside the next step's norm all-reduce: the report of step
    # t carries step t-1, and the last step's come from flush_stats() (checked inside run_and_capture)
    for rank, res in enumerate(results):
        assert res["stats_steps"] == [None, 1, 2], f"rank {rank}: statistics of steps {res['stats_steps']}"
    assert run_and_capture("adamw")["stats_steps"] == [1, 2, 3]  # one process: no collective, no delay
    for kind in CONFIGS:
        single = run_and_capture(kind)
        for rank, res in enumerate(results):
            # rank 0 carries 2*g and rank 1 zeros: the averaged gradient is g exactly (x*2/2), so the global
            # sums differ from one process only in float64 summation order
            np.testing.assert_allclose(res[f"{kind} stats"], single["stats"].numpy(), rtol=1e-9, atol=1e-12,
                                       err_msg=f"{kind} stats rank {rank}")
            np.testing.assert_allclose(res[f"{kind} stats of the step before"], single["prev_stats"].numpy(),
                                       rtol=1e-9, atol=1e-12,
                                       err_msg=f"{kind} stats of the step before rank {rank} (delivered with the "
                                               "next step)")
            # the global norm of the statistics pass is the whole gradient's, and the two ranks' shard norms
            # (small buckets: both ranks hold padding) add up to it
            assert [n for n, _ in res[f"{kind} norms"]] == pytest.approx(res["direct_norms"], rel=1e-6), \
                f"{kind} norms rank {rank}"
        shard = np.array([[s for _, s in res[f"{kind} norms"]] for res in results])
        np.testing.assert_allclose(np.sqrt((shard ** 2).sum(0)), results[0]["direct_norms"], rtol=1e-6,
                                   err_msg=f"{kind} shard norms of both ranks")


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_statistics_norm_pass_matches_the_plain_one_and_sees_the_gradient_before_clipping(kernel: str) -> None:
    """On a statistics step the gradient norm comes from the statistics pass over the ranges the update covers.
    It must equal a plain step's norm when a parameter has no gradient (its elements are left out of the pass),
    and the statistics describe the gradient before ``clip_grad_norm_`` scales it (the cosine does not change)."""
    def run(stats_interval: int) -> tuple[list, list[torch.Tensor]]:
        params = make_params()
        opt = so.ShardedOptimizer(params, lr=LR, kernel=kernel, stats_interval=stats_interval)
        reports = []
        opt.add_report_hook(reports.append)
        for step in range(3):
            for p, g in zip(params, grads_for(step)):
                p.grad = g.clone()
            params[1].grad = None if step == 1 else params[1].grad  # no gradient: skipped by the update
            opt.clip_grad_norm_(0.5)  # every step clips: the norms are ~7
            opt.step()
        return reports, [p.detach().clone() for p in params]

    with_stats, params_stats = run(1)
    plain, params_plain = run(0)
    assert all(r.clipped for r in plain)
    for step, (a, b) in enumerate(zip(with_stats, plain)):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6), step
        assert float(a.stats[0][F["grad_sumsq"]]) == pytest.approx(b.grad_norm ** 2, rel=1e-6), step
    for a, b in zip(params_stats, params_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    step1 = with_stats[1].stats[0]  # parameter 1 had no gradient: not in the statistics either
    assert int(step1[F["numel"]]) == sum(math.prod(s) for s in SHAPES) - math.prod(SHAPES[1])


def test_skipped_step_reports_reason_and_no_statistics() -> None:
    params = make_params()
    opt = so.ShardedOptimizer(params, kernel="eager", stats_interval=1)
    reports = []
    opt.add_report_hook(reports.append)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[0] = float("inf")
    opt.step()
    assert reports[-1].skipped_reason == "nonfinite" and reports[-1].stats is None
    assert reports[-1].shard_nonfinite == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_bit_pattern_counts_equal_float_compares(dtype: torch.dtype) -> None:
    """The histogram and eps counts compare IEEE bit patterns; they must count exactly what the float compares
    count, including signed zeros, subnormals, infinities, NaN and values equal to the limit."""
    from sharded_optim.kernels.stats import _count_le, _count_lt, _magnitude_bits
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(5)
    limits = [0.0, info.tiny, 1e-8, 1e-3, 0.5, 1.0, 100.0, info.max]
    special = [0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny, info.max, -info.max, float("inf"), float("-inf"),
               float("nan")] + limits + [-x for x in limits]
    x = torch.cat([torch.tensor(special, dtype=torch.float64),
                   torch.randn(2000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-9, 3, (2000,),
                                                                                          generator=gen)]).to(dtype)
    bits = _magnitude_bits(x)
    for limit in limits:
        lim = torch.tensor(limit, dtype=torch.float64).to(dtype)
        assert int(_count_le(bits, lim)) == int((x.abs() <= lim).sum()), (dtype, limit)
        assert int(_count_lt(bits, lim)) == int((x.abs() < lim).sum()), (dtype, limit)


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_nonfinite_gradients_counted_when_the_step_is_not_skipped(kernel: str) -> None:
    """With nonfinite_policy="ignore" the update runs on non-finite gradients; the statistics take the masked
    path: exact non-finite and zero counts, and momentum sums over the finite elements only."""
    params = make_params()
    opt = so.ShardedOptimizer(params, lr=LR, betas=BETAS, eps=EPS, kernel=kernel, stats_interval=1,
                              nonfinite_policy="ignore")
    reports = []
    opt.add_report_hook(reports.append)
    for step in range(2):
        for p, g in zip(params, grads_for(step)):
            p.grad = g.clone()
        if step == 1:
            m_prev = [opt.state[p]["exp_avg"].clone() for p in params]
            params[0].grad[1, 0] = float("nan")
            params[2].grad[0, 3] = float("-inf")
        opt.step()
    stats = reports[-1].stats[0]
    g = torch.cat([p.grad.double().reshape(-1) for p in params])
    mp = torch.cat([x.double().reshape(-1) for x in m_prev])
    finite = torch.isfinite(g)
    assert reports[-1].skipped_reason is None
    assert int(stats[F["nonfinite_grad"]]) == 2
    assert int(stats[F["zero_grad"]]) == int((g == 0).sum()) == 2
    assert float(stats[F["mom_grad_dot"]]) == pytest.approx(float((mp * torch.where(finite, g, 0)).sum()), rel=1e-5)
    assert float(stats[F["mom_sumsq"]]) == pytest.approx(float((mp * mp).sum()), rel=1e-5)


def flush_worker(rank: int, world: int) -> dict:
    from sharded_optim import telemetry
    params = make_params()
    opt = so.ShardedOptimizer(params, lr=LR, kernel="eager", bucket_mb=0.0002)
    tel = telemetry.start(opt, base_port=0, run_id="flush", stats_interval=1)
    gauge = lambda: tel.metrics.registry.get_sample_value("sharded_optim_param_norm",  # noqa: E731
                                                          {"param_group": "group0"})
    norms = []
    for step in range(2):
        for p, g in zip(params, grads_for(step, rank)):
            p.grad = g.clone()
        opt.step()
        norms.append(float(torch.cat([p.detach().double().reshape(-1) for p in params]).norm()))
    before = gauge()
    tel.flush()
    after = gauge()
    tel.flush()  # nothing left: a second flush changes nothing
    again = gauge()
    tel.stop()
    return {"norms": norms, "before": before, "after": after, "again": again}


def test_telemetry_flush_publishes_the_last_statistics_step() -> None:
    """Sharded, step t's statistics arrive with step t+1; Telemetry.flush() (collective) publishes the last."""
    res = run_ranks(flush_worker, 2)
    r0 = res[0]
    assert r0["before"] == pytest.approx(r0["norms"][0], rel=1e-6), f"rank 0 before flush: {r0}"  # step 1's
    assert r0["after"] == pytest.approx(r0["norms"][1], rel=1e-6) and r0["after"] != r0["before"], \
        f"rank 0 after flush: {r0}"
    assert r0["again"] == r0["after"], f"rank 0 after a second flush: {r0}"
    # global series come from rank 0 only
    assert res[1]["before"] is None and res[1]["after"] is None, f"rank 1: {res[1]}"


def test_statistics_describe_the_inner_update_under_lookahead() -> None:
    """On a Lookahead synchronisation step the statistics are read before the sync rewrites the fast weights:
    the parameter norm is that of the inner update, equal to the same optimizer's without Lookahead."""
    def run(lookahead: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = make_params()
        inner = so.ShardedOptimizer(params, lr=LR, kernel="eager", stats_interval=1)
        opt = so.Lookahead(inner, k=2, alpha=0.5) if lookahead else inner
        reports = []
        inner.add_report_hook(reports.append)
        for step in range(2):  # step 2 synchronises
            for p, g in zip(params, grads_for(step)):
                p.grad = g.clone()
            opt.step()
        return reports[-1].stats[0], [p.detach().clone() for p in params]

    with_la, params_la = run(True)
    plain, params_plain = run(False)
    assert not all(torch.equal(a, b) for a, b in zip(params_la, params_plain))  # the sync did move them
    for name in ("param_sumsq", "update_sumsq", "eff_lr_sum", "grad_sumsq"):
        assert float(with_la[F[name]]) == pytest.approx(float(plain[F[name]]), rel=1e-12), name


def load_between_worker(rank: int, world: int) -> Scenarios:
    """"straight": two steps; "loaded between steps": the same, then the state after step 1 loaded."""
    out = Scenarios()
    for load in (False, True):
        params = make_params()
        opt = so.ShardedOptimizer(params, lr=LR, kernel="eager", stats_interval=1, bucket_mb=0.0002)
        saved = None
        for step in range(2):
            for p, g in zip(params, grads_for(step, rank)):
                p.grad = g.clone()
            opt.step()
            if step == 0:
                saved = opt.state_dict()
        if load:  # replaces the state that step 2's statistics still have to be read from
            opt.load_state_dict(saved)
        stats_step, stats = opt.flush_stats()
        out["loaded between steps" if load else "straight"] = (stats_step, stats.numpy())
    return out


def test_loading_a_state_between_steps_keeps_the_last_statistics() -> None:
    """Sharded, the statistics of the updated state are read at the start of the next step (while its gradient
    reductions are in flight); loading a state before that must not make them describe the loaded state."""
    for rank, res in enumerate(run_ranks(load_between_worker, 2)):
        loaded, straight = res["loaded between steps"], res["straight"]
        assert loaded[0] == straight[0] == 2, f"rank {rank}: statistics of step {loaded[0]} (loaded), " \
                                              f"{straight[0]} (straight)"
        np.testing.assert_array_equal(loaded[1], straight[1], err_msg=f"loaded between steps rank {rank}")


def checkpoint_between_worker(rank: int, world: int, path: str) -> Scenarios:
    """"straight": two steps; "checkpoint loaded between steps": the same, then the checkpoint of step 1 loaded."""
    from sharded_optim import checkpoint
    out = Scenarios()
    for load in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        opt = so.ShardedOptimizer(model.parameters(), lr=0.05, kernel="eager", stats_interval=1)
        gen = torch.Generator().manual_seed(rank)
        for step in range(2):
            model(torch.randn(5, 4, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step == 0 and load:
                checkpoint.save(path, model, opt, step=1)
        if load:  # replaces the state that step 2's statistics still have to be read from
            checkpoint.load(path, model, opt)
        out["checkpoint loaded between steps" if load else "straight"] = opt.flush_stats()[1].numpy()
    return out


def test_loading_a_checkpoint_between_steps_keeps_the_last_statistics(tmp_path) -> None:
    for rank, res in enumerate(run_ranks(checkpoint_between_worker, 2, str(tmp_path / "ckpt"))):
        np.testing.assert_array_equal(res["checkpoint loaded between steps"], res["straight"],
                                      err_msg=f"checkpoint loaded between steps rank {rank}")


def test_report_norms_equal_the_direct_norms_of_each_param_group() -> None:
    """A report's ``grad_norm`` and ``group_grad_norms`` are the pre-clip norms of the whole gradient and of each
    param group's gradient, as computed directly in float64 (the report reads them from one host copy)."""
    params = make_params()
    opt = so.ShardedOptimizer([{"params": params[:2]}, {"params": params[2:], "lr": LR / 2}], lr=LR, kernel="eager")
    reports: list = []
    opt.add_report_hook(reports.append)
    for step in range(2):
        grads = grads_for(step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        direct = [math.sqrt(sum(float(g.double().square().sum()) for g in gs)) for gs in (grads[:2], grads[2:])]
        assert reports[-1].group_grad_norms == pytest.approx(direct, rel=1e-6), step
        assert reports[-1].grad_norm == pytest.approx(math.hypot(*direct), rel=1e-6), step
        assert reports[-1].lrs == [LR, LR / 2]
