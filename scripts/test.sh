#!/usr/bin/env bash
# Installs what the test suite needs into .venv (created if missing) and runs it.
#
#   scripts/test.sh [--parity] [pytest args...]
#
# --parity (or MRCNN_PARITY=1) also installs torch/torchvision, the reference
# implementations the parity tests compare against. Without them those tests
# skip, unless MRCNN_REQUIRE_PARITY=1, which turns each skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

parity="${MRCNN_PARITY:-0}"
if [[ "${1:-}" == "--parity" ]]; then parity=1; shift; fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null; then python="$candidate"; break; fi
  done
fi
[[ -n "$python" ]] || { echo "test.sh: no python3.11 or python3 on PATH" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "test.sh: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

# Reinstall only when a requirements file changed since the last install.
reqs=(requirements.txt requirements-test.txt)
[[ "$parity" == 1 ]] && reqs+=(requirements-parity.txt)
stamp=".venv/.mrcnn-installed-$(cat "${reqs[@]}" setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  echo "test.sh: installing ${reqs[*]} and the package"
  args=()
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${args[@]}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $status
