"""The CPU multi-tensor kernel (``sharded_optim.kernels.native_cpu``): bitwise the compiled kernels, no gradient copy.

One rank on CPU, fp32: the update reads every gradient where autograd left it, through a table of segments, instead
of copying the gradients into a flat buffer for the compiled kernel.  These tests pin its contract: the same bits as
the compiled kernel for every variant it implements (NaN and infinity included), the C side's scalar and variant
numbering equal to the Python side's, a sum of squares independent of the thread count, bad buffers refused, a
step that copies no gradient, the same trajectory as the copying path, and a clear fallback where no compiler works.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from sharded_optim import ShardedOptimizer, rules
from sharded_optim.kernels import dispatch, native_bf16, native_cpu
from sharded_optim.telemetry.fields import EFF_LR_EDGES, SUM_FIELDS

N_STATE = {"adam_mv": 2, "adam_mvx": 3, "bound_mv": 2, "bound_mvx": 3, "bound_mvs": 3, "bound_mvxs": 4,
           "adamax_mu": 2}
SIZES = [1000, 17, 40000, 3, 16384]   # 40000 spans three work items of the kernel (CHUNK = 16384 elements)


def _c_enum(first: str) -> list[str]:
    """The names of the C source's enum that starts with ``first``, in order."""
    text = "\n".join(path.read_text() for path in native_cpu.SOURCES)
    match = re.search(r"enum \{ (" + first + r"[^}]*)\}", text)
    assert match is not None, f"no enum starting with {first} in {[path.name for path in native_cpu.SOURCES]}"
    return [name.strip() for name in match.group(1).split(",")]


# statistics fields that count elements (exact in both paths); the others are sums of float32 terms
COUNTS = {"numel", "nonfinite_grad", "zero_grad", "eps_dominated", "amsgrad_max_active", "adamod_clipped",
          "adabound_clamped", "friction_near_half"} | {f for f in SUM_FIELDS if f.startswith("eff_lr_le_")}


def _assert_fused_sums_close(fused: torch.Tensor, separate: torch.Tensor) -> None:
    """Statistics rows of the fused pass against the separate passes (float64 sums of the same float32 terms).

    Counts are equal.  A fused sum adds lanes of k = ``STATS_BLOCK / STATS_LANES`` terms summed in float32 (products
    by fmaf), so it is within ``(gamma_k + u) * sum|x|`` of the separate passes' float64 sum of float32-rounded terms
    (plus float64 rounding, far below; 1e-12 relative covers it).
    ``sum|x|`` is the field itself for the sums of non-negative terms, and for ``mom_grad_dot`` (sum m*g) at most
    ``sqrt(mom_sumsq * grad_sumsq)`` (Cauchy-Schwarz; 1e-6 slack for the terms' own float32 rounding)."""
    gamma = native_cpu.STATS_BLOCK_GAMMA
    index = {name: i for i, name in enumerate(SUM_FIELDS)}
    for name, i in index.items():
        a, b = fused[..., i], separate[..., i]
        if name in COUNTS:
            assert torch.equal(a, b), (name, a, b)
            continue
        if name == "mom_grad_dot":
            scale = (separate[..., index["mom_sumsq"]] * separate[..., index["grad_sumsq"]]).sqrt() * (1 + 1e-6)
        else:
            assert (b >= 0).all(), (name, b)
            scale = b
        assert ((a - b).abs() <= gamma * scale + 1e-12 * b.abs()).all(), (name, a, b, (a - b).abs() / scale)


