"""prompt_style="reference": the authors' released adapters (GIRCSE-Mistral7B, GIRCSE-QWEN7B) load with
GIRCSE.from_pretrained(base, adapter=...) and reproduce the authors' embeddings.

Tested offline on tiny Mistral / Qwen2 models with a LoRA adapter saved in the authors' layout (their
lora.json targets; peft ``save_pretrained`` of the wrapped causal LM plus the tokenizer, as their
``LoRATrainer.save_model`` does), against a transcription of the authors' inference code. The tokenizer
adds a BOS token by default (like Mistral's), so skipping special tokens is actually exercised.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gircse import GIRCSE
from gircse.prompts import REFERENCE_QUERY_FORMAT, reference_document_instruction

from .conftest import tiny_causal_lm

TEXTS = ["What is the tallest mountain?",
         "a much longer text that goes on and on about many different things so that it is padded differently",
         "hi"]
RETRIEVE = "Given a question, retrieve passages that answer it"
SEMANTIC = "Retrieve semantically similar text."


def authors_encode(peft_model, tokenizer, texts: list[str], max_new_tokens: int) -> torch.Tensor:
    """The authors' inference, transcribed from github.com/Roytsai27/GIRCSE (commit 20676c1):
    ``BaseEmbedding.tokenize_text`` (embedding/base.py), ``BaseReasoningTrainer.encode`` /
    ``_extend_sequence`` and ``GIRCSETrainer.get_next_token_embedding`` (embedding/trainer.py) with
    logit_temperature 1 and pooling "generate_mean", then the L2 normalization of ``BaseEmbedding.encode``.
    CPU instead of CUDA; ``texts`` are already formatted (``format_text``)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt", max_length=512,
                       pad_to_multiple_of=8, return_token_type_ids=False, add_special_tokens=False)
    attention_mask = inputs.attention_mask
    embedding_layer = peft_model.get_input_embeddings()
    embedding_weight = embedding_layer.weight
    input_embeds = embedding_layer(inputs.input_ids)
    past_key_values = None
    collected_hidden = []
    for _ in range(max_new_tokens + 1):
        model_inputs = {"inputs_embeds": input_embeds if past_key_values is None else input_embeds[:, -1:, :],
                        "attention_mask": attention_mask, "output_hidden_states": True, "use_cache": True}
        if past_key_values is not None:
            model_inputs["past_key_values"] = past_key_values
        outputs = peft_model(**model_inputs)
        logits = outputs.logits[:, -1, :]
        last_hidden = outputs.hidden_states[-1][:, -1:, :]
        next_token_embedding = (F.softmax(logits / 1, dim=-1) @ embedding_weight).unsqueeze(1)
        input_embeds = torch.cat([input_embeds, next_token_embedding], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones((attention_mask.size(0), 1),
                                                               dtype=attention_mask.dtype)], dim=-1)
        past_key_values = outputs.past_key_values
        collected_hidden.append(last_hidden)
    outputs = torch.cat(collected_hidden[1:], dim=1)
    return F.normalize(outputs.mean(dim=1), p=2, dim=-1)


def authors_format(instruction: str | None, text: str) -> str:
    """``BaseEmbedding.format_text``."""
    return f"Instruct: {instruction}\nQuery:{text}" if instruction else text


