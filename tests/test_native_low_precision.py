"""The CPU updates with bf16 and 8-bit state (``sharded_optim.kernels.native_bf16``, ``native_int8``): bitwise the
compiled kernels.

The reference is each kernel's own definition (:func:`sharded_optim.kernels.low_precision.bf16_state`,
:func:`sharded_optim.kernels.int8_state.int8_state`) with its float math run by the fp32 CPU kernel, which
``tests/test_native_cpu.py`` pins bit for bit to the compiled fp32 kernel; widening, decoding, block scales, the hash
and the rounding are integer operations (and one float product), eager and exact.  One variant per precision is also
checked against the compiled kernel itself (one compile each per run), in the kernel and through the optimizer.
Everywhere bitwise, except what is stored for a NaN: which NaN bit pattern an operation returns (its sign, its
payload) is each implementation's choice, so only NaN-ness is compared there.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

from sharded_optim import ShardedOptimizer, rules
from sharded_optim.kernels import dispatch, int8_state as q8, native_bf16, native_cpu, native_int8
from sharded_optim.kernels.low_precision import STOCHASTIC, random_bits, round_stochastic, rounding_salt, state_letters

BLOCKS = 70   # more than one work item of the C kernels (64 blocks or tiles of 256 elements)
COMPILED = "bound_mvxs"   # every state slot (m signed; v, x, s non-negative): the one checked against Inductor
NATIVE = {"bf16": native_bf16, "int8": native_int8}


def _case(precision: str, variant: str, w1: float, seed: int) -> tuple:
    """Parameter, gradient (a NaN, an infinity, zeros), states spanning 30 octaves (an all-zero block, values at the
    8-bit code's last level) as the kernel takes them (bf16 tensors, or codes then scales), scalars (``w1`` picks
    lerp's branch) and the step counter.  bf16 cases are not a whole number of blocks long."""
    gen = torch.Generator().manual_seed(seed)
    n = BLOCKS * q8.BLOCK - (37 if precision == "bf16" else 0)
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-12, 4, (n,), generator=gen).float())
    g[3], g[700], g[1000:1100] = float("nan"), float("inf"), 0.0
    moderate = slice(5 * q8.BLOCK, 6 * q8.BLOCK)   # one block within a few octaves: no new m below the last level
    g[moderate] = torch.randn(q8.BLOCK, generator=gen)
    codes, scales = [], []
    for letter in state_letters(variant):
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 0, (n,), generator=gen).float())
        x[moderate] = torch.randn(q8.BLOCK, generator=gen)
        x = x if letter == "m" else x.abs()
        x[q8.BLOCK: 2 * q8.BLOCK] = 0.0
        # a block on the code's edges: its scale exactly (a power of two), levels and midpoints between them,
        # values around the last level (2**-31.75 below the scale for uint8, 2**-15.75 for int8), a subnormal, -0
        edge = torch.tensor([1.0, 0.5, 0.9375, 1.0 - 2**-5, 2.0**-31, 2.0**-31.5, 2.0**-32, 2.0**-15, 2.0**-15.5,
                             2.0**-16, 2.0**-17, 1e-45, -0.0, 0.75, 0.8125, 0.78125])
        x[2 * q8.BLOCK: 2 * q8.BLOCK + 256] = edge.repeat(16)
        if letter == "m":
            x[2 * q8.BLOCK + 1: 2 * q8.BLOCK + 256: 2] *= -1
        if precision == "bf16":
            codes.append(x.to(torch.bfloat16))
            continue
        c, s = q8.quantize(x, letter == "m", None)
        codes.append(c)
        scales.append(s)
    sc = torch.rand(rules.NUM_SCALARS, generator=gen) * 0.1
    sc[rules.GSCALE], sc[rules.W1], sc[rules.B2], sc[rules.W2] = 0.9, w1, 0.999, 1e-3
    sc[rules.DSCALE], sc[rules.EPS], sc[rules.LO], sc[rules.HI] = 1.0, 1e-8, 1e-3, 5e-2
    return p, g, (*codes, *scales), sc, torch.tensor(70_001, dtype=torch.int64)


