"""The training job's pieces (data, model, schedules, CLI) and in-process runs of every algorithm config."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_optim import ShardedOptimizer
from sharded_optim.app import cli, data
from sharded_optim.app.config import load_config
from sharded_optim.app.model import build_model, num_parameters, param_groups
from sharded_optim.app.train import build_scheduler, fast_forward, train
from tests.support.jobs import REPO, TINY_CONFIG, job_env

TINY_MODEL = ["model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"]


# --- data -----------------------------------------------------------------------------------------------

def test_shipped_corpus_is_real_text_of_useful_size():
    corpus = data.read_corpus()
    assert 100_000 < len(corpus) < 1_000_000
    text = corpus.decode("utf-8")  # plain UTF-8 text
    assert text.count(" the ") > 500 and "optimizer" in text


def test_batches_are_a_function_of_seed_and_step_and_independent_of_world_size():
    train_ds, val_ds = data.split_corpus(data.read_corpus(), seq_len=16, val_fraction=0.1)
    x1, y1 = data.train_batch(train_ds, seed=3, step=5, micro=0, micro_batch=8, rank=0, world_size=1)
    again, _ = data.train_batch(train_ds, seed=3, step=5, micro=0, micro_batch=8, rank=0, world_size=1)
    assert torch.equal(x1, again)
    halves = [data.train_batch(train_ds, 3, 5, 0, 8, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x1)  # two ranks together see exactly the one-rank batch
    other_step, _ = data.train_batch(train_ds, 3, 6, 0, 8, 0, 1)
    other_seed, _ = data.train_batch(train_ds, 4, 5, 0, 8, 0, 1)
    assert not torch.equal(other_step, x1) and not torch.equal(other_seed, x1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one byte
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        data.train_batch(train_ds, 3, 5, 0, 8, rank=0, world_size=3)
    evals = list(data.eval_batches(val_ds, num_batches=2, batch=4, rank=0, world_size=1))
    assert len(evals) == 2 and evals[0][0].shape == (4, 16)


def test_data_path_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        data.read_corpus(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        data.read_corpus(tmp_path)


# --- model ----------------------------------------------------------------------------------------------

def test_model_is_causal_and_sized_as_configured():
    cfg = load_config(REPO / "configs" / "quickstart.yaml").model
    model = build_model(cfg)
    assert 200_000 < num_parameters(model) < 1_000_000
    assert model.head.weight is model.tok_emb.weight
    x = torch.randint(0, 256, (2, 20))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # the future does not leak into earlier positions
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_param_groups_keep_norms_biases_and_embeddings_out_of_decay():
    model = build_model(load_config(None, TINY_MODEL).model)
    decay, no_decay = param_groups(model, weight_decay=0.1, separate_no_decay=True)
    assert decay["name"] == "decay" and decay["weight_decay"] == 0.1
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"] if p.dim() > 1} == embeddings  # else only norms and biases
    assert all(p.dim() == 2 and id(p) not in embeddings for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- schedules ------------------------------------------------------------------------------------------

def _optimizer(cfg) -> ShardedOptimizer:
    return ShardedOptimizer([torch.nn.Parameter(torch.zeros(4))], algorithm="adamw", lr=cfg.optimizer.lr,
                            kernel="eager")


def _lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_schedule():
    cfg = load_config(None, ["optimizer.lr=0.1", "schedule.kind=warmup", "schedule.warmup_steps=4",
                             "schedule.decay=cosine", "schedule.min_lr_ratio=0.1", "training.steps=20"])
    opt = _optimizer(cfg)
    lrs = _lrs(build_scheduler(cfg, opt), opt, 20)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert build_scheduler(load_config(None, []), opt) is None  # constant


def test_one_cycle_cycles_beta1_and_fast_forward_matches():
    overrides = ["optimizer.lr=0.1", "schedule.kind=1cycle", "training.steps=10"]
    cfg = load_config(None, overrides)
    opt = _optimizer(cfg)
    sched = build_scheduler(cfg, opt)
    betas = []
    for _ in range(6):
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    assert betas[0] == pytest.approx(0.95) and min(betas) < 0.9  # momentum falls while the lr rises
    replay_opt = _optimizer(cfg)
    replay = build_scheduler(cfg, replay_opt)
    fast_forward(replay, 6)
    assert replay_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert replay_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


# --- whole job, in process (single process, no launcher) ------------------------------------------------

ALGORITHM_CONFIGS = ["adamw", "amsgrad", "adamod", "radam", "adabound", "nadam", "adamax"]
# AdaMod's step-size bound starts at 0 and has a ~1/(1-beta3)-step memory: shorten it for a 16-step run.
SHORT_RUN_OVERRIDES = {"adamod": ["optimizer.beta3=0.9"]}


@pytest.mark.parametrize("name", ALGORITHM_CONFIGS)
def test_every_algorithm_config_trains(name, tmp_path):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [
        *TINY_MODEL, "training.steps=16", "training.batch_size=8", "training.log_interval=4",
        "training.eval_interval=0", "training.eval_batches=1", "schedule.kind=constant",
        "optimizer.kernel=eager", "optimizer.lr=1e-2", f"training.run_dir={tmp_path}", "checkpoint.interval=0",
        "checkpoint.at_end=false", *SHORT_RUN_OVERRIDES.get(name, [])])
    summary = train(cfg)
    assert summary["algorithm"] == cfg.optimizer.algorithm and summary["steps"] == 16
    assert summary["final_train_loss"] < summary["initial_train_loss"] - 0.3, summary
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["final_val_loss"] == summary["final_val_loss"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3
    assert load_config(tmp_path / "config.yaml") == cfg  # the resolved config is written back verbatim


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    base = [*TINY_MODEL, "training.steps=3", "training.batch_size=4", "training.eval_interval=0",
            "optimizer.kernel=eager", "training.save_final_weights=true"]
    runs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(load_config(TINY_CONFIG, [*base, f"training.seed={seed}", f"training.run_dir={tmp_path / tag}"]))
        runs[tag] = torch.load(tmp_path / tag / "final_weights.pt", weights_only=True)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


# --- command line ---------------------------------------------------------------------------------------

def test_train_cli_rejects_bad_config_with_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  algorithm: adamw\n  betas: [0.9, 1.5]\n  lrr: 0.1\n"
                   f"training:\n  run_dir: {tmp_path / 'run'}\n")
    proc = subprocess.run([sys.executable, "-m", "sharded_optim", "train", "--config", str(bad)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.betas[1]: got 1.5 (float); allowed: a number in [0, 1)" in proc.stderr
    assert "optimizer.lrr: unknown field; known fields:" in proc.stderr
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_train_cli_rejects_bad_override(tmp_path):
    rc = cli.main(["train", "--config", str(TINY_CONFIG), "--set", "optimizer.zero_stage=5",
                   "--set", f"training.run_dir={tmp_path / 'run'}"])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_cli_registry_lists_train_and_accepts_new_commands(capsys):
    seen = {}
    cli.register(cli.Command("echo-test", "test command", lambda p: p.add_argument("word"),
                             lambda args: seen.setdefault("word", args.word) and 0))
    try:
        assert cli.main(["echo-test", "hello"]) == 0
        assert seen == {"word": "hello"}
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        out = capsys.readouterr().out
        assert "train" in out and "echo-test" in out
        with pytest.raises(ValueError, match="already registered"):
            cli.register(cli.Command("echo-test", "other", lambda p: None, lambda a: 0))
    finally:
        cli._REGISTRY.pop("echo-test", None)


def test_deepspeed_local_rank_flag_is_accepted(tmp_path):
    rc = cli.main(["train", "--local_rank=0", "--config", str(TINY_CONFIG), "--set", "training.steps=0"])
    assert rc == 2  # parsed (the flag is stripped); the bad steps value is what is reported


def test_telemetry_enabled_exports_the_runs_steps(tmp_path, monkeypatch):
    import sharded_optim.telemetry as telemetry

    started, written = [], []
    real_start = telemetry.start

    def recording_start(optimizer, **kwargs):
        started.append(real_start(optimizer, **kwargs))
        written.append((started[-1].targets_file, started[-1].targets_file.exists()))
        return started[-1]

    monkeypatch.setattr(telemetry, "start", recording_start)
    cfg = load_config(TINY_CONFIG, ["training.steps=4", "training.eval_interval=0", "schedule.warmup_steps=1",
                                    "telemetry.enabled=true", "telemetry.base_port=0",
                                    "telemetry.stats_interval=2", f"training.run_dir={tmp_path}"])
    train(cfg)
    (handle,) = started
    registry = handle.metrics.registry
    assert registry.get_sample_value("sharded_optim_steps_total") == 4
    groups = {s.labels["param_group"] for m in registry.collect() for s in m.samples if "param_group" in s.labels}
    assert {"decay", "no_decay"} <= groups  # statistics were computed and exported per param group
    (path, existed), = written
    assert path == tmp_path.parent / "targets" / f"{tmp_path.name}.json" and existed  # where prometheus.yml looks
    assert not path.exists()  # stop() withdrew the scrape target
