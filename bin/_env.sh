# Sourced by bin/demo and bin/test: create the virtual environment if it is missing and
# install shardkit into it (editable) with the extras named in SHARDKIT_EXTRAS.
# torch is pinned to the CPU wheel first (on this kind of machine it lies on disk); an
# unpinned torch, pulled in by a dependency, would download a multi-GB CUDA build.
# A venv that already has a torch keeps it: real users bring their own build.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SHARDKIT_VENV:-$ROOT/.venv}
EXTRAS=${SHARDKIT_EXTRAS:-}
TORCH=${SHARDKIT_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.shardkit-installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log="$VENV/install.log"
  echo "installing shardkit${EXTRAS:+[$EXTRAS]} into $VENV (first run takes a minute or two; log: $log)" >&2
  if ! {
    "$VENV/bin/python" -m pip install --upgrade pip &&
    { "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install "$TORCH"; } &&
    "$VENV/bin/python" -m pip install -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "installation failed; the full log is $log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
