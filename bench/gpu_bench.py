"""Fused-update benchmark on one CUDA GPU (issue 7): achieved HBM bandwidth of every algorithm's update.

For each algorithm, on flat fp32 shards of ``--numel`` elements (default 256M = 1 GiB per tensor), in one process,
interleaved, timed with CUDA events (medians):

* ``kernel``: our compiled update, ``sharded_optim.kernels.dispatch.run(dispatch.update(variant), "compiled", ...)`` (Triton),
  with the host scalars of :func:`sharded_optim.rules.host_scalars`;
* ``twin``: the traffic twin of ``bench/kernel_bench.py`` (same tensors read and written, trivial math);
* ``peer``: torch ``fused=True`` (adam, adamw, amsgrad), torch ``foreach=True`` (adamax, nadam, radam), and for
  adamod/adabound/amsbound, which torch does not have, the eager transcription of the authors' code
  (``bench/authors_optim.py``);
* a device-to-device copy of one shard (``dst.copy_(src)``, 8 bytes per element moved), measured in the same
  run: the practical HBM ceiling.

Achieved bandwidth = ALGORITHMS.md section 0 bytes per element (28 or 36) x numel / time.  Telemetry overhead at
``stats_interval=1``: a statistics step's kernels (the gradient-norm pass that also sums the gradient and the
first moment, the plain update, then the read-only pass over the updated state: what ``ShardedOptimizer`` runs on
a statistics step) timed back to back against a plain step's (the gradient-norm pass, the update), and
``ShardedOptimizer.step()`` with ``stats_interval=1`` against
``stats_interval=0``.

    python bench/gpu_bench.py                                   # on the GPU machine
    python bench/gpu_bench.py --device cpu --numel 1e6 --reps 3 # dry run of the same code path on CPU

Without CUDA (and without ``--device cpu``) it exits with status 2 and says so.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from common import environment, interleaved, md_table, median, plot_path, spread, write_json, write_markdown
from kernel_bench import BYTES_PER_ELEMENT, CASES, TWIN_TARGET, KernelCandidate, TwinCandidate, _param, hyper
from sharded_optim import rules
from sharded_optim.kernels import stats as stats_kernels
from sharded_optim.optimizer import ShardedOptimizer


class Clock:
    """CUDA events on a GPU (the device time of everything ``fn`` enqueues); perf_counter after a
    synchronisation elsewhere (the dry run).  Either way, one call of ``fn`` per measurement."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(numel: int, device: torch.device, clock: Clock, reps: int) -> dict:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    clock.sync()
    t = interleaved({"copy": lambda: dst.copy_(src)}, reps, timer=clock)["copy"]
    del src, dst
    free(device)
    return {"seconds": spread(t), "bytes_per_element": 8, "GBps": 8 * numel / median(t) / 1e9}


def stats_step_callable(kernel: KernelCandidate, algorithm: str, group: dict):
    """A statistics step on the kernel's shard, exactly the kernels ShardedOptimizer runs when stats_interval hits:
    the norm pass with the sums of the gradient and the state before the update (``PRE_SUMS``), the update, then
    the sums of the updated state (``dispatch.post_sums(variant)``; sharded, the optimizer runs it while the next step's
    gradients are reduced, here it runs alone)."""
    from sharded_optim.kernels import dispatch
    hs = rules.host_scalars(algorithm, group, max(kernel.t, 1), initial_lr=group["base_lr"], mu_product=1.0)
    sc = torch.tensor(hs.values, dtype=kernel.p.dtype, device=kernel.p.device)
    gscale = torch.tensor(-1.0 if group.get("maximize", False) else 1.0, dtype=torch.float64, device=kernel.p.device)
    edges = stats_kernels.edges_for(kernel.p.device)

    def step_with_stats():
        dispatch.run(dispatch.PRE_SUMS, "compiled", kernel.g, kernel.state[0], gscale, True)  # finite gradients
        kernel.step()
        dispatch.run(dispatch.post_sums(kernel.variant), "compiled", kernel.p, *kernel.state, sc, edges)
    return step_with_stats


def plain_step_callable(kernel: KernelCandidate):
    """A step without statistics: the optimizer's gradient-norm pass (``stats.sumsq``), then the update."""
    def step():
        stats_kernels.sumsq(kernel.g)
        kernel.step()
    return step


