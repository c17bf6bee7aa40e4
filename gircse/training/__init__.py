"""Training GIRCSE models (and the Causal-EOS / Bidirectional-Avg baselines) with LoRA.

``train(model, data, out, TrainConfig(...))`` is the Python API; the ``gircse train`` subcommand is
``gircse.cli.train``. See ``gircse.training.trainer`` for the loop, GradCache and resume;
``gircse.training.distributed`` for the torchrun all-gather. Names are imported on first access, so
importing ``gircse.training.config`` (the CLI parser reads ``TrainConfig``'s defaults) does not import torch.
"""
_LAZY = {
    "TrainConfig": "gircse.training.config",
    "apply_lora": "gircse.training.trainer",
    "batch_gradients": "gircse.training.trainer",
    "embed_texts": "gircse.training.trainer",
    "export_checkpoint": "gircse.training.trainer",
    "frozen_linear_weights_in_bf16": "gircse.training.trainer",
    "train": "gircse.training.trainer",
    "trainable_parameters": "gircse.training.trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gircse.training' has no attribute {name!r}")