def test_the_c_side_numbers_scalars_and_variants_as_python_does():
    names = _c_enum("GSCALE")
    assert [getattr(rules, n) for n in names] == list(range(rules.NUM_SCALARS))
    assert list(native_cpu.SCALAR_ORDER) == list(range(rules.NUM_SCALARS))
    variants = _c_enum("ADAM_MV")
    assert [v.lower() for v in variants] == sorted(native_cpu.VARIANT_IDS, key=native_cpu.VARIANT_IDS.get)
    assert set(N_STATE) == set(native_cpu.VARIANT_IDS) and set(N_STATE) <= set(dispatch.VARIANTS)
    sums = _c_enum("NUMEL")   # ..., EFF_LR_LE_0, NUM_EDGES = 12, NUM_SUMS = EFF_LR_LE_0 + NUM_EDGES
    first_edge = sums.index("EFF_LR_LE_0")
    assert [n.lower() for n in sums[:first_edge + 1]] == list(native_cpu.SUM_FIELDS[:first_edge + 1])
    assert sums[first_edge + 1] == f"NUM_EDGES = {len(EFF_LR_EDGES)}"
    assert len(native_cpu.SUM_FIELDS) == first_edge + len(EFF_LR_EDGES)
    for name in ("STATS_BLOCK", "STATS_LANES"):
        value = re.search(rf"#define {name} (\d+)", native_cpu.SOURCE.read_text())
        assert value is not None and int(value.group(1)) == getattr(native_cpu, name), name


def _case(variant: str, w1: float, seed: int) -> tuple:
    """Flat parameter and state, gradients as separate tensors (with a NaN and an infinity), the same gradients
    laid into a flat buffer with gaps, and the scalars (``w1`` picks lerp's branch)."""
    gen = torch.Generator().manual_seed(seed)
    gap = 5
    n = sum(SIZES) + gap * (len(SIZES) + 1)
    p = torch.randn(n, generator=gen)
    state = [torch.rand(n, generator=gen) for _ in range(N_STATE[variant])]
    grads = [torch.randn(k, generator=gen) for k in SIZES]
    grads[0][3], grads[2][20000] = float("nan"), float("inf")
    sc = torch.rand(rules.NUM_SCALARS, generator=gen) * 0.1
    sc[rules.GSCALE], sc[rules.W1], sc[rules.LO], sc[rules.HI] = 0.9, w1, 1e-3, 5e-2
    flat, rows, offset = torch.zeros(n), [], gap
    for g in grads:
        flat[offset: offset + g.numel()] = g
        rows.append((offset, g, None))
        offset += g.numel() + gap
    return p, state, rows, flat, sc


@pytest.mark.parametrize("w1", [0.1, 0.7])
@pytest.mark.parametrize("variant", sorted(N_STATE))
def test_native_update_is_bitwise_the_compiled_kernel(variant, w1):
    p, state, rows, flat, sc = _case(variant, w1, seed=len(variant))
    p_ref, state_ref = p.clone(), [s.clone() for s in state]
    native_cpu.update(variant, native_cpu.segment_table(rows, p), tuple(state), sc)
    dispatch.run(dispatch.update(variant), "compiled", p_ref, flat, *state_ref, sc)
    covered = torch.zeros_like(p, dtype=torch.bool)
    for offset, g, _ in rows:
        covered[offset: offset + g.numel()] = True
    for got, want in zip([p, *state], [p_ref, *state_ref]):
        torch.testing.assert_close(got[covered], want[covered], rtol=0, atol=0, equal_nan=True)
    assert p[covered].isnan().any()   # the NaN went through as the compiled kernel propagates it
    # the gaps between segments are not the kernel's: untouched
    assert torch.equal(p[~covered], _case(variant, w1, seed=len(variant))[0][~covered])


def test_sumsq_is_float64_accurate_and_independent_of_the_thread_count():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(k, generator=gen) * 10 ** (i - 2) for i, k in enumerate(SIZES)]
    exact = sum(float(g.double().square().sum()) for g in grads)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_cpu.sumsq(grads)
        torch.set_num_threads(2)
        two = native_cpu.sumsq(grads)
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == torch.float64 and torch.equal(one, two)
    # float64 sums of ~60k non-negative terms: relative error below 60k * 2**-53 ~ 7e-12
    assert abs(float(one) - exact) <= 1e-10 * exact
    assert float(native_cpu.sumsq([])) == 0.0


