"""Generate ``optimizer-health.json``, the Grafana dashboard of the optimizer-health metrics.

Built with grafana-foundation-sdk pinned to the Grafana 11.6 line (an unpinned install resolves to 10.1
types).  The committed JSON must equal this script's output: ``python dashboards/generate.py --check``.

Layout (MONITORING.md section 4): variables datasource -> job -> run_id -> param_group -> rank; rows
Overview, Norms and update size, Adam internals, Per-rank health, and collapsed rows for the diffGrad friction
and for low-precision state: their series exist only when the algorithm is diffgrad or diffmod, or the state is
bf16/int8 (Grafana 11 cannot hide a panel by a condition, nor repeat one zero times, so the rows are collapsed and
other runs never create the series).
Per-rank panels always aggregate (topk/bottomk/quantile) so "All" stays readable at 1000 ranks.  Every
``rate()`` uses ``$__rate_interval``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, ScaleDistributionConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.common import GraphThresholdsStyleMode, ScaleDistribution

OUT = Path(__file__).resolve().parent / "optimizer-health.json"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
P = "sharded_optim_"
RUN = 'job=~"$job", run_id=~"$run_id"'
GRP = RUN + ', param_group=~"$param_group"'
RNK = RUN + ', rank=~"$rank"'


@dataclass
class Spec:
    """One panel: title, unit, ``(expr, legend)`` targets and display options."""

    title: str
    unit: str
    targets: list[tuple[str, str]]
    description: str = ""
    kind: str = "timeseries"   # or "stat"
    width: int = 12
    height: int = 8
    log: bool = False
    threshold: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


FRICTION_ROW = "DiffGrad / DiffMod friction"  # collapsed: see the module docstring
QUANT_ROW = "Low-precision state"
COLLAPSED = {FRICTION_ROW, QUANT_ROW}


def _g(metric: str) -> str:
    return f"{P}{metric}{{{GRP}}}"


ROWS: list[tuple[str, list[Spec]]] = [
    ("Overview", [
        Spec("Optimizer steps", "none", [(f"max({P}steps_total{{{RUN}}})", "steps")], kind="stat", width=4,
             height=4, description="Steps attempted (taken + skipped)."),
        Spec("Steps per second", "ops", [(f"sum(rate({P}steps_total{{{RUN}}}[$__rate_interval]))", "steps/s")],
             kind="stat", width=4, height=4),
        Spec("Skipped steps in range", "none",
             [(f"sum by (reason) (increase({P}skipped_steps_total{{{RUN}}}[$__range]))", "{{reason}}")],
             kind="stat", width=4, height=4, threshold=1),
        Spec("Non-finite grad elements in range", "none",
             [(f"sum(increase({P}grad_nonfinite_elements_total{{{GRP}}}[$__range]))", "non-finite")],
             kind="stat", width=4, height=4, threshold=1),
        Spec("Oldest rank heartbeat", "s",
             [(f"time() - min({P}last_step_timestamp_seconds{{{RNK}}})", "seconds since step")],
             kind="stat", width=4, height=4, threshold=300),
        Spec("Total grad norm", "none",
             [(f"sqrt(sum({P}grad_norm{{{RUN}}} ^ 2))", "total")], kind="stat", width=4, height=4,
             description="Global pre-clip gradient norm over all groups."),
    ]),
    ("Norms and update size", [
        Spec("Gradient norm (pre-clip)", "none",
             [(_g("grad_norm"), "{{param_group}}"), (f"sqrt(sum({P}grad_norm{{{RUN}}} ^ 2))", "total")], log=True),
        Spec("Gradient norm per step p50 / p99", "none", [
            (f"histogram_quantile(0.5, sum by (le, param_group) (rate({P}step_grad_norm_bucket{{{GRP}}}"
             f"[$__rate_interval])))", "p50 {{param_group}}"),
            (f"histogram_quantile(0.99, sum by (le, param_group) (rate({P}step_grad_norm_bucket{{{GRP}}}"
             f"[$__rate_interval])))", "p99 {{param_group}}")], log=True,
             description="From the per-step histogram: catches spikes between scrapes."),
        Spec("Parameter norm", "none", [(_g("param_norm"), "{{param_group}}")]),
        Spec("Update / parameter ratio", "none", [(_g("update_to_param_ratio"), "{{param_group}}")], log=True,
             threshold=1e-3, description="||update||/||theta||; ~1e-3 is healthy, far below means frozen."),
        Spec("Clipped steps per second", "ops",
             [(f"sum(rate({P}grad_clipped_steps_total{{{RUN}}}[$__rate_interval]))", "clipped/s")], width=24,
             height=6),
    ]),
    ("Adam internals", [
        Spec("Adam update RMS (before LR)", "none", [(_g("adam_update_rms"), "{{param_group}}")], log=True,
             description="Collapse toward 0: eps dominance or v lag; near 1: sign-like updates."),
        Spec("Epsilon-dominated fraction", "percentunit", [(_g("eps_dominated_ratio"), "{{param_group}}")],
             threshold=0.5),
        Spec("Momentum / gradient cosine", "none", [(_g("momentum_grad_cosine"), "{{param_group}}")],
             extra={"min": -1, "max": 1}),
        Spec("Effective LR p1 / p50 / p99", "none", [
            (f"histogram_quantile({q}, sum by (le, param_group) ({P}effective_lr_bucket{{{GRP}}}))",
             f"p{round(q * 100)} {{{{param_group}}}}") for q in (0.01, 0.5, 0.99)] + [
            (f"{P}effective_lr_gsum{{{GRP}}} / {P}effective_lr_gcount{{{GRP}}}", "mean {{param_group}}")],
             log=True, description="lr/(sqrt(v_hat)+eps) per element; a rising upper tail precedes spikes."),
        Spec("Learning rate", "none", [(_g("learning_rate"), "{{param_group}}")], width=8),
        Spec("RAdam rectification r_t", "none", [(_g("radam_rectification"), "{{param_group}}")], width=8,
             extra={"min": 0, "max": 1}, description="0 in the SGD-momentum warm-up phase."),
        Spec("Zero-gradient fraction", "percentunit", [(_g("grad_zero_ratio"), "{{param_group}}")], width=8),
        Spec("Variant-specific fractions", "percentunit", [
            (_g("amsgrad_max_active_ratio"), "AMSGrad max active {{param_group}}"),
            (_g("adamod_clipped_ratio"), "AdaMod clipped {{param_group}}"),
            (_g("adabound_clamped_ratio"), "AdaBound clamped {{param_group}}")], width=24, height=6),
    ]),
    ("Per-rank health", [
        Spec("Step time p90, slowest 10 ranks", "s", [
            (f"topk(10, histogram_quantile(0.9, sum by (le, rank) (rate({P}step_duration_seconds_bucket{{{RNK}}}"
             f"[$__rate_interval]))))", "rank {{rank}}")]),
        Spec("Step time imbalance (max / median mean step)", "none", [
            (f"max(rate({P}step_duration_seconds_sum{{{RNK}}}[$__rate_interval]) / "
             f"rate({P}step_duration_seconds_count{{{RNK}}}[$__rate_interval])) / "
             f"quantile(0.5, rate({P}step_duration_seconds_sum{{{RNK}}}[$__rate_interval]) / "
             f"rate({P}step_duration_seconds_count{{{RNK}}}[$__rate_interval]))", "max/median")]),
        Spec("Shard grad norm, top / bottom 5 ranks", "none", [
            (f"topk(5, {P}shard_grad_norm{{{RNK}}})", "top rank {{rank}}"),
            (f"bottomk(5, {P}shard_grad_norm{{{RNK}}})", "bottom rank {{rank}}")], log=True),
        Spec("Non-finite shard elements by rank", "none", [
            (f"topk(10, max_over_time({P}shard_nonfinite_grad_elements{{{RNK}}}[$__rate_interval]))",
             "rank {{rank}}")], threshold=1),
        Spec("Seconds since last step, top 10", "s", [
            (f"topk(10, time() - {P}last_step_timestamp_seconds{{{RNK}}})", "rank {{rank}}")], threshold=300),
        Spec("Optimizer state bytes, top 10", "bytes", [
            (f"topk(10, {P}state_bytes{{{RNK}}})", "rank {{rank}}")]),
    ]),
    (FRICTION_ROW, [
        Spec("Friction mean (diffgrad, diffmod)", "none", [(_g("friction_mean"), "{{param_group}}")],
             extra={"min": 0.5, "max": 1}, description="Mean of xi = sigmoid(|g_prev - g|) in [0.5, 1): the "
             "factor on the first moment.  Near 0.5 the step is Adam's (E0) at half the learning rate."),
        Spec("Friction near 0.5 (diffgrad, diffmod)", "percentunit",
             [(_g("friction_near_half_ratio"), "{{param_group}}")], extra={"min": 0, "max": 1},
             description="Fraction of elements with xi <= 0.51 (|g_prev - g| <= 0.04): gradients that did not "
             "change between steps."),
    ]),
    (QUANT_ROW, [
        Spec("State quantization error (bf16/int8 state)", "percentunit",
             [(f"{P}state_quantization_error{{{GRP}}}", "{{param_group}} {{moment}} moment")], log=True,
             description="||q(x) - x|| / ||x||: the stored first (m) and second (v) moment against their fp32 "
                         "values before rounding, on statistics steps.  bf16 sits near 2e-3, int8 near 4e-2; "
                         "a rise means the blocks' dynamic range outgrows the code."),
    ]),
]


def _panel(spec: Spec) -> gd.Panel:
    p = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
    p.title(spec.title).unit(spec.unit).datasource(DS).span(spec.width).height(spec.height)
    if spec.description:
        p.description(spec.description)
    for i, (expr, legend) in enumerate(spec.targets):
        p.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
                      .datasource(DS).range())
    if spec.log:
        p.scale_distribution(ScaleDistributionConfig().type(ScaleDistribution.LOG).log(10))
    if "min" in spec.extra:
        p.min(spec.extra["min"]).max(spec.extra["max"])
    if spec.threshold is not None:
        # Grafana treats the first step as the base (-Infinity) whatever its value; the schema wants a
        # number there, not the null Grafana's own export writes, and every thresholded metric is >= 0.
        p.thresholds(gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=0, color="green"), dm.Threshold(value=spec.threshold, color="red")]))
        if spec.kind != "stat":
            p.thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE))
    return p


def _variables() -> list[gd.QueryVariable | gd.DatasourceVariable]:
    def q(name: str, query: str, *, multi: bool, sort: dm.VariableSort, all_value: str | None = None
          ) -> gd.QueryVariable:
        v = (gd.QueryVariable(name).label(name).datasource(DS).query(query).multi(multi).include_all(multi)
             .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort))
        return v.all_value(all_value) if all_value else v

    heartbeat = f"{P}last_step_timestamp_seconds"
    return [
        gd.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        q("job", f"label_values({heartbeat}, job)", multi=False, sort=dm.VariableSort.ALPHABETICAL_ASC),
        q("run_id", f'label_values({heartbeat}{{job=~"$job"}}, run_id)', multi=False,
          sort=dm.VariableSort.ALPHABETICAL_DESC),  # default run ids start with a timestamp: newest first
        q("param_group", f"label_values({P}learning_rate{{{RUN}}}, param_group)", multi=True,
          sort=dm.VariableSort.ALPHABETICAL_ASC),
        # ".*" rather than an alternation of every rank: 1000 ranks would make a huge regex.
        q("rank", f"label_values({heartbeat}{{{RUN}}}, rank)", multi=True,
          sort=dm.VariableSort.NUMERICAL_ASC, all_value=".*"),
    ]


def build() -> dict[str, object]:
    """The dashboard as a JSON-ready dict, with unique panel ids assigned in layout order."""
    d = (gd.Dashboard("Optimizer health").uid("sharded-optim-health").tags(["sharded-optim", "optimizer"])
         .description("Optimizer-health telemetry of sharded_optim (docs/TELEMETRY.md)")
         .refresh("10s").time("now-1h", "now").timezone("browser").editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR))
    for var in _variables():
        d.with_variable(var)
    for title, specs in ROWS:
        if title in COLLAPSED:  # the panels live inside the row until it is expanded
            row = gd.Row(title).collapsed(True)
            for spec in specs:
                row.with_panel(_panel(spec))
            d.with_row(row)
            continue
        d.with_row(gd.Row(title))
        for spec in specs:
            d.with_panel(_panel(spec))
    doc = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    nested = (p for top in doc["panels"] for p in (top, *top.get("panels", [])))  # collapsed rows hold panels
    for i, panel in enumerate(nested, start=1):  # the SDK leaves ids null
        panel["id"] = i
    return doc


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed JSON is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.name} is out of date: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(build()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
