# Sourced by bin/lock and bin/_env.sh: .venv-tools, a small environment holding pip-tools (pip-compile, pip-sync)
# at the versions requirements/tools.txt names. It installs into the other environments with their own pip.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${SHARDKIT_TOOLS_VENV:-$_root/.venv-tools}
if ! cmp -s "$_root/requirements/tools.txt" "$TOOLS/.locked" 2>/dev/null; then
  echo "making $TOOLS (pip-tools, from requirements/tools.txt)" >&2
  rm -rf "$TOOLS"
  "${PYTHON:-python3}" -m venv "$TOOLS"
  if ! "$TOOLS/bin/python" -m pip install --no-deps --require-hashes -r "$_root/requirements/tools.txt" \
    >"$TOOLS/install.log" 2>&1; then
    tail -n 20 "$TOOLS/install.log" >&2
    echo "could not install pip-tools into $TOOLS; the log is $TOOLS/install.log" >&2
    exit 1
  fi
  cp "$_root/requirements/tools.txt" "$TOOLS/.locked"
fi
