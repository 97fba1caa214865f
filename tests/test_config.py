"""Run configuration: every field typed and range-checked, errors that name the field, the value and what is
allowed; unknown fields rejected; --set overrides; the shipped configs valid."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sharded_optim.app.config import (ConfigError, RunConfig, apply_overrides, dump_config, from_dict, load_config,
                                  parse_override)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def error_lines(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return info.value.errors


def test_defaults_are_valid_and_round_trip():
    cfg = from_dict({})
    assert cfg == RunConfig()
    assert from_dict(cfg.to_dict()) == cfg
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.training.steps >= 1
    raw = yaml.safe_load(path.read_text())
    assert cfg.optimizer.algorithm == raw["optimizer"]["algorithm"]


def test_shipped_configs_cover_every_algorithm_family():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "adamw", "amsgrad", "adamod", "radam", "adabound", "nadam", "adamax", "diffmod",
            "gpu-scale"} <= names
    assert load_config(REPO / "configs" / "diffmod.yaml").optimizer.len_memory == 1000
    assert load_config(REPO / "configs" / "amsgrad.yaml").optimizer.amsgrad is True


@pytest.mark.parametrize("raw, path, value_text, allowed_text", [
    ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas[1]", "1.5", "[0, 1)"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas", "[0.9]", "a list of 2 numbers"),
    ({"optimizer": {"lr": -1.0}}, "optimizer.lr", "-1.0 (float)", "a finite number >= 0"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "'fast'", "a number"),
    ({"optimizer": {"algorithm": "sgd"}}, "optimizer.algorithm", "'sgd'", "'adamw'"),
    ({"optimizer": {"zero_stage": 3}}, "optimizer.zero_stage", "3", "one of 0, 1, 2"),
    ({"optimizer": {"zero_stage": True}}, "optimizer.zero_stage", "True", "one of 0, 1, 2"),
    ({"optimizer": {"nonfinite_policy": "explode"}}, "optimizer.nonfinite_policy", "'explode'", "'skip'"),
    ({"training": {"steps": 0}}, "training.steps", "0", "an integer in [1, inf)"),
    ({"training": {"steps": 2.5}}, "training.steps", "2.5", "an integer"),
    ({"training": {"precision": "fp8"}}, "training.precision", "'fp8'", "'bf16'"),
    ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings", "'yes'", "true or false"),
    ({"telemetry": {"base_port": 70000}}, "telemetry.base_port", "70000", "[0, 65535]"),
    ({"schedule": {"kind": "linear"}}, "schedule.kind", "'linear'", "'1cycle'"),
    ({"checkpoint": {"keep_last": -1}}, "checkpoint.keep_last", "-1", "[0, inf)"),
    ({"data": {"val_fraction": 0.0}}, "data.val_fraction", "0.0", "(0, 0.5]"),
])
def test_bad_value_names_field_value_and_allowed(raw, path, value_text, allowed_text):
    lines = error_lines(raw)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{path}:"), line
    assert value_text in line and "allowed" in line and allowed_text in line, line


def test_unknown_fields_and_sections_list_the_known_ones():
    lines = error_lines({"optimizer": {"lrr": 1e-3}, "trainer": {}})
    text = "\n".join(lines)
    assert "optimizer.lrr: unknown field" in text
    assert "known fields:" in text and "lr," in text and "betas" in text
    assert "trainer: unknown section" in text and "optimizer" in text


def test_all_errors_reported_at_once():
    lines = error_lines({"optimizer": {"eps": -1, "betas": [2, 0.5]}, "training": {"batch_size": 0}})
    assert {line.split(":")[0] for line in lines} == {"optimizer.eps", "optimizer.betas[0]", "training.batch_size"}


def test_option_that_does_not_apply_to_the_algorithm_is_rejected():
    (line,) = error_lines({"optimizer": {"algorithm": "adamw", "beta3": 0.99}})
    assert line.startswith("optimizer.beta3:") and "'adamw'" in line and "adamod" in line
    (line,) = error_lines({"optimizer": {"algorithm": "nadam", "amsgrad": True}})
    assert line.startswith("optimizer.amsgrad:") and "adabound" in line
    assert from_dict({"optimizer": {"algorithm": "adamod", "beta3": 0.99}}).optimizer.beta3 == 0.99
    assert from_dict({"optimizer": {"algorithm": "diffmod", "len_memory": 100}}).optimizer.len_memory == 100
    (line,) = error_lines({"optimizer": {"algorithm": "adamod", "len_memory": 100}})
    assert line.startswith("optimizer.len_memory:") and "diffmod" in line
    (line,) = error_lines({"optimizer": {"algorithm": "diffmod", "len_memory": 100, "beta3": 0.9}})
    assert line.startswith("optimizer.len_memory:") and "beta3" in line
    (line,) = error_lines({"optimizer": {"algorithm": "diffmod", "len_memory": 1}})
    assert line.startswith("optimizer.len_memory:")


def test_cross_field_constraints():
    (line,) = error_lines({"model": {"d_model": 96, "n_heads": 5}})
    assert line.startswith("model.n_heads:") and "96" in line
    (line,) = error_lines({"schedule": {"kind": "warmup", "warmup_steps": 10}, "training": {"steps": 10}})
    assert line.startswith("schedule.warmup_steps:") and "training.steps" in line
    (line,) = error_lines({"training": {"batch_size": 10, "grad_accum": 4}})
    assert line.startswith("training.batch_size:") and "grad_accum" in line


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 3e-4 as the string "3e-4"; the config accepts it as the float it means.
    raw = yaml.safe_load("optimizer: {lr: 3e-4}")
    assert raw["optimizer"]["lr"] == "3e-4"
    assert from_dict(raw).optimizer.lr == pytest.approx(3e-4)


def test_none_means_algorithm_default_for_optional_fields():
    cfg = from_dict({"optimizer": {"weight_decay": None, "lr": None}})
    assert cfg.optimizer.weight_decay is None and cfg.optimizer.lr is None
    (line,) = error_lines({"training": {"steps": None}})
    assert line.startswith("training.steps:") and "None" in line


def test_overrides_apply_and_parse_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {algorithm: adamw, lr: 1.0e-3}\n")
    cfg = load_config(path, ["optimizer.lr=3e-4", "optimizer.betas=[0.9, 0.95]", "training.steps=7",
                             "model.tie_embeddings=false", "data.path=/some/text.txt"])
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.training.steps == 7 and cfg.model.tie_embeddings is False
    assert cfg.data.path == "/some/text.txt"
    assert parse_override("training.run_dir=runs/x=y") == (["training", "run_dir"], "runs/x=y")


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr", "section.field=value"),
    ("lr=3e-4", "section.field"),
    ("trainer.steps=3", "unknown section 'trainer'"),
    ("optimizer.betas=[0.9,", "not valid YAML"),
])
def test_bad_override_is_explained(override, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    assert fragment in str(info.value) and override in str(info.value)


def test_override_of_unknown_field_is_rejected_with_known_fields():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optimizer.learning_rate=1e-3"])
    assert "optimizer.learning_rate: unknown field" in str(info.value) and "lr" in str(info.value)


def test_bad_file_and_bad_yaml_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "not valid YAML" in str(info.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="allowed: a mapping"):
        load_config(listy)


def test_every_field_has_a_declared_check():
    """Each dataclass field carries its range/choices/doc metadata, so none escapes validation."""
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert "doc" in f.metadata, f"{section.name}.{f.name} has no declared check"


# --- one set of limits, no hand copy: the config is the constructor's arguments --------------------------

LIBRARY_ONLY = {"process_group", "reduce_grads", "stats_interval", "overlap_param_gather", "capturable"}


def test_optimizer_section_is_the_constructors_arguments():
    import inspect

    from sharded_optim import ShardedOptimizer
    from sharded_optim.app.config import OptimizerConfig
    from sharded_optim.rules import OPTION_DEFAULTS

    fields = {f.name for f in dataclasses.fields(OptimizerConfig)} - set(OptimizerConfig.LOOP_FIELDS)
    arguments = set(inspect.signature(ShardedOptimizer.__init__).parameters) - {"self", "params", "algorithm_options"}
    options = set(OPTION_DEFAULTS) | {"decoupled_weight_decay", "len_memory"}
    assert fields == (arguments - LIBRARY_ONLY) | options, fields ^ ((arguments - LIBRARY_ONLY) | options)


@pytest.mark.parametrize("section", [{}, {"algorithm": "adamod", "beta3": 0.99, "lr": 3e-4, "zero_stage": 0},
                                     {"algorithm": "diffmod", "len_memory": 100, "weight_decay": 0.1},
                                     {"algorithm": "adabound", "amsgrad": True, "final_lr": 0.2, "kernel": "eager"}])
def test_from_config_builds_what_the_constructor_builds(section):
    import torch

    from sharded_optim import ShardedOptimizer

    o = from_dict({"optimizer": section}).optimizer
    built = ShardedOptimizer.from_config(torch.nn.Linear(3, 2).parameters(), o, exclude=o.LOOP_FIELDS)
    by_hand = ShardedOptimizer(torch.nn.Linear(3, 2).parameters(), **{k: v for k, v in section.items()})
    assert built.algorithm == by_hand.algorithm and built.defaults == by_hand.defaults
    assert (built.zero_stage, built.kernel_mode) == (by_hand.zero_stage, by_hand.kernel_mode)


def test_from_config_refuses_a_field_that_is_no_argument():
    import torch

    from sharded_optim import ShardedOptimizer
    from sharded_optim.app.config import OptimizerConfig

    with pytest.raises(TypeError, match="grad_clip"):   # a loop field not excluded is named, never dropped
        ShardedOptimizer.from_config(torch.nn.Linear(3, 2).parameters(), OptimizerConfig())
    with pytest.raises(TypeError, match="dataclass"):
        ShardedOptimizer.from_config(torch.nn.Linear(3, 2).parameters(), {"lr": 1e-3})


@pytest.mark.parametrize("section", [
    {"lr": 0.0}, {"lr": 20.0}, {"lr": -1e-9}, {"eps": 0.0}, {"betas": [0.0, 0.0]}, {"betas": [0.9, 1.0]},
    {"weight_decay": 1e30}, {"algorithm": "adam", "weight_decay": 1e30}, {"algorithm": "adabound", "gamma": 0.0},
    {"algorithm": "adabound", "final_lr": 50.0}, {"algorithm": "nadam", "momentum_decay": 2.0},
    {"algorithm": "diffmod", "len_memory": 1.0}, {"algorithm": "adamod", "beta3": 1.0}, {"bucket_mb": 1e6},
    {"bucket_mb": 0.0}, {"spike_sigma": 0.0}, {"spike_window": 1},
])
def test_config_accepts_exactly_what_the_constructor_accepts(section):
    import torch

    from sharded_optim import ShardedOptimizer

    try:
        ShardedOptimizer(torch.nn.Linear(3, 2).parameters(), **section)
        constructor_ok = True
    except (ValueError, TypeError):
        constructor_ok = False
    try:
        from_dict({"optimizer": section})
        config_ok = True
    except ConfigError as exc:
        config_ok = False
        assert len(exc.errors) == 1 and exc.errors[0].startswith("optimizer."), exc.errors
    assert config_ok == constructor_ok, section

