"""A small GPT-style transformer: pre-norm blocks, causal attention through
``F.scaled_dot_product_attention``, learned positions, optionally tied input/output embeddings.

Deliberately plain (no dropout, no fused tricks): the job exists to exercise the optimizer, and without
dropout a run is a pure function of the seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``qkv`` projection, ``F.scaled_dot_product_attention(is_causal=True)`` per
    head, and an output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, t, d) -> (b, t, d)``: per head, position ``i`` attends to positions ``<= i`` with
        ``softmax(q k^T / sqrt(head_dim)) v``; the heads are concatenated and projected."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (b, t, d) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """The feed-forward sublayer ``proj(gelu(fc(x)))``, hidden width ``mlp_ratio * d_model``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = max(1, int(cfg.mlp_ratio * cfg.d_model))
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward map, applied to every position independently."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x <- x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The byte-level language model: token and learned position embeddings, ``n_layers`` blocks (:class:`Block`),
    a final layer norm and a linear head (sharing the token embedding's weight when ``tie_embeddings``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers) so the
        residual stream's variance does not grow with depth."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # layer-norm weights
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(b, t, vocab)``; with ``targets`` returns ``(logits, mean cross-entropy)``."""
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len {self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def build_model(cfg: ModelConfig) -> GPT:
    """A freshly initialised :class:`GPT` as ``cfg`` describes it."""
    return GPT(cfg)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float | None, separate_no_decay: bool) -> list[dict]:
    """Split parameters into a ``decay`` group (matrices) and a ``no_decay`` group (norms, biases,
    embeddings), the usual GPT recipe.  Each group carries a ``name`` (a bounded telemetry label).
    ``weight_decay=None`` leaves the decay group on the algorithm's default."""
    if not separate_no_decay:
        return [{"params": list(model.parameters()), "name": "all"}]
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix = p.dim() >= 2 and not isinstance(module, nn.Embedding)
            (decay if is_matrix else no_decay).append(p)
    groups = []
    if decay:
        g = {"params": decay, "name": "decay"}
        if weight_decay is not None:
            g["weight_decay"] = weight_decay
        groups.append(g)
    if no_decay:
        groups.append({"params": no_decay, "name": "no_decay", "weight_decay": 0.0})
    return groups
