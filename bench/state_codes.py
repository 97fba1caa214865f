"""Which 8-bit code for which Adam state: the measurement behind kernels/int8_state.py's choice.

AdamW (torch's formula) trains a small MLP on a regression task whose input features span six orders of magnitude
(so the second moment of one weight block spans twelve), with every state tensor stored through an 8-bit code
after each step (blocks of 256, stochastic rounding).  Codes: ``linear`` (absmax scale, levels max/127 apart, as
blockwise absmax int8), ``log`` (power-of-two scale, levels 2**(-1/8) apart: a true logarithmic code), ``library``
(kernels/int8_state.py: power-of-two scale, 8 levels per octave evenly spaced within it, the fp32 bit pattern cut
to 3 mantissa bits), per state ``m`` and ``v``.  Reported per code pair and seed: final training loss relative to fp32 state, and the mean relative error
of the update direction ``m/(sqrt(v)+eps)`` against fp32 state fed the same gradients (teacher forcing).

    python bench/state_codes.py [--steps 400] [--seeds 3]      # writes bench/results/state_codes.{json,md}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sharded_optim.kernels import int8_state as q8

RESULTS = Path(__file__).parent / "results"


def linear(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Blockwise absmax int8 (127 levels each side), stochastic rounding, dequantized."""
    xb = x.view(-1, q8.BLOCK)
    scale = xb.abs().amax(1, keepdim=True).clamp_min(1e-38) / 127
    y = xb / scale
    low = torch.floor(y)
    return ((low + (u.view_as(y) < (y - low)).float()) * scale).view(-1)


def log(x: torch.Tensor, u: torch.Tensor, signed: bool) -> torch.Tensor:
    """A true logarithmic code: power-of-two block scale, levels 2**(-k/8), k < 127 (signed) or 255; stochastic
    rounding between neighbouring levels, a non-negative value never to 0.  Dequantized."""
    kmax = 127 if signed else 255
    xb = x.view(-1, q8.BLOCK)
    amax = xb.abs().amax(1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))))
    r = xb.abs() / scale
    k0 = torch.floor(-8 * torch.log2(r)).nan_to_num(posinf=kmax - 1).clamp(0, kmax - 1)
    above = torch.exp2(-k0 / 8)
    below = torch.where(k0 + 1 >= kmax, torch.zeros_like(k0), torch.exp2(-(k0 + 1) / 8))
    k = torch.where(u.view_as(r) < ((r - below) / (above - below)).clamp(0, 1), k0, k0 + 1)
    if not signed:
        k = torch.where(r > 0, k.clamp(max=kmax - 1), torch.full_like(k, kmax))
    value = torch.where(k >= kmax, torch.zeros_like(r), torch.exp2(-k / 8)) * scale
    return (torch.sign(xb) * value).view(-1)


def library(x: torch.Tensor, u: torch.Tensor, signed: bool) -> torch.Tensor:
    """The library's code (kernels/int8_state.py), dequantized."""
    bits = (u * 65536).to(torch.int32).clamp(0, 65535)
    return q8.dequantize(*q8.quantize(x, signed, bits))


CODES = {"linear": lambda x, u, signed: linear(x, u), "log": log, "library": library}


def store(kind: str, x: torch.Tensor, signed: bool, gen: torch.Generator) -> torch.Tensor:
    if kind == "fp32":
        return x
    pad = -x.numel() % q8.BLOCK
    flat = torch.nn.functional.pad(x.reshape(-1), (0, pad))
    u = torch.rand(flat.numel(), generator=gen).clamp(1e-7, 1 - 1e-7)
    out = CODES[kind](flat, u, signed)
    return out[: x.numel()].view_as(x)


def train(m_code: str, v_code: str, seed: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    scales = torch.logspace(-3, 3, 64)
    x = torch.randn(2048, 64) * scales
    w_true = torch.randn(64, 1) / scales[:, None]
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(2048, 1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed + 1000)
    lr, b1, b2, eps, wd = 3e-3, 0.9, 0.999, 1e-8, 0.01
    errors = []
    for t in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                m_new = b1 * m[i] + (1 - b1) * g
                v_new = b2 * v[i] + (1 - b2) * g * g
                exact = m_new / (v_new.sqrt() + eps)   # fp32 state fed the same history up to this step
                m[i] = store(m_code, m_new, True, gen)
                v[i] = store(v_code, v_new, False, gen)
                direction = m[i] / (v[i].sqrt() + eps)
                if p.numel() >= q8.SMALL_NUMEL:
                    errors.append(float((direction - exact).norm() / exact.norm().clamp_min(1e-30)))
                p.mul_(1 - lr * wd)
                p.sub_(lr / (1 - b1 ** t) * direction * (1 - b2 ** t) ** 0.5)
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x), y))
    return final, sum(errors) / max(1, len(errors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    pairs = [("fp32", "fp32"), ("linear", "linear"), ("linear", "library"), ("library", "linear"), ("log", "log"),
             ("library", "library")]
    rows = []
    for m_code, v_code in pairs:
        runs = [train(m_code, v_code, seed, args.steps) for seed in range(args.seeds)]
        rows.append({"m": m_code, "v": v_code, "final_loss": [r[0] for r in runs],
                     "update_rel_error": [r[1] for r in runs]})
    base = rows[0]["final_loss"]
    for row in rows:
        row["loss_vs_fp32"] = [a / b for a, b in zip(row["final_loss"], base)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state_codes.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))
    lines = [f"# 8-bit state codes: AdamW, MLP with features over 6 decades, {args.steps} steps, "
             f"{args.seeds} seeds", "", "`python bench/state_codes.py`", "",
             "| m code | v code | final loss / fp32 state (per seed) | mean relative error of m/(sqrt(v)+eps) |",
             "|---|---|---|---|"]
    for row in rows:
        ratios = ", ".join(f"{r:.3f}" for r in row["loss_vs_fp32"])
        err = sum(row["update_rel_error"]) / len(row["update_rel_error"])
        lines.append(f"| {row['m']} | {row['v']} | {ratios} | {err:.4f} |")
    (RESULTS / "state_codes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
