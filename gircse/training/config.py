"""``TrainConfig``: every training option (no heavy imports, so the CLI parser stays cheap)."""
from __future__ import annotations

import dataclasses

from ..methods import METHODS
from ..validation import boolean, integer, one_of, optional, real

__all__ = ["RULES", "TrainConfig"]


@dataclasses.dataclass
class TrainConfig:
    """Paper defaults: LoRA r=64, alpha=32 on all linear layers, lr 1e-5 with 10% warmup, tau 0.02,
    lambda 1, K=5, one epoch, gradients clipped at norm 1.0 (the authors' Trainer; issue 26 measured
    unclipped GIRCSE at nDCG@10 0.737 against 0.895 clipped)."""
    method: str = "gircse"              # gircse | causal-eos | bidirectional-avg | two-stage
    k: int = 5                          # soft tokens during training (gircse)
    temperature: float = 0.02
    lam: float = 1.0                    # ICR regularizer weight (gircse)
    step_reduction: str = "sum"         # sum (paper Eq. 7) | mean (authors' code) of the K step losses
    lr: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None        # a shorter run: the schedule (warmup, decay) spans this many steps
    stop_at_step: int | None = None     # pause after this step of the schedule (checkpoint + model); --resume goes on
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
    max_grad_norm: float | None = 1.0   # clip the global gradient norm (None: off); the authors' Trainer clips at 1.0
    checkpoint_every: int = 50          # optimizer steps between checkpoints (0: only the final one)
    seed: int = 0
    progress: bool = True
    log_every: int = 1
    _kill_after_step: int | None = None  # tests: SIGKILL this process after that optimizer step

    def validate(self) -> "TrainConfig":
        """Check every option (``RULES``: one rule per field) and normalize numpy scalars to Python
        numbers; ValueError/TypeError naming the option. Returns self."""
        for field in dataclasses.fields(self):
            rule = RULES.get(field.name)
            if rule is None:  # a new option must come with its rule
                raise RuntimeError(f"TrainConfig.{field.name} has no validation rule in gircse.training.config.RULES")
            setattr(self, field.name, rule(field.name, getattr(self, field.name)))
        if self.embed_chunk is not None and self.lora_dropout > 0:
            raise ValueError("embed_chunk (GradCache) replays each chunk's forward and needs a deterministic "
                             f"one; lora_dropout must be 0, got {self.lora_dropout}")
        return self

    def public(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


def _target_modules(name: str, value):
    """peft's ``target_modules``: "all-linear", another module-name pattern, or a list of module names."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    raise ValueError(f"{name} must be 'all-linear', a module name or a non-empty list of module names, got {value!r}")


# One rule per TrainConfig field (validate() refuses a field without one).
RULES = {
    "method": one_of(METHODS),
    "k": integer(1),
    "temperature": real(above=0),
    "lam": real(minimum=0),
    "step_reduction": one_of(("sum", "mean")),
    "lr": real(above=0),
    "warmup_ratio": real(minimum=0, below=1),
    "weight_decay": real(minimum=0),
    "epochs": integer(1),
    "max_steps": optional(integer(1)),
    "stop_at_step": optional(integer(1)),
    "batch_size": integer(1),
    "grad_accum": integer(1),
    "num_negatives": integer(0),
    "embed_chunk": optional(integer(1)),
    "max_length": integer(2),
    "lora_r": integer(1),
    "lora_alpha": integer(1),
    "lora_dropout": real(minimum=0, below=1),
    "lora_target_modules": _target_modules,
    "gradient_checkpointing": boolean,
    "bf16": boolean,
    "max_grad_norm": optional(real(above=0)),
    "checkpoint_every": integer(0),
    "seed": integer(0),
    "progress": boolean,
    "log_every": integer(1),
    "_kill_after_step": optional(integer(1)),
}
