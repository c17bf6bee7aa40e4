"""The paper's fair baselines on the same backbone: Causal-EOS and Bidirectional-Avg.

Causal-EOS: the input followed by an EOS token, causal attention; the embedding is the final-layer
(post final norm) state of that EOS position.

Bidirectional-Avg: every input token attends to every other real token, and the embedding is the
mean of the final-layer states over the input tokens (padding excluded).

How bidirectional attention is switched on, per family (transformers 5.24): Llama, Mistral and
Qwen2 all build their masks through ``transformers.masking_utils.create_causal_mask`` (Mistral and
Qwen2 also ``create_sliding_window_causal_mask``), and both return an *already prepared 4-D mask
as-is* ("If the mask is already 4D, simply return as-is"). We therefore pass a 4-D additive float
mask ``[B, 1, L, L]`` that lets every query see every real key and no padded key, with no
causal triangle (boolean "may attend" for SDPA, as transformers' own ``sdpa_mask`` builds it, so it
also works under autocast; additive float for eager). SDPA's ``is_causal`` is only used when the
mask is None, and sliding-window layers get the same full mask. Nothing in the model
or its config is modified, so the same model object serves every method. Flash-attention
implementations ignore custom 4-D masks, so this baseline requires ``sdpa`` or ``eager``.
(The alternative, ``config.is_causal = False``, is honoured by ``create_causal_mask`` too, but it
mutates the shared config; the 4-D mask keeps the switch local to the call.)
"""
from __future__ import annotations

import torch
from torch import nn

from .generation import check_left_padded, decoder_of, left_padded_position_ids

__all__ = ["bidirectional_attention_mask", "bidirectional_mean", "causal_eos_state"]


def causal_eos_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-layer state of the last position, ``[B, d]``; the caller appends EOS to every input.

    Left padding puts every row's EOS in the last column.
    """
    check_left_padded(attention_mask)
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=left_padded_position_ids(attention_mask))
    return out.last_hidden_state[:, -1]


def bidirectional_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` mask with no causal triangle: every query sees every real key, no padded key.

    ``dtype=None``: boolean (True = may attend; what SDPA takes). A float dtype: additive (0 or
    ``finfo(dtype).min``; what eager attention adds to the scores). Padded query rows still see the
    real keys (never a fully masked row, which would make softmax NaN); their outputs are discarded.
    """
    length = attention_mask.shape[1]
    keys_real = attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)  # [B, 1, L, L]
    if dtype is None:
        return keys_real.contiguous()
    full = torch.zeros(keys_real.shape, dtype=dtype, device=attention_mask.device)
    return full.masked_fill(~keys_real, torch.finfo(dtype).min)


def bidirectional_mean(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real input tokens of the final-layer states under bidirectional attention, ``[B, d]``."""
    decoder = decoder_of(model)
    implementation = getattr(decoder.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"bidirectional-avg needs attn_implementation 'sdpa' or 'eager' (custom 4-D masks), "
                         f"got {implementation!r}")
    dtype = None if implementation == "sdpa" else decoder.get_input_embeddings().weight.dtype
    out = decoder(input_ids=input_ids, attention_mask=bidirectional_attention_mask(attention_mask, dtype),
                  position_ids=left_padded_position_ids(attention_mask))
    weights = attention_mask.to(out.last_hidden_state.dtype).unsqueeze(-1)
    return (out.last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1)
