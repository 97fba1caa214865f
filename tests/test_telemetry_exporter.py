"""Exporter unit tests: values, label whitelist, export ranks, promtool lint, HTTP serving and shutdown."""
from __future__ import annotations

import json
import math
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sharded_optim.telemetry.exporter import PREFIX, SKIP_REASONS, OptimizerMetrics
from sharded_optim.telemetry.fields import EFF_LR_EDGES, FIELD_INDEX, NUM_FIELDS
from sharded_optim.telemetry.finalize import finalize
from sharded_optim.telemetry.report import StepReport
from sharded_optim.telemetry.server import MetricsServer, gather_targets, write_targets_file
from tests.support.prometheus import free_port, promtool

ALLOWED_LABELS = {"param_group", "reason", "le", "rank"}
INFO_LABELS = {"rank", "world_size", "hostname"}
PER_RANK = {PREFIX + n for n in ("last_step_timestamp_seconds", "step_duration_seconds", "shard_grad_norm",
                                 "shard_nonfinite_grad_elements", "state_bytes", "exporter_info")}


def _stats(groups: int, seed: int = 0, nonfinite: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(groups, NUM_FIELDS, generator=gen, dtype=torch.float64)
    s[:, FIELD_INDEX["numel"]] = 1000.0
    s[:, FIELD_INDEX["nonfinite_grad"]] = nonfinite
    counts = torch.linspace(10, 900, len(EFF_LR_EDGES), dtype=torch.float64)  # cumulative, increasing
    for i in range(len(EFF_LR_EDGES)):
        s[:, FIELD_INDEX[f"eff_lr_le_{i}"]] = counts[i]
    for name in FIELD_INDEX:
        if name.startswith("quant_"):
            s[:, FIELD_INDEX[name]] = 0.0   # fp32 state: no quantization error measured
    return s


def _report(step: int, *, rank: int = 0, stats: torch.Tensor | None = None, skipped: str | None = None,
            algorithm: str = "radam", **kw: object) -> StepReport:
    fields: dict[str, object] = dict(
        step=step, skipped_reason=skipped, group_names=["decay", "no_decay"], lrs=[1e-3, 5e-4],
        grad_norm=1.5, group_grad_norms=[1.2, 0.9], clipped=step % 2 == 0, algorithm=algorithm, stats=stats,
        radam_rectification=[None, None] if step < 6 else [0.4, 0.4], rank=rank, shard_grad_norm=0.7,
        shard_nonfinite=0, state_bytes=4096, step_seconds=0.003)
    fields.update(kw)
    return StepReport(**fields)  # type: ignore[arg-type]


def _families(m: OptimizerMetrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def test_values_follow_reports() -> None:
    m = OptimizerMetrics(rank=0)
    stats = _stats(2)
    for step in range(1, 8):
        m.observe(_report(step, stats=stats if step % 3 == 0 else None,
                          skipped="nonfinite" if step == 4 else None))
    get = m.registry.get_sample_value
    assert get(PREFIX + "steps_total") == 7
    assert get(PREFIX + "skipped_steps_total", {"reason": "nonfinite"}) == 1
    for reason in SKIP_REASONS[1:]:
        assert get(PREFIX + "skipped_steps_total", {"reason": reason}) == 0  # pre-initialised
    assert get(PREFIX + "grad_clipped_steps_total") == 3
    assert get(PREFIX + "learning_rate", {"param_group": "no_decay"}) == 5e-4
    assert get(PREFIX + "grad_norm", {"param_group": "decay"}) == 1.2
    assert get(PREFIX + "step_grad_norm_count", {"param_group": "decay"}) == 7
    assert get(PREFIX + "step_grad_norm_bucket", {"param_group": "decay", "le": "1.0"}) == 0
    assert get(PREFIX + "step_grad_norm_bucket", {"param_group": "decay", "le": "10.0"}) == 7
    assert get(PREFIX + "radam_rectification", {"param_group": "decay"}) == 0.4
    expected = finalize(stats, ["decay", "no_decay"])
    for group, st in expected.items():
        lab = {"param_group": group}
        assert get(PREFIX + "update_to_param_ratio", lab) == st.update_to_param_ratio
        assert get(PREFIX + "momentum_grad_cosine", lab) == st.momentum_grad_cosine
        assert get(PREFIX + "effective_lr_gsum", lab) == st.effective_lr_sum
        assert get(PREFIX + "effective_lr_gcount", lab) == st.numel
        assert get(PREFIX + "effective_lr_bucket", {**lab, "le": "1e-09"}) == st.effective_lr_buckets[0]
        assert get(PREFIX + "effective_lr_bucket", {**lab, "le": "+Inf"}) == st.numel
    assert get(PREFIX + "step_duration_seconds_count", {"rank": "0"}) == 7
    assert get(PREFIX + "loss_scale") is None  # never reported: absent rather than a fake 0


def test_friction_gauges_exist_for_diffgrad_and_diffmod_only() -> None:
    stats = _stats(2, seed=3)
    stats[:, FIELD_INDEX["friction_sum"]] = torch.tensor([700.0, 550.0], dtype=torch.float64)
    stats[:, FIELD_INDEX["friction_near_half"]] = torch.tensor([120.0, 900.0], dtype=torch.float64)
    other = OptimizerMetrics(rank=0)
    other.observe(_report(1, stats=stats, algorithm="adamod"))
    assert not any(name.startswith(PREFIX + "friction") for name in _families(other))  # absent, not 0
    for algorithm in ("diffgrad", "diffmod"):
        m = OptimizerMetrics(rank=0)
        m.observe(_report(1, algorithm=algorithm))   # created on the first report, set on statistics steps
        m.observe(_report(2, stats=stats, algorithm=algorithm))
        get = m.registry.get_sample_value
        assert get(PREFIX + "friction_mean", {"param_group": "decay"}) == 0.7
        assert get(PREFIX + "friction_mean", {"param_group": "no_decay"}) == 0.55
        assert get(PREFIX + "friction_near_half_ratio", {"param_group": "decay"}) == 0.12
        assert get(PREFIX + "friction_near_half_ratio", {"param_group": "no_decay"}) == 0.9
        assert finalize(stats, ["decay", "no_decay"])["decay"].friction_mean == 0.7


def test_quantization_error_gauge_exists_for_low_precision_state_only() -> None:
    fp32 = OptimizerMetrics(rank=0)
    fp32.observe(_report(1, stats=_stats(2)))
    assert PREFIX + "state_quantization_error" not in _families(fp32)   # absent, not 0
    stats = _stats(2, seed=4)
    stats[:, FIELD_INDEX["quant_err_m_sumsq"]] = torch.tensor([4.0, 0.0], dtype=torch.float64)
    stats[:, FIELD_INDEX["quant_ref_m_sumsq"]] = torch.tensor([400.0, 0.0], dtype=torch.float64)   # m still 0
    stats[:, FIELD_INDEX["quant_err_v_sumsq"]] = torch.tensor([1.0, 9.0], dtype=torch.float64)
    stats[:, FIELD_INDEX["quant_ref_v_sumsq"]] = torch.tensor([1e4, 900.0], dtype=torch.float64)
    m = OptimizerMetrics(rank=0)
    m.observe(_report(1, stats=stats))
    get = m.registry.get_sample_value
    name = PREFIX + "state_quantization_error"
    assert get(name, {"param_group": "decay", "moment": "first"}) == 0.1
    assert get(name, {"param_group": "decay", "moment": "second"}) == 0.01
    assert get(name, {"param_group": "no_decay", "moment": "first"}) == 0.0
    assert get(name, {"param_group": "no_decay", "moment": "second"}) == 0.1


def test_nonfinite_counts_and_nan_norm_do_not_poison_histogram() -> None:
    m = OptimizerMetrics(rank=0)
    m.observe(_report(1, stats=_stats(2)))
    assert m.registry.get_sample_value(PREFIX + "grad_nonfinite_elements_total", {"param_group": "decay"}) == 0
    m.observe(_report(2, stats=_stats(2, nonfinite=5), group_grad_norms=[math.nan, 1.0], skipped="nonfinite",
                      shard_nonfinite=5, loss_scale=1024.0))
    get = m.registry.get_sample_value
    assert get(PREFIX + "grad_nonfinite_elements_total", {"param_group": "decay"}) == 5
    assert math.isnan(get(PREFIX + "grad_norm", {"param_group": "decay"}))
    assert get(PREFIX + "step_grad_norm_count", {"param_group": "decay"}) == 1
    assert math.isfinite(get(PREFIX + "step_grad_norm_sum", {"param_group": "decay"}))
    assert get(PREFIX + "shard_nonfinite_grad_elements", {"rank": "0"}) == 5
    assert get(PREFIX + "loss_scale") == 1024.0


def test_label_whitelist_and_no_created_series() -> None:
    m = OptimizerMetrics(rank=0, world_size=4)
    m.observe(_report(7, stats=_stats(2), loss_scale=2.0**16))
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    fams = _families(m)
    assert len(fams) >= 25
    for fam in fams.values():
        assert fam.name.startswith(PREFIX), fam.name
        for sample in fam.samples:
            allowed = INFO_LABELS if fam.name == PREFIX + "exporter_info" else ALLOWED_LABELS
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
            if "rank" in sample.labels:
                assert fam.name in PER_RANK, f"rank label on global series {sample.name}"


def test_non_export_rank_exposes_only_per_rank_series() -> None:
    m = OptimizerMetrics(rank=3, world_size=4)
    m.observe(_report(9, rank=3, stats=_stats(2)))
    fams = _families(m)
    assert {f.name for f in fams.values()} == PER_RANK
    for fam in fams.values():
        for sample in fam.samples:
            assert sample.labels.get("rank") == "3", sample
    rank0 = OptimizerMetrics(rank=0)
    rank0.observe(_report(9, stats=_stats(2)))
    assert len(generate_latest(rank0.registry)) > 4 * len(generate_latest(m.registry))


def test_promtool_check_metrics_accepts_exposition() -> None:
    m = OptimizerMetrics(rank=0)
    m.observe(_report(6, stats=_stats(3), group_names=["a", "b", "c"], lrs=[1e-3] * 3,
                      group_grad_norms=[1.0] * 3, radam_rectification=[0.1, 0.2, 0.3], loss_scale=8.0))
    res = promtool("check", "metrics", stdin=generate_latest(m.registry).decode())
    assert res.returncode == 0, res.stdout + res.stderr
    # The lint is real: the gauge-with-le shape the collector avoids is rejected.
    bad = "# HELP x_ratio r\n# TYPE x_ratio gauge\nx_ratio{le=\"1\"} 1\n"
    assert promtool("check", "metrics", stdin=bad).returncode != 0


@pytest.mark.parametrize("field,kw", [
    ("lrs", {"lrs": [1e-3]}),
    ("group_grad_norms", {"group_grad_norms": [1.0, 2.0, 3.0]}),
    ("skipped_reason", {"skipped": "because"}),
    ("group_names", {"group_names": ["a", "a"]}),
    ("stats", {"stats": torch.zeros(2, 3, dtype=torch.float64)}),
])
def test_bad_reports_name_the_field(field: str, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        OptimizerMetrics(rank=0).observe(_report(1, **kw))  # type: ignore[arg-type]


def test_port_zero_scrape_and_clean_shutdown() -> None:
    m = OptimizerMetrics(rank=0)
    m.observe(_report(1, stats=_stats(2)))
    server = MetricsServer(m.registry, port=0)
    assert server.port > 0 and server.thread.is_alive()
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    assert f'{PREFIX}steps_total 1.0' in body
    assert f'{PREFIX}effective_lr_bucket{{le="+Inf",param_group="decay"}} 1000.0' in body
    server.stop()
    assert not server.thread.is_alive()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=2)
    server.stop()  # idempotent
    with pytest.raises(ValueError, match="port"):
        MetricsServer(m.registry, port=70000)


def test_fixed_port_is_bound_on_loopback() -> None:
    port = free_port()
    server = MetricsServer(OptimizerMetrics(rank=1).registry, port=port)
    try:
        assert server.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        server.stop()


def test_targets_file_is_file_sd_json(tmp_path: Path) -> None:
    path = write_targets_file(tmp_path / "sub" / "t.json", ["127.0.0.1:1", "127.0.0.1:2"], run_id="r1")
    doc = json.loads(path.read_text())
    assert doc == [{"targets": ["127.0.0.1:1", "127.0.0.1:2"], "labels": {"job": "sharded_optim",
                                                                        "run_id": "r1"}}]
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary left behind
    assert gather_targets("127.0.0.1", 9400) == ["127.0.0.1:9400"]  # no process group: just this rank
    with pytest.raises(ValueError, match="targets"):
        write_targets_file(tmp_path / "e.json", [], run_id="r")


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        server = MetricsServer(OptimizerMetrics(rank=rank, world_size=world).registry, port=0)
        targets = gather_targets("127.0.0.1", server.port)
        if rank == 0:
            write_targets_file(out, targets, run_id="gloo")
        dist.barrier()  # keep every server up until rank 0 has scraped them all
        if rank == 0:
            for t in targets:
                with urllib.request.urlopen(f"http://{t}/metrics", timeout=10) as resp:
                    assert f'rank="{targets.index(t)}"' in resp.read().decode()
        dist.barrier()
        server.stop()
    finally:
        dist.destroy_process_group()


def test_targets_gathered_over_gloo(tmp_path: Path) -> None:
    out = tmp_path / "targets.json"
    mp.start_processes(_gather_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    (entry,) = json.loads(out.read_text())
    assert len(entry["targets"]) == 2 and len(set(entry["targets"])) == 2
    assert all(t.startswith("127.0.0.1:") for t in entry["targets"])


def test_start_with_the_real_optimizer(tmp_path: Path) -> None:
    from sharded_optim import ShardedOptimizer, telemetry

    model = torch.nn.Linear(8, 4)
    opt = ShardedOptimizer([{"params": model.parameters(), "name": "all"}], lr=1e-2, kernel="eager")
    targets = tmp_path / "targets" / "run.json"
    tel = telemetry.start(opt, base_port=0, run_id="unit", targets_file=targets)
    assert opt.stats_interval == telemetry.DEFAULT_STATS_INTERVAL  # statistics were off: default turned on
    assert json.loads(targets.read_text())[0]["targets"] == [f"127.0.0.1:{tel.port}"]
    try:
        for _ in range(telemetry.DEFAULT_STATS_INTERVAL):
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with urllib.request.urlopen(f"http://127.0.0.1:{tel.port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert f"{PREFIX}steps_total {float(telemetry.DEFAULT_STATS_INTERVAL)}" in body
        assert f'{PREFIX}param_norm{{param_group="all"}}' in body  # one statistics step happened
    finally:
        tel.stop()
    assert not targets.exists() and not tel.server.thread.is_alive()
    model(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()  # the hook is gone: the stopped exporter no longer counts
    assert tel.metrics.registry.get_sample_value(PREFIX + "steps_total") == telemetry.DEFAULT_STATS_INTERVAL
    tel.stop()  # idempotent
    with pytest.raises(TypeError, match="optimizer"):
        telemetry.start(object(), base_port=0)
    with pytest.raises(ValueError, match="base_port"):
        telemetry.start(opt, base_port=-1)
    with pytest.raises(ValueError, match="stats_interval"):
        telemetry.start(opt, base_port=0, stats_interval=-2)
