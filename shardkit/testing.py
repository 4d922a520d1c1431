"""Tiny randomly initialised Qwen2-VL and Qwen3-VL models for tests and benchmarks without model weights."""

from __future__ import annotations

#: the vision token ids of the real Qwen vocabulary (the same in every family)
VISION_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def tiny_qwen2_vl_config(family: str = "qwen2_vl", initializer_range: float = 0.02):
    """A tiny randomly initialisable Qwen2-VL / Qwen2.5-VL config with the real vocabulary size.

    A larger ``initializer_range`` gives the frozen output layer room for confident
    predictions, so that a LoRA adapter alone can fit a small set.
    """
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
        }
    text = {
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_theta": 10000.0,
        "initializer_range": initializer_range,
    }
    return Config(text_config=text, vision_config=vision, initializer_range=initializer_range, **VISION_TOKEN_IDS)


def tiny_qwen3_vl_config(moe: bool = False, initializer_range: float = 0.02):
    """A tiny randomly initialisable Qwen3-VL (or, with ``moe``, Qwen3-VL-MoE) config with the real vocabulary size.

    Everything Qwen3-VL adds over Qwen2.5-VL is kept: the 16-pixel patches with
    learned position embeddings, DeepStack features injected into the first
    decoder layer, interleaved M-RoPE, q/k norms and (MoE) routed experts.
    """
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
        "vocab_size": 151936,
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
    }  # fmt: skip
    if moe:
        from transformers import Qwen3VLMoeConfig as Config

        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    else:
        from transformers import Qwen3VLConfig as Config
    return Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **VISION_TOKEN_IDS)
