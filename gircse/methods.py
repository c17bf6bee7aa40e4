"""The embedding methods a ``GIRCSE`` model runs, and how each one pools its embedding.

The one list of method names: the model, ``gircse_config.json`` validation (``gircse.loading``),
``TrainConfig`` and the command lines all read it from here. No heavy imports, so a CLI parser or a
config check can use it without importing torch.
"""
from __future__ import annotations

__all__ = ["METHODS", "POOLING", "check_method"]

METHODS = ("gircse", "causal-eos", "bidirectional-avg", "two-stage")
# What each method's embedding is; save_pretrained writes it into gircse_config.json ("pooling").
POOLING = {
    "gircse": "mean of the final-layer states of the K generated soft-token positions",
    "causal-eos": "final-layer state of an appended EOS token",
    "bidirectional-avg": "mean of the final-layer states of the input tokens, bidirectional attention",
    "two-stage": "final-layer state of an EOS appended to the text + its greedy K-token expansion",
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method