def _reference(precision: str, variant: str, p, g, states, sc, step) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The kernel's definition with the fp32 CPU kernel's float math, in place; returns where a new state is NaN,
    and the new states before rounding."""
    letters = state_letters(variant)
    codes, scales = states[:len(letters)], states[len(letters):]
    wide = [c.float() for c in codes] if precision == "bf16" else [q8.dequantize(c, s) for c, s in zip(codes, scales)]
    native_cpu.update(variant, native_cpu.segment_table([(0, g, None)], p), tuple(wide), sc)
    salt = rounding_salt(g, step)
    for position, (c, w, letter) in enumerate(zip(codes, wide, letters)):
        if precision == "bf16":
            c.copy_(round_stochastic(w, salt, position) if STOCHASTIC[letter] else w.to(torch.bfloat16))
            continue
        new_codes, new_scales = q8.quantize(w, letter == "m", random_bits(w.view(torch.int32), salt, position))
        c.copy_(new_codes)
        scales[position].copy_(new_scales)
    return torch.stack([w.isnan() for w in wide]).any(dim=0), wide


def _blocks_above_the_last_level(m: torch.Tensor) -> torch.Tensor:
    """Per block of a new first moment: finite, and nothing below its last level (the C kernel's 16-bit encoding
    of the signed state; the other blocks take the 32-bit one)."""
    blocks = m.reshape(-1, q8.BLOCK)
    floor = q8.last_level(q8.block_scales(blocks.abs()), signed=True)
    return blocks.isfinite().all(dim=1) & (blocks.abs().amin(dim=1) >= floor.reshape(-1))


def _same_bits(got: list[torch.Tensor], want: list[torch.Tensor], skip: torch.Tensor) -> None:
    """Byte for byte, except the elements ``skip`` marks (NaN-ness must agree there, for floating tensors)."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype)
        if a.numel() == skip.numel():
            if a.is_floating_point():
                assert torch.equal(a[skip].float().isnan(), b[skip].float().isnan()), f"tensor {i}: NaN-ness differs"
            a, b = a[~skip], b[~skip]
        bytes_a, bytes_b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
        assert torch.equal(bytes_a, bytes_b), f"tensor {i} ({a.dtype}): {int((bytes_a != bytes_b).sum())} bytes differ"


@pytest.mark.parametrize("w1", [0.1, 0.7])
@pytest.mark.parametrize("variant", sorted(native_cpu.VARIANT_IDS))
@pytest.mark.parametrize("precision", sorted(NATIVE))
def test_native_update_is_bitwise_the_kernels_definition(precision, variant, w1):
    p, g, states, sc, step = _case(precision, variant, w1, seed=len(variant))
    want = [p.clone(), *[s.clone() for s in states]]
    nan, wide = _reference(precision, variant, want[0], g, want[1:], sc, step)
    NATIVE[precision].update(variant, p, g, *states, sc, step)
    _same_bits([p, *states], want, skip=nan)
    assert p.isnan().any() and nan.sum() < 3   # the NaN went through; every other element is compared
    if precision == "int8" and "m" in state_letters(variant):   # both encodings of the signed state ran
        above = _blocks_above_the_last_level(wide[state_letters(variant).index("m")])
        assert above.any() and not above.all(), int(above.sum())


@pytest.mark.parametrize("precision", sorted(NATIVE))
def test_native_update_is_independent_of_the_thread_count(precision):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p, g, states, sc, step = _case(precision, "adam_mvx", 0.1, seed=3)
            NATIVE[precision].update("adam_mvx", p, g, *states, sc, step)
            results.append([p, *states])
    finally:
        torch.set_num_threads(threads)
    _same_bits(results[0], results[1], skip=torch.zeros(results[0][0].numel(), dtype=torch.bool))


@pytest.mark.parametrize("precision", sorted(NATIVE))
def test_native_update_is_bitwise_the_compiled_kernel(precision):
    p, g, states, sc, step = _case(precision, COMPILED, 0.1, seed=5)
    want = [p.clone(), *[s.clone() for s in states]]
    compiled = dispatch._compiled(dispatch.update(COMPILED, precision))   # the Inductor kernel, not the dispatcher
    if precision == "int8":
        for part in q8.blocked_calls((want[0], g, *want[1:], sc, step), 0, len(state_letters(COMPILED))):
            compiled(*part)
    else:
        compiled(want[0], g, *want[1:], sc, step)
    NATIVE[precision].update(COMPILED, p, g, *states, sc, step)
    _same_bits([p, *states], want, skip=~g.isfinite())
    assert (g.isnan() & p.isnan()).any()


