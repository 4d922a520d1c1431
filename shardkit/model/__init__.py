"""The model room: a Qwen-VL model loaded, checked against a build and a cache of image embeddings, its vision tower
and that tower's fingerprint; and this process's rank, world size and device. :mod:`shardkit.model.packing` makes
the linear-attention layers of Qwen3.5 models run each packed sample alone.

Used by the trainers, ``shardkit embed``, the loaders (rank and world size) and the command line; it imports none
of them. torch and transformers are imported by the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

from shardkit.errors import ConfigError
from shardkit.shards.embeddings import EmbeddingManifest
from shardkit.shards.manifest import BuildInfo

if TYPE_CHECKING:
    import torch

# vision config keys that say how a model was loaded or saved, not what the network computes
_NOT_ARCHITECTURE = {
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
    "name_or_path",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "attn_implementation",
    "use_cache",
}


# -- ranks -----------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when it is initialised, else ``(0, 1)`` (torch or not)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by torchrun (``backend``: default nccl on GPU, gloo on CPU);
    ``(rank, world_size, device)``, the device this process's GPU (``LOCAL_RANK``) or the CPU."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
        global _joined
        _joined = True
    return (*rank_world(), device)


_joined = False  # whether setup_distributed made this process's group (leave_distributed ends only that one)
_left = 0  # how many groups this process has left (a key of its own in the store for each)


def leave_distributed() -> None:
    """Leave the process group :func:`setup_distributed` joined, one rank after another, while the interpreter is
    whole. A group the caller made is left to the caller.

    Gloo's connections are torn down when a group is destroyed, or when the process exits still in it; a rank whose
    teardown meets a peer's closing connection can abort (SIGABRT, "terminate called without an active exception":
    pytorch/gloo#155; at exit, pytorch/pytorch#179291). So after a barrier the ranks destroy the group in turn, the
    highest first: each waits, in the rendezvous store (``MASTER_ADDR:MASTER_PORT``, not the group), for the rank
    above it to have left, so no rank's teardown overlaps another's. Called when a command ends well only: after an
    error the other ranks may be inside a collective, and destroying the group then can hang.
    """
    import datetime

    import torch.distributed as dist

    global _joined, _left
    if not (_joined and dist.is_initialized()):
        _joined = False
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # every rank is done with the group
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(minutes=10),
    )
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    prefix = f"shardkit/left/{run}/{_left}"
    if rank < world - 1:
        store.wait([f"{prefix}/{rank + 1}"])
    dist.destroy_process_group()
    _joined, _left = False, _left + 1
    if rank > 0:
        store.set(f"{prefix}/{rank}", "1")


# -- the model -------------------------------------------------------------------------------


def load_model(path: str, attn_implementation: str | None = None) -> torch.nn.Module:
    """A model of a type some family trains (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and their MoE variants: the
    families' ``model_classes``), float32, from a local folder or a Hugging Face id."""
    import torch
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ConfigError(f"cannot load model {path!r}: {exc}") from None
    from shardkit.families import MODEL_CLASSES  # each family names the transformers classes of its checkpoints

    if config.model_type not in MODEL_CLASSES:
        raise ConfigError(
            f"model {path!r} is {config.model_type!r}; the local trainer takes the model types "
            f"{', '.join(MODEL_CLASSES)}"
        )
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = getattr(transformers, MODEL_CLASSES[config.model_type])
    return model_class.from_pretrained(path, dtype=torch.float32, **options)


def check_fits_build(model: torch.nn.Module, build: BuildInfo) -> None:
    """Refuse a model whose vision tower cuts images on another patch grid than the build's family."""
    vision = model.config.vision_config
    family = build.family
    if (vision.patch_size, vision.spatial_merge_size) != (family.patch_size, family.merge_size):
        raise ConfigError(
            f"the build's images are on a {family.patch_size}x{family.merge_size} patch grid "
            f"({family.name}), the model's vision tower uses {vision.patch_size}x{vision.spatial_merge_size}"
        )


def check_token_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse a batch whose token ids lie outside the model's vocabulary (a build made with another tokenizer)."""
    if int(input_ids.max()) >= model.config.text_config.vocab_size:
        raise ConfigError(
            "the build's token ids exceed the model's vocabulary: was it built with this model's tokenizer?"
        )


def check_fits_embeddings(model: torch.nn.Module, embeddings: EmbeddingManifest, location: str) -> None:
    """Refuse cached image embeddings (at ``location``) made by another vision tower than ``model``'s, or for a
    model they cannot yet be fed to (Qwen3-VL, whose deepstack features enter the language model's first layers;
    Qwen3.5's tower has none: its merger's output alone is what the language model receives)."""
    if model.config.model_type.startswith("qwen3_vl"):
        raise ConfigError(
            "cached image embeddings are not yet fed to Qwen3-VL (its deepstack features would be left out); "
            "train it with --freeze-vision-tower alone, on pixels"
        )
    fingerprint = vision_fingerprint(model)
    if embeddings.vision.fingerprint != fingerprint:
        raise ConfigError(
            f"the image embeddings in {location} were made by another vision tower ({embeddings.vision.model}, "
            f"fingerprint {embeddings.vision.fingerprint[:12]}) than this model's ({fingerprint[:12]}): "
            "run shardkit embed with this model"
        )


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower with its merger(s) of a Qwen-VL model (or of a peft model wrapping one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.visual


def vision_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the vision tower's config and weights (taken as float32, so any load dtype of a bf16 checkpoint
    gives the same)."""
    import torch

    config = {
        k: v
        for k, v in model.config.vision_config.to_dict().items()
        if not k.startswith("_") and k not in _NOT_ARCHITECTURE
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision_tower(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
