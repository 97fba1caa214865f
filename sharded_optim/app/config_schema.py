"""The run configuration's sections as typed dataclasses: each field's type, default, range or choices, and doc.

:mod:`sharded_optim.app.config` reads YAML into these and validates them.  A field's range (``_num``) or set of
allowed values (``_choice``) is declared next to it.  The optimizer's hyperparameters have no range here: the
optimizer's own validation is the one set of limits (:func:`sharded_optim.app.config.load_config` applies it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..rules import ALGORITHMS
from ..telemetry import DEFAULT_STATS_INTERVAL

# Options of ShardedOptimizer that only some algorithms accept (rules.SPECS[alg].options says which).
ALGORITHM_OPTIONS = ("decoupled_weight_decay", "amsgrad", "bias_correction", "maximize", "beta3", "len_memory",
                     "final_lr", "gamma", "momentum_decay", "degenerated_to_sgd")


# --- field declarations -------------------------------------------------------------------------------

def _num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False, doc: str = "") -> Any:
    """A numeric field with an optional range; ``*_open`` excludes the bound."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
                                            "doc": doc})


def _choice(default: Any, choices: tuple, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _plain(default: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """A small GPT-style byte-level transformer (see :mod:`sharded_optim.app.model`)."""

    vocab_size: int = _num(256, 256, 1 << 20, doc="256 for the byte-level corpus")
    seq_len: int = _num(128, 2, 1 << 16, doc="context length in tokens")
    d_model: int = _num(128, 8, 1 << 16)
    n_layers: int = _num(4, 1, 512)
    n_heads: int = _num(4, 1, 1024)
    mlp_ratio: float = _num(4.0, 0.0, 64.0, lo_open=True)
    tie_embeddings: bool = _plain(True, "share the input embedding with the output projection")
    bias: bool = _plain(True, "biases in linear layers and layer norms")


@dataclass
class DataConfig:
    """The training text (see :mod:`sharded_optim.app.data`) and the share of it held out for validation."""

    path: str | None = _plain(None, "a UTF-8 text file or a directory of .txt files; None: the shipped corpus")
    val_fraction: float = _num(0.1, 0.0, 0.5, lo_open=True, doc="tail of the corpus held out for eval")


@dataclass
class OptimizerConfig:
    """Arguments of :class:`sharded_optim.ShardedOptimizer` (see docs/ARCHITECTURE.md) plus the loop's clipping
    and grouping (:attr:`LOOP_FIELDS`); the job builds the optimizer with ``ShardedOptimizer.from_config``.

    ``None`` means "the algorithm's default" (as the optimizer defines it).  An algorithm-specific option
    (``beta3``, ``final_lr``, ...) set for an algorithm that does not use it is an error, not ignored.  The
    hyperparameters' limits are the optimizer's own (checked by the loader), so a config accepts exactly what
    the constructor accepts.
    """

    LOOP_FIELDS: ClassVar[tuple[str, ...]] = ("grad_clip", "no_decay_norm_and_bias")  # not optimizer arguments

    algorithm: str = _choice("adamw", ALGORITHMS)
    lr: float | None = _num(None, doc="None: the algorithm's default")
    betas: tuple[float, float] = _num((0.9, 0.999))
    eps: float = _num(1e-8)
    weight_decay: float | None = _num(None, doc="None: the algorithm's default")
    decoupled_weight_decay: bool | None = _plain(None, "None: the algorithm's default")
    amsgrad: bool | None = _plain(None, "adam, adamw, adamod, adabound (AMSBound)")
    bias_correction: bool | None = _plain(None, "adam, adamw, adamax, adamod, adabound")
    maximize: bool | None = _plain(None)
    beta3: float | None = _num(None, doc="adamod, diffmod: step-size memory")
    len_memory: float | None = _num(None, doc="diffmod: beta3 = 1 - 1/len_memory (give one of the two)")
    final_lr: float | None = _num(None, doc="adabound")
    gamma: float | None = _num(None, doc="adabound: bound speed")
    momentum_decay: float | None = _num(None, doc="nadam")
    degenerated_to_sgd: bool | None = _plain(None, "radam")
    zero_stage: int = _choice(2, (0, 1, 2))
    bucket_mb: float = _num(25.0)
    overlap: bool = _plain(True)
    grad_reduce_dtype: str | None = _choice(None, (None, "float32", "bfloat16", "float16"))
    param_gather_dtype: str | None = _choice(None, (None, "float32", "bfloat16", "float16"))
    master_weights: bool = _plain(True)
    nonfinite_policy: str = _choice("skip", ("skip", "raise", "ignore"))
    spike_sigma: float | None = _num(None, doc="skip steps with a grad-norm spike")
    spike_window: int = _num(128)
    kernel: str = _choice("auto", ("auto", "compiled", "eager"))
    state_precision: str = _choice("fp32", ("fp32", "bf16", "int8"))
    grad_clip: float = _num(1.0, 0.0, None, doc="global gradient-norm clip; 0 disables")
    no_decay_norm_and_bias: bool = _plain(True, "put norms, biases and embeddings in a group without decay")

    def algorithm_options(self) -> dict[str, Any]:
        """The algorithm-specific options that were set (``None`` ones left to the optimizer's defaults)."""
        return {name: getattr(self, name) for name in ALGORITHM_OPTIONS if getattr(self, name) is not None}


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``constant``, ``warmup`` (linear warmup, then an optional decay) or ``1cycle``
    (``torch.optim.lr_scheduler.OneCycleLR``; with ``cycle_momentum`` it rewrites ``betas[0]``)."""

    kind: str = _choice("constant", ("constant", "warmup", "1cycle"))
    warmup_steps: int = _num(0, 0, None)
    decay: str = _choice("none", ("none", "linear", "cosine"), "after warmup (kind=warmup)")
    min_lr_ratio: float = _num(0.1, 0.0, 1.0, doc="final lr / lr for a decay")
    pct_start: float = _num(0.3, 0.0, 1.0, lo_open=True, hi_open=True, doc="1cycle")
    div_factor: float = _num(25.0, 0.0, None, lo_open=True, doc="1cycle: initial lr = lr / div_factor")
    final_div_factor: float = _num(1e4, 0.0, None, lo_open=True, doc="1cycle")
    cycle_momentum: bool = _plain(True, "1cycle")
    base_momentum: float = _num(0.85, 0.0, 1.0, hi_open=True, doc="1cycle")
    max_momentum: float = _num(0.95, 0.0, 1.0, hi_open=True, doc="1cycle")


@dataclass
class TrainingConfig:
    """The training loop: length, global batch and accumulation, seed, logging and evaluation cadence, precision,
    device, threads, and the run directory."""

    steps: int = _num(100, 1, None, doc="length of the run (the schedule spans all of it)")
    stop_at: int | None = _num(None, 1, None, doc="end this invocation after this step (resume later); None: steps")
    batch_size: int = _num(16, 1, None, doc="global sequences per optimizer step (all ranks, all micro-batches)")
    grad_accum: int = _num(1, 1, 4096, doc="micro-batches per optimizer step")
    seed: int = _num(0, 0, 2**63 - 1)
    log_interval: int = _num(10, 1, None)
    eval_interval: int = _num(50, 0, None, doc="0: evaluate only at the end")
    eval_batches: int = _num(4, 1, None)
    precision: str = _choice("fp32", ("fp32", "bf16"), "bf16: autocast; parameters and state stay fp32")
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    threads: int = _num(0, 0, 1024, doc="torch threads per rank; 0: OMP_NUM_THREADS or cores / local ranks")
    timeout_s: float = _num(600.0, 0.0, None, lo_open=True, doc="collective timeout")
    run_dir: str = _plain("runs/default", "where the summary, metrics and (by default) checkpoints go")
    save_final_weights: bool = _plain(True, "rank 0 writes final_weights.pt (model state_dict) to run_dir")


@dataclass
class TelemetryConfig:
    """The Prometheus metrics server each rank runs, and how often the optimizer computes its statistics (see
    :mod:`sharded_optim.telemetry`)."""

    enabled: bool = _plain(False)
    base_port: int = _num(9400, 0, 65535, doc="rank r serves metrics on base_port + local_rank; 0: ephemeral")
    addr: str = _plain("127.0.0.1", "address the metrics servers bind (0.0.0.0 for a cluster)")
    stats_interval: int = _num(DEFAULT_STATS_INTERVAL, 0, None, doc="optimizer statistics every N steps; 0: never")


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and where, how many are kept, and whether ``--resume`` may fall back past a damaged
    one."""

    interval: int = _num(0, 0, None, doc="save every N steps; 0: only at the end if enabled")
    at_end: bool = _plain(False, "save after the last step")
    dir: str | None = _plain(None, "None: <training.run_dir>/checkpoints")
    keep_last: int = _num(2, 0, None, doc="checkpoints kept; 0 keeps all")
    fallback: bool = _plain(True, "--resume skips a checkpoint that fails verification (naming it and why) and "
                                  "uses the newest good one; false: refuse instead")


@dataclass
class RunConfig:
    """A whole run's configuration: one field per section (the top-level keys of a config file)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` if set, else ``<training.run_dir>/checkpoints``."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.training.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) that :func:`from_dict` reads back to an equal config."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {sec: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, sec)).items()}
                for sec in section_names()}


def section_names() -> list[str]:
    """The sections of :class:`RunConfig`, in declaration order."""
    return [f.name for f in dataclasses.fields(RunConfig)]
