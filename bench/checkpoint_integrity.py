"""What the checkpoint checksums cost: save and load of one process, with and without them.

``python bench/checkpoint_integrity.py --mib 64 --repeats 5`` builds a model of ``--mib`` MiB of fp32 parameters
(AdamW: a checkpoint of 3x that), then times, alternating so that load drifts hit both equally:

* ``save``: ``checkpoint.save`` as shipped (each chunk read back from the page cache and CRC-32C'd), and with
  the checksum writer replaced by DCP's plain ``FileSystemWriter``;
* ``load``: ``checkpoint.load`` as shipped (every chunk checked before it is deserialised, then the finite-value
  check), and with both turned off;
* ``crc32c`` and ``zlib.crc32`` alone over a buffer of the checkpoint's size.

Prints the minimum and the median of each and the overheads.  The files go to a temporary directory (page
cache: this measures the CPU cost of the checks, not the disk).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import crc32c
import torch
from torch.distributed.checkpoint import FileSystemWriter

from sharded_optim import ShardedOptimizer, checkpoint
from sharded_optim.checkpoint import integrity as ckpt_integrity
from sharded_optim.checkpoint import loading as ckpt_load


class PlainWriter(FileSystemWriter):
    checksums: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = int(args.mib * 2**20 / 4)
    side = int(n ** 0.5)
    model = torch.nn.Linear(side, side, bias=False)
    opt = ShardedOptimizer(model.parameters(), algorithm="adamw", lr=1e-3, kernel="eager")
    model(torch.randn(2, side)).sum().backward()
    opt.step()
    real_writer, real_chunks, real_files = ckpt_integrity.ChecksumWriter, ckpt_load._chunks, ckpt_load._files
    times: dict[str, list[float]] = {k: [] for k in ("save", "save_plain", "load", "load_plain")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.repeats):
            for plain in ((False, True) if r % 2 else (True, False)):  # alternate which goes first
                ckpt_integrity.ChecksumWriter = PlainWriter if plain else real_writer  # type: ignore[misc]
                t0 = time.perf_counter()
                checkpoint.save(root / f"c{int(plain)}", model, opt, step=r)
                times["save_plain" if plain else "save"].append(time.perf_counter() - t0)
            ckpt_integrity.ChecksumWriter = real_writer  # type: ignore[misc]
            for plain in ((False, True) if r % 2 else (True, False)):
                if plain:  # no chunk checksums, no finite check: the format-1 load path
                    ckpt_load._chunks = ckpt_load._files = lambda meta: None  # type: ignore[assignment]
                    finite, ckpt_load._check_finite = ckpt_load._check_finite, lambda *a: None
                t0 = time.perf_counter()
                checkpoint.load(root / f"c{int(plain)}", model, opt)
                times["load_plain" if plain else "load"].append(time.perf_counter() - t0)
                if plain:
                    ckpt_load._chunks, ckpt_load._files, ckpt_load._check_finite = real_chunks, real_files, finite
        size = sum(f.stat().st_size for f in (root / "c0").rglob("*") if f.is_file())
    buf = torch.randn(size // 4).numpy().tobytes()
    for name, fn in (("crc32c", crc32c.crc32c), ("zlib.crc32", zlib.crc32)):
        best = min(_time(fn, buf) for _ in range(3))
        print(f"{name:<11} {size / best / 1e9:6.2f} GB/s over {size / 2**20:.0f} MiB")
    print(f"checkpoint of {size / 2**20:.0f} MiB, {args.repeats} repeats (the minimum is the least disturbed by "
          "other processes on a shared machine):")
    for stat, fn in (("min", min), ("median", statistics.median)):
        m = {k: fn(v) for k, v in times.items()}
        for op in ("save", "load"):
            extra = m[op] - m[f"{op}_plain"]
            print(f"  {stat:>6} {op}: {m[op] * 1e3:8.1f} ms with checks, {m[op + '_plain'] * 1e3:8.1f} ms "
                  f"without: {extra * 1e3:+.1f} ms ({100 * extra / m[op + '_plain']:+.0f}%)")


def _time(fn, buf: bytes) -> float:
    t0 = time.perf_counter()
    fn(buf)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
