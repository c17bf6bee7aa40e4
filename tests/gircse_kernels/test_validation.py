"""Bad input fails loudly with the argument's name, whichever backend would have run."""
import pytest
import torch

from gircse_kernels import reference, soft_token_embedding

V, D, DE = 11, 8, 5


def ok():
    return dict(hidden=torch.randn(3, D), lm_head_weight=torch.randn(V, D), embed_weight=torch.randn(V, DE),
                lm_head_bias=torch.randn(V))


BAD = [
    ("hidden", dict(hidden=torch.randn(3, D + 1)), ValueError, "hidden's last dimension"),
    ("embed rows", dict(embed_weight=torch.randn(V + 1, DE)), ValueError, "embed_weight"),
    ("bias shape", dict(lm_head_bias=torch.randn(V + 2)), ValueError, "lm_head_bias"),
    ("W rank", dict(lm_head_weight=torch.randn(V, D, 1)), ValueError, "lm_head_weight must be 2-D"),
    ("E rank", dict(embed_weight=torch.randn(V * DE)), ValueError, "embed_weight must be 2-D"),
    ("hidden 0-D", dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have at least one dimension"),
    ("int hidden", dict(hidden=torch.ones(3, D, dtype=torch.long)), TypeError, "hidden must be a floating"),
    ("not tensor", dict(lm_head_weight=[[1.0] * D] * V), TypeError, "lm_head_weight must be a torch.Tensor"),
    ("empty batch", dict(hidden=torch.randn(0, D)), ValueError, "empty batch"),
    ("empty vocab", dict(lm_head_weight=torch.randn(0, D), embed_weight=torch.randn(0, DE),
                         lm_head_bias=torch.randn(0)), ValueError, "V >= 1"),
    ("fp64 in fused", dict(hidden=torch.randn(3, D, dtype=torch.float64),
                           lm_head_weight=torch.randn(V, D, dtype=torch.float64),
                           embed_weight=torch.randn(V, DE, dtype=torch.float64),
                           lm_head_bias=torch.randn(V, dtype=torch.float64)), TypeError, "would compute in torch.float64"),
    ("int weights", dict(lm_head_weight=torch.ones(V, D, dtype=torch.int32)), TypeError,
     "lm_head_weight must be a floating"),
    ("other device", dict(lm_head_bias=torch.randn(V, device="meta")), ValueError, "lm_head_bias is on meta"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_tensors(name, override, exc, match, backend):
    args = {**ok(), **override}
    with pytest.raises(exc, match=match):
        soft_token_embedding(**args, backend=backend)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite number, got inf"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a positive finite number, got 0.0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be None or a positive finite number, got inf"),
    (dict(softcap=float("nan")), ValueError, "softcap must be None or a positive finite number, got nan"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(grad_filter_eps=1.5), ValueError, "grad_filter_eps"),
    (dict(batch_invariant=1), TypeError, "batch_invariant must be a bool"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        soft_token_embedding(**ok(), **kw)


def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    args = ok()
    expected = soft_token_embedding(**args, temperature=0.5, softcap=3.0, backend="torch")
    actual = soft_token_embedding(**args, temperature=np.float32(0.5), softcap=np.int64(3), backend="torch",
                                  grad_filter_eps=np.float64(0.0))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_reference_validates_too():
    with pytest.raises(ValueError, match="hidden's last dimension"):
        reference.soft_token_embedding(torch.randn(2, 3), torch.randn(V, D), torch.randn(V, DE))
    for softcap in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be None or a positive finite number"):
            reference.soft_token_embedding(**ok(), softcap=softcap)


def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        soft_token_embedding(**ok(), backend="triton")
