# Sourced by bin/demo and bin/test: bring the virtual environment VENV to a committed lock, then install shardkit
# from this checkout into it (editable, no dependencies: the lock holds them all).
#   SHARDKIT_VENV   the environment (default .venv); created when missing
#   SHARDKIT_LOCK   demo | test | newest: requirements/NAME.txt (made by bin/lock)
#   SHARDKIT_EXACT  1: the environment holds exactly the lock (pip-sync removes anything else); 0: it holds at least
#                   the lock (bin/demo, whose lock is a subset of test's at the same versions, so that bin/demo and
#                   bin/test share .venv in any order)
# Nothing is installed when the environment already matches (bin/_locks.py check, about a second).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SHARDKIT_VENV:-$ROOT/.venv}
LOCK=$ROOT/requirements/${SHARDKIT_LOCK:-test}.txt
EXACT=${SHARDKIT_EXACT:-1}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "$VENV runs Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'): the locks in" \
    "requirements/ are made for Python 3.11; delete $VENV and run again with PYTHON=python3.11" >&2
  exit 1
fi
_check=("$VENV/bin/python" "$ROOT/bin/_locks.py" check "$LOCK")
[ "$EXACT" = 1 ] && _check+=(--exact)
if ! "${_check[@]}" >"$VENV/lock-check.txt"; then
  source "$ROOT/bin/_tools.sh"
  log="$VENV/install.log"
  echo "== $(date -u '+%F %T') UTC: $VENV to requirements/$(basename "$LOCK") ($(wc -l <"$VENV/lock-check.txt") to change)" >>"$log"
  echo "installing requirements/$(basename "$LOCK") into $VENV ($(wc -l <"$VENV/lock-check.txt") packages to add," \
    "change or remove; from nothing: about 1 min for the demo, 3 for .venv's tests, 5 for .venv-newest's" \
    "torchvision; log: $log)" >&2
  pip_pin=$(grep -o '^pip==[^ ]*' "$ROOT/requirements/tools.txt")
  if ! {
    # pip itself at the version .venv-tools has: pip-sync drives the environment's own pip and asks for a recent one
    "$VENV/bin/python" -m pip install --no-deps "$pip_pin" &&
    if [ "$EXACT" = 1 ]; then
      "$TOOLS/bin/pip-sync" --python-executable "$VENV/bin/python" "$LOCK"
    else
      "$VENV/bin/python" -m pip install --no-deps --require-hashes -r "$LOCK"
    fi &&
      "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$ROOT"
  } >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "installation failed; the full log is $log" >&2
    exit 1
  fi
  if ! "${_check[@]}" >"$VENV/lock-check.txt"; then
    cat "$VENV/lock-check.txt" >&2
    echo "$VENV does not match requirements/$(basename "$LOCK") after installing (above); the log is $log" >&2
    exit 1
  fi
fi
export PATH="$VENV/bin:$PATH"
