"""Typed, validated run configuration: YAML in, dataclasses out, clear errors for anything else.

A run config has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``training``, ``telemetry``
and ``checkpoint``; every field has a type and, where it matters, a range or a set of allowed values,
declared next to the field (:mod:`sharded_optim.app.config_schema`).  :func:`load_config` reads YAML with
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
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..rules import ALGORITHMS, LEN_MEMORY_ALGORITHMS, SPECS
from .config_schema import (ALGORITHM_OPTIONS, CheckpointConfig, DataConfig, ModelConfig,  # noqa: F401  (re-exported)
                            OptimizerConfig, RunConfig, ScheduleConfig, TelemetryConfig, TrainingConfig,
                            section_names)


class ConfigError(ValueError):
    """One or more configuration fields are invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | None = None, *, where: str | None = None):
        self.errors = errors
        head = f"invalid configuration {where}:" if where else \
            f"invalid configuration{f' in {source}' if source else ''}:"
        super().__init__("\n  ".join([head, *errors]))


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


def _optimizer_limits(o: OptimizerConfig, errors: list[str]) -> None:
    """The optimizer's own checks of its arguments: one set of limits for the constructor and the config.

    Each argument is checked alone (the others at their defaults, the algorithm and its boolean options as given,
    since those move limits: coupled L2 caps weight_decay), so that every bad field is reported at once; then
    all together.  The optimizer's message (``lr must be X, got Y``) becomes the config's form
    (``optimizer.lr: got Y; allowed: X``), so ``--set`` blame and the one-line report work as for any field.
    """
    from .. import options  # the library's validation; imports torch, so only once the fields are well-typed

    hyper = {"lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": None}
    run = {"zero_stage": 2, "bucket_mb": 25.0, "nonfinite_policy": "skip", "spike_sigma": None, "spike_window": 128}
    # options the algorithm does not take, and beta3 with len_memory, are _cross_checks' (it names both sides)
    accepted = SPECS[o.algorithm].options + (("len_memory",) if o.algorithm in LEN_MEMORY_ALGORITHMS else ())
    given = {k: v for k, v in o.algorithm_options().items() if k in accepted}
    if "beta3" in given and "len_memory" in given:
        return
    flags = {k: v for k, v in given.items() if isinstance(v, bool)}

    def check(h: dict[str, Any], opts: dict[str, Any], r: dict[str, Any]) -> bool:
        try:
            options.resolve_defaults(o.algorithm, h["lr"], h["betas"], h["eps"], h["weight_decay"], opts)
            options.check_arguments(**r, stats_interval=0, capturable=False)
        except (ValueError, TypeError) as exc:
            errors.append(_optimizer_error(o, str(exc)))
            return False
        return True

    alone = [check({**hyper, name: getattr(o, name)}, dict(flags), run) for name in hyper]
    alone += [check(hyper, {**flags, name: value}, run) for name, value in given.items() if name not in flags]
    alone += [check(hyper, dict(flags), {**run, name: getattr(o, name)}) for name in run]
    if all(alone):
        check({name: getattr(o, name) for name in hyper}, given, {name: getattr(o, name) for name in run})


def _optimizer_error(o: OptimizerConfig, text: str) -> str:
    """``lr must be X, got Y`` as the other fields say it: ``optimizer.lr: got Y (float); allowed: X``."""
    said = re.fullmatch(r"(\w+)(?:\[(\d)\])? must be (.*?)[,;] got .*", text, re.DOTALL)
    if not said or said[1] not in {f.name for f in dataclasses.fields(OptimizerConfig)}:
        return f"optimizer: {text}"
    value = getattr(o, said[1]) if said[2] is None else getattr(o, said[1])[int(said[2])]
    name = said[1] if said[2] is None else f"{said[1]}[{said[2]}]"
    return f"optimizer.{name}: got {_describe(value)}; allowed: {said[3]}"


def from_dict(raw: Any, source: str | None = None) -> RunConfig:
    """Validate a plain mapping (as from YAML) into a :class:`RunConfig`; raise :class:`ConfigError`."""
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<top level>: got {_describe(raw)}; allowed: a mapping with sections "
                           f"{', '.join(section_names())}"], source)
    for key in raw:
        if key not in section_names():
            errors.append(f"{key}: unknown section; known sections: {', '.join(section_names())}")
    hints = typing.get_type_hints(RunConfig)
    sections = {name: _build_section(name, hints[name], raw.get(name), errors) for name in section_names()}
    cfg = RunConfig(**sections)
    _optimizer_limits(cfg.optimizer, errors)   # a field that failed its type check holds its default here
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
                           f"sections: {', '.join(section_names())}"])
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
        if section not in section_names():
            raise ConfigError([f"--set {text!r}: unknown section {section!r}; known sections: "
                               f"{', '.join(section_names())}"])
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
                               f"{', '.join(section_names())}"], source)
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
