"""Packing for models with linear-attention layers (Qwen3.5 and Qwen3.5-MoE's Gated DeltaNet): each sample of a
packed row runs through those layers alone.

A packed row holds whole samples one after another; the attention layers keep them apart through the
block-diagonal mask transformers builds from the position ids that restart at each sample (or from
``cu_seq_lens_*`` for flash-attention). Qwen3.5's Gated DeltaNet layers take no such boundary: in transformers
5.5.4 ``Qwen3_5GatedDeltaNet.forward(hidden_states, cache_params=None, attention_mask=None)`` runs its causal
convolution and its delta-rule recurrence over the whole row (the torch fallback and the fla / causal-conv1d
kernels alike, which transformers calls with ``seq_idx=None`` and no ``cu_seqlens``), so each sample starts from
the state its predecessors left and its logits change.

:func:`install` fixes that on a model: every decoder layer with a ``linear_attn`` module (Qwen3.5, Qwen3.5-MoE and
any layer built the same way) gets a forward that reads the sample boundaries from the arguments the text model
hands every layer, and its ``linear_attn`` a forward that runs once per sample, on that sample's slice of the row,
and puts the outputs back in place. The recurrence and the convolution then start fresh at each sample, as when the
sample is alone; everything else in the layer acts per token. Boundaries, per row:

- ``cu_seq_lens_q`` when given: cumulative lengths over the rows laid end to end (as shardkit's packed collator and
  transformers' flash-attention path write them);
- else the text position ids (row 0 of the 4-row M-RoPE ids, or 2-D ids): a sample starts where they are 0.

A row that holds one sample (an unpacked batch, where the positions do not restart) runs as before, with the
padding mask applied as transformers applies it. Padding after a row's last sample belongs to that sample's slice:
it comes after every real token, and the layer is causal. With a cache (generation) a packed row is refused: its
state would mix samples. Each sample's call gets none of the row's boundary arguments.

transformers 5.25 maps ``Qwen3_5GatedDeltaNet`` to hub kernels and, on a loaded model, maps it again at every
``train()`` / ``eval()``, dropping a forward set on the module: the decoder layer's forward (which no kernel mapping
touches) therefore puts the per-sample forward back on its ``linear_attn`` at every call, around whatever forward
the mapping chose.

Gradient checkpointing recomputes each sample alone too. In transformers 5.5 the recompute goes through the layer's
instance forward (this wrapper); later versions (5.25) replay the layer's class forward and hand its keyword
arguments on to ``linear_attn``, so the wrapper also puts ``cu_seq_lens_q`` into them when the batch gave only
position ids. Later transformers also refuse ``cu_seq_lens_q`` on their torch fallback ("can't keep packed
sequences apart"); with this wrapper the boundaries never reach the kernels.

Cost: one call of the layer per sample (a Python loop), exact on every path; the fla kernels' ``cu_seqlens`` and
causal-conv1d's ``seq_idx`` would do it in one call on a GPU, but transformers 5.5 does not pass them through.

:func:`prepare_packing` is what the trainer calls for a packed run: it installs this on a model with
linear-attention layers and refuses (rather than train on samples that see each other) a model whose configuration
declares linear-attention layers this module cannot find.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from shardkit.errors import ConfigError

#: the attribute marking a module whose forward this module replaced (its value: the original forward, and for a
#: linear-attention module whether that was set on the module itself)
_ORIGINAL = "_shardkit_original_forward"
#: the attribute marking the per-sample forward of a linear-attention module
_PER_SAMPLE = "_shardkit_per_sample"
#: where a linear-attention module finds the boundaries of the call in progress
_BOUNDARIES = "_shardkit_sample_starts"
#: keyword arguments that describe a packed row's boundaries
_BOUNDARY_KWARGS = frozenset(
    {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "position_ids"}
)
#: keyword arguments of a linear-attention call that describe the whole row (the cache, the padding mask, the
#: boundaries), left out of each sample's call
_NOT_PER_SAMPLE = _BOUNDARY_KWARGS | {"cache_params", "cache", "attention_mask"}


def linear_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model`` that hold a linear-attention (``linear_attn``) module."""
    return [m for m in model.modules() if isinstance(getattr(m, "linear_attn", None), torch.nn.Module)]


def installed(model: torch.nn.Module) -> bool:
    """Whether every linear-attention layer of ``model`` runs per sample (true when it has none)."""
    return all(_ORIGINAL in layer.__dict__ for layer in linear_attention_layers(model))


def sample_starts(
    rows: int, length: int, position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None
) -> list[list[int]]:
    """The start of each sample in each of ``rows`` rows of ``length`` tokens (each row's list begins with 0)."""
    starts: list[list[int]] = [[0] for _ in range(rows)]
    if cu_seq_lens is not None:
        for flat in cu_seq_lens.tolist()[:-1]:
            row, start = divmod(int(flat), length)
            if row < rows and start:
                starts[row].append(start)
        if int(cu_seq_lens[-1]) != rows * length:
            raise ValueError(f"cu_seq_lens ends at {int(cu_seq_lens[-1])}, not at the batch's {rows} x {length} tokens")
        return starts
    if position_ids is None:
        return starts
    if position_ids.ndim == 1:
        position_ids = position_ids[None]
    if position_ids.shape[-1] != length:
        raise ValueError(f"position ids of length {position_ids.shape[-1]} for rows of {length} tokens")
    position_ids = position_ids.expand(rows, length)
    for row, columns in enumerate(position_ids == 0):
        starts[row] += [int(c) for c in torch.nonzero(columns).view(-1).tolist() if c]
    return starts


