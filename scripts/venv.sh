# Sourced by scripts/*.sh: creates or reuses .venv and installs the given
# requirement files (plus the package, editable) when any of them changed.
#
#   source scripts/venv.sh requirements.txt [more requirement files...]
#
# Leaves $PY set to the virtualenv's python.

_python="${PYTHON:-}"
if [[ -z "$_python" ]]; then
  for _candidate in python3.11 python3; do
    if command -v "$_candidate" >/dev/null; then _python="$_candidate"; break; fi
  done
fi
[[ -n "$_python" ]] || { echo "$(basename "$0"): no python3.11 or python3 on PATH" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "$(basename "$0"): creating .venv with $($_python --version)"
  "$_python" -m venv .venv
fi

# Reinstall only when a requirements file changed since the last install.
# The install goes through uv (pinned below, itself installed from PyPI), which
# fetches and unpacks wheels in parallel: the runtime requirements take ~20 s
# instead of pip's ~45 s, bytecode included. Where uv cannot be installed or
# fails, and where pip is set to another index than PyPI (an index-url in its
# configuration or PIP_INDEX_URL, which uv does not read), pip does it.
_uv_version=0.13.9
_stamp=".venv/.mrcnn-installed-$(cat "$@" setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [[ ! -f "$_stamp" ]]; then
  echo "$(basename "$0"): installing $* and the package"
  _args=()
  for _r in "$@"; do _args+=(-r "$_r"); done
  _pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  _uv=(.venv/bin/python -m uv pip install --quiet --python .venv/bin/python --compile-bytecode)
  # The requirements, then the package itself without its (looser) setup.cfg ranges.
  _install() { "$@" "${_args[@]}" && "$@" --no-deps -e .; }
  # (Read whole, not piped into grep -q: under pipefail, pip's SIGPIPE would fail the test.)
  _pip_config="$(.venv/bin/python -m pip config list 2>/dev/null || true)"
  if ! grep -Eq '(^|[.])index-url=' <<< "$_pip_config" \
      && "${_pip[@]}" "uv==$_uv_version" && _install "${_uv[@]}"; then
    :
  else
    echo "$(basename "$0"): installing with pip (uv failed or pip has its own index)" >&2
    _install "${_pip[@]}"
  fi
  touch "$_stamp"
fi
PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