def bench_case(name: str, numel: int, reps: int, warmup: int, p0: torch.Tensor, g: torch.Tensor,
               clock: Clock, with_class: bool) -> dict:
    algorithm, options, peer_name, peer_factory, _cpu_target = CASES[name]
    group = hyper(algorithm, options)
    variant = rules.kernel_variant(algorithm, group)
    n_state = len(rules.state_keys(algorithm, group))
    device = p0.device
    kernel = KernelCandidate(algorithm, group, p0, g)
    twin = TwinCandidate(variant, n_state, p0, g)
    peer_param = _param(p0, g)
    peer = peer_factory([peer_param], group)
    kernel.step()
    peer.step()
    twin.step()
    clock.sync()
    scale = float((peer_param.detach() - p0).abs().max())
    diff = float((kernel.p - peer_param.detach()).abs().max())
    check = {"update_max_abs": scale, "kernel_vs_peer_max_abs": diff, "ok": diff <= 1e-3 * scale + 1e-7}
    fns = {"twin": twin.step, "kernel": kernel.step, "peer": peer.step,
           "kernel_with_norm": plain_step_callable(kernel),
           "kernel_with_stats": stats_step_callable(kernel, algorithm, group)}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    clock.sync()
    times = interleaved(fns, reps, timer=clock)
    del kernel, twin, peer, peer_param
    free(device)
    med = {k: median(v) for k, v in times.items()}
    bpe = BYTES_PER_ELEMENT[variant]
    row = {"case": name, "algorithm": algorithm, "options": options, "variant": variant, "peer": peer_name,
           "bytes_per_element": bpe, "numel": numel, "check_after_step_1": check,
           "seconds": {k: spread(v) for k, v in times.items()},
           "GBps": {k: bpe * numel / med[k] / 1e9 for k in ("twin", "kernel", "peer")},
           "kernel_over_twin_speed": med["twin"] / med["kernel"],
           "kernel_over_peer_speed": med["peer"] / med["kernel"],
           "stats_step_over_update": med["kernel_with_stats"] / med["kernel_with_norm"]}
    if with_class:
        row["class_stats"] = class_stats(name, algorithm, options, group, p0, g, reps, warmup, clock)
    return row


def class_stats(name, algorithm, options, group, p0, g, reps, warmup, clock) -> dict:
    """ShardedOptimizer.step() with statistics every step vs never (one process, no sharding)."""
    out: dict = {}
    try:
        params = {k: _param(p0, g) for k in ("stats_interval=0", "stats_interval=1")}
        opts = {k: ShardedOptimizer([params[k]], algorithm=algorithm, lr=group["lr"], kernel="compiled",
                                    stats_interval=int(k[-1]), **options) for k in params}
        fns = {k: o.step for k, o in opts.items()}
        for _ in range(warmup + 1):
            for fn in fns.values():
                fn()
        clock.sync()
        times = interleaved(fns, reps, timer=clock)
        out = {k: spread(v) for k, v in times.items()}
        out["ratio"] = median(times["stats_interval=1"]) / median(times["stats_interval=0"])
    except Exception as exc:  # reported, not fatal: the other numbers of the run are still worth having
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
    finally:
        params = opts = fns = None
        free(p0.device)
    return out


def markdown(payload: dict) -> str:
    env = payload["environment"]
    dev = env["cuda"] or f"CPU dry run ({env['cpu']}, {env['torch_threads']} threads)"
    copy = payload["copy"]
    out = ["# Fused update benchmark (GPU)\n",
           f"`{payload['command']}`: {payload['numel']:,} fp32 elements per shard on {dev}, torch {env['torch']}; "
           f"{payload['reps']} interleaved repetitions, {payload['timer']}, medians.  Device-to-device copy of one "
           f"shard: **{copy['GBps']:.1f} GB/s** (8 B/element).  GB/s = ALGORITHMS.md bytes/element x numel / "
           "time.\n"]
    header = ["case", "B/elem", "kernel GB/s", "% of copy", "twin GB/s", "peer GB/s", "kernel/twin", "peer",
              "kernel/peer", "stats step / update", "step(stats=1) / step(stats=0)", "step-1 check"]
    rows = []
    for r in payload["results"]:
        cs = r.get("class_stats", {})
        cls = "-" if not cs else (f"{cs['ratio']:.2f}" if "ratio" in cs else "ERROR: " + cs["error"][:60])
        rows.append([r["case"], r["bytes_per_element"], r["GBps"]["kernel"],
                     f"{100 * r['GBps']['kernel'] / copy['GBps']:.0f}%", r["GBps"]["twin"], r["GBps"]["peer"],
                     f"{r['kernel_over_twin_speed']:.2f}", r["peer"], f"{r['kernel_over_peer_speed']:.2f}x",
                     f"{r['stats_step_over_update']:.2f}", cls,
                     "ok" if r["check_after_step_1"]["ok"] else "MISMATCH"])
    out.append(md_table(header, rows))
    out.append(f"\nkernel/twin target (issue 2): >= {TWIN_TARGET}.  'stats step' = a statistics step's kernels "
               "(the norm pass with the statistics sums, the update, the read-back of the updated state) over a plain "
               "step's (the norm pass, the update); 'step(stats=1)/step(stats=0)' = `ShardedOptimizer.step()` with "
               "statistics every step vs never.\n")
    return "\n".join(out)


