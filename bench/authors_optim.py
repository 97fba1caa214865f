"""Eager peers for the algorithms torch.optim does not have: AdaMod, AdaBound/AMSBound and DiffMod.

Written for the benchmarks from the update rules in ALGORITHMS.md sections 8, 9 and 10, which transcribe the
authors' reference code (lancopku/AdaMod ``adamod/adamod.py``, Luolc/AdaBound ``adabound/adabound.py``, and
lessw2020's ``diffmod/diffmod.py`` with ``version=0`` and ``average_step=False``).  Same
math and the same sequence of eager tensor operations per parameter (one op per line of the rule, temporaries
allocated as the reference code allocates them), in current torch API spelling.  These are the "authors'
reference implementation" peers of DESIGN.md section 5; they are not part of the library, and not the float64
oracle the tests compare against (``tests/support/reference.py``): these are peers to time, that one is the truth.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class AuthorsAdaMod(Optimizer):
    """AdaMod as in the authors' code: E0 epsilon, 1/bc1 folded into the step size, decoupled decay lr*wd."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["exp_avg_lr"] = torch.zeros_like(p)
                    self._init_extra(st, p)
                st["step"] += 1
                t = st["step"]
                m, v, s, g = st["exp_avg"], st["exp_avg_sq"], st["exp_avg_lr"], p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v.sqrt().add_(group["eps"])
                scale = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                if group["weight_decay"] != 0:
                    p.add_(p, alpha=-group["weight_decay"] * group["lr"])
                eta = torch.full_like(denom, scale).div_(denom)
                s.mul_(group["beta3"]).add_(eta, alpha=1 - group["beta3"])
                eta = torch.minimum(eta, s).mul_(self._direction(st, m, g))
                p.add_(-eta)

    def _init_extra(self, st: dict, p: torch.Tensor) -> None:
        """More state for a subclass (DiffMod's previous gradient)."""

    def _direction(self, st: dict, m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """What the bounded step size multiplies: the first moment."""
        return m


class AuthorsAdaBound(Optimizer):
    """AdaBound / AMSBound as in the authors' code: L2 decay, E0 epsilon, step size clamped to bounds that
    converge to ``final_lr * lr / base_lr``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                 weight_decay=0.0, amsbound=False):
        super().__init__(params, dict(lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                                      weight_decay=weight_decay, amsbound=amsbound))
        self.base_lrs = [g["lr"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for group, base_lr in zip(self.param_groups, self.base_lrs):
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsbound"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["amsbound"]:
                    vmax = st["max_exp_avg_sq"]
                    torch.maximum(vmax, v, out=vmax)
                    denom = vmax.sqrt().add_(group["eps"])
                else:
                    denom = v.sqrt().add_(group["eps"])
                scale = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                fl = group["final_lr"] * group["lr"] / base_lr
                lo = fl * (1 - 1 / (group["gamma"] * t + 1))
                hi = fl * (1 + 1 / (group["gamma"] * t))
                eta = torch.full_like(denom, scale).div_(denom).clamp_(lo, hi).mul_(m)
                p.add_(-eta)




class AuthorsDiffMod(AuthorsAdaMod):
    """DiffMod as in lessw2020's code: AdaMod (E0, 1/bc1 folded into the step size, decoupled lr*wd decay) with
    diffGrad's friction xi = 1/(1 + exp(-|g_prev - g|)) on the first moment, beta3 = 1 - 1/len_memory.

    One deliberate difference: ``previous_grad`` is a copy of the gradient, where that code keeps an alias of
    ``p.grad`` (ALGORITHMS.md section 10: with gradient buffers reused in place every xi after the first is 0.5)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), len_memory=1000, eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, beta3=1 - 1 / len_memory, eps=eps, weight_decay=weight_decay)

    def _init_extra(self, st: dict, p: torch.Tensor) -> None:
        st["previous_grad"] = torch.zeros_like(p)

    def _direction(self, st: dict, m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        xi = torch.abs(st["previous_grad"] - g).neg_().exp_().add_(1).reciprocal_()
        st["previous_grad"] = g.clone()
        return m * xi
