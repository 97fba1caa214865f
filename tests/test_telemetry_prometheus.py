"""End to end: a real 2-rank gloo run of ShardedOptimizer scraped by a real Prometheus.

While the run keeps stepping, the test waits until Prometheus has scraped both ranks, then runs every
template-variable query and every dashboard panel query the way Grafana would (variables substituted,
``$__rate_interval`` etc.) and requires at least one finite sample from each; then rank 1 feeds a NaN into
its batch and the non-finite alert must fire.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.prometheus import (  # noqa: F401  (prometheus_server is a fixture)
    DASHBOARDS, PrometheusServer, format_variable, free_port, label_values_query, panels, prometheus_server,
    rate_interval, substitute, wait_until)

RUN_ID = "live-test"
SCRAPE_S = 1.0
pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, targets: str, stop: Any, inject_nan: Any) -> None:
    """One rank: a small MLP trained with the real ShardedOptimizer until the test says stop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sharded_optim import ShardedOptimizer, telemetry

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    groups = [{"params": list(model[0].parameters()), "name": "hidden"},
              {"params": list(model[2].parameters()), "name": "head"}]
    # bf16 state: the "Low-precision state" panel (series that only bf16/int8 state creates) must show data too
    opt = ShardedOptimizer(groups, algorithm="radam", lr=1e-3, kernel="eager", state_precision="bf16")
    tel = telemetry.start(opt, base_port=0, run_id=RUN_ID, targets_file=targets, stats_interval=1)
    gen = torch.Generator().manual_seed(1 + rank)
    try:
        while True:
            # Both ranks agree on stopping before the next collective, so neither waits on a gone peer.
            flag = torch.tensor([1.0 if stop.is_set() else 0.0])
            dist.all_reduce(flag)
            if flag.item() > 0:
                break
            x = torch.randn(32, 16, generator=gen)
            if rank == 1 and inject_nan.is_set():
                x[0, 0] = math.nan
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            time.sleep(0.02)  # pace the workload: leave CPU to Prometheus on a 2-core machine
    finally:
        tel.stop()
        dist.destroy_process_group()


def _resolve_variables(prom: PrometheusServer, dashboard: dict[str, Any], start: float, end: float
                       ) -> dict[str, str]:
    """Run every query variable in order, as Grafana does, and pick its value (All for multi variables)."""
    chosen: dict[str, str] = {"datasource": "prometheus"}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = label_values_query(substitute(var["query"], chosen, {}))
        series = prom.api("series", **{"match[]": selector, "start": start, "end": end})
        values = sorted({s[label] for s in series if label in s})
        assert values, f"variable ${var['name']} ({var['query']}) resolved to no values"
        if var["name"] == "run_id":
            assert RUN_ID in values
            values = [RUN_ID]
        if var.get("includeAll"):
            chosen[var["name"]] = var.get("allValue") or format_variable(values, multi_or_all=True)
        else:
            chosen[var["name"]] = format_variable(values[:1], multi_or_all=var.get("multi", False))
    return chosen


def _finite_samples(prom: PrometheusServer, expr: str, start: float, end: float) -> int:
    result = prom.api("query_range", query=expr, start=start, end=end, step=SCRAPE_S)["result"]
    return sum(math.isfinite(float(v)) for series in result for _, v in series["values"])


def test_live_prometheus_dashboard_and_nonfinite_alert(prometheus_server: PrometheusServer,
                                                       tmp_path: Path) -> None:
    prom = prometheus_server
    ctx = mp.get_context("spawn")
    stop, inject_nan = ctx.Event(), ctx.Event()
    procs = mp.start_processes(_worker, args=(2, free_port(), str(prom.targets_file), stop, inject_nan),
                               nprocs=2, join=False, start_method="spawn")

    def alive() -> None:
        procs.join(timeout=0)  # raises with the worker's traceback if a rank failed

    def ready() -> bool:
        alive()
        if len(prom.targets_up()) != 2:
            return False
        # Enough history for rate() over $__rate_interval, and RAdam past its SGD phase.
        q = prom.api("query", query=f'count_over_time(sharded_optim_steps_total{{run_id="{RUN_ID}"}}[20s])')
        r = prom.api("query", query=f'min(sharded_optim_radam_rectification{{run_id="{RUN_ID}"}})')
        return bool(q["result"]) and float(q["result"][0]["value"][1]) >= 8 and bool(r["result"]) \
            and float(r["result"][0]["value"][1]) > 0

    try:
        wait_until(ready, timeout=120, what="Prometheus to scrape both ranks for 8 s")
        entry = json.loads(prom.targets_file.read_text())[0]
        assert entry["labels"] == {"job": "sharded_optim", "run_id": RUN_ID} and len(entry["targets"]) == 2
        ranks = prom.api("query", query=f'sharded_optim_last_step_timestamp_seconds{{run_id="{RUN_ID}"}}')
        assert sorted(s["metric"]["rank"] for s in ranks["result"]) == ["0", "1"]

        dashboard = json.loads((DASHBOARDS / "optimizer-health.json").read_text())
        end = time.time()
        start = end - 30
        chosen = _resolve_variables(prom, dashboard, start, end)
        builtins = {"__interval": f"{SCRAPE_S:g}s", "__range": f"{end - start:.0f}s",
                    "__rate_interval": f"{rate_interval(SCRAPE_S, SCRAPE_S):g}s"}
        empty = []
        checked = 0
        # the collapsed friction row charts series only diffgrad/diffmod create: with RAdam they must not exist
        friction = {id(p) for row in dashboard["panels"] if row["title"] == "DiffGrad / DiffMod friction"
                    for p in row.get("panels", [])}
        assert len(friction) == 2
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], chosen, builtins)
                checked += 1
                if id(panel) in friction:
                    assert _finite_samples(prom, expr, start, end) == 0, f"friction series with RAdam: {expr}"
                elif _finite_samples(prom, expr, start, end) == 0:
                    empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
        assert checked >= 30
        assert empty == [], "panel queries without a finite sample:\n" + "\n".join(empty)
        # The check can fail: a misspelt metric returns nothing.
        assert _finite_samples(prom, f'sharded_optim_grad_nrom{{run_id="{RUN_ID}"}}', start, end) == 0

        inject_nan.set()

        def firing() -> list[dict[str, Any]]:
            alive()
            return [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"
                    and a["labels"]["alertname"] == "ShardedOptimNonFiniteGradients"
                    and a["labels"].get("run_id") == RUN_ID]

        (alert,) = wait_until(firing, timeout=60, what="ShardedOptimNonFiniteGradients to fire")
        assert alert["labels"]["severity"] == "page"
        # The other signals agree (each target is scraped on its own clock, so wait for both).
        for expr in (f'sharded_optim_skipped_steps_total{{run_id="{RUN_ID}",reason="nonfinite"}} > 0',
                     f'max_over_time(sharded_optim_shard_nonfinite_grad_elements{{run_id="{RUN_ID}"}}[1m]) > 0'):
            wait_until(lambda: prom.api("query", query=expr)["result"], timeout=20, what=expr)
    finally:
        stop.set()
        # join() returns as soon as one more rank exits (True once all have), raising if one failed.
        wait_until(lambda: procs.join(timeout=1), timeout=60, what="both ranks to exit", poll=0)
    assert [p.exitcode for p in procs.processes] == [0, 0]
    assert not prom.targets_file.exists()  # rank 0 unlisted the finished run
