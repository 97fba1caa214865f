"""The committed dashboard, scrape config and alert rules: schema, reproducibility, structure, promtool."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from tests.support.prometheus import DASHBOARDS, panels, promtool, shared_dir

DASHBOARD = DASHBOARDS / "optimizer-health.json"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _validator() -> jsonschema.Draft7Validator:
    """Draft-7 validator for Grafana 11.6 dashboards, with common.jsonschema.json resolvable by $ref."""
    folder = shared_dir() / "grafana-schema"
    docs = {}
    for name in ("dashboard-11.6.jsonschema.json", "common.jsonschema.json"):
        path = folder / name
        if not path.is_file():
            pytest.fail(f"missing schema {path}")
        docs[name] = json.loads(path.read_text())
    registry = Registry().with_resources(
        (name, Resource.from_contents(doc, default_specification=DRAFT7)) for name, doc in docs.items())
    schema = docs["dashboard-11.6.jsonschema.json"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, registry=registry)


def _load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_validates_against_grafana_11_6_schema() -> None:
    validator = _validator()
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(_load())]
    assert errors == []
    # The validator is strict enough to catch real mistakes.
    for mutate in (lambda d: d.update(refresh=5), lambda d: d["panels"][1]["gridPos"].update(w="wide"),
                   lambda d: d["templating"]["list"][1].update(refresh="sometimes")):
        broken = _load()
        mutate(broken)
        assert not validator.is_valid(broken)


def test_regenerating_reproduces_committed_json() -> None:
    gen = _generator()
    assert gen.render() == DASHBOARD.read_text(), "run: python dashboards/generate.py"
    assert gen.main(["--check"]) == 0


def test_dashboard_structure() -> None:
    d = _load()
    all_panels = list(panels(d))
    ids = [p["id"] for p in all_panels]
    assert None not in ids and len(ids) == len(set(ids))
    rows = [p["title"] for p in all_panels if p["type"] == "row"]
    assert rows == ["Overview", "Norms and update size", "Adam internals", "Per-rank health",
                    "DiffGrad / DiffMod friction", "Low-precision state"]
    friction = next(p for p in all_panels if p["title"] == "DiffGrad / DiffMod friction")
    # collapsed: its panels (series that only diffgrad/diffmod create) stay out of the way of other algorithms
    assert friction["collapsed"] is True
    assert [p["targets"][0]["expr"].split("{")[0] for p in friction["panels"]] == [
        "sharded_optim_friction_mean", "sharded_optim_friction_near_half_ratio"]
    quant = next(p for p in all_panels if p["title"] == "Low-precision state")   # series of bf16/int8 state only
    assert quant["collapsed"] is True
    assert [p["targets"][0]["expr"].split("{")[0] for p in quant["panels"]] == [
        "sharded_optim_state_quantization_error"]
    variables = [v["name"] for v in d["templating"]["list"]]
    assert variables == ["datasource", "job", "run_id", "param_group", "rank"]
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert t["datasource"]["uid"] == "${datasource}"
            assert expr.count("(") == expr.count(")"), expr
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", expr
            assert 'run_id=~"$run_id"' in expr and 'job=~"$job"' in expr, expr
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
            assert used <= set(variables), expr


def test_dashboard_covers_every_exported_metric() -> None:
    from sharded_optim.telemetry.exporter import FRICTION_GAUGES, GROUP_GAUGES, QUANT_GAUGE
    text = DASHBOARD.read_text()
    wanted = {"steps_total", "skipped_steps_total", "grad_nonfinite_elements_total", "grad_norm",
              "step_grad_norm_bucket", "learning_rate", "grad_clipped_steps_total", "effective_lr_bucket",
              "radam_rectification", "last_step_timestamp_seconds", "step_duration_seconds_bucket",
              "shard_grad_norm", "shard_nonfinite_grad_elements", "state_bytes"}
    wanted |= set(GROUP_GAUGES) | set(FRICTION_GAUGES) | {QUANT_GAUGE}
    missing = {m for m in wanted if f"sharded_optim_{m}" not in text}
    assert not missing


def test_promtool_check_rules_and_config() -> None:
    res = promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 rules found" in res.stdout
    res = promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules(tmp_path: Path) -> None:
    res = promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DASHBOARDS / "alerts_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (DASHBOARDS / "alerts.yml").read_text()))
    assert tested == defined
    # The fixtures can fail: the stalled-rank rule with a 10x longer threshold no longer fires.
    (tmp_path / "alerts.yml").write_text((DASHBOARDS / "alerts.yml").read_text().replace("> 300", "> 3000"))
    (tmp_path / "alerts_test.yml").write_text((DASHBOARDS / "alerts_test.yml").read_text())
    res = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert res.returncode != 0 and "ShardedOptimRankStalled" in res.stdout + res.stderr


def test_generator_layout_has_no_duplicate_titles() -> None:
    doc = _generator().build()
    titles = [p["title"] for p in panels(doc)]
    assert len(titles) == len(set(titles))
    assert copy.deepcopy(doc) == _load()
