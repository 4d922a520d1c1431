"""Terminal mode: a sample's conversation with its trained tokens marked (ANSI colour, or [[...]] markers)."""

from __future__ import annotations

from shardkit.shards import Sample
from shardkit.show.tokens import ImageSpan, TokenDecoder, visible

TRAINED_ON, TRAINED_OFF = "\x1b[1;30;43m", "\x1b[0m"  # bold black on yellow
MUTED_ON = "\x1b[2m"


def sample_text(sample: Sample, decoder: TokenDecoder, *, color: bool) -> str:
    """The sample's header line and conversation; trained runs of tokens in colour or between ``[[`` and ``]]``."""
    info = sample.stored
    open_mark, close_mark = (TRAINED_ON, TRAINED_OFF) if color else ("[[", "]]")
    out = [
        f"== {visible(sample.key)} (source line {info.line}): {info.num_tokens} tokens, "
        f"{info.num_trained_tokens} trained"
        + (", fitted" if info.fitted else "")
        + (f", {info.truncated_tokens} tokens truncated" if info.truncated_tokens else "")
        + " =="
    ]
    trained = False
    for turn in decoder.turns(sample):
        for item in turn.items:
            is_trained = item.trained > 0 if isinstance(item, ImageSpan) else item.weight > 0
            if is_trained != trained:
                out.append(open_mark if is_trained else close_mark)
                trained = is_trained
            if isinstance(item, ImageSpan):
                chip = f"<{item.label}>"
                out.append(f"{MUTED_ON}{chip}{TRAINED_OFF}" if color and not trained else chip)
            else:
                out.append(item.text)
    if trained:
        out.append(close_mark)
    return out[0] + "\n" + "".join(out[1:]).rstrip("\n") + "\n"
