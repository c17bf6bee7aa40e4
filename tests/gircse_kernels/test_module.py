import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gircse_kernels import SoftTokenEmbedding, reference


def tiny(cls, config_cls, tie):
    torch.manual_seed(0)
    config = config_cls(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return cls(config).eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_model_binds_the_models_own_weights(family, tie):
    model = tiny(*{"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[family],
                 tie)
    module = SoftTokenEmbedding.from_model(model, backend="torch")
    assert module.lm_head_weight is model.get_output_embeddings().weight
    assert module.embed_weight is model.get_input_embeddings().weight
    assert module.tied == tie
    h = torch.randn(2, 3, 32)
    expected = torch.softmax(model.lm_head(h), -1) @ model.get_input_embeddings().weight
    torch.testing.assert_close(module(h), expected, rtol=1e-5, atol=1e-6)
    # Gradients reach the model's parameters (that is what LoRA / fine-tuning relies on).
    module(h).square().sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert model.get_output_embeddings().weight.grad is not None


def test_bias_and_softcap_are_taken_from_the_model():
    model = tiny(LlamaForCausalLM, LlamaConfig, False)
    model.lm_head = torch.nn.Linear(32, 301, bias=True)
    model.config.final_logit_softcapping = 7.0
    module = SoftTokenEmbedding.from_model(model, backend="torch", temperature=0.5)
    assert module.lm_head_bias is model.lm_head.bias
    h = torch.randn(4, 32)
    # The temperature divides the model's final (softcapped) logits, as transformers' sampling does.
    model_logits = 7.0 * torch.tanh(model.lm_head(h).double() / 7.0)
    expected = torch.softmax(model_logits / 0.5, -1) @ model.get_input_embeddings().weight.double()
    torch.testing.assert_close(module(h).double(), expected, rtol=1e-5, atol=1e-6)
    assert "softcap=14.0" in repr(module)  # the op's cap: softcap_7(z) / 0.5 == softcap_14(z / 0.5)


def test_from_model_without_lm_head_is_a_clear_error():
    class Headless(torch.nn.Module):
        def get_output_embeddings(self):
            return None

        def get_input_embeddings(self):
            return torch.nn.Embedding(3, 4)

    with pytest.raises(ValueError, match="must have both output"):
        SoftTokenEmbedding.from_model(Headless())


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        SoftTokenEmbedding(torch.randn(3, 4), torch.randn(3, 4), backend="gpu")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(softcap=float("inf")), ValueError, "softcap must be None or a positive finite number, got inf"),
    (dict(softcap=float("nan")), ValueError, "softcap must be None or a positive finite number, got nan"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite number, got inf"),
    (dict(embed_scale=0.0), ValueError, "embed_scale must be a positive finite number, got 0.0"),
    (dict(embed_scale="2"), TypeError, "embed_scale must be a positive float, got str"),
])
def test_bad_options_fail_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        SoftTokenEmbedding(torch.randn(3, 4), torch.randn(3, 4), **kw)


def test_embed_scale_multiplies_the_mix():
    w, e, h = torch.randn(7, 4), torch.randn(7, 5), torch.randn(2, 4)
    scaled = SoftTokenEmbedding(w, e, embed_scale=3.0, backend="torch")(h)
    torch.testing.assert_close(scaled, 3.0 * reference.soft_token_embedding(h, w, e), rtol=1e-5, atol=1e-6)
