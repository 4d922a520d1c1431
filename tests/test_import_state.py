"""Importing shardkit changes no process-wide setting (Pillow's bomb guard, warnings, logging, environment)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import shardkit

MODULES = ["shardkit", "shardkit.images", "shardkit.build", "shardkit.load.torch", "shardkit.train.local"]

PROBE = """
import importlib, json, logging, os, socket, sys, warnings
from PIL import Image

def state():
    root = logging.getLogger()
    return {
        "MAX_IMAGE_PIXELS": Image.MAX_IMAGE_PIXELS,
        "warnings.filters": [repr(f) for f in warnings.filters],
        "logging root": [root.level, [repr(h) for h in root.handlers]],
        "logging.disable": logging.root.manager.disable,
        "os.environ": dict(os.environ),
        "recursion limit": sys.getrecursionlimit(),
        "socket timeout": socket.getdefaulttimeout(),
    }

third_party, ours = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:  # what the libraries do on import is theirs, not shardkit's
    try:
        importlib.import_module(name)
    except ImportError:
        pass
before = state()
for name in ours:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": state()}))
"""


def third_party_imports() -> list[str]:
    """The modules shardkit's files import at module level (each dotted name, not shardkit's own)."""
    names: set[str] = set()
    for path in Path(shardkit.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in ("shardkit", "__future__"))


def test_third_party_imports_are_found():
    found = third_party_imports()
    assert "PIL" in found and "numpy" in found and "pyarrow.parquet" in found


def changes(modules: list[str], env: dict[str, str] | None = None) -> dict[str, tuple]:
    """The process-wide settings importing ``modules`` changes, in a fresh interpreter: {name: (before, after)}."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(third_party_imports()), json.dumps(modules)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    states = json.loads(out.stdout)
    before, after = states["before"], states["after"]
    return {key: (before[key], after[key]) for key in before if before[key] != after[key]}


def test_importing_shardkit_changes_no_process_wide_setting():
    changed = changes(MODULES)
    assert not changed, f"importing {', '.join(MODULES)} changed: {changed}"


def test_the_probe_sees_a_module_that_changes_settings(tmp_path):
    (tmp_path / "meddler.py").write_text(
        "import warnings\nfrom PIL import Image\nImage.MAX_IMAGE_PIXELS = None\nwarnings.simplefilter('ignore')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    changed = changes(["meddler"], env)
    assert set(changed) == {"MAX_IMAGE_PIXELS", "warnings.filters"}
    assert changed["MAX_IMAGE_PIXELS"][1] is None
