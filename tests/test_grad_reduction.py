"""ZeRO-2 on gloo reduces each bucket by a send/recv exchange into pooled staging buffers (zero_grads.py): on 3 ranks
the result must be exactly the average ``sum_r g_r / world`` in rank order, whatever the buckets, micro-batches,
missing gradients and param groups, and the buffers must be reused rather than allocated per bucket.  ZeRO-1's
all-reduce must survive ranks that complete their buckets in different orders (checked on 2 ranks, where gloo's sum
is the rank-order sum bitwise)."""
from __future__ import annotations

import pytest

from tests.support.grad_reduction_scenarios import scenarios
from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.slow
CASES = ("one backward", "two micro-batches", "a parameter without gradient",
         "ranks launching buckets in different orders")


@pytest.fixture(scope="module")
def results():
    return run_ranks(scenarios, 3)


@pytest.fixture(scope="module")
def zero1_results():
    return run_ranks(scenarios, 2, 1)


@pytest.mark.parametrize("case", CASES)
def test_zero1_all_reduce_in_one_order_on_every_rank(zero1_results, case):
    """Buckets launch in index order on every rank (the rest at the end of backward): a rank that completed them in
    another order paired the wrong buckets in its all-reduces (a size error, or wrong sums where sizes agree)."""
    for rank, r in enumerate(zero1_results):
        for i, (equal, max_diff) in enumerate(r[case]):
            assert equal, f"ZeRO-1, {case}, rank {rank}, parameter {i}: max diff {max_diff:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_exchange_gives_the_rank_order_average_bitwise(results, case):
    """Every step so far matches the one-process optimizer fed the directly computed average, bit for bit (an
    elementwise update of bitwise-equal gradients), on every rank: the exchange sums every rank's piece once, in rank
    order, zeroes padding and missing gradients in reused buffers, and adds a second micro-batch to the first."""
    for rank, r in enumerate(results):
        for i, (equal, max_diff) in enumerate(r[case]):
            assert equal, f"{case}, rank {rank}, parameter {i}: max diff {max_diff:.3g}"


def test_staging_buffers_are_pooled(results):
    """More buckets than buffers, yet no more buffers than the pool's limit are kept once every reduction is folded
    (buckets launched while the pool is in flight get transient buffers: waiting for an older reduction instead
    deadlocks the "different orders" case, where each rank waits for a bucket the other launches only later)."""
    for rank, r in enumerate(results):
        assert r["buckets"] > r["staging limit"], f"rank {rank}: {r['buckets']} buckets, the test needs more"
        assert 1 <= r["staging buffers"] <= r["staging limit"], \
            f"rank {rank}: {r['staging buffers']} staging buffers, limit {r['staging limit']}"
