"""The CPU update with 8-bit state (``sharded_optim.kernels.native_int8``): bitwise the compiled 8-bit kernel.

The reference is the 8-bit kernel's own definition (:func:`sharded_optim.kernels.int8_state.int8_state`) with its
float math run by the fp32 CPU kernel, which ``tests/test_native_cpu.py`` pins bit for bit to the compiled fp32
kernel: decode (integer), update (that kernel), block scale, hash and encode (integer, and one float product), all
eager and exact.  One variant is also checked against the compiled 8-bit kernel itself (one compile per run), in the
kernel and through the optimizer.
"""
from __future__ import annotations

import re

import pytest
import torch

from sharded_optim import ShardedOptimizer, rules
from sharded_optim.kernels import dispatch, int8_state as q8, native_cpu, native_int8
from sharded_optim.kernels.low_precision import random_bits, rounding_salt, state_letters

BLOCKS = 70   # more than one work item of the C kernel (64 blocks)
COMPILED = "bound_mvxs"   # every state slot (m signed; v, x, s non-negative): the one checked against Inductor


def _case(variant: str, w1: float, seed: int) -> tuple:
    """Parameter, gradient (a NaN, an infinity, zeros), codes and scales of states spanning 30 octaves (an all-zero
    block, values at the last level), scalars (``w1`` picks lerp's branch) and the step counter."""
    gen = torch.Generator().manual_seed(seed)
    n = BLOCKS * q8.BLOCK
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-12, 4, (n,), generator=gen).float())
    g[3], g[700], g[1000:1100] = float("nan"), float("inf"), 0.0
    codes, scales = [], []
    for letter in state_letters(variant):
        signed = letter == "m"
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 0, (n,), generator=gen).float())
        x = x if signed else x.abs()
        x[q8.BLOCK: 2 * q8.BLOCK] = 0.0
        c, s = q8.quantize(x, signed, None)
        codes.append(c)
        scales.append(s)
    sc = torch.rand(rules.NUM_SCALARS, generator=gen) * 0.1
    sc[rules.GSCALE], sc[rules.W1], sc[rules.B2], sc[rules.W2] = 0.9, w1, 0.999, 1e-3
    sc[rules.DSCALE], sc[rules.EPS], sc[rules.LO], sc[rules.HI] = 1.0, 1e-8, 1e-3, 5e-2
    return p, g, codes, scales, sc, torch.tensor(70_001, dtype=torch.int64)


def _reference(variant: str, p, g, codes, scales, sc, step) -> None:
    """int8_state.int8_state's update with the fp32 CPU kernel's float math, in place."""
    wide = [q8.dequantize(c, s) for c, s in zip(codes, scales)]
    native_cpu.update(variant, native_cpu.segment_table([(0, g, None)], p), tuple(wide), sc)
    salt = rounding_salt(g, step)
    for position, (c, s, w) in enumerate(zip(codes, scales, wide)):
        new_codes, new_scales = q8.quantize(w, c.dtype == torch.int8, random_bits(w.view(torch.int32), salt, position))
        c.copy_(new_codes)
        s.copy_(new_scales)


def _same_bits(got: list[torch.Tensor], want: list[torch.Tensor], skip: torch.Tensor | None = None) -> None:
    """Byte for byte; ``skip`` (a mask over the elements) leaves those codes out."""
    for i, (a, b) in enumerate(zip(got, want)):
        if skip is not None and a.numel() == skip.numel() and a.dtype != torch.float32:
            a, b = a[~skip], b[~skip]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), \
            f"tensor {i} ({a.dtype}): {int((a.view(torch.uint8) != b.view(torch.uint8)).sum())} bytes differ"


@pytest.mark.parametrize("w1", [0.1, 0.7])
@pytest.mark.parametrize("variant", sorted(native_cpu.VARIANT_IDS))
def test_native_int8_update_is_bitwise_the_kernels_definition(variant, w1):
    p, g, codes, scales, sc, step = _case(variant, w1, seed=len(variant))
    want = [p.clone(), *[c.clone() for c in codes], *[s.clone() for s in scales]]
    _reference(variant, want[0], g, want[1: 1 + len(codes)], want[1 + len(codes):], sc, step)
    native_int8.update(variant, p, g, *codes, *scales, sc, step)
    _same_bits([p, *codes, *scales], want)
    assert p.isnan().any() and any(s.isinf().any() or (s == 1).any() for s in scales)   # NaN/inf went through


