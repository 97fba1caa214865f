"""Typed, validated run configuration: YAML in, dataclasses out, clear errors for anything else.

A run config has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``training``, ``telemetry``
and ``checkpoint``; every field has a type and, where it matters, a range or a set of allowed values,
declared next to the field (``_num``/``_choice`` below).  :func:`load_config` reads YAML with
``yaml.safe_load``, applies ``--set section.field=value`` overrides, and checks everything at once: the
:class:`ConfigError` it raises lists every bad field by its path (``optimizer.betas[1]``), the value given
and what is allowed.  Unknown fields are rejected with the list of known ones, so a typo never silently
falls back to a default.

YAML 1.1 (PyYAML) reads ``3e-4`` (no dot) as a *string*; float fields accept such strings when they parse
as a number, because rejecting the most common way of writing a learning rate helps nobody.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..rules import ALGORITHMS, LEN_MEMORY_ALGORITHMS, SPECS
from ..telemetry import DEFAULT_STATS_INTERVAL

# Options of ShardedOptimizer that only some algorithms accept (rules.SPECS[alg].options says which).
ALGORITHM_OPTIONS = ("decoupled_weight_decay", "amsgrad", "bias_correction", "maximize", "beta3", "len_memory",
                     "final_lr", "gamma", "momentum_decay", "degenerated_to_sgd")


class ConfigError(ValueError):
    """One or more configuration fields are invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | None = None, *, where: str | None = None):
        self.errors = errors
        head = f"invalid configuration {where}:" if where else \
            f"invalid configuration{f' in {source}' if source else ''}:"
        super().__init__("\n  ".join([head, *errors]))


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
    path: str | None = _plain(None, "a UTF-8 text file or a directory of .txt files; None: the shipped corpus")
    val_fraction: float = _num(0.1, 0.0, 0.5, lo_open=True, doc="tail of the corpus held out for eval")


@dataclass
class OptimizerConfig:
    """Arguments of :class:`sharded_optim.ShardedOptimizer` (see docs/ARCHITECTURE.md) plus clipping.

    ``None`` means "the algorithm's default" (as the optimizer defines it).  An algorithm-specific option
    (``beta3``, ``final_lr``, ...) set for an algorithm that does not use it is an error, not ignored.
    """

    algorithm: str = _choice("adamw", ALGORITHMS)
    lr: float | None = _num(None, 0.0, 10.0, lo_open=True, doc="None: the algorithm's default")
    betas: tuple[float, float] = _num((0.9, 0.999), 0.0, 1.0, hi_open=True)
    eps: float = _num(1e-8, 0.0, 1.0, lo_open=True)
    weight_decay: float | None = _num(None, 0.0, 10.0, doc="None: the algorithm's default")
    decoupled_weight_decay: bool | None = _plain(None, "None: the algorithm's default")
    amsgrad: bool | None = _plain(None, "adam, adamw, adamod, adabound (AMSBound)")
    bias_correction: bool | None = _plain(None, "adam, adamw, adamax, adamod, adabound")
    maximize: bool | None = _plain(None)
    beta3: float | None = _num(None, 0.0, 1.0, hi_open=True, doc="adamod, diffmod: step-size memory")
    len_memory: float | None = _num(None, 1.0, None, lo_open=True,
                                    doc="diffmod: beta3 = 1 - 1/len_memory (give one of the two)")
    final_lr: float | None = _num(None, 0.0, 10.0, doc="adabound")
    gamma: float | None = _num(None, 0.0, 1.0, lo_open=True, hi_open=True, doc="adabound: bound speed")
    momentum_decay: float | None = _num(None, 0.0, 1.0, doc="nadam")
    degenerated_to_sgd: bool | None = _plain(None, "radam")
    zero_stage: int = _choice(2, (0, 1, 2))
    bucket_mb: float = _num(25.0, 0.0, 1 << 16, lo_open=True)
    overlap: bool = _plain(True)
    grad_reduce_dtype: str | None = _choice(None, (None, "float32", "bfloat16", "float16"))
    param_gather_dtype: str | None = _choice(None, (None, "float32", "bfloat16", "float16"))
    master_weights: bool = _plain(True)
    nonfinite_policy: str = _choice("skip", ("skip", "raise", "ignore"))
    spike_sigma: float | None = _num(None, 0.0, None, lo_open=True, doc="skip steps with a grad-norm spike")
    spike_window: int = _num(128, 2, None)
    kernel: str = _choice("auto", ("auto", "compiled", "eager"))
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
    enabled: bool = _plain(False)
    base_port: int = _num(9400, 0, 65535, doc="rank r serves metrics on base_port + local_rank; 0: ephemeral")
    addr: str = _plain("127.0.0.1", "address the metrics servers bind (0.0.0.0 for a cluster)")
    stats_interval: int = _num(DEFAULT_STATS_INTERVAL, 0, None, doc="optimizer statistics every N steps; 0: never")


