"""One rank of the two-"node" job in tests/test_multinode.py (run by torchrun: ``-m tests.support.multinode_job``).

Every rank, in one process group (the agents' c10d rendezvous, 2 agents x 2 ranks):

1. records where torchrun placed it (rank, local rank, group rank, which agent started it);
2. checks the FSDP2 path on a 2x2 HSDP mesh, replicate across nodes and shard within a node, against an
   unsharded torch.optim.AdamW reference (tests/test_fsdp.py's scenario);
3. runs the training job (``sharded_optim.app.train.train``) with telemetry, reading the file_sd targets file rank 0
   writes at telemetry start (it is withdrawn again when the run ends), and a checkpoint every ``interval`` steps.

Usage: ``-m tests.support.multinode_job OUT_DIR CONFIG [--set k=v ...]``; each rank writes ``OUT_DIR/rank_<r>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def hsdp_check() -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sharded_optim import ShardedOptimizer
    from tests.test_fsdp import _train_pair, make_model, shard

    world = dist.get_world_size()
    nodes = world // int(os.environ["LOCAL_WORLD_SIZE"])
    mesh = init_device_mesh("cpu", (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))
    out = {"shard_group": sorted(dist.get_process_group_ranks(mesh.get_group("shard"))),
           "replicate_group": sorted(dist.get_process_group_ranks(mesh.get_group("replicate")))}
    dp_rank = mesh.get_local_rank("replicate") * mesh.size(1) + mesh.get_local_rank("shard")
    out.update(_train_pair(mesh, dp_rank, world, "adamw", "torch"))
    opt = ShardedOptimizer(shard(make_model(0), mesh).parameters(), zero_stage=0)
    opt.memory_report()  # builds the runtimes
    rt = next(rt for _, rt in opt._all_runtimes())
    out["reduce_group"] = sorted(dist.get_process_group_ranks(rt.reduce_group))
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import sharded_optim.telemetry as telemetry
    from sharded_optim.app.config import load_config
    from sharded_optim.dist import init_distributed
    from sharded_optim.app.train import train

    info = init_distributed(backend="gloo")
    result: dict[str, Any] = {
        "rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
        "local_world_size": info.local_world_size, "group_rank": int(os.environ["GROUP_RANK"]),
        "node": os.environ["NODE_TAG"], "launcher": info.launcher}
    result["hsdp"] = hsdp_check()

    real_start = telemetry.start

    def start_and_read_targets(optimizer: Any, **kwargs: Any) -> Any:
        handle = real_start(optimizer, **kwargs)
        if handle.targets_file is not None:  # rank 0: what Prometheus would read while the job runs
            result["targets_file"] = json.loads(handle.targets_file.read_text())
        result["metrics_port"] = handle.server.port
        return handle

    telemetry.start = start_and_read_targets
    result["summary"] = train(load_config(args.config, args.overrides))  # reuses, then ends, the process group
    (args.out / f"rank_{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
