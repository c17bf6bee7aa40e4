"""``gircse train``: argument parser and runner.

  gircse train --model smollm2-135m --data train.jsonl --method gircse --k 5 --out runs/x
  torchrun --nproc_per_node 2 -m gircse train ...      # negatives span both ranks (gloo on CPU)

``--data`` defaults to the shipped Debian training set. Defaults are the paper's (LoRA r=64/alpha=32
on all linear layers, lr 1e-5, 10% warmup, tau 0.02, lambda 1, K=5, one epoch).
"""
from __future__ import annotations

import argparse

from ..methods import METHODS
from .common import DTYPE_NAMES, _quiet_loading, check_device

__all__ = ["add_train_arguments", "add_train_parser", "config_from_args", "run_train"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import TrainConfig

    d = TrainConfig()
    parser.add_argument("--model", default="smollm2-135m", help="base causal LM: 'smollm2-135m', a path or hub id")
    parser.add_argument("--data", default=None, help="JSONL(.gz) rows {query, pos, neg, instruction} "
                                                     "(default: the shipped Debian training set)")
    parser.add_argument("--out", required=True, help="output directory (checkpoint, log, trained model)")
    parser.add_argument("--method", choices=METHODS, default=d.method)
    parser.add_argument("--k", type=int, default=d.k, help="soft tokens generated during training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT from its checkpoint.safetensors (same options and data file)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an OUT that holds a run, replacing its checkpoint, log and model")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--num-negatives", type=int, default=d.num_negatives, help="hard negatives per row")
    parser.add_argument("--gradcache-chunk", type=int, default=None,
                        help="GradCache: embed in chunks of this many texts (bounded memory); default off")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--lam", type=float, default=d.lam, help="ICR regularizer weight")
    parser.add_argument("--step-reduction", choices=("sum", "mean"), default=d.step_reduction,
                        help="combine the K step losses by sum (the paper's Eq. 7) or mean (the authors' code)")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="end the run after this many optimizer steps (the lr schedule spans them)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop after this step of the full schedule, writing the checkpoint and the model "
                             "at that step; a later --resume continues the same run")
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--lora-target-modules", default="all-linear",
                        help="'all-linear' or a comma-separated list of module names")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (loss and similarities stay fp32)")
    parser.add_argument("--max-grad-norm", type=_grad_norm, default=d.max_grad_norm,
                        help="clip the gradient's global norm to this (default %(default)s, as the authors' "
                             "Trainer; 'none' turns clipping off)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="model weights dtype (default: fp32 on CPU)")


def _grad_norm(text: str) -> float | None:
    """'none' (no clipping) or a number; TrainConfig checks that it is > 0."""
    return None if text.strip().lower() == "none" else float(text)


_grad_norm.__name__ = "max-grad-norm"  # argparse names the type in "invalid max-grad-norm value: ..."


def add_train_parser(sub) -> None:
    parser = sub.add_parser("train", help="train a GIRCSE (or baseline) LoRA adapter on JSONL pairs")
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)


def config_from_args(args):
    from ..training.config import TrainConfig

    targets = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return TrainConfig(
        method=args.method, k=args.k, temperature=args.temperature, lam=args.lam,
        step_reduction=args.step_reduction, lr=args.lr,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, epochs=args.epochs,
        max_steps=args.max_steps, stop_at_step=args.stop_at_step, batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        num_negatives=args.num_negatives, embed_chunk=args.gradcache_chunk, max_length=args.max_length,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target_modules=targets, gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
        max_grad_norm=args.max_grad_norm, checkpoint_every=args.checkpoint_every, seed=args.seed,
        progress=not args.no_progress).validate()


def run_train(args) -> int:
    import os
    import sys
    import time

    from .. import loading
    from ..model import GIRCSE
    from ..training.trainer import plan_run, train

    # Everything that can be wrong is checked before the model loads: options, paths, every data row, the
    # run's fit in one step, what --out holds and, with --resume, that the checkpoint is this run's.
    config = config_from_args(args)
    data = args.data
    if data is None:
        from ..data.debian import shipped_path

        data = shipped_path("train.jsonl.gz")
    loading.check_model_reference(args.model, what="--model")
    check_device(args.device)
    plan_run(data, args.out, config, resume=args.resume, overwrite=args.overwrite,
             world_size=int(os.environ.get("WORLD_SIZE", "1")))
    start = time.perf_counter()
    with _quiet_loading():
        model = GIRCSE.from_pretrained(args.model, method=config.method, k=config.k, device=args.device,
                                       dtype=args.dtype, max_length=config.max_length)
    train(model, data, args.out, config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"gircse train: {config.method} on {data} -> {args.out} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    return 0
