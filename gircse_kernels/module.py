"""``SoftTokenEmbedding``: the op as an nn.Module bound to a model's LM head and input embeddings."""
from __future__ import annotations

import torch
from torch import nn

from ._validation import check_backend, check_grad_filter, check_logit_options, check_positive_finite
from .architectures import model_scales
from .dispatch import soft_token_embedding


class SoftTokenEmbedding(nn.Module):
    """Maps hidden states to the probability-weighted mix of input-embedding rows.

    ``forward(hidden [..., d]) -> [..., d_e]`` equals
    ``embed_scale * soft_token_embedding(hidden, lm_head_weight, embed_weight, lm_head_bias,
    temperature=temperature, softcap=softcap)`` without building the [.., V] logits.
    The weights are the model's own parameters (shared, not copied), so LoRA or full fine-tuning of
    the model flows through this module.
    """

    def __init__(self, lm_head_weight: torch.Tensor, embed_weight: torch.Tensor,
                 lm_head_bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                 softcap: float | None = None, embed_scale: float = 1.0, backend: str = "auto",
                 grad_filter_eps: float = 0.0, batch_invariant: bool = False):
        super().__init__()
        check_logit_options(temperature, softcap)
        check_positive_finite("embed_scale", embed_scale)
        check_backend(backend)
        check_grad_filter(grad_filter_eps)
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
        self.lm_head_weight = lm_head_weight
        self.embed_weight = embed_weight
        self.lm_head_bias = lm_head_bias
        self.temperature, self.softcap, self.embed_scale = temperature, softcap, embed_scale
        self.backend, self.grad_filter_eps, self.batch_invariant = backend, grad_filter_eps, batch_invariant

    @classmethod
    def from_model(cls, model: nn.Module, *, temperature: float = 1.0, **kwargs) -> "SoftTokenEmbedding":
        """Bind to a transformers causal LM (tied or untied): ``forward(h)`` is the model's own soft token,
        ``softmax(model_logits(h) / temperature) @ model.get_input_embeddings()(arange(V))``.

        The logits are the model forward's (LM-head bias, final-logit softcap, Cohere's ``logit_scale``,
        Granite's ``logits_scaling``) and the rows what its input-embedding module returns (Gemma's
        sqrt(d) scale): ``gircse_kernels.architectures`` folds these into the op's temperature, softcap
        and ``embed_scale``, and refuses, naming the model, what it cannot reproduce. ``temperature``
        divides the model's final logits (after its softcap, as transformers' sampling temperature
        does); the other keywords (backend, grad_filter_eps, batch_invariant) pass through.
        """
        lm_head = model.get_output_embeddings()
        embeddings = model.get_input_embeddings()
        if lm_head is None or embeddings is None:
            raise ValueError(
                f"model ({type(model).__name__}) must have both output (LM head) and input embeddings"
            )
        taken = sorted({"softcap", "embed_scale"} & kwargs.keys())
        if taken:
            raise TypeError(f"from_model reads {' and '.join(taken)} from the model; to set them yourself, "
                            f"build SoftTokenEmbedding(lm_head_weight, embed_weight, ...) directly")
        check_logit_options(temperature, None)
        scales = model_scales(model, lm_head, embeddings)
        return cls(lm_head.weight, embeddings.weight, lm_head.bias, embed_scale=scales.embed_scale,
                   **scales.op_options(temperature), **kwargs)

    @property
    def tied(self) -> bool:
        return self.lm_head_weight is self.embed_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mixed = soft_token_embedding(
            hidden, self.lm_head_weight, self.embed_weight, self.lm_head_bias,
            temperature=self.temperature, softcap=self.softcap, backend=self.backend,
            grad_filter_eps=self.grad_filter_eps, batch_invariant=self.batch_invariant,
        )
        return mixed if self.embed_scale == 1.0 else mixed * self.embed_scale

    def extra_repr(self) -> str:
        vocab, d = self.lm_head_weight.shape
        return (f"vocab={vocab}, d={d}, d_embed={self.embed_weight.shape[1]}, tied={self.tied}, "
                f"bias={self.lm_head_bias is not None}, temperature={self.temperature}, "
                f"softcap={self.softcap}, embed_scale={self.embed_scale}, backend={self.backend!r}, "
                f"batch_invariant={self.batch_invariant}")
