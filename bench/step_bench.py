"""The step users call, against torch's best optimizers in the same run (issue 21).

What is timed is one iteration of the loop a user runs, not the kernel::

    opt.zero_grad()                      # set_to_none=True, torch's default
    produce_gradients()                  # a backward that hands every parameter a fresh gradient
    clip(1.0)                            # optional: ours opt.clip_grad_norm_, torch's clip_grad_norm_(foreach=True)
    opt.step()

``produce_gradients`` is one autograd node whose backward returns every gradient from one multi-tensor multiply
(fresh tensors, as a model's backward hands them over, through the same AccumulateGrad nodes), so the model's own
arithmetic does not dilute the comparison yet nothing is missing from the optimizer's side of the step.

Candidates, interleaved round by round (medians): ``ours`` (``ShardedOptimizer``, adamw, one process; on CUDA the
device path), torch ``AdamW(fused=True)``, torch ``AdamW(foreach=True)``, and with ``--compiled-peer`` torch's
compiled optimizer (``torch.compile(opt.step)`` over foreach AdamW; its compile time is reported).  Workloads: one
big tensor, a GPT-like parameter list (CUDA: GPT-2-medium shapes, 289 tensors, 354M; CPU: 100 tensors, 8.9M), a
small model (20 tensors, 0.66M) for latency, each with and without clipping, and ours with statistics every step
against none; DiffGrad and DiffMod (which torch lacks) against torch-optimizer's DiffGrad and the DiffMod
reference, both eager.  On CUDA the small model is also timed as a CUDA-graph replay (ours ``capturable=True``, torch
``fused=True, capturable=True``).  Ratios are peer time / our time, the median over rounds of each round's
ratio (:func:`paired_ratio`): above 1 means we are faster.

    python bench/step_bench.py                       # CPU, results in bench/results/step_bench_cpu.*
    python bench/step_bench.py --device cuda --compiled-peer   # on a GPU: bench/results/step_bench_cuda.*
    python bench/step_bench.py --quick               # a smoke run with small sizes (nothing written)
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from common import environment, md_table, median, paired_ratio, plot_path, spread, write_json, write_markdown
from sharded_optim import ShardedOptimizer

LR, WD = 1e-3, 1e-2


def gpt_shapes(d: int, layers: int, vocab: int, wpe: int | None, head_ln: bool) -> list[tuple[int, ...]]:
    """GPT-2 parameter shapes: embeddings, per layer LN/attention/LN/MLP weights and biases, final LN."""
    shapes: list[tuple[int, ...]] = [(vocab, d)] + ([(wpe, d)] if wpe else [])
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + ([(d,), (d,)] if head_ln else [])


def workloads(device: str, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    if quick:
        return {"big": [(1 << 16,)], "gpt": gpt_shapes(64, 2, 512, 128, True), "small": [(64, 64), (64,)] * 10}
    small = [(256, 256), (256,)] * 10   # 20 tensors, 0.66M
    if device == "cuda":
        # GPT-2 medium with a tied head and no position table: 289 tensors, 354M parameters
        return {"big": [(256 << 20,)], "gpt": gpt_shapes(1024, 24, 50304, None, False), "small": small}
    return {"big": [(16 << 20,)], "gpt": gpt_shapes(256, 8, 9088, 1024, True), "small": small}


class _Produce(torch.autograd.Function):
    """Backward hands every parameter a fresh gradient ``c_i * g`` from one multi-tensor multiply."""

    @staticmethod
    def forward(ctx: Any, coeffs: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.coeffs = coeffs
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return (None, *torch._foreach_mul(ctx.coeffs, g))


class Loop:
    """One candidate: its own parameters, gradient coefficients and optimizer; ``__call__`` is one iteration."""

    def __init__(self, name: str, shapes: list[tuple[int, ...]], device: str, clip: bool, make: Callable):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.name, self.clip = name, clip
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for s in shapes]
        self.coeffs = [torch.randn(s, generator=gen).to(device) * 1e-3 for s in shapes]
        self.opt, self.clip_fn, self.step_fn = make(self.params)
        self.compile_s = 0.0

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        _Produce.apply(self.coeffs, *self.params).backward()
        if self.clip:
            self.clip_fn(1.0)
        self.step_fn()


def ours(stats_interval: int = 0, capturable: bool = False, algorithm: str = "adamw") -> Callable:
    def make(params: list[torch.Tensor]) -> tuple:
        wd = {"weight_decay": WD} if algorithm == "adamw" else {}
        opt = ShardedOptimizer(params, algorithm=algorithm, lr=LR, stats_interval=stats_interval,
                               capturable=capturable, **wd)
        return opt, opt.clip_grad_norm_, opt.step
    return make


def eager_peer(algorithm: str) -> Callable:
    """The peers of the algorithms torch lacks: torch-optimizer's DiffGrad, the DiffMod reference (both eager)."""
    def make(params: list[torch.Tensor]) -> tuple:
        if algorithm == "diffgrad":
            import torch_optimizer
            opt = torch_optimizer.DiffGrad(params, lr=LR)
        else:
            from authors_optim import AuthorsDiffMod
            opt = AuthorsDiffMod(params, lr=LR)
        clip = lambda m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True)   # noqa: E731
        return opt, clip, opt.step
    return make


