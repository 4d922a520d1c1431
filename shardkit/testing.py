"""Tiny randomly initialised Qwen2-VL, Qwen3-VL and Qwen3.5 models, and small Qwen-style tokenizers, for tests and
benchmarks without model weights.

With the real 151,936-token vocabulary the embedding and output layers are 97% of a tiny model's weights and
almost all of a training step on CPU (the logits of every position over the whole vocabulary). Where token parity
is not what is tested, :func:`write_tiny_tokenizer` gives a 2,048-token tokenizer cut from the real one, and the
configs take their vocabulary size and vision token ids from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shardkit.tokenizer.qwen3_5 import CONFIG_TOKEN_IDS

#: the vision token ids of the real Qwen vocabulary (the same in every family)
VISION_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
REAL_VOCAB_SIZE = 151936
TINY_VOCAB_SIZE = 2048
_VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_TEXT_TOKENS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"}


def write_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """Write a ``vocab_size``-token Qwen-style tokenizer into ``folder`` (loadable with ``--tokenizer folder``).

    It is the real Qwen BPE vocabulary cut short: the byte alphabet and the earliest merges (in Qwen's
    vocabulary a merge's id is 256 + its rank, so the first ids with the first merges are a complete BPE
    model), the same normalizer and pre-tokenizer, then Qwen2-VL's 14 added tokens (``<|endoftext|>`` to
    ``<|video_pad|>``) renumbered to follow. Text tokenizes into more, shorter tokens than with the real
    vocabulary; the chat markup and image tokens are single tokens as there. Deterministic: the same files
    every time.
    """
    from shardkit.families import get_family
    from shardkit.tokenizer import bundled_tokenizer_dir

    source = bundled_tokenizer_dir()
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = [token for token in spec["added_tokens"] if token["id"] <= get_family("qwen2_vl").last_added_id]
    plain = vocab_size - len(added)
    if plain <= 256:
        raise ValueError(f"vocab_size must exceed {256 + len(added)}, got {vocab_size}")
    model = spec["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < plain}
    model["merges"] = model["merges"][: plain - 256]
    for merge in model["merges"]:  # the premise above: every kept merge makes a kept token
        if "".join(merge.split(" ") if isinstance(merge, str) else merge) not in model["vocab"]:
            raise ValueError(f"the Qwen vocabulary's merge {merge!r} makes a token past id {plain}")
    renumbered = {token["id"]: plain + i for i, token in enumerate(added)}
    spec["added_tokens"] = [{**token, "id": renumbered[token["id"]]} for token in added]
    config["added_tokens_decoder"] = {
        str(renumbered[int(i)]): token for i, token in config["added_tokens_decoder"].items() if int(i) in renumbered
    }
    names = {token["content"] for token in added}
    config["additional_special_tokens"] = [t for t in config.get("additional_special_tokens", []) if t in names]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(out)


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    """``vocab_size``, the vision token ids and (with a tokenizer) the text model's bos/eos ids of the config for
    ``tokenizer`` (None: the real vocabulary, the configs' own bos/eos ids)."""
    if tokenizer is None:
        return {"vocab_size": REAL_VOCAB_SIZE, **VISION_TOKEN_IDS}
    if isinstance(tokenizer, str | os.PathLike):
        from shardkit.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))[0]
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (_VISION_TOKENS | _TEXT_TOKENS).items()}
    return {"vocab_size": len(tokenizer), **ids}


