"""The multi-node path on one machine: two torchrun agents as two "nodes" (``--nnodes 2``, 2 ranks each), meeting
at a c10d rendezvous on 127.0.0.1, as launch/slurm.sbatch starts them (``python -m sharded_optim.app.torchrun``).

The two nodes differ as real ones do in their address: node 0's metrics bind 127.0.0.1, node 1's 127.0.0.2 (both
loopback), on the same ports (``base_port + local rank``).  One launch pair checks that the job trains, that ranks
and local ranks are placed as torchrun documents (global rank = group rank x 2 + local rank), that rank 0's file_sd
targets list all four endpoints, and that FSDP2 works on a 2x2 HSDP mesh (replicate across nodes, shard within);
then the 4-rank checkpoint resumes on 2 ranks (launch/torchrun.sh) to the 4-rank run's weights up to summation
order.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.jobs import REPO, TINY_CONFIG, job_env, require_tool
from tests.support.multiproc import free_port

pytestmark = pytest.mark.slow

STEPS = yaml.safe_load(TINY_CONFIG.read_text())["training"]["steps"]
HALF = STEPS // 2
NODE_ADDRS = ("127.0.0.1", "127.0.0.2")
RTOL, ATOL = 1e-4, 1e-5  # tests/test_fsdp.py's bounds for the HSDP scenario (its _err <= 1)


def free_pair_on_both() -> int:
    """A port p with p and p + 1 free on both node addresses (each node serves base_port + local rank)."""
    for _ in range(50):
        base = free_port()
        try:
            socks = [socket.create_server((addr, base + i)) for addr in NODE_ADDRS for i in (0, 1)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise AssertionError("no free port pair on 127.0.0.1 and 127.0.0.2")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict:
    require_tool("torchrun")
    tmp = tmp_path_factory.mktemp("multinode")
    out, run_dir = tmp / "ranks", tmp / "run"
    out.mkdir()
    base_port, rdzv_port, rdzv_id = free_pair_on_both(), free_port(), uuid.uuid4().hex[:8]
    procs, logs = [], []
    t0 = time.perf_counter()
    for node, addr in enumerate(NODE_ADDRS):
        cmd = [sys.executable, "-m", "sharded_optim.app.torchrun", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{rdzv_port}",
               "--rdzv_id", rdzv_id, "--rdzv_conf", f"is_host={int(node == 0)}", "--monitor-interval", "0.5",
               "-m", "tests.support.multinode_job", str(out), str(TINY_CONFIG),
               "--set", f"training.run_dir={run_dir}", "--set", f"checkpoint.interval={HALF}",
               "--set", "checkpoint.keep_last=0", "--set", "telemetry.enabled=true",
               "--set", f"telemetry.addr={addr}", "--set", f"telemetry.base_port={base_port}"]
        log = open(tmp / f"node{node}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=job_env(NODE_TAG=f"node{node}",
                                                                  SHARDED_OPTIM_KERNEL="eager"),
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.perf_counter() - t0
    output = "".join(log.seek(0) or log.read() for log in logs)
    assert codes == [0, 0], f"exit codes {codes}:\n{output[-8000:]}"
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(4)]
    print(f"two-node launch pair: {wall:.1f} s wall")
    return {"ranks": ranks, "run_dir": run_dir, "base_port": base_port, "output": output, "tmp": tmp}


def test_ranks_and_local_ranks_follow_the_nodes(two_nodes):
    ranks = two_nodes["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["world_size"] == 4 and r["local_world_size"] == 2 and r["launcher"] == "torchrun" for r in ranks)
    for r in ranks:  # torchrun: global rank = group (node) rank x ranks per node + local rank
        assert r["rank"] == r["group_rank"] * 2 + r["local_rank"], r
    nodes = {r["group_rank"]: {x["node"] for x in ranks if x["group_rank"] == r["group_rank"]} for r in ranks}
    assert sorted(nodes) == [0, 1] and all(len(tags) == 1 for tags in nodes.values()), nodes  # a node = an agent
    assert {tag for tags in nodes.values() for tag in tags} == {"node0", "node1"}


def test_the_training_job_trains_on_four_ranks(two_nodes):
    timings = ("tokens_per_s", "train_time_s", "wall_time_s")  # each rank's own clock
    summaries = [{k: v for k, v in r["summary"].items() if k not in timings} for r in two_nodes["ranks"]]
    assert all(s == summaries[0] for s in summaries)  # every rank saw the same losses
    s = summaries[0]
    assert s["world_size"] == 4 and s["launcher"] == "torchrun" and s["steps"] == STEPS
    assert s["final_train_loss"] < s["initial_train_loss"] - 1.0, s
    written = json.loads((two_nodes["run_dir"] / "summary.json").read_text())
    assert written["world_size"] == 4 and written["final_val_loss"] == s["final_val_loss"]


def test_targets_file_lists_every_endpoint_of_both_nodes(two_nodes):
    ranks, base = two_nodes["ranks"], two_nodes["base_port"]
    (doc,) = ranks[0]["targets_file"]
    expected = [f"{NODE_ADDRS[int(r['node'][-1])]}:{base + r['local_rank']}" for r in ranks]  # in rank order
    assert doc["targets"] == expected and len(set(expected)) == 4, doc
    assert sorted(doc["targets"]) == sorted(f"{a}:{base + i}" for a in NODE_ADDRS for i in (0, 1))
    assert doc["labels"]["run_id"] == two_nodes["run_dir"].name
    assert [r["metrics_port"] for r in ranks] == [base + r["local_rank"] for r in ranks]
    assert all("targets_file" not in r for r in ranks[1:])  # only rank 0 writes it
    assert not (two_nodes["run_dir"].parent / "targets" / "run.json").exists()  # withdrawn at the end


def test_hsdp_replicates_across_nodes_and_shards_within(two_nodes):
    ranks = two_nodes["ranks"]
    for r in ranks:
        h = r["hsdp"]
        same_node = sorted(x["rank"] for x in ranks if x["group_rank"] == r["group_rank"])
        same_local = sorted(x["rank"] for x in ranks if x["local_rank"] == r["local_rank"])
        assert h["shard_group"] == same_node and h["reduce_group"] == same_node, (r["rank"], h)
        assert h["replicate_group"] == same_local, (r["rank"], h)
        # same math as one unsharded torch.optim.AdamW on the whole batch, to float summation order
        assert h["param_err"] <= 1.0 and h["state_err"] <= 1.0, (r["rank"], h)
        assert h["norm_rel_diff"] <= RTOL, (r["rank"], h)
        assert h["losses"][-1] < h["losses"][0]


def test_checkpoint_from_four_ranks_resumes_on_two(two_nodes, tmp_path):
    src = two_nodes["run_dir"]
    run_dir = shutil.copytree(src, tmp_path / "run")
    # back to the state after step HALF, as if the 4-rank job had stopped there
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{HALF:08d}\n")
    for name in ("summary.json", "final_weights.pt"):
        (run_dir / name).unlink()
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--config", str(TINY_CONFIG), "--resume",
           "--set", f"training.run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(NPROC_PER_NODE="2"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["resumed_from"] == HALF and s["steps"] == STEPS
    four = torch.load(src / "final_weights.pt", weights_only=True)
    two = torch.load(run_dir / "final_weights.pt", weights_only=True)
    for name in four:
        # the same global batches; only the order of the gradient sums differs (as in test_launchers)
        torch.testing.assert_close(two[name], four[name], rtol=1e-3, atol=1e-4, msg=name)