def torch_adamw(**kwargs: Any) -> Callable:
    def make(params: list[torch.Tensor]) -> tuple:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **kwargs)
        clip = lambda m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True)   # noqa: E731
        return opt, clip, opt.step
    return make


def torch_compiled(params: list[torch.Tensor]) -> tuple:
    # torch's compiled-optimizer recipe with a constant lr (a tensor lr needs capturable=True with foreach)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True)
    step = torch.compile(opt.step, fullgraph=False)
    clip = lambda m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True)   # noqa: E731
    return opt, clip, step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_loops(loops: dict[str, Loop], device: str, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per iteration: ``iters`` iterations between synchronisations, candidates interleaved per round."""
    for loop in loops.values():
        _sync(device)
        t0 = time.perf_counter()
        loop()   # the first call compiles (ours and the compiled peer)
        _sync(device)
        loop.compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            loop()
    out: dict[str, list[float]] = {n: [] for n in loops}
    names = list(loops)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                loops[name]()
            _sync(device)
            out[name].append((time.perf_counter() - t0) / iters)
    return out


def graph_replay(make: Callable, shapes: list[tuple[int, ...]], rounds: int, iters: int) -> list[float]:
    """The whole iteration (zero_grad excluded: the graph owns its gradients) captured once, replayed."""
    loop = Loop("graph", shapes, "cuda", False, make)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            loop()
    torch.cuda.current_stream().wait_stream(stream)
    loop.opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _Produce.apply(loop.coeffs, *loop.params).backward()
        loop.step_fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    return times


def run(device: str, quick: bool, compiled_peer: bool, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    loads = workloads(device, quick)
    iters = {"big": 5, "gpt": 5, "small": 50} if device == "cuda" else {"big": 3, "gpt": 3, "small": 20}
    for workload, shapes in loads.items():
        for clip in (False, True):
            makers: dict[str, Callable] = {"ours": ours(), "torch_fused": torch_adamw(fused=True),
                                           "torch_foreach": torch_adamw(foreach=True)}
            if compiled_peer and workload != "big" and not clip:   # each compile of the GPT list takes minutes
                makers["torch_compiled"] = torch_compiled
            loops = {n: Loop(n, shapes, device, clip, m) for n, m in makers.items()}
            times = time_loops(loops, device, rounds, iters[workload], warmup=2)
            key = f"{workload}{'_clip' if clip else ''}"
            results[key] = {
                "tensors": len(shapes), "numel": sum(torch.Size(s).numel() for s in shapes), "clip": clip,
                "seconds": {n: spread(t) for n, t in times.items()},
                "ratio_vs_ours": {n: paired_ratio(t, times["ours"]) for n, t in times.items() if n != "ours"},
                "first_call_s": {n: loop.compile_s for n, loop in loops.items()}}
            print(key, {n: f"{median(t) * 1e3:.3f} ms" for n, t in times.items()},
                  {n: f"{r:.2f}x" for n, r in results[key]["ratio_vs_ours"].items()}, flush=True)
            del loops
            if device == "cuda":
                torch.cuda.empty_cache()
    for algorithm in ("diffgrad", "diffmod"):   # the family members torch lacks, against their eager peers
        loops = {"ours": Loop("ours", loads["gpt"], device, False, ours(algorithm=algorithm)),
                 "eager_peer": Loop("eager_peer", loads["gpt"], device, False, eager_peer(algorithm))}
        times = time_loops(loops, device, rounds, iters["gpt"], warmup=2)
        results[f"gpt_{algorithm}"] = {"seconds": {n: spread(t) for n, t in times.items()},
                                       "peer_over_ours": paired_ratio(times["eager_peer"], times["ours"])}
        print(f"gpt_{algorithm}", f"{results[f'gpt_{algorithm}']['peer_over_ours']:.2f}x", flush=True)
        del loops
    shapes = loads["gpt"]
    loops = {"stats_0": Loop("stats_0", shapes, device, False, ours(0)),
             "stats_1": Loop("stats_1", shapes, device, False, ours(1))}
    times = time_loops(loops, device, rounds, iters["gpt"], warmup=2)
    results["gpt_stats"] = {"seconds": {n: spread(t) for n, t in times.items()},
                            "stats_1_over_0": paired_ratio(times["stats_1"], times["stats_0"])}
    print("gpt_stats", f"{results['gpt_stats']['stats_1_over_0']:.3f}x", flush=True)
    del loops
    if device == "cuda":
        small = loads["small"]
        ours_g = graph_replay(ours(capturable=True), small, rounds, 200)
        torch_g = graph_replay(torch_adamw(fused=True, capturable=True), small, rounds, 200)
        results["small_graph"] = {"seconds": {"ours": spread(ours_g), "torch_fused_capturable": spread(torch_g)},
                                  "ratio_vs_ours": {"torch_fused_capturable": median(torch_g) / median(ours_g)}}
        print("small_graph", results["small_graph"]["ratio_vs_ours"], flush=True)
    return results


def report(device: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    env = environment()
    name = f"step_bench_{device}"
    cmd = f"python bench/step_bench.py --device {device}" + (" --compiled-peer" if args.compiled_peer else "") + \
        f" --rounds {args.rounds}"
    write_json(name, {"command": cmd, "environment": env, "results": results})
    rows = []
    for key, r in results.items():
        if "ratio_vs_ours" not in r or key == "small_graph" or "tensors" not in r:
            continue
        ours_ms = r["seconds"]["ours"]["median"] * 1e3
        rows.append([key, r["tensors"], f"{r['numel'] / 1e6:.2f}M", f"{ours_ms:.3f}"] +
                    [f"{r['ratio_vs_ours'][n]:.2f}x" if n in r["ratio_vs_ours"] else "-" for n in
                     ("torch_fused", "torch_foreach", "torch_compiled")])
    text = [f"# Step benchmark ({env.get('cuda') or env.get('cpu')})", "",
            f"`{cmd}`; torch {env['torch']}; median seconds per iteration of zero_grad + backward (one fresh "
            "gradient per parameter) + optional clip_grad_norm_(1.0) + step; ratio = median over rounds of peer "
            "time / our time in that round "
            "(> 1: we are faster).", "",
            md_table(["workload", "tensors", "params", "ours ms", "torch fused", "torch foreach", "torch compiled"],
                     rows), "",
            f"Statistics every step (GPT-like list): {results['gpt_stats']['stats_1_over_0']:.3f}x the time of none."]
    peers = {"gpt_diffgrad": "torch-optimizer DiffGrad (eager)", "gpt_diffmod": "the DiffMod reference (eager)"}
    for key, peer in peers.items():
        if key in results:
            text += ["", f"{key[4:]} on the GPT-like list: ours {results[key]['seconds']['ours']['median'] * 1e3:.2f} "
                         f"ms, {peer} {results[key]['seconds']['eager_peer']['median'] * 1e3:.2f} ms "
                         f"({results[key]['peer_over_ours']:.2f}x)."]
    if "small_graph" in results:
        g = results["small_graph"]
        text += ["", f"Small model as a CUDA graph replay: ours {g['seconds']['ours']['median'] * 1e6:.1f} us, torch "
                     f"fused capturable {g['seconds']['torch_fused_capturable']['median'] * 1e6:.1f} us "
                     f"({g['ratio_vs_ours']['torch_fused_capturable']:.2f}x)."]
    compiled = {k: r["first_call_s"].get("torch_compiled") for k, r in results.items()
                if isinstance(r, dict) and "first_call_s" in r and "torch_compiled" in r["first_call_s"]}
    if compiled:
        text += ["", "torch compiled optimizer, first call (compile) seconds: " +
                 ", ".join(f"{k} {v:.1f}" for k, v in compiled.items())]
    write_markdown(name, "\n".join(text))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    peers = ["torch_fused", "torch_foreach", "torch_compiled"]
    keys = [row[0] for row in rows]
    for i, peer in enumerate(peers):
        vals = [results[k]["ratio_vs_ours"].get(peer, 0.0) for k in keys]
        ax.bar([x + i * 0.27 for x in range(len(keys))], vals, width=0.27, label=peer)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.27 for x in range(len(keys))], keys, rotation=20)
    ax.set_ylabel("peer time / our time")
    ax.set_title(f"Whole-step speed vs torch ({env.get('cuda') or 'CPU'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path(name), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written")
    parser.add_argument("--compiled-peer", action="store_true", help="also time torch.compile(opt.step)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_bench: --device cuda but no CUDA device is available")
    results = run(args.device, args.quick, args.compiled_peer, args.rounds)
    if not args.quick:
        report(args.device, results, args)


if __name__ == "__main__":
    main()