def test_bad_gradients_and_buffers_are_refused():
    flat, sc = torch.zeros(12), torch.zeros(rules.NUM_SCALARS)
    with pytest.raises(ValueError, match=r"each gradient must be a contiguous float32 CPU tensor of 4 elements, got "
                                         r"torch.float64"):
        native_cpu.segment_table([(0, torch.zeros(4, dtype=torch.float64), None)], flat)
    with pytest.raises(ValueError, match=r"contiguous: False"):
        native_cpu.segment_table([(0, torch.zeros(4, 4).t(), None)], torch.zeros(16))
    with pytest.raises(ValueError, match=r"each parameter must be a contiguous float32 CPU tensor of 4 elements"):
        native_cpu.segment_table([(0, torch.zeros(4), torch.zeros(5))])
    with pytest.raises(ValueError, match=r"flat_param must be a contiguous float32 CPU tensor of at least 13"):
        native_cpu.segment_table([(9, torch.zeros(4), None)], flat)
    with pytest.raises(ValueError, match=r"a segment without parameter tensor needs flat_param"):
        native_cpu.segment_table([(0, torch.zeros(4), None)])
    table = native_cpu.segment_table([(8, torch.zeros(4), None)], flat)
    with pytest.raises(ValueError, match=r"state must be a contiguous float32 CPU tensor of at least 12 elements"):
        native_cpu.update("adam_mv", table, (torch.zeros(12), torch.zeros(11)), sc)
    with pytest.raises(ValueError, match=r"variant 'adam_mvg' has no native kernel"):
        native_cpu.update("adam_mvg", table, (torch.zeros(12),) * 3, sc)
    with pytest.raises(ValueError, match=r"gsign must be 1.0 or -1.0 \(the sign of a maximize step\), got 0.5"):
        native_cpu.update("adam_mv", table, (torch.zeros(12),) * 2, sc, stats=True, gsign=0.5)
    with pytest.raises(ValueError, match=r"a table row starts before the state \(offset below base 9\)"):
        native_cpu.update("adam_mv", table, (torch.zeros(12),) * 2, sc, base=9)
    with pytest.raises(ValueError, match=r"state must be a contiguous float32 CPU tensor of at least 5 elements"):
        native_cpu.update("adam_mv", table, (torch.zeros(4),) * 2, sc, base=7)
    with pytest.raises(ValueError, match=r"the table must be a contiguous int64 tensor of rows of 4"):
        native_cpu.update("adam_mv", table.t(), (torch.zeros(12),) * 2, sc)


