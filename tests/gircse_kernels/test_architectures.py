"""``SoftTokenEmbedding.from_model`` gives each architecture's own soft token: the softmax of the logits
its forward returns, mixing what its input-embedding module returns (``gircse_kernels.architectures``)."""
import pytest
import torch
import transformers as tf
from torch import nn

from gircse_kernels import SoftTokenEmbedding
from gircse_kernels.architectures import ModelScales, model_scales

V, D = 301, 32
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, config overrides). Caps and logit scales are chosen to bend the
# logits of these random models (std ~1.1) far more than the tolerance.
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama-tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(head_dim=8, final_logit_softcapping=2.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(head_dim=8, final_logit_softcapping=2.0)),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.25)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=4.0, embedding_multiplier=3.0)),
    "phi": (tf.PhiConfig, tf.PhiForCausalLM, {}),  # an LM-head bias
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {}),  # n_embd / n_layer names, tied wte, learned positions
}


def tiny(family: str) -> nn.Module:
    config_cls, model_cls, overrides = FAMILIES[family]
    kwargs = {**COMMON, **overrides}
    if family == "gpt2":
        kwargs = dict(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    elif family == "phi":
        kwargs.pop("num_key_value_heads")
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


def own_soft_tokens(model: nn.Module, ids: torch.Tensor, temperature: float):
    """(final hidden states, the model's own soft tokens) from its forward and its embedding module, fp64."""
    with torch.no_grad():
        hidden = model.get_decoder()(ids).last_hidden_state
        logits = model(ids).logits.double()
        rows = model.get_input_embeddings()(torch.arange(V)).double()
    return hidden, torch.softmax(logits / temperature, dim=-1) @ rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_model_is_the_models_own_soft_token(family, temperature):
    model = tiny(family)
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    hidden, expected = own_soft_tokens(model, ids, temperature)
    module = SoftTokenEmbedding.from_model(model, temperature=temperature, backend="torch")
    assert module.lm_head_weight is model.get_output_embeddings().weight
    assert module.embed_weight is model.get_input_embeddings().weight
    with torch.no_grad():
        actual = module(hidden).double()
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-6)
    # The case discriminates: the unscaled op (lm_head(h) and the embedding weight as they are) differs
    # wherever the architecture scales something.
    with torch.no_grad():
        plain = SoftTokenEmbedding(module.lm_head_weight, module.embed_weight, module.lm_head_bias,
                                   temperature=temperature, backend="torch")(hidden).double()
    if model_scales(model, model.get_output_embeddings(), model.get_input_embeddings()) != ModelScales():
        assert (plain - expected).abs().max() > 100 * (2e-6 + 2e-5 * expected.abs().max())


def test_the_scales_read_from_each_family():
    assert model_scales(*_parts(tiny("gemma"))) == ModelScales(embed_scale=D ** 0.5)
    assert model_scales(*_parts(tiny("gemma2"))) == ModelScales(softcap=2.0, embed_scale=D ** 0.5)
    assert model_scales(*_parts(tiny("cohere"))) == ModelScales(logit_multiplier=0.25)
    assert model_scales(*_parts(tiny("granite"))) == ModelScales(logit_multiplier=0.25)
    for family in ("llama", "qwen2", "mistral", "phi", "gpt2"):
        assert model_scales(*_parts(tiny(family))) == ModelScales(), family


def _parts(model):
    return model, model.get_output_embeddings(), model.get_input_embeddings()


def test_gradients_reach_a_scaled_models_parameters():
    model = tiny("gemma2")
    module = SoftTokenEmbedding.from_model(model, backend="torch")
    module(torch.randn(3, D)).square().sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("keyword", ["softcap", "embed_scale"])
def test_from_model_refuses_scales_it_reads_from_the_model(keyword):
    with pytest.raises(TypeError, match=f"from_model reads {keyword} from the model"):
        SoftTokenEmbedding.from_model(tiny("llama"), **{keyword: 2.0})


def test_refused_by_model_type():
    config = tf.FalconH1Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4,
                               mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16)
    model = tf.FalconH1ForCausalLM(config)
    with pytest.raises(ValueError, match=r"cannot bind FalconH1ForCausalLM: .*embedding_multiplier.*'falcon_h1'"):
        SoftTokenEmbedding.from_model(model)


def test_refused_when_the_forward_scales_token_ids_only():
    config = tf.MarianConfig(vocab_size=V, d_model=D, decoder_layers=1, encoder_layers=1, decoder_attention_heads=4,
                             encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64,
                             scale_embedding=True, pad_token_id=0, decoder_start_token_id=0)
    model = tf.MarianForCausalLM(config)
    with pytest.raises(ValueError, match="cannot bind MarianForCausalLM: .*scale_embedding"):
        SoftTokenEmbedding.from_model(model)


def test_refused_when_the_lm_head_is_wrapped():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"LM head is a peft\..*Linear, not a plain nn.Linear"):
        SoftTokenEmbedding.from_model(model.get_base_model())


def test_refused_when_the_embedding_module_is_not_a_lookup():
    class Noisy(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = tiny("llama")
    model.set_input_embeddings(Noisy(V, D))
    with pytest.raises(ValueError, match="input embedding .*Noisy overrides nn.Embedding.forward"):
        SoftTokenEmbedding.from_model(model)
    model.set_input_embeddings(nn.Embedding(V, D, max_norm=1.0))
    with pytest.raises(ValueError, match="renormalizes rows on lookup"):
        SoftTokenEmbedding.from_model(model)