@dataclass
class CheckpointConfig:
    interval: int = _num(0, 0, None, doc="save every N steps; 0: only at the end if enabled")
    at_end: bool = _plain(False, "save after the last step")
    dir: str | None = _plain(None, "None: <training.run_dir>/checkpoints")
    keep_last: int = _num(2, 0, None, doc="checkpoints kept; 0 keeps all")
    fallback: bool = _plain(True, "--resume skips a checkpoint that fails verification (naming it and why) and "
                                  "uses the newest good one; false: refuse instead")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.training.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) that :func:`from_dict` reads back to an equal config."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {sec: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, sec)).items()}
                for sec in _section_names()}


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


# --- validation ---------------------------------------------------------------------------------------

def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "-inf" if lo is None else f"{lo:g}"
    right = "inf" if hi is None else f"{hi:g}"
    lb = "(" if meta.get("lo_open") or lo is None else "["
    rb = ")" if meta.get("hi_open") or hi is None else "]"
    return f" in {lb}{left}, {right}{rb}"


def _check_scalar(path: str, value: Any, tp: Any, meta: dict, errors: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` or append an error and return None."""
    choices = meta.get("choices")
    if choices is not None:
        if value in choices and type(value) is type(next(c for c in choices if c == value)):
            return value
        errors.append(f"{path}: got {_describe(value)}; allowed: one of {', '.join(map(repr, choices))}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: got {_describe(value)}; allowed: true or false")
        return None
    if tp is str:
        if isinstance(value, str) and value:
            return value
        errors.append(f"{path}: got {_describe(value)}; allowed: a non-empty string")
        return None
    if tp in (int, float):
        num: float | int | None = None
        if isinstance(value, bool):
            num = None
        elif tp is int and isinstance(value, int):
            num = value
        elif tp is float and isinstance(value, (int, float)):
            num = float(value)
        elif tp is float and isinstance(value, str):
            try:
                num = float(value)
            except ValueError:
                num = None
        kind = "an integer" if tp is int else "a number"
        rng = _range_text(meta)
        if num is None or (tp is float and not math.isfinite(num)):
            errors.append(f"{path}: got {_describe(value)}; allowed: {kind}{rng}")
            return None
        lo, hi = meta.get("lo"), meta.get("hi")
        bad = (lo is not None and (num < lo or (meta.get("lo_open") and num == lo))) or \
              (hi is not None and (num > hi or (meta.get("hi_open") and num == hi)))
        if bad:
            errors.append(f"{path}: got {_describe(value)}; allowed: {kind}{rng}")
            return None
        return num
    raise TypeError(f"unsupported config field type {tp!r} at {path}")  # a bug in this module, not user input


def _check_field(path: str, value: Any, tp: Any, meta: dict, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_field(path, value, inner, meta, errors)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            errors.append(f"{path}: got {_describe(value)}; allowed: a list of {len(args)} numbers"
                          f"{_range_text(meta)}")
            return None
        items = [_check_scalar(f"{path}[{i}]", v, a, meta, errors) for i, (v, a) in enumerate(zip(value, args))]
        return None if any(x is None for x in items) else tuple(items)
    return _check_scalar(path, value, tp, meta, errors)


def _build_section(name: str, cls: type, raw: Any, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{name}: got {_describe(raw)}; allowed: a mapping of fields")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            errors.append(f"{name}.{key}: unknown field; known fields: {', '.join(fields)}")
    values = {}
    for fname, f in fields.items():
        if fname in raw:
            checked = _check_field(f"{name}.{fname}", raw[fname], hints[fname], dict(f.metadata), errors)
            if checked is not None or raw[fname] is None:
                values[fname] = checked
    return cls(**values)


def _cross_checks(cfg: RunConfig, errors: list[str]) -> None:
    """Constraints between fields (each message names the fields involved)."""
    m, o, s, t = cfg.model, cfg.optimizer, cfg.schedule, cfg.training
    if m.d_model % m.n_heads:
        errors.append(f"model.n_heads: got {m.n_heads}; allowed: a divisor of model.d_model ({m.d_model})")
    for name, value in o.algorithm_options().items():
        accepted = SPECS[o.algorithm].options + (("len_memory",) if o.algorithm in LEN_MEMORY_ALGORITHMS else ())
        if name not in accepted:
            users = [a for a in ALGORITHMS if name in SPECS[a].options] if name != "len_memory" else \
                list(LEN_MEMORY_ALGORITHMS)
            errors.append(f"optimizer.{name}: got {value!r} but optimizer.algorithm is {o.algorithm!r}; this "
                          f"option applies only to {', '.join(users)} (leave it unset)")
    if o.beta3 is not None and o.len_memory is not None:
        errors.append(f"optimizer.len_memory: got {o.len_memory!r} and optimizer.beta3 {o.beta3!r}; allowed: one "
                      "of the two (beta3 = 1 - 1/len_memory)")
    if s.kind == "warmup" and s.warmup_steps >= t.steps:
        errors.append(f"schedule.warmup_steps: got {s.warmup_steps}; allowed: fewer than training.steps "
                      f"({t.steps})")
    if s.kind == "1cycle" and s.cycle_momentum and s.base_momentum > s.max_momentum:
        errors.append(f"schedule.base_momentum: got {s.base_momentum}; allowed: <= schedule.max_momentum "
                      f"({s.max_momentum})")
    if t.stop_at is not None and t.stop_at > t.steps:
        errors.append(f"training.stop_at: got {t.stop_at}; allowed: at most training.steps ({t.steps})")
    if t.batch_size % t.grad_accum:
        errors.append(f"training.batch_size: got {t.batch_size}; allowed: a multiple of training.grad_accum "
                      f"({t.grad_accum})")


def from_dict(raw: Any, source: str | None = None) -> RunConfig:
    """Validate a plain mapping (as from YAML) into a :class:`RunConfig`; raise :class:`ConfigError`."""
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<top level>: got {_describe(raw)}; allowed: a mapping with sections "
                           f"{', '.join(_section_names())}"], source)
    for key in raw:
        if key not in _section_names():
            errors.append(f"{key}: unknown section; known sections: {', '.join(_section_names())}")
    hints = typing.get_type_hints(RunConfig)
    sections = {name: _build_section(name, hints[name], raw.get(name), errors) for name in _section_names()}
    cfg = RunConfig(**sections)
    if not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> ``(["optimizer", "lr"], "3e-4")``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected section.field=value, e.g. optimizer.lr=3e-4"])
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError([f"--set {text!r}: the key must be section.field, e.g. optimizer.lr; "
                           f"sections: {', '.join(_section_names())}"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {text!r}: the value is not valid YAML ({exc})"]) from None
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with every ``section.field=value`` override applied."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        (section, name), value = parse_override(text)
        if section not in _section_names():
            raise ConfigError([f"--set {text!r}: unknown section {section!r}; known sections: "
                               f"{', '.join(_section_names())}"])
        sec = out.get(section)
        if not isinstance(sec, dict):
            sec = {}
        sec[name] = value
        out[section] = sec
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (``None``: all defaults), apply overrides, validate."""
    raw: Any = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read config file: {exc.strerror}"], source) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError([f"<top level>: got {_describe(raw)}; allowed: a mapping with sections "
                               f"{', '.join(_section_names())}"], source)
    raw = apply_overrides(raw or {}, overrides or [])
    try:
        return from_dict(raw, source)
    except ConfigError as exc:
        raise _blame(exc, source, overrides or []) from None


def _blame(exc: ConfigError, source: str | None, overrides: list[str]) -> ConfigError:
    """Name where each bad value came from: a value set by ``--set`` is the command line's, not the file's."""
    given = {text.partition("=")[0].strip(): text for text in overrides}
    lines, from_cli = [], 0
    for line in exc.errors:
        key = line.split(":", 1)[0].split("[", 1)[0]
        if key in given:
            from_cli += 1
            line += f" (from the command line: --set {given[key]})"
        lines.append(line)
    if not from_cli:
        return ConfigError(lines, source)
    where = "on the command line (--set)" if from_cli == len(lines) else \
        f"in {source or 'the defaults'} and on the command line (--set)"
    return ConfigError(lines, source, where=where)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a config (what a run writes next to its results)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