def _train(monkeypatch, precision: str, native: bool) -> tuple[torch.Tensor, dict]:
    monkeypatch.setenv(native_cpu.ENV_VAR, "1" if native else "0")
    calls = []
    real = NATIVE[precision].update
    monkeypatch.setattr(NATIVE[precision], "update", lambda *a: calls.append(a[0]) or real(*a))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = ShardedOptimizer([p], algorithm="adamod", amsgrad=True, lr=1e-2, kernel="compiled",
                           state_precision=precision)
    for step in range(3):
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
        opt.step()
    assert calls == ([COMPILED] * 3 if native else []), calls
    return p.detach().clone(), opt.state_dict()["state"][0]


@pytest.mark.parametrize("precision", sorted(NATIVE))
def test_the_optimizer_runs_it_on_cpu_with_the_compiled_kernels_bits(monkeypatch, precision):
    """``kernel="compiled"`` on CPU: low-precision updates go to the C kernels (unless SHARDED_OPTIM_NATIVE_CPU=0),
    and the trajectory is bitwise the compiled kernel's."""
    native, compiled = _train(monkeypatch, precision, True), _train(monkeypatch, precision, False)
    assert torch.equal(native[0], compiled[0])
    for key, value in native[1].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(compiled[1][key])), key


@pytest.mark.parametrize("precision", sorted(NATIVE))
def test_eager_mode_and_unsupported_inputs_stay_with_the_torch_kernel(monkeypatch, precision):
    p, g, states, sc, step = _case(precision, "adam_mv", 0.1, seed=7)
    args = (p, g, *states, sc, step)
    calls = []
    monkeypatch.setattr(NATIVE[precision], "update", lambda *a: calls.append(a[0]))
    dispatch.run(dispatch.update("adam_mv", precision), "eager", *args)
    assert calls == []
    dispatch.run(dispatch.update("adam_mv", precision), "auto", *args)
    assert calls == ["adam_mv"]
    accepts = NATIVE[precision].accepts
    assert accepts("adam_mv", args)
    assert not accepts("adam_mvg", args)   # diffGrad: its exp stays with the compiled kernel
    assert not accepts("adam_mv", (p.double(), *args[1:]))
    if precision == "int8":
        assert not accepts("adam_mv", (p[:-1], g[:-1], *args[2:]))   # not a whole number of blocks


def test_mismatched_states_are_refused_by_name():
    p, g, states, sc, step = _case("int8", "adam_mv", 0.1, seed=8)
    codes, scales = states[:2], states[2:]
    with pytest.raises(ValueError, match=r"native_int8: adam_mv takes codes of 17920 elements .* got codes "
                                         r"\[\(17920, torch.uint8\)"):
        native_int8.update("adam_mv", p, g, codes[1], codes[1], *scales, sc, step)
    with pytest.raises(ValueError, match=r"float32 scales of 70 blocks, got .* scales \[\(69, torch.float32\)"):
        native_int8.update("adam_mv", p, g, *codes, scales[0][:-1], scales[1], sc, step)
    p, g, states, sc, step = _case("bf16", "adam_mv", 0.1, seed=8)
    with pytest.raises(ValueError, match=r"native_bf16: adam_mv takes a gradient and bfloat16 states of 17883 "
                                         r"elements, got gradient 17883, states \[\(17883, torch.bfloat16\), "
                                         r"\(17882, torch.bfloat16\)\]"):
        native_bf16.update("adam_mv", p, g, states[0], states[1][:-1], sc, step)


def test_the_c_side_constants_are_the_python_ones():
    text = native_cpu.SOURCE.with_name("native_int8.c").read_text()
    defines = {name: int(value, 0) for name, value in re.findall(r"#define (\w+) (0x[0-9A-Fa-f]+|\d+)u?\b", text)}
    assert defines["BLOCK"] == q8.BLOCK and defines["SHIFT"] == q8.SHIFT and defines["MIN_NORMAL"] == q8._MIN_NORMAL
    assert defines["EXPONENT"] == q8._EXPONENT and defines["ONE_BITS"] == q8._ONE


def test_the_phase_timing_harness_still_builds(tmp_path):
    """``bench/int8_phases.c`` includes the kernel's source and calls its functions: it must follow their changes."""
    cc = native_cpu._compiler()
    assert cc is not None, "no C compiler: the native kernels need one too"
    harness = native_cpu.SOURCE.parents[2] / "bench" / "int8_phases.c"
    flags = [f for f in native_cpu.FLAGS if f not in ("-shared", "-fPIC")]
    done = subprocess.run([cc, *flags, "-I", str(native_cpu.SOURCE.parent), str(harness), "-o",
                           str(tmp_path / "int8_phases"), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
