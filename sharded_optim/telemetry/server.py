"""One Prometheus HTTP endpoint per rank, and the file_sd targets file that lists them all.

Each rank serves its own registry on ``base_port + LOCAL_RANK`` (MONITORING.md 2.1): no multiprocess mode,
no Pushgateway.  Rank 0 gathers every rank's ``host:port`` and writes a Prometheus ``file_sd_configs`` JSON,
so a scrape config never has to know the world size or the ports (port 0 gives ephemeral ports in tests).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
from pathlib import Path

import torch.distributed as dist
from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

DEFAULT_JOB = "sharded_optim"


class MetricsServer:
    """A started ``prometheus_client`` HTTP server with a clean, idempotent :meth:`stop`."""

    def __init__(self, registry: CollectorRegistry, *, port: int, addr: str = "127.0.0.1",
                 setting: str = "port") -> None:
        """``setting`` names where ``port`` came from, for the error when it is taken (e.g.
        ``telemetry.base_port 9400 + LOCAL_RANK 1``)."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        self.addr = addr
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            why = "is already in use (another job, or another run with the same setting?)" \
                if exc.errno == errno.EADDRINUSE else "may not be bound by this user (ports below 1024 need root)"
            raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port} ({setting}): the port {why}; choose "
                                     f"a free one, e.g. {free_port(addr)} (free now), or 0 for an ephemeral port "
                                     "per rank (the targets file lists them)") from None
        self.port: int = self._server.server_port  # the bound port, also when asked for port 0

    @property
    def thread(self) -> threading.Thread:
        """The thread serving the HTTP endpoint."""
        return self._thread

    def stop(self) -> None:
        """Stop serving, close the socket and join the serving thread."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def free_port(addr: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``addr`` right now (a suggestion: another process may take it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def advertised_host(addr: str) -> str:
    """The host other machines (Prometheus) should use: the bind address unless it is a wildcard."""
    if addr in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return addr


def gather_targets(host: str, port: int) -> list[str]:
    """Every rank's ``host:port`` in rank order (a collective when a process group exists)."""
    mine = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [t for t in everyone if t is not None]


def write_targets_file(path: str | os.PathLike[str], targets: list[str], *, run_id: str,
                       job: str = DEFAULT_JOB) -> Path:
    """Write a Prometheus file_sd JSON atomically (Prometheus watches the file and must never read half)."""
    if not targets:
        raise ValueError("targets must list at least one host:port")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = [{"targets": targets, "labels": {"job": job, "run_id": run_id}}]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
