"""finalize() against the same statistics computed directly with torch on small unsharded tensors."""
from __future__ import annotations

import math

import pytest
import torch

from sharded_optim.telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS
from sharded_optim.telemetry.finalize import finalize, finalize_group

LR, EPS = 1e-3, 1e-8


def _group(seed: int, n: int) -> dict[str, torch.Tensor]:
    """One Adam step on a random tensor, with zeros, eps-dominated elements and a wide eta spread."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    g[::7] = 0.0
    m_prev = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1 + 0.5 * g
    v_hat = torch.rand(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-20, 2, (n,), generator=gen)
    m_hat = 0.9 * m_prev + 0.1 * g
    unit = m_hat / (v_hat.sqrt() + EPS)
    theta = torch.randn(n, generator=gen, dtype=torch.float64) - LR * unit
    eta = LR / (v_hat.sqrt() + EPS)
    return dict(g=g, m_prev=m_prev, v_hat=v_hat, unit=unit, delta=LR * unit, theta=theta, eta=eta,
                v=v_hat * 0.9, v_max=v_hat, s=eta * torch.rand(n, generator=gen, dtype=torch.float64) * 2)


def _partial_sums(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """What one rank's statistics pass computes on its shard (fields.py layout)."""
    row = torch.zeros(NUM_FIELDS, dtype=torch.float64)
    vals = {
        "numel": t["g"].numel(), "grad_sumsq": t["g"].pow(2).sum(), "param_sumsq": t["theta"].pow(2).sum(),
        "update_sumsq": t["delta"].pow(2).sum(), "unit_update_sumsq": t["unit"].pow(2).sum(),
        "mom_grad_dot": (t["m_prev"] * t["g"]).sum(), "mom_sumsq": t["m_prev"].pow(2).sum(),
        "nonfinite_grad": (~torch.isfinite(t["g"])).sum(), "zero_grad": (t["g"] == 0).sum(),
        "eps_dominated": (t["v_hat"].sqrt() < EPS).sum(), "amsgrad_max_active": (t["v_max"] > t["v"]).sum(),
        "adamod_clipped": (t["s"] < t["eta"]).sum(), "adabound_clamped": (t["eta"] > 0.5).sum(),
        "eff_lr_sum": t["eta"].sum(),
    }
    for name, v in vals.items():
        row[FIELD_INDEX[name]] = float(v)
    for i, edge in enumerate(EFF_LR_EDGES):
        row[FIELD_INDEX[f"eff_lr_le_{i}"]] = float((t["eta"] <= edge).sum())
    return row


def _sharded_sums(t: dict[str, torch.Tensor], world: int) -> torch.Tensor:
    """Split every tensor into ``world`` shards and add the partial sums, as all_reduce(SUM) does."""
    shards = {k: v.tensor_split(world) for k, v in t.items()}
    rows = [_partial_sums({k: parts[r] for k, parts in shards.items()}) for r in range(world)]
    return torch.stack(rows).sum(0)


@pytest.mark.parametrize("world", [1, 3])
def test_matches_direct_torch(world: int) -> None:
    groups = {"embed": _group(0, 257), "mlp": _group(1, 1000)}
    stats = torch.stack([_sharded_sums(t, world) for t in groups.values()])
    out = finalize(stats, list(groups))
    assert list(out) == ["embed", "mlp"]
    for name, t in groups.items():
        st, n = out[name], t["g"].numel()
        close = dict(rel=1e-12, abs=1e-15)
        assert st.numel == n
        assert st.grad_norm == pytest.approx(torch.linalg.vector_norm(t["g"]).item(), **close)
        assert st.param_norm == pytest.approx(torch.linalg.vector_norm(t["theta"]).item(), **close)
        assert st.update_to_param_ratio == pytest.approx(
            (torch.linalg.vector_norm(t["delta"]) / torch.linalg.vector_norm(t["theta"])).item(), **close)
        assert st.adam_update_rms == pytest.approx(t["unit"].pow(2).mean().sqrt().item(), **close)
        assert st.momentum_grad_cosine == pytest.approx(
            torch.nn.functional.cosine_similarity(t["m_prev"], t["g"], dim=0, eps=0).item(), rel=1e-10)
        assert 0.0 < st.momentum_grad_cosine < 1.0
        assert st.eps_dominated_ratio == pytest.approx((t["v_hat"].sqrt() < EPS).double().mean().item())
        assert 0.0 < st.eps_dominated_ratio < 1.0
        assert st.grad_zero_ratio == pytest.approx((t["g"] == 0).double().mean().item())
        assert st.grad_zero_ratio > 0.1
        assert st.nonfinite_count == 0
        assert st.amsgrad_max_active_ratio == pytest.approx((t["v_max"] > t["v"]).double().mean().item())
        assert st.adamod_clipped_ratio == pytest.approx((t["s"] < t["eta"]).double().mean().item())
        assert st.adabound_clamped_ratio == pytest.approx((t["eta"] > 0.5).double().mean().item())
        assert st.effective_lr_mean == pytest.approx(t["eta"].mean().item(), rel=1e-12)
        # Cumulative buckets, computed independently with bucketize + cumsum over the whole tensor.
        edges = torch.tensor(EFF_LR_EDGES, dtype=torch.float64)
        idx = torch.bucketize(t["eta"], edges, right=False)  # index of the first edge >= eta
        direct = torch.bincount(idx, minlength=len(edges) + 1).cumsum(0)[: len(edges)]
        assert list(st.effective_lr_buckets) == direct.double().tolist()
        assert len(set(st.effective_lr_buckets)) > 3  # the test data really spans several decades


def test_empty_group_and_zero_momentum_are_nan_free() -> None:
    empty = finalize_group([0.0] * NUM_FIELDS)
    for key, value in vars(empty).items():
        if key != "effective_lr_buckets":
            assert value == 0.0, key
    t = _group(2, 64)
    t["m_prev"] = torch.zeros_like(t["m_prev"])  # first step: no momentum yet
    st = finalize_group(_partial_sums(t).tolist())
    assert st.momentum_grad_cosine == 0.0
    assert st.grad_norm > 0


def test_zero_param_that_moved_is_infinite_ratio() -> None:
    row = [0.0] * NUM_FIELDS
    row[FIELD_INDEX["update_sumsq"]] = 4.0
    assert math.isinf(finalize_group(row).update_to_param_ratio)


def test_nonfinite_gradient_propagates() -> None:
    t = _group(3, 50)
    t["g"][[3, 9, 11]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    st = finalize(_partial_sums(t).unsqueeze(0), ["g0"])["g0"]
    assert st.nonfinite_count == 3
    assert math.isnan(st.grad_norm)
    assert math.isnan(st.momentum_grad_cosine)


def test_bad_shapes_name_the_field() -> None:
    with pytest.raises(ValueError, match="stats"):
        finalize(torch.zeros(2, NUM_FIELDS - 1, dtype=torch.float64), ["a", "b"])
    with pytest.raises(ValueError, match="group_names"):
        finalize(torch.zeros(2, NUM_FIELDS, dtype=torch.float64), ["a"])
    with pytest.raises(ValueError, match="stats row"):
        finalize_group([1.0, 2.0])
