"""``SoftTokenEmbedding``: the op as an nn.Module bound to a model's LM head and input embeddings."""
from __future__ import annotations

import torch
from torch import nn

from ._validation import check_backend, check_grad_filter
from .dispatch import soft_token_embedding


class SoftTokenEmbedding(nn.Module):
    """Maps hidden states to the probability-weighted mix of input-embedding rows.

    ``forward(hidden [..., d]) -> [..., d_e]`` equals
    ``softmax(lm_head(hidden) / temperature) @ embed_weight`` without building the [.., V] logits.
    The weights are the model's own parameters (shared, not copied), so LoRA or full fine-tuning of
    the model flows through this module.
    """

    def __init__(self, lm_head_weight: torch.Tensor, embed_weight: torch.Tensor,
                 lm_head_bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", grad_filter_eps: float = 0.0,
                 batch_invariant: bool = False):
        super().__init__()
        check_backend(backend)
        check_grad_filter(grad_filter_eps)
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
        self.lm_head_weight = lm_head_weight
        self.embed_weight = embed_weight
        self.lm_head_bias = lm_head_bias
        self.temperature, self.softcap = temperature, softcap
        self.backend, self.grad_filter_eps, self.batch_invariant = backend, grad_filter_eps, batch_invariant

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> "SoftTokenEmbedding":
        """Bind to any transformers causal LM (tied or untied; LM-head bias and Gemma softcap honoured)."""
        lm_head = model.get_output_embeddings()
        embeddings = model.get_input_embeddings()
        if lm_head is None or embeddings is None:
            raise ValueError(
                f"model ({type(model).__name__}) must have both output (LM head) and input embeddings"
            )
        config = getattr(model, "config", None)
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap is not None and "softcap" not in kwargs:
            kwargs["softcap"] = float(softcap)
        return cls(lm_head.weight, embeddings.weight, getattr(lm_head, "bias", None), **kwargs)

    @property
    def tied(self) -> bool:
        return self.lm_head_weight is self.embed_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_token_embedding(
            hidden, self.lm_head_weight, self.embed_weight, self.lm_head_bias,
            temperature=self.temperature, softcap=self.softcap, backend=self.backend,
            grad_filter_eps=self.grad_filter_eps, batch_invariant=self.batch_invariant,
        )

    def extra_repr(self) -> str:
        vocab, d = self.lm_head_weight.shape
        return (f"vocab={vocab}, d={d}, d_embed={self.embed_weight.shape[1]}, tied={self.tied}, "
                f"bias={self.lm_head_bias is not None}, temperature={self.temperature}, "
                f"softcap={self.softcap}, backend={self.backend!r}, batch_invariant={self.batch_invariant}")
