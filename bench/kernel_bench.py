"""Fused-update benchmark on CPU (issue 2): our compiled kernels vs the strongest peer vs a traffic twin.

For each algorithm, on flat fp32 buffers of ``--numel`` elements (default 16M), in one process, interleaved:

* ``kernel``: ``sharded_optim.kernels.dispatch.run(dispatch.update(variant), "compiled", ...)`` on flat buffers with the host
  scalars of :func:`sharded_optim.rules.host_scalars` (building the scalar tensor is inside the timing);
* ``class``: ``ShardedOptimizer.step()`` on one parameter of the same size (single process, no sharding), to
  show what the class adds around the kernel;
* ``peer``: torch ``fused=True`` (adam, adamw, amsgrad), torch ``foreach=True`` (adamax, nadam, radam), the
  eager transcription of the authors' code in ``bench/authors_optim.py`` (adamod, adabound, amsbound, diffmod),
  or torch-optimizer's eager ``DiffGrad`` (diffgrad);
* ``twin``: a compiled in-place kernel reading and writing exactly the tensors the variant does, with trivial
  arithmetic (``p += g; m += g; v += g; ...``): the memory-traffic floor of this machine.

Effective GB/s counts the algorithmic bytes of ALGORITHMS.md section 0 (28, 36 or 44 bytes per element) for every
candidate.  All candidates start from the same parameters and gradient; after the first step the kernel and
class results are checked against the peer.

Run from the repository root:  ``python bench/kernel_bench.py``  (``--numel 1e6 --reps 3`` for a smoke run).
"""
from __future__ import annotations

import argparse
import gc
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from torch._inductor import metrics as inductor_metrics

from common import environment, interleaved, md_table, median, plot_path, spread, write_json, write_markdown
from authors_optim import AuthorsAdaBound, AuthorsAdaMod, AuthorsDiffMod
from sharded_optim import rules
from sharded_optim.kernels import dispatch
from sharded_optim.optimizer import ShardedOptimizer


# ------------------------------------------------------------------------------------------ traffic twins
# One function per state set, each a distinct code object (its own compile-cache entry), same arguments as the
# real variant.  Every tensor the variant reads is read, every tensor it writes is written, once.
def twin_mv(p, g, m, v, sc):
    p.add_(g); m.add_(g); v.add_(g)  # noqa: E702


def twin_mvx(p, g, m, v, vmax, sc):
    p.add_(g); m.add_(g); v.add_(g); vmax.add_(g)  # noqa: E702


def twin_mvs(p, g, m, v, s, sc):
    p.add_(g); m.add_(g); v.add_(g); s.add_(g)  # noqa: E702


def twin_mvxs(p, g, m, v, vmax, s, sc):
    p.add_(g); m.add_(g); v.add_(g); vmax.add_(g); s.add_(g)  # noqa: E702


# diffGrad's previous gradient is one more state tensor: its twins are those of the same tensor count
TWINS = {"adam_mv": twin_mv, "bound_mv": twin_mv, "adamax_mu": twin_mv, "adam_mvx": twin_mvx,
         "bound_mvx": twin_mvx, "bound_mvs": twin_mvs, "bound_mvxs": twin_mvxs, "adam_mvg": twin_mvs,
         "bound_mvsg": twin_mvxs}
_compiled_twins: dict[str, object] = {}


