"""``TrainConfig``: every training option (no heavy imports, so the CLI parser stays cheap)."""
from __future__ import annotations

import dataclasses

__all__ = ["METHODS", "TrainConfig"]

METHODS = ("gircse", "causal-eos", "bidirectional-avg", "two-stage")  # == gircse.model.METHODS (tested)


@dataclasses.dataclass
class TrainConfig:
    """Paper defaults: LoRA r=64, alpha=32 on all linear layers, lr 1e-5 with 10% warmup, tau 0.02,
    lambda 1, K=5, one epoch."""
    method: str = "gircse"              # gircse | causal-eos | bidirectional-avg
    k: int = 5                          # soft tokens during training (gircse)
    temperature: float = 0.02
    lam: float = 1.0                    # ICR regularizer weight (gircse)
    lr: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None        # stop early (after this many optimizer steps)
    batch_size: int = 16                # rows per rank per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    num_negatives: int = 1              # hard negatives per row (the first ones in "neg")
    embed_chunk: int | None = None      # GradCache chunk size in texts; None = direct
    max_length: int = 256
    lora_r: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    gradient_checkpointing: bool = False
    bf16: bool = False                  # bf16 autocast for the model's forward/backward
    max_grad_norm: float | None = None
    checkpoint_every: int = 50          # optimizer steps between checkpoints (0: only the final one)
    seed: int = 0
    progress: bool = True
    log_every: int = 1
    _kill_after_step: int | None = None  # tests: SIGKILL this process after that optimizer step

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("k", "batch_size", "grad_accum", "epochs", "max_length", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_negatives < 0:
            raise ValueError("num_negatives must be >= 0")
        if self.embed_chunk is not None and self.embed_chunk < 1:
            raise ValueError("embed_chunk must be >= 1 (or None for no GradCache)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        return self

    def public(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
