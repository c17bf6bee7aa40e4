"""method="two-stage": greedy expansion by the backbone (adapter off), then Causal-EOS over text + expansion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gircse import GIRCSE
from gircse.two_stage import EXPANSION_PROMPT, expand_texts, join_expansion

from .conftest import tiny_causal_lm

TEXTS = ["The Eiffel Tower is in Paris.", "Cats are small mammals that purr.", "x"]


def greedy_by_hand(backbone, tokenizer, text: str, k: int) -> str:
    """Uncached greedy decoding, one full forward per token: the oracle for expand_texts."""
    ids = tokenizer(EXPANSION_PROMPT.format(text=text))["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(k):
            logits = backbone(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_expansion_is_greedy_decoding_and_batch_invariant(make_tiny, smollm2_tokenizer):
    model = make_tiny("llama", method="two-stage", k=6)
    expansions = model.expand(TEXTS)
    assert expansions == [greedy_by_hand(model.model, smollm2_tokenizer, t, 6) for t in TEXTS]
    assert expansions == [model.expand([t])[0] for t in TEXTS]  # left padding changes nothing
    assert model.expand(TEXTS, k=2) == [greedy_by_hand(model.model, smollm2_tokenizer, t, 2) for t in TEXTS]
    assert all(expansions)


def test_expansion_uses_the_backbone_without_the_adapter(smollm2_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_causal_lm("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    with_adapter = GIRCSE(peft_model, smollm2_tokenizer, method="two-stage", k=5)
    plain = GIRCSE(tiny_causal_lm("qwen2"), smollm2_tokenizer, method="two-stage", k=5)
    assert with_adapter.expand(TEXTS) == plain.expand(TEXTS)
    # stage 2 runs with the adapter: the embeddings differ
    assert np.abs(with_adapter.encode(TEXTS) - plain.encode(TEXTS)).max() > 1e-3


def test_two_stage_embeds_text_plus_expansion_like_causal_eos(make_tiny):
    model = make_tiny("mistral", method="two-stage", k=4)
    causal_eos = GIRCSE(model.model, model.tokenizer, method="causal-eos")
    joined = [join_expansion(t, e) for t, e in zip(TEXTS, model.expand(TEXTS))]
    np.testing.assert_allclose(model.encode(TEXTS, "Find it"), causal_eos.encode(joined, "Find it"), atol=2e-5)
    assert torch.equal(model.tokenize(TEXTS)["input_ids"], causal_eos.tokenize(joined)["input_ids"])
    assert model.encode(TEXTS, return_all_steps=True).shape == (3, 1, 32)
    k2 = [join_expansion(t, e) for t, e in zip(TEXTS, model.expand(TEXTS, k=2))]
    np.testing.assert_allclose(model.encode(TEXTS, k=2), causal_eos.encode(k2), atol=2e-5)
    assert join_expansion("a", "") == "a"


def test_expansion_argument_errors(make_tiny, smollm2_tokenizer):
    model = make_tiny("llama", method="two-stage", k=3)
    with pytest.raises(ValueError, match=r"\{text\} field"):
        expand_texts(model.model, smollm2_tokenizer, TEXTS, 3, prompt="no field")
    with pytest.raises(ValueError, match="leaves no room"):
        expand_texts(model.model, smollm2_tokenizer, TEXTS, 3, max_length=10)
    with pytest.raises(ValueError, match="batch_size"):
        model.expand(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="k"):
        model.expand(TEXTS, k=0)
    long_text = "word " * 600  # longer than max_length: the text is cut, the prompt's tail kept
    assert isinstance(expand_texts(model.model, smollm2_tokenizer, [long_text], 2, max_length=64)[0], str)


def test_two_stage_trains_stage_two(smollm2_tokenizer):
    """The trainer's batch gradients for method two-stage: the expansion is a constant (inference, adapter
    off, eval mode), the LoRA adapter of stage 2 gets gradients, GradCache equals direct, and the model is
    back in training mode."""
    from gircse.training import TrainConfig

    from .test_training import assert_grads_close, grads_of, make_rows, tiny_gircse

    model, config = tiny_gircse(smollm2_tokenizer, "two-stage", num_negatives=1, temperature=0.1)
    rows = make_rows(4, seed=7)
    loss, steps, direct = grads_of(model, rows, config)
    assert torch.isfinite(loss) and steps.shape == (1,) and model.training
    _, _, cached = grads_of(model, rows, TrainConfig(**{**config.public(), "embed_chunk": 2}))
    assert_grads_close(cached, direct)