def tiny_qwen2_vl_config(family: str = "qwen2_vl", initializer_range: float = 0.02, tokenizer: Any = None):
    """A tiny randomly initialisable Qwen2-VL / Qwen2.5-VL config.

    Its vocabulary is the real one, or, with ``tokenizer`` (a folder such as :func:`write_tiny_tokenizer`
    writes, or a loaded tokenizer), that tokenizer's size and vision token ids. A larger
    ``initializer_range`` gives the frozen output layer room for confident predictions, so that a LoRA
    adapter alone can fit a small set.
    """
    vocabulary = _vocabulary(tokenizer)
    token_ids = {key: vocabulary[key] for key in VISION_TOKEN_IDS}
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config

        vision = {
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        }
    else:
        from transformers import Qwen2_5_VLConfig as Config

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": 64,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "in_chans": 3,
            "tokens_per_second": 2,  # the published checkpoints' (the config class's default is 4)
        }
    text = {
        "vocab_size": vocabulary["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_theta": 10000.0,
        "initializer_range": initializer_range,
        **{key: vocabulary[key] for key in _TEXT_TOKENS if key in vocabulary},
    }
    return Config(text_config=text, vision_config=vision, initializer_range=initializer_range, **token_ids)


def tiny_qwen3_vl_config(moe: bool = False, initializer_range: float = 0.02, tokenizer: Any = None):
    """A tiny randomly initialisable Qwen3-VL (or, with ``moe``, Qwen3-VL-MoE) config; its vocabulary as in
    :func:`tiny_qwen2_vl_config`.

    Everything Qwen3-VL adds over Qwen2.5-VL is kept: the 16-pixel patches with
    learned position embeddings, DeepStack features injected into the first
    decoder layer, interleaved M-RoPE, q/k norms and (MoE) routed experts.
    """
    vocabulary = _vocabulary(tokenizer)
    token_ids = {key: vocabulary[key] for key in VISION_TOKEN_IDS}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
        "initializer_range": initializer_range,
    }
    text = {
        "vocab_size": vocabulary["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True},
        "initializer_range": initializer_range,
        **{key: vocabulary[key] for key in _TEXT_TOKENS if key in vocabulary},
    }  # fmt: skip
    if moe:
        from transformers import Qwen3VLMoeConfig as Config

        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    else:
        from transformers import Qwen3VLConfig as Config
    return Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)


#: the vision token ids of the Qwen3.5 vocabulary (transformers' ``Qwen3_5Config``), by config key
QWEN3_5_VISION_TOKEN_IDS = {key: CONFIG_TOKEN_IDS[token] for key, token in _VISION_TOKENS.items()}
QWEN3_5_VOCAB_SIZE = 248320


def write_tiny_qwen3_5_tokenizer(folder: str | os.PathLike, vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """Write a ``vocab_size``-token Qwen3.5-style tokenizer into ``folder`` (loadable with ``--tokenizer folder``):
    the first BPE ranks of the offline Qwen3.5 vocabulary (the 256 bytes come first, so every text encodes), built as
    the real one is (:func:`shardkit.tokenizer.qwen3_5.backend_from_ranks`), then its 33 added tokens (``<think>``
    and the tool tokens included) renumbered to follow. Deterministic."""
    from shardkit.tokenizer import qwen3_5

    plain = vocab_size - len(qwen3_5.ADDED_TOKENS)
    if plain <= 256:
        raise ValueError(f"vocab_size must exceed {256 + len(qwen3_5.ADDED_TOKENS)}, got {vocab_size}")
    ranks = qwen3_5.read_ranks(qwen3_5.ranks_path().read_bytes())
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    qwen3_5.write_folder(qwen3_5.backend_from_ranks({t: r for t, r in ranks.items() if r < plain}), out)
    return str(out)


def tiny_qwen3_5_config(moe: bool = False, initializer_range: float = 0.02, tokenizer: Any = None):
    """A tiny randomly initialisable Qwen3.5 (or, with ``moe``, Qwen3.5-MoE) config: one Gated DeltaNet
    (linear-attention) layer then one full-attention layer, a one-block vision tower on the real grid (patch 16,
    merge 2, no deepstack), interleaved M-RoPE on a quarter of each head; its vocabulary the real one (248,320 rows)
    or, with ``tokenizer`` (a folder such as :func:`write_tiny_qwen3_5_tokenizer` writes, or a loaded tokenizer),
    that tokenizer's size and vision token ids."""
    if tokenizer is None:
        vocabulary = {"vocab_size": QWEN3_5_VOCAB_SIZE, **QWEN3_5_VISION_TOKEN_IDS}
    else:
        vocabulary = _vocabulary(tokenizer)
    text = {
        "vocab_size": vocabulary["vocab_size"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "max_position_embeddings": 4096,
        "initializer_range": initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        **{key: vocabulary[key] for key in _TEXT_TOKENS if key in vocabulary},
    }  # fmt: skip
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "initializer_range": initializer_range,
    }
    if moe:
        from transformers import Qwen3_5MoeConfig as Config

        text |= {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
                 "num_experts_per_tok": 2}  # fmt: skip
    else:
        from transformers import Qwen3_5Config as Config

        text["intermediate_size"] = 128
    token_ids = {key: vocabulary[key] for key in QWEN3_5_VISION_TOKEN_IDS}
    return Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
