"""The committed locks (requirements/*.txt) and the environments made from them; standard library only.

python bin/_locks.py check LOCK [--exact]   (with the environment's own python) every package LOCK names is
                                             installed at that version, and shardkit is this checkout, editable;
                                             --exact: nothing else is installed. Exit 1 with one line per problem.
python bin/_locks.py readme                  rewrite the README's "Locked environments" table from the locks
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)
LOCKED_ON = re.compile(r"^# \S+ lock, locked on (\d{4}-\d\d-\d\d)", re.MULTILINE)
# what a venv brings with it or pip-sync leaves by design, beside the lock
ALWAYS_THERE = {"pip", "shardkit"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    return {normalise(name): version for name, version in PIN.findall(lock.read_text())}


def check(lock: Path, exact: bool) -> list[str]:
    wanted = pins(lock)
    installed = {normalise(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    problems = []
    for name, version in sorted(wanted.items()):
        dist = installed.get(name)
        if dist is None:
            problems.append(f"{name}: missing ({lock.name} names {version})")
        elif dist.version != version:
            problems.append(f"{name}: {dist.version} installed, {lock.name} names {version}")
    if exact:
        extra = sorted(set(installed) - set(wanted) - ALWAYS_THERE)
        problems += [f"{name}: installed, not in {lock.name}" for name in extra]
    own = installed.get("shardkit")
    origin = json.loads(own.read_text("direct_url.json") or "{}") if own else {}
    if origin.get("url") != ROOT.as_uri() or not origin.get("dir_info", {}).get("editable"):
        problems.append(f"shardkit: not installed editable from {ROOT}")
    return problems


def readme() -> None:
    """The table between the README's locks markers: each environment, its lock's date and its key versions."""
    rows = [
        ("`.venv`, every test (`bin/test`)", "test"),
        ("`.venv`, the demo (`bin/demo`): a subset of the line above", "demo"),
        ("`.venv-newest`, the torch path and parity tests again", "newest"),
    ]
    lines = [
        "| environment | lock | locked on | torch | torchvision | transformers | packages |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name in rows:
        path = ROOT / "requirements" / f"{name}.txt"
        text = path.read_text()
        versions = pins(path)
        date = LOCKED_ON.search(text)
        lines.append(
            f"| {label} | `requirements/{name}.txt` | {date.group(1) if date else '?'} | "
            f"{versions.get('torch', 'none')} | {versions.get('torchvision', 'none')} | "
            f"{versions.get('transformers', '?')} | {len(versions)} |"
        )
    readme_path = ROOT / "README.md"
    text = readme_path.read_text()
    start, end = "<!-- locks:start -->", "<!-- locks:end -->"
    if start not in text or end not in text:
        sys.exit(f"README.md has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme_path.write_text(f"{before}{start}\n" + "\n".join(lines) + f"\n{end}{after}")
    print(f"README.md: locks table rewritten ({datetime.date.today().isoformat()})", file=sys.stderr)


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) in (2, 3) and argv[2:] in ([], ["--exact"]):
        problems = check(ROOT / argv[1] if not Path(argv[1]).is_absolute() else Path(argv[1]), exact="--exact" in argv)
        for line in problems:
            print(line)
        return 1 if problems else 0
    if argv == ["readme"]:
        readme()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
