"""The CPU multi-tensor update (``native_cpu.c``): the fused step reading every gradient where autograd left it.

On one rank the parameters and the optimizer state are flat buffers, but each parameter's gradient is a tensor of
its own.  The compiled kernels read one flat gradient, so a step either copied every gradient into it (8 of the
~36 bytes per element a step moves, plus a kernel launch of ~0.3 ms host time per extra run on a 2-core CPU) or
called the kernel once per parameter.  This kernel takes a table of gradient segments instead, as torch's fused
optimizers take tensor lists: one call per run, no copy.  Its arithmetic is bitwise that of the compiled kernels
(see the C source; ``tests/test_native_cpu.py`` checks it), so which kernel runs never changes a result.

The library is built once per machine with the system C compiler (``$CC``, else ``cc``; under a second) into
``$SHARDED_OPTIM_CACHE_DIR`` (default ``~/.cache/sharded_optim``), keyed by the source, the flags, the compiler
and the CPU (``-march=native``).  Where no compiler works, one warning says so and the compiled kernels read a
flat gradient as before.  ``SHARDED_OPTIM_NATIVE_CPU=0`` turns the kernel off, and with it the 8-bit and bf16
state updates of :mod:`.native_int8` and :mod:`.native_bf16`, built into the same library.
"""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .. import rules
from ..telemetry.fields import EFF_LR_EDGES
from .stats import POST_FIELDS, PRE_FIELDS, add_post_sums, add_pre_sums

SOURCE = Path(__file__).with_name("native_cpu.c")
# one library from every source: the fp32 kernels here, the 8-bit and bf16 state updates (native_int8.py,
# native_bf16.py), what they share
SOURCES = (SOURCE, SOURCE.with_name("native_int8.c"), SOURCE.with_name("native_bf16.c"),
           SOURCE.with_name("native_common.h"))
ENV_VAR = "SHARDED_OPTIM_NATIVE_CPU"
CACHE_ENV_VAR = "SHARDED_OPTIM_CACHE_DIR"
# -ffp-contract=off as Inductor's CPU code: no FMA contraction, so the bits match the compiled kernels;
# -fno-math-errno lets sqrtf vectorise (it stays correctly rounded)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11")

# the variants the C kernel implements, by its enum value; diffGrad's friction (exp) stays with the compiled kernels
VARIANT_IDS = {"adam_mv": 0, "adam_mvx": 1, "bound_mv": 2, "bound_mvx": 3, "bound_mvs": 4, "bound_mvxs": 5,
               "adamax_mu": 6}
# state tensors in kernel argument order -> the C kernel's (m, v, x, s) slots
_SLOTS = {"adam_mv": (0, 1), "adam_mvx": (0, 1, 2), "bound_mv": (0, 1), "bound_mvx": (0, 1, 2),
          "bound_mvs": (0, 1, 3), "bound_mvxs": (0, 1, 2, 3), "adamax_mu": (0, 2)}
