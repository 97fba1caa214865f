"""Test helpers for the telemetry tests: required tools, a real Prometheus server, Grafana-style templating.

Nothing here is a mock: :class:`PrometheusServer` runs ``/usr/bin/prometheus`` on 127.0.0.1 with a temporary
storage directory, and the dashboard checks run the dashboard's own queries against it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
T = TypeVar("T")


def require_tool(name: str) -> str:
    """Path of an executable; a missing one fails under CI=true (never a silent skip there), else skips."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian package 'prometheus' provides prometheus and promtool)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def shared_dir() -> Path:
    """The read-only shared design folder, ``../shared`` next to the repository root."""
    path = REPO.parent / "shared"
    if not (path / "grafana-schema").is_dir():
        pytest.fail(f"shared design folder not found at {path} (expected ../shared beside the repository "
                    "root, holding grafana-schema/)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=DASHBOARDS)


def wait_until(fn: Callable[[], T | None], *, timeout: float, what: str, poll: float = 0.2) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except OSError as exc:  # the server may not be up yet: keep the last error for the message
            last_exc = exc
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


class PrometheusServer:
    """``/usr/bin/prometheus`` on 127.0.0.1, configured from the committed ``dashboards/prometheus.yml``.

    Only what a test must change is overridden: 1 s scrape/evaluation intervals, the file_sd path, and the
    rule file as an absolute path.
    """

    def __init__(self, targets_file: Path, workdir: Path) -> None:
        self.targets_file = targets_file
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        cfg["rule_files"] = [str(DASHBOARDS / "alerts.yml")]
        (job,) = cfg["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "prometheus.log"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            [require_tool("prometheus"), f"--config.file={self.config}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=60, what="Prometheus /-/ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return "Ready" in http_get(self.url + "/-/ready", timeout=2)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns ``data`` and fails on a non-success status."""
        query = urllib.parse.urlencode(params, doseq=True)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def targets_up(self) -> list[dict[str, Any]]:
        return [t for t in self.api("targets")["activeTargets"] if t["health"] == "up"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def prometheus_server() -> Iterator[PrometheusServer]:
    """A running Prometheus scraping the targets listed in ``<tmp>/targets.json`` (written by rank 0)."""
    require_tool("prometheus")
    with tempfile.TemporaryDirectory(prefix="prom-") as tmp:
        work = Path(tmp)
        targets = work / "targets.json"
        targets.write_text("[]\n")
        server = PrometheusServer(targets, work)
        try:
            yield server
        finally:
            server.stop()


# ---- Grafana-style templating -------------------------------------------------------------------------

def format_variable(values: list[str], *, multi_or_all: bool) -> str:
    """What Grafana's Prometheus datasource substitutes for ``$var`` (its interpolateQueryExpr).

    A single-value variable is escaped for a PromQL string only; a multi-value or include-All variable is
    regex-escaped (doubled for the PromQL string) and several values are joined as ``(a|b)``.
    """
    if not multi_or_all:
        return values[0].replace("\\", "\\\\").replace("'", "\\\\'")
    escaped = [re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", v.replace("\\", "\\\\\\\\")) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def rate_interval(interval_s: float, scrape_s: float) -> float:
    """Grafana's ``$__rate_interval``: max($__interval + scrape interval, 4 * scrape interval)."""
    return max(interval_s + scrape_s, 4 * scrape_s)


def substitute(expr: str, variables: dict[str, str], builtins: dict[str, str]) -> str:
    """Replace ``$name``, ``${name}`` and ``[[name]]`` (longest names first, as Grafana's regex does)."""
    every = {**builtins, **variables}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in every:
            raise AssertionError(f"query uses undefined variable ${name}: {expr}")
        return every[name]

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def label_values_query(query: str) -> tuple[str | None, str]:
    """Split ``label_values(selector, label)`` / ``label_values(label)`` into (selector, label)."""
    m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\)\s*", query)
    if not m:
        raise AssertionError(f"unsupported variable query: {query!r}")
    return m.group(1), m.group(2)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])