def cu_seq_lens(starts: list[list[int]], length: int) -> torch.Tensor:
    """The boundaries of :func:`sample_starts` as cumulative lengths over the rows laid end to end (int32)."""
    flat = [row * length + start for row, row_starts in enumerate(starts) for start in row_starts]
    return torch.tensor([*flat, len(starts) * length], dtype=torch.int32)


def _wrap_attention(attention: torch.nn.Module) -> None:
    """Put the per-sample forward on ``attention``, around its forward of the moment, unless it is there."""
    if getattr(attention.__dict__.get("forward"), _PER_SAMPLE, False):
        return
    original = attention.forward
    attention.__dict__[_ORIGINAL] = (original, "forward" in attention.__dict__)
    forward = _attention_forward(attention, original)
    setattr(forward, _PER_SAMPLE, True)
    attention.forward = forward


def _layer_forward(layer: torch.nn.Module, original: Any) -> Any:
    attention = layer.linear_attn

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _wrap_attention(attention)  # again, where a kernel mapping (train(), eval()) has put another forward there
        rows, length = hidden_states.shape[:2]
        positions = kwargs.get("position_ids")
        if positions is None and len(args) >= 3:  # (position_embeddings, attention_mask, position_ids, ...)
            positions = args[2]
        starts = sample_starts(rows, length, positions, kwargs.get("cu_seq_lens_q"))
        if kwargs.get("cu_seq_lens_q") is None and any(len(row) > 1 for row in starts):
            # Later transformers (5.25) pass the layer's keyword arguments on to linear_attn and, under gradient
            # checkpointing, replay the layer's class forward, not this one: the boundaries must be in them.
            kwargs["cu_seq_lens_q"] = cu_seq_lens(starts, length).to(hidden_states.device)
        setattr(attention, _BOUNDARIES, starts)
        try:
            return original(hidden_states, *args, **kwargs)
        finally:
            setattr(attention, _BOUNDARIES, None)

    return forward


def _attention_forward(attention: torch.nn.Module, original: Any) -> Any:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows, length = hidden_states.shape[:2]
        given = kwargs.get("cu_seq_lens_q")  # transformers 5.25 passes them here; 5.5 only to the layer
        starts = sample_starts(rows, length, cu_seq_lens=given) if given is not None else None
        starts = starts or getattr(attention, _BOUNDARIES, None)
        if starts is None or all(len(row) == 1 for row in starts):
            rest = {k: v for k, v in kwargs.items() if k not in _BOUNDARY_KWARGS} if given is not None else kwargs
            return original(hidden_states, *args, **rest)
        # (hidden_states, cache, attention_mask, ...): the cache is `cache_params` in transformers 5.5, `cache` later
        cache = kwargs.get("cache_params", kwargs.get("cache", args[0] if args else None))
        if cache is not None:
            raise ValueError(
                "a packed row (positions restarting inside it) cannot run with a cache: pass use_cache=False"
            )
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if attention_mask is not None and attention_mask.ndim == 2:  # what transformers does to padding, first
            hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
        # the row's boundaries must not reach a kernel that runs one sample (later transformers pass them on)
        rest = {k: v for k, v in kwargs.items() if k not in _NOT_PER_SAMPLE}
        out = []
        for row, row_starts in enumerate(starts):
            ends = [*row_starts[1:], length]
            pieces = [
                original(hidden_states[row : row + 1, start:end], **rest)
                for start, end in zip(row_starts, ends, strict=True)
            ]
            out.append(torch.cat(pieces, dim=1))
        return torch.cat(out, dim=0)

    return forward


class Handle:
    """What :func:`install` changed on a model; :meth:`remove` puts the original forwards back."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for layer in self.modules:
            layer.__dict__.pop(_ORIGINAL, None)
            layer.__dict__.pop("forward", None)
            attention = layer.linear_attn
            original, own = attention.__dict__.pop(_ORIGINAL, (None, False))
            if getattr(attention.__dict__.get("forward"), _PER_SAMPLE, False):  # else a kernel mapping replaced it
                if own:
                    attention.forward = original
                else:
                    del attention.forward
        self.modules = []


def install(model: torch.nn.Module) -> Handle:
    """Make every linear-attention layer of ``model`` run each packed sample alone (see the module doc).

    Installing twice changes nothing more; the returned :class:`Handle` undoes this call's changes.
    """
    changed = []
    for layer in linear_attention_layers(model):
        if _ORIGINAL in layer.__dict__:
            continue
        _wrap_attention(layer.linear_attn)
        layer.__dict__[_ORIGINAL] = layer.forward
        layer.forward = _layer_forward(layer, layer.forward)
        changed.append(layer)
    return Handle(changed)


@contextmanager
def per_sample_linear_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """:func:`install` for the duration of a ``with`` block."""
    handle = install(model)
    try:
        yield model
    finally:
        handle.remove()


def prepare_packing(model: torch.nn.Module) -> Handle:
    """Make ``model`` fit for packed rows: :func:`install` where it has linear-attention layers (nothing to do
    where it has none). Refuses a model whose text configuration's ``layer_types`` name more linear-attention
    layers than there are decoder layers with a ``linear_attn`` module: those would let packed samples see each
    other."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    declared = sum(kind == "linear_attention" for kind in getattr(config, "layer_types", None) or [])
    found = len(linear_attention_layers(model))
    if declared != found:
        raise ConfigError(
            f"--pack: the model declares {declared} linear-attention layers and shardkit finds {found} it can run "
            "one sample at a time; the others would carry their state from one packed sample into the next: train "
            "without --pack (batches by --batch-size or --batch-tokens)"
        )
    return install(model)
