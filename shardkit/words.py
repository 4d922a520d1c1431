"""How shardkit words what it tells people (no imports: the command line uses it before anything is loaded)."""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` and the noun, plural unless the count is 1: ``counted(1, "shard")`` is "1 shard"."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
