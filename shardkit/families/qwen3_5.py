"""Qwen3.5 / Qwen3.6 and Qwen3.8: the chat formats of tinker-cookbook 0.5.8's renderers and of the published
Hugging Face template, their vocabulary, grid and transformers classes.

The five families here share Qwen3-VL's markup (``<|im_start|>{role}\\n...<|im_end|>``, images as
``<|vision_start|><|image_pad|>...<|vision_end|>``), the 248,077-id vocabulary (``shardkit.tokenizer.qwen3_5``)
and the vision grid (patch 16, merge 2). What is new is the think block: an assistant message the model produced
after the last user message opens with ``<think>\\n{reasoning}\\n</think>\\n\\n``, empty here (shardkit records
carry no reasoning), and the generation prompt ends ``<|im_start|>assistant\\n<think>\\n``.

``qwen3_5`` is tinker-cookbook's ``qwen3_5`` renderer (Qwen3.5 and Qwen3.6 on Tinker), as
``build_supervised_example`` writes it:

- no default system prompt; each message's text is trimmed at its edges like the template's ``|trim`` (leading
  text parts left-stripped up to the first non-blank text or image, trailing ones right-stripped likewise);
- message ``i`` is a header ``\\n<|im_start|>{role}\\n`` (no ``\\n`` for the first), tokenized on its own, then the
  content and ``<|im_end|>``, tokenized apart from it; no ``\\n`` after the last ``<|im_end|>``;
- an assistant message after the last user message has the empty think block in its header
  (``...assistant\\n<think>\\n\\n</think>\\n\\n``, weight 0); earlier assistant messages have none;
- the last message, the turn being produced, is split at the generation prompt: its header is
  ``\\n<|im_start|>assistant\\n<think>\\n`` (weight 0) and ``\\n</think>\\n\\n`` is a unit of its own at the start of
  the output, weighted like the answer. So the empty block tokenizes ``<think> \\n | \\n </think> \\n\\n``: two
  ``\\n`` tokens where the template's one encode has one ``\\n\\n``.

``qwen3_5_disable_thinking`` is the cookbook renderer of that name: the same, but the produced turn's whole empty
block stays in its header (the prompt ``...<think>\\n\\n</think>\\n\\n`` says "do not think"), so only the answer
and ``<|im_end|>`` train. The cookbook's ``qwen3_5_preserve_thinking`` differs from ``qwen3_5`` only for messages
with reasoning, which shardkit records cannot hold: ``qwen3_5`` equals it too.

``qwen3_8`` is the cookbook's default renderer for Qwen3.8 models, ``qwen3_8_xhigh_reasoning`` (there is no
renderer named ``qwen3_8``): as ``qwen3_5``, but every assistant message gets the empty think block (history
included, since Qwen3.8 preserves thinking), and the reasoning-effort instruction
(:data:`XHIGH_INSTRUCTION`) starts the system message, ``{instruction}\\n\\n{system}``, or is the whole system
message when the record has none (an empty system message becomes the instruction alone). The instruction is
injected text: it never carries weight (nor the ``<|im_end|>`` of a system message it makes up alone, as with
Qwen2-VL's default system prompt), where the cookbook, training every message (``ALL_MESSAGES``), trains it.
``qwen3_8_disable_thinking`` is the cookbook's renderer of that name: no instruction, the produced turn's block
in its header.

``qwen3_5_hf`` is the chat template published with the Qwen3.5 checkpoints (``tests/fixtures`` holds a copy), as
transformers' ``apply_chat_template`` renders it: each message ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` with the
same trim, the empty block ``<think>\\n\\n</think>\\n\\n`` after the header of every assistant message after the last
user message, the whole string tokenized at once (so the block is ``<think> \\n\\n </think> \\n\\n``) and a ``\\n``
after the last ``<|im_end|>`` (weight 0). A trained message's block, after the generation prompt's ``<think>\\n``,
trains with it: as the ``\\n\\n`` token ends in that part, it carries weight too. The template refuses a
conversation without a user message ("No user query found in messages."), and so does ``qwen3_5_hf``
(``no_user_message``); the cookbook renders one (every assistant message then gets the block), and so do the
cookbook-equal families.

Weights: a trained message's content, its ``<|im_end|>`` and (produced turn) ``\\n</think>\\n\\n``. Equal to the
cookbook for ``last_assistant`` (``LAST_ASSISTANT_MESSAGE``), ``all_assistant`` (``ALL_ASSISTANT_MESSAGES``) and
per-message ``loss`` flags (``CUSTOMIZED`` with each message's flag). ``all`` (``ALL_MESSAGES``) differs from the
cookbook in two documented places, both shardkit rules for every family: images and their vision markers never
carry weight (the cookbook weights a trained user message's image chunk and markers), and the injected Qwen3.8
instruction never does.

Cookbook behaviour that cannot happen here, and why: (1) the weight of ``<think>\\n`` in a turn *with reasoning*
depends on whether the conversation has an image (``_train_after_the_generation_prompt`` only rewrites
text-only conversations), and (2) the disable-thinking renderers raise on reasoning in a text-only
conversation but train it when an image is present. Both need reasoning; shardkit records carry none, and text
holding ``<think>``, ``</think>`` or the tool tokens is rejected as a reserved token (the template would read
``</think>`` in an answer as the end of reasoning, and ``<tool_response>`` content as a tool turn), so every
record renders the same way with or without images.

The Base models (Qwen3.5-9B-Base, 35B-A3B-Base) use the cookbook's ``role_colon`` renderer, which refuses
images: there is no reference for them and no family here.

Images: the grid of ``Qwen3_5VisionConfig`` (patch 16, spatial merge 2, temporal patch 2), normalised with mean and
std 0.5, at least 65,536 pixels (256x256), as the Qwen3.5 preprocessor configuration gives them (its
``size.shortest_edge``; ``longest_edge`` is 16,777,216, of which shardkit keeps its own budget of 1,280 tokens, as for
Qwen3-VL: a stored image within both bounds is left as it is by the processor). Evidence: transformers'
``Qwen3_5VisionConfig`` (patch, merge, temporal); tinker-cookbook's ``model_info.py`` (Qwen3.5, 3.6 and 3.8 share
one tokenizer and preprocessor); two third-party test fixtures on GitHub that restate the checkpoints'
``preprocessor_config.json`` (shortest 65536, longest 16777216, mean/std 0.5, patch 16, merge 2). The file itself
could not be downloaded here, so mean/std and the minimum are as strong as those copies (and equal Qwen3-VL's).

Models: Qwen3.5 and Qwen3.6 checkpoints are transformers' ``qwen3_5`` (dense) and ``qwen3_5_moe`` (35B-A3B, 397B-A17B)
types, served by ``Qwen3VLProcessor`` with ``Qwen2VLImageProcessor``; every family here trains both. Their language
model mixes Gated DeltaNet (linear attention) and full-attention layers: packed rows need
:mod:`shardkit.model.packing`. Qwen3.8's checkpoint type could not be read offline; the cookbook gives it Qwen3.5's
tokenizer and preprocessor, and its builds train the same two types.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from shardkit.errors import ConfigError, RecordError
from shardkit.families.qwen3_vl import QWEN3_VL
from shardkit.render import ChatTokens, Piece, Renderer
from shardkit.schema import ImagePart, Record, TextPart
from shardkit.tokenizer.qwen3_5 import LAST_ADDED_ID
from shardkit.tokenizer.qwen3_5 import NAME as TOKENIZER

#: the instruction ``qwen3_8_xhigh_reasoning`` (the Qwen3.8 template's default ``reasoning_effort``) puts first in
#: the system message
XHIGH_INSTRUCTION = (
    "Reasoning effort is set to xhigh. Please think carefully through the task, validate key assumptions, consider "
    "plausible alternatives, and prioritize correctness, consistency, and clarity in the final answer."
)

THINK = "<think>"
END_THINK = "</think>"
#: the empty think block of an assistant message that did not reason
EMPTY_BLOCK = f"{THINK}\n\n{END_THINK}\n\n"
#: the part of the empty block the generation prompt supplies (with thinking on)
PROMPT_THINK = f"{THINK}\n"

#: Qwen's chat markup; a record's text may hold neither the think nor the tool tokens (the template would read them
#: as the end of reasoning or a tool turn)
TOKENS = ChatTokens(
    reserved=ChatTokens().reserved
    + (THINK, END_THINK, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
)


@dataclass(frozen=True)
class _Turn:
    """A message as these formats write it: its role, its trimmed parts, its weight, and injected text before
    the parts (never weighted)."""

    role: str
    parts: list[TextPart | ImagePart]
    weight: float
    injected: str = ""


def trim(parts: list[TextPart | ImagePart]) -> list[TextPart | ImagePart]:
    """A message's parts with whitespace stripped at its edges, as the template's ``|trim`` strips the rendered
    content (and the cookbook's ``_strip_visible_content``): from the start, text parts are left-stripped until one
    keeps some text or an image comes; likewise from the end."""
    out = list(parts)
    for order, strip in ((range(len(out)), str.lstrip), (range(len(out) - 1, -1, -1), str.rstrip)):
        for i in order:
            part = out[i]
            if not isinstance(part, TextPart):
                break
            out[i] = TextPart(type="text", text=strip(part.text))
            if out[i].text:
                break
    return out


class Qwen3_5Base(Renderer):
    """What the Qwen3.5-generation renderers share: the think tokens checked, the trimmed turns, the content."""

    #: whether the system message is Qwen3.8's: :attr:`INSTRUCTION` first, or dropped when empty without one
    QWEN3_8_SYSTEM: ClassVar[bool] = False
    #: the reasoning-effort instruction Qwen3.8 puts first in the system message, or None
    INSTRUCTION: ClassVar[str | None] = None

    def __init__(self, tokenizer: Any, tokens: ChatTokens, last_added_id: int | None):
        super().__init__(tokenizer, tokens, last_added_id)
        for token in (THINK, END_THINK):
            if self.backend.token_to_id(token) is None:
                raise ConfigError(f"the tokenizer has no {token} token: it is not a Qwen3.5 family tokenizer")

    def turns(self, record: Record, weights: list[float]) -> list[_Turn]:
        """The record's messages, trimmed and weighted, with the instruction injected (see the module doc)."""
        turns = [_Turn(m.role, trim(m.content), w) for m, w in zip(record.messages, weights, strict=True)]
        if not self.QWEN3_8_SYSTEM:
            return turns
        instruction = self.INSTRUCTION
        if turns[0].role != "system":
            return [_Turn("system", [], 0.0, instruction), *turns] if instruction else turns
        system = turns[0]
        text = "".join(p.text for p in system.parts if isinstance(p, TextPart))
        if not instruction:
            return turns if text else turns[1:]  # an empty system message renders nothing
        if text == instruction or text.startswith(f"{instruction}\n\n"):
            return turns  # the cookbook does not add it twice
        injected = f"{instruction}\n\n" if text else instruction
        return [replace(system, injected=injected), *turns[1:]]

    def content(self, turn: _Turn) -> list[Piece]:
        """A turn's injected text (weight 0), then its parts (:meth:`content_pieces`) and ``<|im_end|>``."""
        injected = [Piece(turn.injected)] if turn.injected else []
        return [*injected, *self.content_pieces(turn.parts, turn.weight), Piece(self.tokens.im_end, turn.weight)]


class Qwen3_5Renderer(Qwen3_5Base):
    """tinker-cookbook's ``qwen3_5`` renderer (Qwen3.5 and Qwen3.6)."""

    #: whether the generation prompt leaves thinking on (ends ``<think>\\n``) or closes the block
    THINKING: ClassVar[bool] = True

    def block(self, index: int, last_user: int) -> bool:
        """Whether assistant message ``index`` opens with the empty think block."""
        return index > last_user

    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        turns = self.turns(record, weights)
        last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
        out: list[Piece] = []
        for i, turn in enumerate(turns):
            newline = "\n" if i else ""
            header = f"{newline}{self.tokens.im_start}{turn.role}\n"
            output = []
            if turn.role == "assistant" and self.block(i, last_user):
                if i == len(turns) - 1 and self.THINKING:  # the produced turn: the prompt ends at <think>\n
                    header += PROMPT_THINK
                    output.append(Piece(EMPTY_BLOCK.removeprefix(PROMPT_THINK), turn.weight, new_unit=True))
                else:
                    header += EMPTY_BLOCK
            content = self.content(turn)
            out += [Piece(header, new_unit=True), *output, replace(content[0], new_unit=True), *content[1:]]
        return out


class Qwen3_5DisableThinkingRenderer(Qwen3_5Renderer):
    """tinker-cookbook's ``qwen3_5_disable_thinking`` renderer."""

    THINKING = False


class Qwen3_8Renderer(Qwen3_5Renderer):
    """tinker-cookbook's ``qwen3_8_xhigh_reasoning`` renderer, its default for Qwen3.8 models."""

    QWEN3_8_SYSTEM = True
    INSTRUCTION = XHIGH_INSTRUCTION

    def block(self, index: int, last_user: int) -> bool:
        return True


class Qwen3_8DisableThinkingRenderer(Qwen3_8Renderer):
    """tinker-cookbook's ``qwen3_8_disable_thinking`` renderer: no instruction (an empty system message is dropped),
    the produced turn's block in its header."""

    INSTRUCTION = None
    THINKING = False


class Qwen3_5TemplateRenderer(Qwen3_5Base):
    """The published Qwen3.5 chat template, as transformers' ``apply_chat_template`` renders it."""

    def pieces(self, record: Record, weights: list[float]) -> list[Piece]:
        turns = self.turns(record, weights)
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        if not users:
            raise RecordError(
                "the record has no user message, which the Qwen3.5 chat template refuses ('No user query found in "
                "messages.')",
                "no_user_message",
            )
        out: list[Piece] = []
        for i, turn in enumerate(turns):
            out.append(Piece(f"{self.tokens.im_start}{turn.role}\n"))
            if turn.role == "assistant" and i > users[-1]:
                out += [Piece(PROMPT_THINK), Piece(EMPTY_BLOCK.removeprefix(PROMPT_THINK), turn.weight)]
            out += self.content(turn)
            out.append(Piece("\n"))
        return out


# Qwen3-VL's grid, normalisation, processor and image processor (see the module doc for the evidence)
QWEN3_5 = replace(
    QWEN3_VL,
    name="qwen3_5",
    chat_format=Qwen3_5Renderer,
    tokens=TOKENS,
    tokenizer=TOKENIZER,
    last_added_id=LAST_ADDED_ID,
    model_classes={"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"},
    tinker_renderer="qwen3_5",
    # Qwen3.5's video processor and its text are not checked against transformers yet: refused (video_not_supported)
    video_grid=None,
)
QWEN3_5_DISABLE_THINKING = replace(
    QWEN3_5,
    name="qwen3_5_disable_thinking",
    chat_format=Qwen3_5DisableThinkingRenderer,
    tinker_renderer="qwen3_5_disable_thinking",
)
# the published template: the same vocabulary, grid and classes; Tinker's tokens differ (the final newline, the
# produced turn's empty block)
QWEN3_5_HF = replace(QWEN3_5, name="qwen3_5_hf", chat_format=Qwen3_5TemplateRenderer, tinker_renderer=None)
# the cookbook's default renderer for Qwen3.8 (there is no renderer named qwen3_8)
QWEN3_8 = replace(QWEN3_5, name="qwen3_8", chat_format=Qwen3_8Renderer, tinker_renderer="qwen3_8_xhigh_reasoning")
QWEN3_8_DISABLE_THINKING = replace(
    QWEN3_5,
    name="qwen3_8_disable_thinking",
    chat_format=Qwen3_8DisableThinkingRenderer,
    tinker_renderer="qwen3_8_disable_thinking",
)
