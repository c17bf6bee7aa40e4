"""What a transformers causal LM does on top of ``lm_head(h)`` and ``weight[ids]``: the scales
``SoftTokenEmbedding.from_model`` folds into the op, and the architectures it refuses.

A soft token is fed back to the model as ``inputs_embeds``, so for a model and a temperature T it must be

    softmax(logits(h) / T) @ inputs_embeds_of(arange(V))

where ``logits(h)`` is what the model's own forward returns for the final hidden state h, and
``inputs_embeds_of(ids)`` what the model would use as ``inputs_embeds`` for those token ids, that is
``get_input_embeddings()(ids)`` -- unless the model's forward scales the ids path only. The
architectures of transformers 5.x (read from their modeling files) differ from the plain
``lm_head(h)`` / ``weight[ids]`` in these ways:

* final-logit softcapping ``c * tanh(z / c)``: config ``final_logit_softcapping`` (Gemma2, Gemma3,
  Gemma3n, Gemma4, VaultGemma, NanoChat, Beam) or ``logits_soft_cap`` (RecurrentGemma);
* a constant multiplier of the logits: Cohere's ``logit_scale`` (Cohere, Cohere2, Cohere2-MoE,
  Cohere Compass) and ``1 / logits_scaling`` (the Granite family);
* a constant scale inside the input-embedding module: the ``*ScaledWordEmbedding`` modules (Gemma's
  ``sqrt(hidden_size)``, ...), whose ``embed_scale`` the ``inputs_embeds`` path never sees. (A scale
  that the model's forward applies to ``inputs_embeds`` whatever their origin -- Granite's
  ``embedding_multiplier``, CTRL's, RecurrentGemma's -- applies to soft tokens too and needs nothing.)

All three are folded in exactly: with multiplier s and cap c, ``softcap_c(s z) / T`` equals the op's
``softcap_{c/T}(z / (T/s))``, so the op runs with temperature ``T / s`` and softcap ``c / T``, and
its output is multiplied by the embedding scale.

Refused with a ValueError that names the model: an LM head that is not a plain ``nn.Linear`` (a
LoRA or quantized wrapper: the op would read the base weight only and silently drop the rest), an
input-embedding module that does more than a lookup (times a known scale), a config that scales
the token-id embeddings in the forward only (``scale_embedding``: the Marian / Pegasus / MVP style
decoders), and architectures whose extra transforms are not handled (listed in ``REFUSED``).
Any other architecture is taken to compute ``lm_head(h)`` and ``weight[ids]`` and nothing more,
which holds for the rest of transformers 5.x's causal LMs (Llama, Mistral, Qwen2, Phi, GPT-2, ...).
"""
from __future__ import annotations

import dataclasses
import math

from torch import nn

# model_type -> how the forward multiplies the logits (config, causal LM) -> multiplier.
LOGIT_MULTIPLIERS = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"),
                    lambda config, model: getattr(model, "logit_scale", config.logit_scale)),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid"),
                    lambda config, model: 1.0 / config.logits_scaling if config.logits_scaling else math.inf),
}

# Config attributes that hold a final-logit softcap, wherever an architecture sets them.
SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap")

# model_type -> what its forward does that from_model does not reproduce.
REFUSED = {
    "falcon_h1": "its forward scales the token-id embeddings by embedding_multiplier (not inputs_embeds) and "
                 "the logits by lm_head_multiplier",
    "hyperclovax": "its forward multiplies the logits by logits_scaling",
    "inkling_text": "its forward cuts the logits to unpadded_vocab_size",
    "inkling_mm_model": "its forward cuts the logits to unpadded_vocab_size",
    "inkling2": "its forward applies a logit_softcap module to the logits",
    "inkling2_text": "its forward applies a logit_softcap module to the logits",
    "inkling2_loop": "its forward applies a logit_softcap module to the logits",
    "inkling2_loop_text": "its forward applies a logit_softcap module to the logits",
    "prophetnet": "its LM head predicts n-gram streams",
}


@dataclasses.dataclass(frozen=True)
class ModelScales:
    """``model logits = softcap_c(logit_multiplier * lm_head(h))`` (no cap when ``softcap`` is None)
    and ``inputs_embeds_of(ids) = embed_scale * embed_weight[ids]``."""

    logit_multiplier: float = 1.0
    softcap: float | None = None
    embed_scale: float = 1.0

    def op_options(self, temperature: float) -> dict:
        """The op's ``temperature`` and ``softcap`` for ``softmax(model logits / temperature)``."""
        return dict(temperature=temperature / self.logit_multiplier,
                    softcap=None if self.softcap is None else self.softcap / temperature)


def _refuse(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"SoftTokenEmbedding.from_model cannot bind {type(model).__name__}: {why}, so the op's "
        f"softmax(lm_head(h)) @ embed_weight would not be the model's own soft token. Build "
        f"SoftTokenEmbedding(lm_head_weight, embed_weight, ...) yourself if you know the model's head.")


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _plain_lookup(embeddings: nn.Module) -> bool:
    return type(embeddings).forward is nn.Embedding.forward


def _input_embedding_scale(model: nn.Module, embeddings: nn.Module) -> float:
    name = _class_name(embeddings)
    if not isinstance(embeddings, nn.Embedding):
        raise _refuse(model, f"its input embeddings are a {name}, not an nn.Embedding lookup")
    if embeddings.max_norm is not None:
        raise _refuse(model, f"its input embedding {name} renormalizes rows on lookup (max_norm)")
    if _plain_lookup(embeddings):
        return 1.0
    # transformers' *ScaledWordEmbedding: forward = lookup * embed_scale (a float, or a 0-d buffer
    # next to its Python value scalar_embed_scale, read without a device sync).
    scale = getattr(embeddings, "scalar_embed_scale", getattr(embeddings, "embed_scale", None))
    if not type(embeddings).__name__.endswith("ScaledWordEmbedding") or scale is None:
        raise _refuse(model, f"its input embedding {name} overrides nn.Embedding.forward (a LoRA or other "
                             f"wrapper?) with something other than a known constant scale")
    return float(scale)


def model_scales(model: nn.Module, lm_head: nn.Module, embeddings: nn.Module) -> ModelScales:
    """The scales ``model`` applies around ``lm_head`` and ``embeddings`` (its output and input
    embedding modules); a ValueError naming the model where it does something else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise _refuse(model, f"{REFUSED[model_type]} (model_type {model_type!r})")
    if not isinstance(lm_head, nn.Linear) or type(lm_head).forward is not nn.Linear.forward:
        raise _refuse(model, f"its LM head is a {_class_name(lm_head)}, not a plain nn.Linear (a LoRA or "
                             f"quantized wrapper would be read as its base weight only)")
    embed_scale = _input_embedding_scale(model, embeddings)
    if getattr(config, "scale_embedding", False) and _plain_lookup(embeddings):
        raise _refuse(model, "its config sets scale_embedding, which its forward applies to token ids only, "
                             "not to inputs_embeds")
    multiplier = LOGIT_MULTIPLIERS[model_type](config, model) if model_type in LOGIT_MULTIPLIERS else 1.0
    softcaps = [getattr(config, name, None) for name in SOFTCAP_ATTRIBUTES]
    softcap = next((float(c) for c in softcaps if c is not None), None)
    scales = ModelScales(float(multiplier), softcap, embed_scale)
    for field in dataclasses.fields(scales):
        value = getattr(scales, field.name)
        if value is not None and not 0 < value < math.inf:
            raise _refuse(model, f"its {field.name} is {value} (a positive finite number expected)")
    return scales
