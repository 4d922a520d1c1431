"""shardkit: training-ready shards for Qwen2-VL family fine-tuning.

The data flows one way: ``read`` (JSONL -> records) -> ``images`` (resize to
the model's grid) -> ``render`` (chat format -> tokens and loss weights) ->
``shards`` (tar or Parquet, manifest), orchestrated by ``build``.
"""

__version__ = "0.1.0"