def test_a_run_reads_its_rows_of_the_step_table_through_a_base_offset():
    """A run's rows keep the step table's offsets (no rewritten copy); ``base`` locates its state: the same bits
    as the rows rewritten relative to the run's own state views."""
    p, state, rows, flat, sc = _case("adam_mvx", 0.1, seed=4)
    start = rows[1][0]   # a run from the second segment on
    p2, state2 = p.clone(), [x.clone() for x in state]
    native_cpu.update("adam_mvx", native_cpu.segment_table(rows[1:], p), tuple(x[start:] for x in state), sc,
                      base=start)
    native_cpu.update("adam_mvx", native_cpu.segment_table([(o - start, g, None) for o, g, _ in rows[1:]], p2[start:]),
                      tuple(x[start:] for x in state2), sc)
    for got, want in zip([p, *state], [p2, *state2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(p, _case("adam_mvx", 0.1, seed=4)[0])


def test_segments_may_update_parameters_of_their_own():
    """A row's parameter may be a tensor of its own (FSDP2's local shards) instead of a region of a flat buffer."""
    p, state, rows, flat, sc = _case("adam_mv", 0.1, seed=3)
    own = [p[o: o + g.numel()].clone() for o, g, _ in rows]
    native_cpu.update("adam_mv", native_cpu.segment_table(rows, p), tuple(state), sc)
    state_again = _case("adam_mv", 0.1, seed=3)[1]
    native_cpu.update("adam_mv", native_cpu.segment_table([(o, g, q) for (o, g, _), q in zip(rows, own)]),
                      tuple(state_again), sc)
    for (o, g, _), q in zip(rows, own):
        torch.testing.assert_close(q, p[o: o + g.numel()], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(state, state_again):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _gradient_copies(model: nn.Module, opt: ShardedOptimizer) -> list[list[int]]:
    """Shapes of the gradient-shaped tensors any copy kernel reads during one ``step()``."""
    from torch.profiler import ProfilerActivity, profile
    shapes = [list(p.shape) for p in model.parameters()]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    return [s for e in prof.events() if "copy" in e.name for s in e.input_shapes if s in shapes]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_one_rank_cpu_step_copies_no_gradient(set_to_none):
    model = _model()
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=set_to_none)
        model(torch.randn(4, 8)).square().mean().backward()
        copies = _gradient_copies(model, opt)
    rt = next(iter(opt._runtimes.values()))[0]
    assert rt.native and copies == []
    assert all(p.grad is not None and p.grad.data_ptr() != 0 for p in model.parameters())


def _train(native: bool, monkeypatch, algorithm: str, max_norm: float) -> tuple[list[torch.Tensor], ShardedOptimizer]:
    monkeypatch.setenv(native_cpu.ENV_VAR, "1" if native else "0")
    model = _model()
    opt = ShardedOptimizer(model.parameters(), algorithm=algorithm, lr=1e-2, stats_interval=3, amsgrad=True,
                           kernel="compiled")
    for i in range(7):
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        if i == 2:   # a parameter without a gradient: not stepped (one rank, torch.optim semantics)
            model[4].bias.grad = None
        if i == 3:   # a non-contiguous gradient: copied into the flat buffer, read from there
            model[2].weight.grad = model[2].weight.grad.t().contiguous().t()
        if i == 5:
            model[0].weight.grad[0, 0] = float("nan")   # skipped
        opt.clip_grad_norm_(max_norm)
        opt.step()
        opt.zero_grad(set_to_none=i % 2 == 0)
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("algorithm", ["adamw", "adamod"])
def test_native_trajectory_equals_the_copying_path(monkeypatch, algorithm):
    """With clipping inactive the two paths are bitwise equal (statistics steps, a skipped step, a parameter
    without gradient and a copied non-contiguous gradient included).  With clipping active the norms are summed
    differently (float64 per element here, fp32 chunk norms combined in float64 there): the coefficient differs by
    ~1e-8 relative at most, and so does the clipped gradient; after 7 steps the parameters differ by less than
    lr * 7 * 1e-6 (bound from the update's 1/sqrt(v) sensitivity, far above the ~1e-9 seen)."""
    native, native_opt = _train(True, monkeypatch, algorithm, max_norm=1e6)
    copied, copied_opt = _train(False, monkeypatch, algorithm, max_norm=1e6)
    assert next(iter(native_opt._runtimes.values()))[0].native
    assert not next(iter(copied_opt._runtimes.values()))[0].native
    assert all(torch.equal(a, b) for a, b in zip(native, copied))
    assert native_opt.skipped_steps["nonfinite"] == copied_opt.skipped_steps["nonfinite"] == 1
    clipped, _ = _train(True, monkeypatch, algorithm, max_norm=0.05)
    clipped_ref, _ = _train(False, monkeypatch, algorithm, max_norm=0.05)
    assert max(float((a - b).abs().max()) for a, b in zip(clipped, clipped_ref)) < 1e-2 * 7 * 1e-6


def test_an_unbuildable_kernel_warns_once_and_the_copying_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv(native_cpu.CACHE_ENV_VAR, str(tmp_path))
    native_cpu.library.cache_clear()
    try:
        model = _model()
        opt = ShardedOptimizer(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(RuntimeWarning, match="the CPU multi-tensor kernel could not be built") as caught:
            for _ in range(2):   # one warning: the failure is remembered
                model(torch.randn(4, 8)).square().mean().backward()
                opt.step()
        assert sum("could not be built" in str(w.message) for w in caught) == 1
        assert not next(iter(opt._runtimes.values()))[0].native
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        # bf16 state falls back to the compiled kernel (the variant tests/test_native_low_precision.py compiles)
        p = torch.nn.Parameter(torch.randn(300))
        p.grad = torch.randn(300)
        low = ShardedOptimizer([p], algorithm="adamod", amsgrad=True, lr=1e-2, state_precision="bf16")
        start = p.detach().clone()
        monkeypatch.setattr(native_bf16, "update", lambda *a: pytest.fail("the C bf16 kernel ran without a library"))
        low.step()
        assert not torch.equal(start, p) and low.state[p]["exp_avg"].dtype == torch.bfloat16
    finally:
        monkeypatch.undo()
        native_cpu.library.cache_clear()
    assert native_cpu.enabled()


def _stats_rows(monkeypatch, native: bool, params: list[torch.Tensor], backward, algorithm: str,
                **options) -> list[torch.Tensor]:
    """Statistics rows of three steps at ``stats_interval=1`` with the native kernel on or off; ``backward(i)``
    hands ``params`` step ``i``'s gradients."""
    monkeypatch.setenv(native_cpu.ENV_VAR, "1" if native else "0")
    opt = ShardedOptimizer(params, algorithm=algorithm, lr=1e-2, stats_interval=1, kernel="compiled", **options)
    rows = []
    for i in range(3):
        backward(i)
        opt.step()
        opt.zero_grad()
        rows.append(opt.flush_stats()[1])
    assert next(iter(opt._runtimes.values()))[0].native == native
    return rows


@pytest.mark.parametrize("algorithm, options, frozen", [
    ("adamw", {"maximize": True}, False), ("adam", {"amsgrad": True}, False), ("adamod", {}, False),
    ("adabound", {"amsgrad": True}, False), ("adabound", {}, False), ("adamax", {"weight_decay": 1e-2}, False),
    ("adamw", {}, True)])
def test_statistics_from_the_update_pass_equal_the_separate_passes(monkeypatch, algorithm, options, frozen):
    """A native runtime's statistics step computes every sum inside the update (one pass, gradients in place); the
    copying path computes them in two more passes.  Counts are equal; the sums, the same float32 terms added in
    float32 lanes, are within the bound of :func:`_assert_fused_sums_close` (1.0e-6 relative; 4.6e-8 the worst
    measured here).  ``frozen``: the middle layer's weight has no gradient, so one rank updates the other runs
    only, and the sums must cover just those."""
    def run(native: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = _model()

        def backward(i: int) -> None:
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).square().mean().backward()
            if frozen:
                model[2].weight.grad = None
        rows = _stats_rows(monkeypatch, native, list(model.parameters()), backward, algorithm, **options)
        return rows, [p.detach().clone() for p in model.parameters()]
    (fused, params), (separate, params_ref) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(params, params_ref))
    for a, b in zip(fused, separate):
        assert a.shape == b.shape and (b != 0).any()
        _assert_fused_sums_close(a, b)


@pytest.mark.parametrize("algorithm", ["adamw", "adamod"])
def test_step_size_histogram_across_blocks_and_decades(monkeypatch, algorithm):
    """The fused pass counts |eta| <= edge per block of the segment, comparing only the edges between the block's
    least and greatest step size.  Segments of several blocks and a partial one (3000 and 2500 elements), gradient
    magnitudes spread over 15 decades so the step sizes cross most edges inside one block: every count equals the
    separate pass's (counts are exact integers; the sums within the bound of the test above)."""
    le = [i for i, name in enumerate(SUM_FIELDS) if name.startswith("eff_lr_le_")]

    def run(native: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        params = [nn.Parameter(torch.randn(n, generator=gen)) for n in (3000, 2500)]

        def backward(i: int) -> None:
            for p in params:
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                p.grad = sign * 10.0 ** (torch.rand(p.shape, generator=gen) * 15 - 12)
        return _stats_rows(monkeypatch, native, params, backward, algorithm)
    for a, b in zip(run(True), run(False)):
        counts = b[:, le]
        assert (counts > 0).any() and (counts < b[:, SUM_FIELDS.index("numel")][:, None]).any()
        assert torch.equal(a[:, le], counts)
        _assert_fused_sums_close(a, b)
