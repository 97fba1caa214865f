"""Byte-level text data: a corpus read as raw UTF-8 bytes (vocabulary 256), a train/validation split, and
deterministic sampling of fixed-length windows.

Sampling is a pure function of ``(seed, step)``: the *global* batch of step ``s`` is drawn from a generator
seeded with ``(seed, s)`` and each rank takes its contiguous slice.  Consequences, all intended:

* the data a run sees does not depend on the world size or the launcher, so the same seed gives the same
  training at 1, 2 or 4 ranks (up to floating-point summation order);
* resuming at step ``s`` needs no saved data-loader state.

The shipped corpus is ``sharded_optim/app/data/*.txt`` (the project's own documentation and notes on
optimizers and distributed training, written for this purpose), concatenated in name order.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).resolve().parent / "data"


def read_corpus(path: str | Path | None = None) -> bytes:
    """Bytes of a text file, or of every ``*.txt`` in a directory (name order); None: the shipped corpus."""
    root = Path(path) if path is not None else CORPUS_DIR
    if root.is_dir():
        files = sorted(root.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"data.path: no .txt files in directory {str(root)!r}")
        return b"\n\n".join(f.read_bytes() for f in files)
    if not root.is_file():
        raise FileNotFoundError(f"data.path: {str(root)!r} is neither a file nor a directory")
    return root.read_bytes()


@dataclass
class ByteDataset:
    """One split of a byte corpus; windows of ``seq_len + 1`` bytes give (input, next-byte target)."""

    tokens: torch.Tensor  # uint8, 1-D
    seq_len: int

    def __post_init__(self) -> None:
        if self.tokens.numel() < self.seq_len + 2:
            raise ValueError(f"split of {self.tokens.numel()} bytes is too short for model.seq_len "
                             f"{self.seq_len}; use a bigger corpus or a shorter sequence")

    @property
    def num_windows(self) -> int:
        """Distinct window start offsets."""
        return self.tokens.numel() - self.seq_len

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``(len(starts), seq_len)`` as int64."""
        offsets = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = self.tokens[offsets].long()
        return chunk[:, :-1], chunk[:, 1:]


def split_corpus(data: bytes, seq_len: int, val_fraction: float) -> tuple[ByteDataset, ByteDataset]:
    """Train = the head of the corpus, validation = the last ``val_fraction`` of it."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = max(seq_len + 2, int(len(tokens) * val_fraction))
    return ByteDataset(tokens[:-n_val], seq_len), ByteDataset(tokens[-n_val:], seq_len)


def _rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    if global_batch % world_size:
        raise ValueError(f"training.batch_size / training.grad_accum = {global_batch} sequences per "
                         f"micro-batch is not divisible by the world size {world_size}")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def train_batch(ds: ByteDataset, seed: int, step: int, micro: int, micro_batch: int, rank: int,
                world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of micro-batch ``micro`` of optimizer step ``step`` (``micro_batch`` sequences
    over all ranks).  Random window starts, a pure function of ``(seed, step, micro)``."""
    # An explicit mix (not hash()) so the stream is the same in every Python version.
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro * 0x94D049BB133111EB) % (1 << 63)
    g = torch.Generator().manual_seed(mixed)
    starts = torch.randint(0, ds.num_windows, (micro_batch,), generator=g)
    return ds.windows(starts[_rank_slice(micro_batch, rank, world_size)])


def eval_batches(ds: ByteDataset, num_batches: int, batch: int, rank: int,
                 world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: ``num_batches * batch`` evenly spaced windows, identical every eval;
    yields this rank's share of each batch."""
    total = num_batches * batch
    starts = torch.linspace(0, ds.num_windows - 1, total).long()
    for i in range(num_batches):
        yield ds.windows(starts[i * batch:(i + 1) * batch][_rank_slice(batch, rank, world_size)])
