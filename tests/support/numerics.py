"""Helpers shared by the numerics tests: ulps, deterministic problems, error reports."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

EPS32 = 2.0 ** -23          # ulp(1) in float32; ulp(x) <= EPS32*|x| for normal x
TINY32 = 2.0 ** -149         # smallest subnormal


def ulp32(x) -> np.ndarray:
    """ulp of float32 numbers of magnitude |x| (elementwise, float64 result; exact powers of two)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    a32 = a.astype(np.float32)
    nxt = np.nextafter(a32, np.float32(np.inf))
    return np.maximum((nxt.astype(np.float64) - a32.astype(np.float64)), TINY32)


def to64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64, copy=True)


def worst_ratio(actual, expected, tol) -> tuple[float, int]:
    """max |actual-expected|/tol and where (for messages)."""
    err = np.abs(to64(actual) - to64(expected)).reshape(-1)
    r = err / np.asarray(tol, dtype=np.float64).reshape(-1)
    i = int(np.argmax(r)) if r.size else 0
    return (float(r[i]) if r.size else 0.0), i


def assert_within(name, actual, expected, tol):
    """Every element within its own tolerance; the message names the tensor and the worst element."""
    a, e = to64(actual), to64(expected)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), e.shape)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values {a[~np.isfinite(a)][:4]}"
    ratio, i = worst_ratio(a, e, tol)
    assert ratio <= 1.0, (
        f"{name}: error {abs(a.reshape(-1)[i] - e.reshape(-1)[i]):.3e} at element {i} is {ratio:.2f}x the tolerance "
        f"{tol.reshape(-1)[i]:.3e} (got {a.reshape(-1)[i]!r}, want {e.reshape(-1)[i]!r})")


def assert_rel(name, actual, expected, rel):
    """|actual - expected| <= rel * max|expected| (norm-wise relative error, for trajectories)."""
    a, e = to64(actual), to64(expected)
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-300)
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    assert err <= rel * scale, f"{name}: max abs error {err:.3e} > {rel:.1e} * {scale:.3e}"


def make_inputs(n: int, seed: int, spread: bool = True):
    """A float32 parameter and gradient with magnitudes spread over many decades (exercises eps dominance)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=n) * 2.0
    g = rng.normal(size=n)
    if spread:
        g = g * 10.0 ** rng.uniform(-7, 1.5, size=n)
    return p.astype(np.float32), g.astype(np.float32)


class NoisyQuadratic:
    """g_t(p) = a*(p - c) + noise_t: a contracting problem, so rounding differences do not blow up.

    Deterministic in (seed, t); the same object gives the same gradients to every implementation.
    """

    def __init__(self, n: int, seed: int = 0, a: float = 0.4, noise: float = 1.0):
        rng = np.random.default_rng(seed)
        self.n, self.a, self.seed, self.noise = n, a, seed, noise
        self.c = rng.normal(size=n)
        self.scale = 10.0 ** rng.uniform(-3, 1, size=n)

    def p0(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).normal(size=self.n) * 2.0

    def __call__(self, p, t: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, t))
        return self.a * (to64(p) - self.c) + self.noise * self.scale * rng.normal(size=self.n)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
