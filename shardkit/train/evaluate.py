"""Evaluation during training: the token-weighted mean loss over a whole build, each sample once.

The rule (the same for the torch and the Tinker trainer): the evaluation build
is cut into batches of ``batch_size`` consecutive samples in manifest order;
rank ``r`` of ``world`` evaluates the ``r``-th of ``world`` contiguous runs of
those batches (the remainder included: unlike a training epoch, nothing is
dropped). Each batch gives its summed loss and its number of target tokens;
the per-batch values are gathered in batch order and added with
:func:`math.fsum`, so the result is the same on any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalResult:
    """The mean loss per target token over ``samples`` samples holding ``tokens`` target tokens."""

    loss: float
    tokens: int
    samples: int

    def record(self, step: int) -> dict[str, float | int]:
        """The ``metrics.jsonl`` line of this evaluation at ``step``."""
        return {"step": step, "eval_loss": self.loss, "eval_tokens": self.tokens, "eval_samples": self.samples}


def eval_batches(num_samples: int, batch_size: int) -> list[np.ndarray]:
    """Sample ids of each evaluation batch: consecutive runs of ``batch_size``, the last possibly shorter."""
    return [np.arange(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def rank_share(num_batches: int, rank: int, world: int) -> range:
    """The batch numbers rank ``rank`` of ``world`` evaluates: a contiguous run, all runs covering every batch."""
    return range(num_batches * rank // world, num_batches * (rank + 1) // world)


def combine(loss_sums: Sequence[float], tokens: Sequence[int], samples: int) -> EvalResult:
    """The mean loss from every batch's summed loss and target tokens (in batch order)."""
    total = int(sum(tokens))
    return EvalResult(math.fsum(loss_sums) / total if total else float("nan"), total, samples)