def test_native_int8_is_independent_of_the_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p, g, codes, scales, sc, step = _case("adam_mvx", 0.1, seed=3)
            native_int8.update("adam_mvx", p, g, *codes, *scales, sc, step)
            results.append([p, *codes, *scales])
    finally:
        torch.set_num_threads(threads)
    _same_bits(results[0], results[1])


def test_native_int8_is_bitwise_the_compiled_kernel():
    """Bitwise, except the codes of elements whose state became NaN (a NaN gradient): a NaN encodes no number, and
    which NaN bit pattern an operation returns (its sign, its payload) is the compiler's choice, so its code may
    differ; the block's scale (1 for a block holding a NaN) and every other element agree."""
    p, g, codes, scales, sc, step = _case(COMPILED, 0.1, seed=5)
    want = [p.clone(), *[c.clone() for c in codes], *[s.clone() for s in scales]]
    compiled = dispatch._compiled(dispatch.update(COMPILED, "int8"))   # the Inductor kernel, not the dispatcher
    for part in q8.blocked_calls((want[0], g, *want[1:], sc, step), 0, len(codes)):
        compiled(*part)
    native_int8.update(COMPILED, p, g, *codes, *scales, sc, step)
    _same_bits([p, *codes, *scales], want, skip=g.isnan())
    assert (g.isnan() & p.isnan()).any() and (want[0].isnan() == p.isnan()).all()


def _train(monkeypatch, native: bool) -> tuple[torch.Tensor, dict]:
    monkeypatch.setenv(native_cpu.ENV_VAR, "1" if native else "0")
    calls = []
    real = native_int8.update
    monkeypatch.setattr(native_int8, "update", lambda *a: calls.append(a[0]) or real(*a))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = ShardedOptimizer([p], algorithm="adamod", amsgrad=True, lr=1e-2, kernel="compiled",
                           state_precision="int8")
    for step in range(3):
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
        opt.step()
    assert calls == ([COMPILED] * 3 if native else []), calls
    return p.detach().clone(), opt.state_dict()["state"][0]


def test_the_optimizer_runs_it_on_cpu_with_the_compiled_kernels_bits(monkeypatch):
    """``kernel="compiled"`` on CPU: 8-bit updates go to the C kernel (unless SHARDED_OPTIM_NATIVE_CPU=0), and the
    trajectory is bitwise the compiled kernel's."""
    native, compiled = _train(monkeypatch, True), _train(monkeypatch, False)
    assert torch.equal(native[0], compiled[0])
    for key, value in native[1].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(compiled[1][key])), key


def test_eager_mode_and_unsupported_inputs_stay_with_the_torch_kernel(monkeypatch):
    p, g, codes, scales, sc, step = _case("adam_mv", 0.1, seed=7)
    args = (p, g, *codes, *scales, sc, step)
    calls = []
    monkeypatch.setattr(native_int8, "update", lambda *a: calls.append(a[0]))
    dispatch.run(dispatch.update("adam_mv", "int8"), "eager", *args)
    assert calls == []
    dispatch.run(dispatch.update("adam_mv", "int8"), "auto", *args)
    assert calls == ["adam_mv"]
    assert native_int8.accepts("adam_mv", args)
    assert not native_int8.accepts("adam_mvg", args)   # diffGrad: its exp stays with the compiled kernel
    assert not native_int8.accepts("adam_mv", (p[:-1], g[:-1], *args[2:]))   # not a whole number of blocks
    assert not native_int8.accepts("adam_mv", (p.double(), *args[1:]))


def test_mismatched_codes_and_scales_are_refused_by_name():
    p, g, codes, scales, sc, step = _case("adam_mv", 0.1, seed=8)
    with pytest.raises(ValueError, match=r"native_int8: adam_mv takes codes of 17920 elements .* got codes "
                                         r"\[\(17920, torch.uint8\)"):
        native_int8.update("adam_mv", p, g, codes[1], codes[1], *scales, sc, step)
    with pytest.raises(ValueError, match=r"float32 scales of 70 blocks, got .* scales \[\(69, torch.float32\)"):
        native_int8.update("adam_mv", p, g, *codes, scales[0][:-1], scales[1], sc, step)


def test_the_c_side_constants_are_the_python_ones():
    text = native_cpu.SOURCE.with_name("native_int8.c").read_text()
    defines = {name: int(value, 0) for name, value in re.findall(r"#define (\w+) (0x[0-9A-Fa-f]+|\d+)u?\b", text)}
    assert defines["BLOCK"] == q8.BLOCK and defines["SHIFT"] == q8.SHIFT and defines["MIN_NORMAL"] == q8._MIN_NORMAL
    assert defines["EXPONENT"] == q8._EXPONENT and defines["ONE_BITS"] == q8._ONE
