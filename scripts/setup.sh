#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv and install everything the job and the tests need.
#
# Usage:  source scripts/setup.sh        (or: bash scripts/setup.sh)
# Env:    VENV    virtualenv directory (default: .venv in the repository)
#         PYTHON  interpreter to create it with (default: python3)
# Installs: the package in editable mode with the [dev,deepspeed,mpi,integrations] extras, pinned by constraints.txt
# (torch==2.13.0: an unpinned install would pull a multi-GB CUDA build), and Debian's prometheus/promtool
# (used by the telemetry tests) when they are missing and we are root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing sharded-optim[dev,deepspeed,mpi,integrations] (pinned by constraints.txt)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,deepspeed,mpi,integrations]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's prometheus (for the telemetry tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "setup: prometheus/promtool not found and cannot apt-get install them (not root);" \
         "the telemetry tests need them: apt-get install prometheus" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
