"""What the training job prints and logs: rank 0's lines, its progress bar, ``metrics.jsonl`` records, and
strict JSON for ``summary.json``."""
from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any, TextIO

from ..dist import DistInfo

if TYPE_CHECKING:
    from tqdm import tqdm


def strict_json(value: Any) -> Any:
    """``value`` with non-finite floats as None: summary.json is strict JSON (no NaN/Infinity tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def log(info: DistInfo, text: str) -> None:
    """Print ``text`` on rank 0 only."""
    if info.is_main:
        print(text, flush=True)


def progress_bar(info: DistInfo, total: int, initial: int) -> tqdm:
    """tqdm on rank 0 (to stderr); disabled on the other ranks."""
    from tqdm import tqdm

    # Redraws every 0.5 s on a terminal; in a log file (not a TTY) rarely, so logs stay readable.
    return tqdm(total=total, initial=initial, disable=not info.is_main, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 60.0, desc="train", unit="step")


def emit(info: DistInfo, progress: tqdm, metrics_file: TextIO | None, record: dict) -> None:
    """On rank 0: append ``record`` to ``metrics.jsonl`` and print it above the progress bar (a training step's line, or
    a validation loss)."""
    if not info.is_main:
        return
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    if "loss" in record:
        progress.set_postfix(loss=f"{record['loss']:.4f}", step_ms=f"{1e3 * record['step_s']:.0f}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        progress.write(f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                       f"{1e3 * record['step_s']:.0f} ms/step  {record['tokens_per_s']:.0f} tok/s")
    else:
        progress.write(f"step {record['step']:>6}  val_loss {record['val_loss']:.4f}")
