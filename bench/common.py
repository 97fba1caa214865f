"""Shared helpers for the benchmarks: interleaved timing, environment facts, result files.

Timing rule (DESIGN.md section 5): every candidate is timed in the same process, repetitions interleaved
(A, B, C, A, B, C, ...; the order rotates each round so no candidate always runs first), and we report medians
and paired ratios (:func:`paired_ratio`).  Absolute times on a shared machine are only indicative.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # run as `python bench/x.py` from the repository root
    sys.path.insert(0, str(REPO))


def interleaved(fns: dict[str, Callable[[], object]], reps: int, *, timer: Callable[[Callable[[], object]], float]
                | None = None) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, interleaved and rotated; return seconds per call per name."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    timer = timer or wall_time
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(timer(fns[name]))
    return out


def wall_time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(peer: list[float], ours: list[float]) -> float:
    """Median over rounds of ``peer / ours`` measured in the same round: each round times every candidate back to
    back, so a slow phase of a shared machine (seconds long here) scales both sides of a round's ratio alike, where
    a ratio of two medians mixes rounds from different phases (it moved single ratios by up to a third between
    runs of the same code on the 2-core CPU)."""
    return median([p / o for p, o in zip(peer, ours, strict=True)])


def spread(xs: list[float]) -> dict[str, float]:
    """Median plus the interquartile range, for the JSON files."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": q[1] if len(xs) >= 2 else xs[0], "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1],
            "n": len(xs)}


def _git_state() -> dict[str, object]:
    """Which engine was measured: HEAD and the files of the package that differ from it (the tree is shared)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sharded_optim"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"git_head": head, "uncommitted_package_files": [ln[3:] for ln in dirty if ln.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment() -> dict[str, object]:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **_git_state()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def write_markdown(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def grouped_bars(name: str, panels: list[tuple[str, str, list[str], dict[str, list[float]], float | None]]) -> Path:
    """``bench/results/<name>.png``: one bar chart per panel ``(title, y label, categories, {series: values},
    reference line or None)``, the series side by side within each category."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, categories, series, line) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar([k + (i - (len(series) - 1) / 2) * width for k in range(len(categories))], values, width,
                   label=label)
        if line is not None:
            ax.axhline(line, color="k", ls="--", lw=1)
        ax.set_xticks(list(range(len(categories))), categories)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = plot_path(name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
