#!/usr/bin/env bash
# Installs what the test suite needs into .venv (created if missing) and runs it.
#
#   scripts/test.sh [--parity] [pytest args...]
#
# --parity (or MRCNN_PARITY=1) also installs torch/torchvision, the reference
# implementations the parity tests compare against. Without them those tests
# skip, unless MRCNN_REQUIRE_PARITY=1, which turns each skip into a failure.
#
# Test files run in MRCNN_TEST_WORKERS parallel pytest processes (default 2,
# pytest-xdist, one file per worker at a time so that a module's fixtures are
# built once); 0 runs everything in this process, as plain pytest does.
set -euo pipefail
cd "$(dirname "$0")/.."

parity="${MRCNN_PARITY:-0}"
if [[ "${1:-}" == "--parity" ]]; then parity=1; shift; fi

reqs=(requirements.txt requirements-test.txt)
[[ "$parity" == 1 ]] && reqs+=(requirements-parity.txt)
source scripts/venv.sh "${reqs[@]}"

workers="${MRCNN_TEST_WORKERS:-2}"
parallel=()
[[ "$workers" != 0 ]] && parallel=(-n "$workers" --dist loadfile)

set +e
"$PY" -m pytest "${parallel[@]}" "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $status
