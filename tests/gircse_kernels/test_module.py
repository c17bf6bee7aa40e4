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
    assert module.lm_head_bias is model.lm_head.bias and module.softcap == 7.0
    h = torch.randn(4, 32)
    expected = reference.soft_token_embedding(h, model.lm_head.weight, model.get_input_embeddings().weight,
                                              model.lm_head.bias, temperature=0.5, softcap=7.0)
    torch.testing.assert_close(module(h), expected, rtol=1e-5, atol=1e-6)
    assert "softcap=7.0" in repr(module)


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
