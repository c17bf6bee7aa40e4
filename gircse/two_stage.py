"""The two-stage generative baseline (the paper's Appendix F): generate hard tokens, then embed the text.

Stage 1 expands each text with the backbone's own greedy decoding (``k`` new tokens at most, stopping at
EOS), the LoRA adapter switched off so the base LLM writes the expansion. Stage 2 embeds
``"{text}\\n{expansion}"`` like Causal-EOS (the final-layer state of an appended EOS), with the adapter on.
The contrast with GIRCSE is the point: GIRCSE feeds K *soft* tokens back and pools their states in one
cached generation; this baseline decodes K *hard* tokens and then runs a second pass over text + expansion.

The paper's exact Appendix F prompt was not available to us; ``EXPANSION_PROMPT`` is our own and any
prompt with a ``{text}`` field can be passed instead.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .generation import base_causal_lm, check_k
from .prompts import left_pad, validate_texts

__all__ = ["EXPANSION_PROMPT", "expand_texts", "join_expansion"]

EXPANSION_PROMPT = ("Expand the following text: restate what it means and add closely related terms.\n"
                    "Text: {text}\nExpansion:")


def join_expansion(text: str, expansion: str) -> str:
    """Stage 2's input: the text, then its expansion on a new line (the text alone if nothing was generated)."""
    return f"{text}\n{expansion}" if expansion else text


def _adapter_disabled(model: nn.Module):
    """The backbone alone: a peft model's adapter switched off for the duration (no-op without one)."""
    if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def _fit_text(tokenizer, text: str, budget: int) -> str:
    """``text`` cut to ``budget`` tokens (from the end), so the prompt's tail ("Expansion:") always survives."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget])


@torch.inference_mode()
def expand_texts(model: nn.Module, tokenizer, texts: list[str], k: int, *, prompt: str = EXPANSION_PROMPT,
                 max_length: int = 512, batch_size: int = 16) -> list[str]:
    """Greedy expansions (stage 1), one per text, in input order; each at most ``k`` new tokens.

    Batches are left padded (generate derives positions from the attention mask), sorted by length so
    they carry little padding. Inputs longer than ``max_length - k`` tokens lose the end of the text.
    """
    texts = validate_texts(texts)
    k = check_k(k)
    if not isinstance(prompt, str) or "{text}" not in prompt:
        raise ValueError(f"prompt must be a str with a {{text}} field, got {prompt!r:.80}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    overhead = len(tokenizer(prompt.replace("{text}", ""), add_special_tokens=True)["input_ids"])
    budget = max_length - k - overhead
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for the text after the expansion prompt "
                         f"({overhead} tokens) and k={k} generated tokens")
    sequences = [tokenizer(prompt.replace("{text}", _fit_text(tokenizer, t, budget)),
                           add_special_tokens=True)["input_ids"] for t in texts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    backbone = base_causal_lm(model)
    device = next(backbone.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(sequences[i]))
    expansions: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()  # also during training (stage 2's adapter is trained): no dropout, no checkpointing here
    try:
        with _adapter_disabled(model):
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                input_ids, attention_mask = left_pad([sequences[i] for i in index], pad, device)
                out = backbone.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=k,
                                        min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=pad,
                                        eos_token_id=eos)
                for row, i in enumerate(index):
                    expansions[i] = tokenizer.decode(out[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return expansions