@pytest.fixture(scope="module")
def bos_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer made to prepend a BOS token by default, as Mistral's does."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tokenizer.convert_tokens_to_ids("<|im_start|>"))])
    tokenizer.bos_token = "<|im_start|>"
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def save_authors_layout(tmp_path, family: str, tokenizer) -> tuple[str, str]:
    """``(base_dir, adapter_dir)``: a tiny base model and a LoRA adapter saved as the authors' trainer saves it."""
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = str(tmp_path / f"{family}-base"), str(tmp_path / f"{family}-adapter")
    tiny_causal_lm(family).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"])
    peft_model = get_peft_model(tiny_causal_lm(family), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: give the adapter a real effect
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers: past_key_values -> cache (the authors' code)
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_reference_style_reproduces_the_authors_embeddings(tmp_path, bos_tokenizer, family):
    from peft import PeftModel

    base_dir, adapter_dir = save_authors_layout(tmp_path, family, bos_tokenizer)
    model = GIRCSE.from_pretrained(base_dir, adapter=adapter_dir, prompt_style="reference")
    assert model.k == 5 and model.prompt_style == "reference" and hasattr(model.model, "peft_config")
    authors_model = PeftModel.from_pretrained(tiny_causal_lm(family), adapter_dir).eval()
    authors_model64 = copy.deepcopy(authors_model).double()

    def check(ours, instruction, texts, k=5):
        """Three-way oracle: the random tiny model amplifies fp32 round-off over the K steps (up to ~1e-4 on a
        long text), so ours (fp32) must be as close to the authors' loop run in float64 as their fp32 run is."""
        formatted = [authors_format(instruction, t) for t in texts]
        with torch.no_grad():
            truth = authors_encode(authors_model64, bos_tokenizer, formatted, k)
            theirs = authors_encode(authors_model, bos_tokenizer, formatted, k)
        error = (torch.from_numpy(ours).double() - truth).abs().max()
        assert error <= (theirs.double() - truth).abs().max() + 2e-5, (error, instruction)
        return truth

    truth = check(model.encode_queries(TEXTS, RETRIEVE), RETRIEVE, TEXTS)
    # documents, the authors' rule: a retrieval instruction is dropped, a semantic-similarity one kept
    check(model.encode_documents(TEXTS, RETRIEVE), None, TEXTS)
    check(model.encode_documents(TEXTS, SEMANTIC), SEMANTIC, TEXTS)
    check(model.encode(TEXTS, k=3), None, TEXTS, k=3)
    # the comparison can fail: our own prompt style (BOS, "Query: ") gives other embeddings
    ours = GIRCSE.from_pretrained(base_dir, adapter=adapter_dir, k=5)
    assert (torch.from_numpy(ours.encode_queries(TEXTS, RETRIEVE)).double() - truth).abs().max() > 1e-2


def test_reference_prompts_and_saved_style(tmp_path, make_tiny, bos_tokenizer):
    assert REFERENCE_QUERY_FORMAT.format(instruction="Do", text="x") == "Instruct: Do\nQuery:x"
    assert reference_document_instruction(RETRIEVE) is None
    assert reference_document_instruction("Given a claim, RETRIEVE documents") is None
    assert reference_document_instruction(SEMANTIC) == SEMANTIC
    assert reference_document_instruction("Classify the review") == "Classify the review"
    assert reference_document_instruction(None) is None
    model = GIRCSE(tiny_causal_lm("mistral"), bos_tokenizer, k=2, prompt_style="reference")
    ids = model.tokenize(["hello"], "Do")["input_ids"][0].tolist()
    assert ids == bos_tokenizer("Instruct: Do\nQuery:hello", add_special_tokens=False)["input_ids"]
    assert GIRCSE(tiny_causal_lm("mistral"), bos_tokenizer, k=2).tokenize(["hello"])["input_ids"][0, 0] == \
        bos_tokenizer.bos_token_id
    # a list of document instructions follows the rule per text
    mixed = model.encode_documents(["a b", "c d"], [RETRIEVE, SEMANTIC])
    torch.testing.assert_close(torch.from_numpy(mixed[0]), torch.from_numpy(model.encode(["a b"])[0]), atol=2e-5,
                               rtol=0)
    torch.testing.assert_close(torch.from_numpy(mixed[1]), torch.from_numpy(model.encode(["c d"], SEMANTIC)[0]),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        GIRCSE(tiny_causal_lm("mistral"), bos_tokenizer, prompt_style="authors")
    # save / load keeps the style (and its query format)
    base_dir = str(tmp_path / "base")
    model.model.save_pretrained(base_dir)
    bos_tokenizer.save_pretrained(base_dir)
    saved = GIRCSE(tiny_causal_lm("mistral"), bos_tokenizer, k=2, prompt_style="reference", base_model=base_dir)
    saved.save_pretrained(str(tmp_path / "saved"))
    loaded = GIRCSE.from_pretrained(str(tmp_path / "saved"))
    assert loaded.prompt_style == "reference" and loaded.query_format == REFERENCE_QUERY_FORMAT and loaded.k == 2