def compiled_twin(variant: str):
    fn = TWINS[variant]
    if fn.__name__ not in _compiled_twins:
        _compiled_twins[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled_twins[fn.__name__]


# ------------------------------------------------------------------------------------------ the cases
# name -> (our algorithm, our options, peer description, peer factory(params, hyper), ours/peer target)
def _torch(cls, **kw):
    return lambda params, h: cls(params, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                 weight_decay=h["weight_decay"], **kw)


def _diffgrad_peer(params, h):
    import torch_optimizer  # the [dev] extra; only this case needs it
    return torch_optimizer.DiffGrad(params, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                    weight_decay=h["weight_decay"])


CASES = {
    "adam": ("adam", {}, "torch.optim.Adam(fused=True)", _torch(torch.optim.Adam, fused=True), None),
    "adamw": ("adamw", {}, "torch.optim.AdamW(fused=True)", _torch(torch.optim.AdamW, fused=True), 1.0),
    "amsgrad": ("adam", {"amsgrad": True}, "torch.optim.Adam(amsgrad=True, fused=True)",
                _torch(torch.optim.Adam, amsgrad=True, fused=True), 1.2),
    "adamax": ("adamax", {}, "torch.optim.Adamax(foreach=True)", _torch(torch.optim.Adamax, foreach=True), 3.0),
    "nadam": ("nadam", {}, "torch.optim.NAdam(foreach=True)", _torch(torch.optim.NAdam, foreach=True), 3.0),
    "radam": ("radam", {}, "torch.optim.RAdam(foreach=True)", _torch(torch.optim.RAdam, foreach=True), 3.0),
    "adamod": ("adamod", {}, "authors' AdaMod (eager, bench/authors_optim.py)",
               lambda params, h: AuthorsAdaMod(params, lr=h["lr"], betas=h["betas"], beta3=h["beta3"],
                                                 eps=h["eps"], weight_decay=h["weight_decay"]), 10.0),
    "adabound": ("adabound", {}, "authors' AdaBound (eager, bench/authors_optim.py)",
                 lambda params, h: AuthorsAdaBound(params, lr=h["lr"], betas=h["betas"], final_lr=h["final_lr"],
                                                     gamma=h["gamma"], eps=h["eps"],
                                                     weight_decay=h["weight_decay"]), 10.0),
    "amsbound": ("adabound", {"amsgrad": True}, "authors' AdaBound(amsbound=True) (eager)",
                 lambda params, h: AuthorsAdaBound(params, lr=h["lr"], betas=h["betas"], final_lr=h["final_lr"],
                                                     gamma=h["gamma"], eps=h["eps"], weight_decay=h["weight_decay"],
                                                     amsbound=True), 10.0),
    "diffgrad": ("diffgrad", {}, "torch_optimizer.DiffGrad (eager)", lambda params, h: _diffgrad_peer(params, h),
                 None),
    "diffmod": ("diffmod", {}, "lessw2020's DiffMod (eager, bench/authors_optim.py)",
                lambda params, h: AuthorsDiffMod(params, lr=h["lr"], betas=h["betas"],
                                                   len_memory=1 / (1 - h["beta3"]), eps=h["eps"],
                                                   weight_decay=h["weight_decay"]), None),
}
TWIN_TARGET = 0.9

# Per-element bytes moved per step, ALGORITHMS.md section 0 (fp32; gradient read only).
BYTES_PER_ELEMENT = {"adam_mv": 28, "bound_mv": 28, "adamax_mu": 28, "adam_mvx": 36, "bound_mvx": 36,
                     "bound_mvs": 36, "bound_mvxs": 44, "adam_mvg": 36, "bound_mvsg": 44}


def hyper(algorithm: str, options: dict) -> dict:
    """The full param-group dict our rules expect (defaults of the algorithm = defaults of its peer)."""
    spec = rules.SPECS[algorithm]
    group = dict(lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=spec.weight_decay,
                 **rules.resolve_options(algorithm, options))
    group["base_lr"] = group["lr"]
    return group


class KernelCandidate:
    """Our fused update called directly on flat buffers, as ShardedOptimizer does per shard."""

    def __init__(self, algorithm: str, group: dict, p0: torch.Tensor, g: torch.Tensor):
        self.algorithm, self.group = algorithm, group
        self.variant = rules.kernel_variant(algorithm, group)
        self.p = p0.clone()
        self.g = g
        self.state = [torch.zeros_like(p0) for _ in rules.state_keys(algorithm, group)]
        self.t = 0
        self.mu = 1.0

    def step(self) -> None:
        self.t += 1
        hs = rules.host_scalars(self.algorithm, self.group, self.t, initial_lr=self.group["base_lr"],
                                mu_product=self.mu)
        if hs.mu_product is not None:
            self.mu = hs.mu_product
        sc = torch.tensor(hs.values, dtype=self.p.dtype, device=self.p.device)
        dispatch.run(dispatch.update(self.variant), "compiled", self.p, self.g, *self.state, sc)


class TwinCandidate:
    def __init__(self, variant: str, n_state: int, p0: torch.Tensor, g: torch.Tensor):
        self.fn = compiled_twin(variant)
        self.p = torch.zeros_like(p0)
        self.g = g
        self.state = [torch.zeros_like(p0) for _ in range(n_state)]
        self.sc = torch.zeros(rules.NUM_SCALARS, device=p0.device)

    def step(self) -> None:
        self.fn(self.p, self.g, *self.state, self.sc)


def _param(p0: torch.Tensor, g: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(p0.clone())
    p.grad = g.clone()
    return p


def bench_case(name: str, numel: int, reps: int, warmup: int, p0: torch.Tensor, g: torch.Tensor) -> dict:
    algorithm, options, peer_name, peer_factory, target = CASES[name]
    group = hyper(algorithm, options)
    variant = rules.kernel_variant(algorithm, group)
    n_state = len(rules.state_keys(algorithm, group))

    kernel = KernelCandidate(algorithm, group, p0, g)
    cls_param = _param(p0, g)
    cls_opt = ShardedOptimizer([cls_param], algorithm=algorithm, lr=group["lr"], betas=group["betas"],
                               eps=group["eps"], weight_decay=group["weight_decay"], kernel="compiled", **options)
    peer_param = _param(p0, g)
    peer = peer_factory([peer_param], group)
    twin = TwinCandidate(variant, n_state, p0, g)

    # first step of each (compiles ours and the twin), then the correctness check on step 1
    compile_s = {}
    for label, fn in (("kernel", kernel.step), ("twin", twin.step)):
        inductor_metrics.reset()
        t0 = time.perf_counter()
        fn()
        compile_s[label] = {"first_call_s": time.perf_counter() - t0,
                            "generated_kernels": inductor_metrics.generated_kernel_count}
    cls_opt.step()
    peer.step()
    ref = peer_param.detach()
    scale = float((ref - p0).abs().max())  # size of one update
    check = {
        "update_max_abs": scale,
        "kernel_vs_peer_max_abs": float((kernel.p - ref).abs().max()),
        "class_vs_peer_max_abs": float((cls_param.detach() - ref).abs().max()),
    }
    # the same math: after one step the difference is rounding, far below the update itself
    check["ok"] = max(check["kernel_vs_peer_max_abs"], check["class_vs_peer_max_abs"]) <= 1e-3 * scale + 1e-7
    fns = {"twin": twin.step, "kernel": kernel.step, "class": cls_opt.step, "peer": peer.step}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = interleaved(fns, reps)
    med = {k: median(v) for k, v in times.items()}
    bpe = BYTES_PER_ELEMENT[variant]
    row = {
        "case": name, "algorithm": algorithm, "options": options, "variant": variant, "peer": peer_name,
        "bytes_per_element": bpe, "numel": numel, "compile": compile_s, "check_after_step_1": check,
        "seconds": {k: spread(v) for k, v in times.items()},
        "elements_per_s": {k: numel / t for k, t in med.items()},
        "effective_GBps": {k: numel * bpe / t / 1e9 for k, t in med.items()},
        "kernel_over_twin_speed": med["twin"] / med["kernel"],
        # the same ratios from the fastest repetition of each: less sensitive to other jobs on a shared machine
        "kernel_over_twin_speed_best": min(times["twin"]) / min(times["kernel"]),
        "kernel_over_peer_speed_best": min(times["peer"]) / min(times["kernel"]),
        "class_over_twin_speed": med["twin"] / med["class"],
        "kernel_over_peer_speed": med["peer"] / med["kernel"],
        "class_over_peer_speed": med["peer"] / med["class"],
        "target_peer": target, "target_twin": TWIN_TARGET,
    }
    row["meets_twin_target"] = row["kernel_over_twin_speed"] >= TWIN_TARGET
    row["meets_peer_target"] = None if target is None else row["kernel_over_peer_speed"] >= target
    del kernel, cls_opt, cls_param, peer, peer_param, twin
    gc.collect()
    return row


def class_breakdown(numel: int, reps: int, p0: torch.Tensor, g: torch.Tensor) -> dict:
    """Where ShardedOptimizer.step() spends its time beyond the kernel (adamw, one process): the gradient copy
    into the flat gradient buffer and the float64 global gradient norm, each timed on its own, interleaved."""
    group = hyper("adamw", {})
    param = _param(p0, g)
    opt = ShardedOptimizer([param], algorithm="adamw", kernel="compiled")
    opt.step()
    rt = next(iter(opt._runtimes.values()))[0]
    kernel = KernelCandidate("adamw", group, p0, g)
    kernel.step()
    fns = {"step()": opt.step, "kernel only": kernel.step, "grad copy (collect_grads)": rt.collect_grads,
           "grad norm (_group_norms)": lambda: opt._group_norms({id(rt): [True] * len(rt.layout.slots)})}
    for fn in fns.values():
        fn()
    times = interleaved(fns, reps)
    return {k: spread(v) for k, v in times.items()}


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["case"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.2
    labels = [("twin", "traffic twin"), ("kernel", "ours: kernel"), ("class", "ours: ShardedOptimizer.step"),
              ("peer", "peer")]
    for i, (key, label) in enumerate(labels):
        ax1.bar([x + (i - 1.5) * width for x in range(len(rows))], [r["effective_GBps"][key] for r in rows],
                width, label=label)
    ax1.set_xticks(range(len(rows)), names, rotation=30)
    ax1.set_ylabel("effective GB/s (algorithmic bytes / time)")
    ax1.set_title(f"fused update, {rows[0]['numel'] / 2**20:g}Mi fp32 elements")
    ax1.legend(fontsize=8)
    ax2.bar([x - 0.2 for x in range(len(rows))], [r["kernel_over_peer_speed"] for r in rows], 0.4,
            label="ours (kernel) / peer")
    ax2.bar([x + 0.2 for x in range(len(rows))], [r["kernel_over_twin_speed"] for r in rows], 0.4,
            label="ours (kernel) / twin")
    for x, r in enumerate(rows):
        if r["target_peer"]:
            ax2.hlines(r["target_peer"], x - 0.4, x, colors="k", linestyles="--")
    ax2.axhline(TWIN_TARGET, color="gray", lw=0.8, ls=":")
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(rows)), names, rotation=30)
    ax2.set_ylabel("speed ratio (dashed: peer target, dotted: 0.9x twin)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(payload: dict) -> str:
    rows = payload["results"]
    env = payload["environment"]
    out = [f"# Fused update benchmark (CPU)\n",
           f"`{payload['command']}`: {payload['numel']:,} fp32 elements, {env['torch_threads']} torch threads "
           f"on {env['logical_cpus']} logical CPUs ({env['cpu']}), torch {env['torch']}, "
           f"{payload['reps']} interleaved repetitions per candidate after {payload['warmup']} warm-up steps; "
           "medians. GB/s = algorithmic bytes (ALGORITHMS.md section 0) / time.\n"]
    header = ["case", "B/elem", "twin GB/s", "kernel GB/s", "class GB/s", "peer GB/s", "kernel Melem/s",
              "kernel/twin", "class/twin", "peer", "kernel/peer", "class/peer", "target", "met",
              "kernel/twin, kernel/peer (best-of)", "step-1 check"]
    table = []
    for r in rows:
        g = r["effective_GBps"]
        target = "-" if r["target_peer"] is None else f">= {r['target_peer']:g}x"
        met = ("yes" if r["meets_twin_target"] else "NO (twin)") if r["meets_peer_target"] is None else \
            ("yes" if r["meets_twin_target"] and r["meets_peer_target"] else
             "NO (" + ", ".join(x for x, ok in (("twin", r["meets_twin_target"]), ("peer", r["meets_peer_target"]))
                                if not ok) + ")")
        table.append([r["case"], r["bytes_per_element"], g["twin"], g["kernel"], g["class"], g["peer"],
                      r["elements_per_s"]["kernel"] / 1e6, f"{r['kernel_over_twin_speed']:.2f}",
                      f"{r['class_over_twin_speed']:.2f}", r["peer"], f"{r['kernel_over_peer_speed']:.2f}x",
                      f"{r['class_over_peer_speed']:.2f}x", target, met,
                      f"{r['kernel_over_twin_speed_best']:.2f}, {r['kernel_over_peer_speed_best']:.2f}x",
                      "ok" if r["check_after_step_1"]["ok"] else "MISMATCH"])
    out.append(md_table(header, table))
    out.append("\nTargets: kernel/twin >= 0.9 for every algorithm; kernel/peer as listed.  'kernel' calls "
               "`dispatch.run(dispatch.update(variant), 'compiled', ...)` on flat buffers; 'class' is `ShardedOptimizer.step()` "
               "on one parameter of the same size (one process).  'met' uses the medians; the best-of column "
               "gives the same ratios from each candidate's fastest repetition (the machine is shared: other jobs "
               "preempt one of the two OpenMP threads and stall a whole kernel call).\n")
    bd = payload.get("class_breakdown")
    if bd:
        out.append("## Where `ShardedOptimizer.step()` spends time beyond the kernel (adamw)\n")
        out.append(md_table(["part", "median ms", "p25 ms", "p75 ms"],
                            [[k, v["median"] * 1e3, v["p25"] * 1e3, v["p75"] * 1e3] for k, v in bd.items()]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=16 * 2**20)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="kernel_bench", help="results file stem under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # before any compile: a thread-count change recompiles
    numel = int(args.numel)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(numel, generator=gen) * 0.1
    g = torch.randn(numel, generator=gen) * 1e-2
    rows = []
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        row = bench_case(name, numel, args.reps, args.warmup, p0, g)
        rows.append(row)
        print(f"{name:9s} kernel/twin {row['kernel_over_twin_speed']:.2f}  kernel/peer "
              f"{row['kernel_over_peer_speed']:.2f}x  class/peer {row['class_over_peer_speed']:.2f}x  "
              f"check {'ok' if row['check_after_step_1']['ok'] else 'MISMATCH'}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    breakdown = class_breakdown(numel, args.reps, p0, g)
    command = "python bench/kernel_bench.py" + "".join(
        f" --{k} {v}" for k, v in (("numel", args.numel), ("reps", args.reps), ("cases", args.cases))
        if str(v) != str(ap.get_default(k)))
    payload = {"benchmark": "kernel_bench", "command": command, "numel": numel, "reps": args.reps,
               "warmup": args.warmup, "environment": environment(), "results": rows,
               "class_breakdown": breakdown}
    write_json(args.out, payload)
    write_markdown(args.out, markdown(payload))
    plot(rows, plot_path(args.out))
    print(markdown(payload))


if __name__ == "__main__":
    main()
