"""Training GIRCSE models (and the Causal-EOS / Bidirectional-Avg baselines) with LoRA.

``train(model, data, out, TrainConfig(...))`` is the Python API; ``add_train_parser`` / ``run_train``
(``gircse.training.cli``) the ``gircse train`` subcommand. See ``gircse.training.trainer`` for the loop,
GradCache and resume; ``gircse.training.distributed`` for the torchrun all-gather.
"""
from .cli import add_train_arguments, add_train_parser, config_from_args, run_train
from .trainer import TrainConfig, apply_lora, batch_gradients, embed_texts, train, trainable_parameters

__all__ = ["TrainConfig", "add_train_arguments", "add_train_parser", "config_from_args", "run_train", "apply_lora", "batch_gradients", "embed_texts", "train", "trainable_parameters"]
