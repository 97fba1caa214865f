#!/usr/bin/env bash
# Set up a fresh machine (virtualenv, pinned install, Prometheus) and run the whole test suite.
#
# Usage:  bash scripts/test.sh [pytest args...]
# In CI (CI=true) no test may skip for a missing dependency: the tests fail instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