def plot(payload: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = payload["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    x = range(len(rows))
    w = 0.27
    for i, key in enumerate(("twin", "kernel", "peer")):
        ax1.bar([k + (i - 1) * w for k in x], [r["GBps"][key] for r in rows], w, label=key)
    ax1.axhline(payload["copy"]["GBps"], color="k", ls="--", lw=1, label="device copy")
    ax1.set_xticks(list(x), [r["case"] for r in rows], rotation=30)
    ax1.set_ylabel("achieved GB/s (algorithmic bytes / time)")
    ax1.set_title(f"{payload['numel'] / 2**20:.0f}Mi fp32 elements")
    ax1.legend(fontsize=8)
    ax2.bar(list(x), [r["stats_step_over_update"] for r in rows])
    ax2.set_xticks(list(x), [r["case"] for r in rows], rotation=30)
    ax2.set_ylabel("statistics pass time / update time")
    ax2.set_title("telemetry at stats_interval=1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu = dry run of the same code")
    ap.add_argument("--numel", type=float, default=256 * 2**20)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-class", action="store_true", help="skip the ShardedOptimizer stats_interval comparison")
    ap.add_argument("--out", default=None, help="results stem under bench/results/ (default gpu_bench, or "
                                                "gpu_bench_cpu_dryrun with --device cpu)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA device and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}).  Run it on the GPU machine, or try the code path on CPU with "
              "`python bench/gpu_bench.py --device cpu --numel 1e6 --reps 3`.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    numel = int(args.numel)
    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(0)
    p0 = torch.randn(numel, generator=gen, device=device) * 0.1
    g = torch.randn(numel, generator=gen, device=device) * 1e-2
    copy = copy_bandwidth(numel, device, clock, args.reps)
    print(f"device copy: {copy['GBps']:.1f} GB/s", flush=True)
    rows = []
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        row = bench_case(name, numel, args.reps, args.warmup, p0, g, clock, not args.no_class)
        rows.append(row)
        cs = row.get("class_stats", {})
        print(f"{name:9s} kernel {row['GBps']['kernel']:.1f} GB/s ({row['GBps']['kernel'] / copy['GBps']:.0%} of "
              f"copy)  kernel/twin {row['kernel_over_twin_speed']:.2f}  kernel/peer "
              f"{row['kernel_over_peer_speed']:.2f}x  stats/update {row['stats_step_over_update']:.2f}  "
              f"class stats=1/0 {cs.get('ratio', cs.get('error', '-'))}  "
              f"check {'ok' if row['check_after_step_1']['ok'] else 'MISMATCH'}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out = args.out or ("gpu_bench" if device.type == "cuda" else "gpu_bench_cpu_dryrun")
    command = "python bench/gpu_bench.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("device", "numel", "reps", "cases")
        if str(getattr(args, k)) != str(ap.get_default(k)))
    payload = {"benchmark": "gpu_bench", "command": command, "numel": numel, "reps": args.reps,
               "warmup": args.warmup, "device": str(device),
               "timer": "CUDA events" if device.type == "cuda" else "perf_counter (dry run)",
               "environment": environment(), "copy": copy, "results": rows}
    write_json(out, payload)
    write_markdown(out, markdown(payload))
    plot(payload, plot_path(out))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