# the sums of a statistics step's update (the C enum NUMEL ...): stats.PRE_FIELDS, then POST_FIELDS without diffGrad's
# friction (no native diffGrad kernel)
SUM_FIELDS = PRE_FIELDS + tuple(f for f in POST_FIELDS if not f.startswith("friction"))
STATS_BLOCK, STATS_LANES = 256, 16   # the C source's: a block's terms go to 16 float32 lanes, then float64
_LANE_TERMS = STATS_BLOCK // STATS_LANES   # k: terms a lane adds in float32 (fmaf for products) before float64
# gamma_k (k roundings per lane) + u (the separate passes round each product first): the fused sums' distance from
# the separate passes', in units of the sum of the terms' magnitudes
STATS_BLOCK_GAMMA = _LANE_TERMS * 2.0**-24 / (1 - _LANE_TERMS * 2.0**-24) + 2.0**-24
_EDGES = torch.tensor(EFF_LR_EDGES, dtype=torch.float64).to(torch.float32)   # compared in float32, as stats.py does
SCALAR_ORDER = (rules.GSCALE, rules.L2, rules.DECAY, rules.W1, rules.B2, rules.W2, rules.STEP, rules.DSCALE,
                rules.EPS, rules.LO, rules.HI, rules.B3, rules.W3, rules.CG)   # the C enum, checked by the tests


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _compiler() -> str | None:
    name = os.environ.get("CC") or "cc"
    return shutil.which(name) or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [path.read_text() for path in SOURCES]
    key = hashlib.sha256("\0".join([*texts, " ".join(FLAGS), version, _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "sharded_optim")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"native_cpu-{key[:20]}.so"
    if not target.exists():
        # build beside the target and rename: ranks building at once each publish a whole file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            units = [str(path) for path in SOURCES if path.suffix == ".c"]
            subprocess.run([cc, *FLAGS, *units, "-o", tmp, "-lm"], capture_output=True, text=True, check=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (no compiler, a failed build: warned once)."""
    cc = _compiler()
    try:
        if cc is None:
            raise FileNotFoundError("no C compiler found ($CC, cc, gcc, clang)")
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(f"sharded_optim: the CPU multi-tensor kernel could not be built ({detail}); one-rank CPU steps "
                      f"copy gradients into a flat buffer instead, and bf16/int8 state runs the compiled kernels",
                      RuntimeWarning, stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sharded_optim_update.argtypes = [ctypes.c_int, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int,
                                         ctypes.c_float, ptr, ptr]
    lib.sharded_optim_sumsq.argtypes = [i64, ptr, ptr, ctypes.c_int]
    lib.sharded_optim_update_int8.argtypes = [ctypes.c_int, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.sharded_optim_update_bf16.argtypes = [ctypes.c_int, i64, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    return lib


def enabled() -> bool:
    """Whether one-rank CPU runtimes read every gradient in place (the kernel is on and built)."""
    return os.environ.get(ENV_VAR, "1") != "0" and library() is not None


def segment_table(rows: list[tuple[int, Tensor, Tensor | None]], flat_param: Tensor | None = None) -> Tensor:
    """The kernel's table, one row per segment ``(offset, gradient, parameter)``: ``offset`` into the flat state,
    a float32 CPU gradient, and the parameter values it updates: a tensor of their own (same size), or None for
    ``flat_param`` at ``offset``.  The tensors must stay alive until the kernel has run (the caller holds them)."""
    flat_ptr = None
    if flat_param is not None:
        flat_ptr = _check_flat("flat_param", flat_param, max((o + g.numel() for o, g, q in rows if q is None),
                                                             default=0))
    out = array.array("q")   # built flat and wrapped: a tensor from nested tuples costs 4x more per step
    for offset, g, param in rows:
        n = g.numel()
        grad_ptr = _check_segment("gradient", g, n)
        if param is None:
            if flat_ptr is None:
                raise ValueError("native_cpu: a segment without parameter tensor needs flat_param")
            out.extend((offset, n, grad_ptr, flat_ptr + 4 * offset))
        else:
            out.extend((offset, n, grad_ptr, _check_segment("parameter", param, n)))
    return _wrap(out)


def _wrap(rows: array.array) -> Tensor:
    """The (n, 4) int64 table over ``rows`` (the tensor keeps the array alive)."""
    return torch.frombuffer(rows, dtype=torch.int64).reshape(-1, 4) if rows else torch.zeros(0, 4, dtype=torch.int64)


def _check_segment(name: str, t: Tensor, numel: int) -> int:
    if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"native_cpu: each {name} must be a contiguous float32 CPU tensor of {numel} elements, got "
                         f"{t.dtype} on {t.device}, {t.numel()} elements (contiguous: {t.is_contiguous()})")
    return t.data_ptr()


def _check_flat(name: str, t: Tensor, end: int) -> int:
    if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or t.numel() < end:
        raise ValueError(f"native_cpu: {name} must be a contiguous float32 CPU tensor of at least {end} elements, "
                         f"got {t.dtype} on {t.device}, {t.numel()} elements (contiguous: {t.is_contiguous()})")
    return t.data_ptr()


def update(variant: str, table: Tensor, state: tuple[Tensor, ...], sc: Tensor, stats: bool = False,
           gsign: float = 1.0, base: int = 0) -> Tensor | None:
    """Run the fused update of ``variant`` over the segments of ``table`` (:func:`segment_table`, or rows of
    :func:`slot_table`): ``state`` (kernel argument order) is flat, a row's state at its offset minus ``base``; ``sc``
    the host scalars (:mod:`sharded_optim.rules`).  The rows are bounds-checked against the state in C (one loop;
    the tensor arithmetic that did it here cost more than a small step's kernel).

    ``stats=True`` (a statistics step) also returns the :data:`SUM_FIELDS` sums from the same pass: those of the
    gradient (times ``gsign``, the sign the update applies) and of the first moment before the update, and those of
    the updated state and the step sizes, as :mod:`.stats` computes them in two more passes.  Counts are exact; sums
    add lanes of ``STATS_BLOCK / STATS_LANES`` terms summed in float32 in float64, where :mod:`.stats` adds every
    float32 term in float64: within :data:`STATS_BLOCK_GAMMA` times the sum of the terms' magnitudes of that.
    ``gsign`` is 1 or -1 (``maximize``)."""
    if gsign not in (1.0, -1.0):
        raise ValueError(f"native_cpu.update: gsign must be 1.0 or -1.0 (the sign of a maximize step), got {gsign!r}")
    lib = library()
    if lib is None or variant not in VARIANT_IDS:
        raise ValueError(f"native_cpu: variant {variant!r} has no native kernel here "
                         f"(built: {lib is not None}; variants: {sorted(VARIANT_IDS)})")
    if table.dtype is not torch.int64 or table.dim() != 2 or table.shape[1] != 4 or not table.is_contiguous():
        raise ValueError(f"native_cpu: the table must be a contiguous int64 tensor of rows of 4 (segment_table), got "
                         f"{table.dtype} of shape {tuple(table.shape)}")
    slots: list[int | None] = [None] * 4
    for tensor, slot in zip(state, _SLOTS[variant], strict=True):
        slots[slot] = _check_flat("state", tensor, 0)
    nstate = min(t.numel() for t in state)
    scalars = sc.to(torch.float32).contiguous()
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64) if stats else None
    rc = lib.sharded_optim_update(VARIANT_IDS[variant], len(table), table.data_ptr(), base, nstate, *slots,
                                  scalars.data_ptr(), torch.get_num_threads(), gsign, _EDGES.data_ptr(),
                                  None if sums is None else sums.data_ptr())
    if rc == -2:
        end = int((table[:, 0] - base + table[:, 1]).max())
        _check_flat("state", min(state, key=Tensor.numel), end)   # raises, naming the size the rows need
        raise ValueError(f"native_cpu: a table row starts before the state (offset below base {base})")
    if rc != 0:
        raise MemoryError("native_cpu: the update could not allocate its work list")
    return sums


def slot_table(offsets: list[int], numels: list[int], grad: Tensor, master: Tensor, direct: dict[int, Tensor]
               ) -> Tensor:
    """A one-rank runtime's table for one step, one row per parameter slot in slot order: the slot's offset into
    the flat buffers, its length, its gradient (``direct[s]``, read where autograd left it, or else the slot's
    region of the flat ``grad``) and its region of ``master``.  Built once per step and shared by the norm
    (:func:`sumsq_table`) and the update runs (row slices): one loop over the slots, no per-row checks (the
    caller made the direct gradients float32 and contiguous; the flat buffers are checked here)."""
    end = max((offset + numel for offset, numel in zip(offsets, numels)), default=0)
    base_g, base_p = _check_flat("grad", grad, end), _check_flat("master", master, end)
    rows = array.array("q")
    for s, (offset, numel) in enumerate(zip(offsets, numels)):
        g = direct.get(s)
        rows.extend((offset, numel, base_g + 4 * offset if g is None else g.data_ptr(), base_p + 4 * offset))
    return _wrap(rows)


def sumsq(grads: list[Tensor]) -> Tensor:
    """Sum of squares of every tensor of ``grads`` (float32, CPU, contiguous) in float64, in one call: deterministic,
    independent of the thread count."""
    rows = array.array("q")
    for g in grads:   # offset and parameter columns are not read
        rows.extend((0, g.numel(), _check_segment("gradient", g, g.numel()), 0))
    return sumsq_table(_wrap(rows))


def sumsq_table(table: Tensor) -> Tensor:
    """:func:`sumsq` of the gradient segments of a table (:func:`segment_table`, :func:`slot_table`)."""
    lib = library()
    if lib is None:
        raise ValueError("native_cpu: the kernel library is not built")
    out = torch.zeros((), dtype=torch.float64)
    if len(table) and lib.sharded_optim_sumsq(len(table), table.data_ptr(), out.data_ptr(),
                                              torch.get_num_threads()) != 0:
        raise MemoryError("native_cpu: the sum of squares could not allocate its work list")
    return out


def add_sums(out: Tensor, sums: Tensor, lr: float) -> None:
    """Add a statistics update's :data:`SUM_FIELDS` sums to the statistics row ``out``, as the separate passes'
    :func:`.stats.add_pre_sums` and :func:`.stats.add_post_sums` do (the friction fields stay zero)."""
    n_pre = len(PRE_FIELDS)
    add_pre_sums(out, sums[:n_pre])
    add_post_sums(out, torch.cat([sums[n_pre:], sums.new_zeros(len(POST_FIELDS) - (len(SUM_FIELDS) - n_pre))]), lr)
