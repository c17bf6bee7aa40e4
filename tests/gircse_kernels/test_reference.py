import pytest
import torch

from gircse_kernels import reference
from tests.gircse_kernels.op_cases import Case, make_inputs


def test_reference_matches_textbook_formula_in_fp64():
    h, w, e, b = make_inputs(Case(lead=(4,), vocab=11, d=8, d_embed=5, bias=True), requires_grad=False)
    h, w, e, b = (t.double() for t in (h, w, e, b))
    expected = torch.softmax((h @ w.T + b) / 0.7, -1) @ e
    assert torch.allclose(reference.soft_token_embedding(h, w, e, b, temperature=0.7), expected)


def test_softcap_bounds_logits():
    # With softcap c, no logit exceeds c: a huge logit cannot take all the mass from the others.
    h = torch.tensor([[1.0]])
    w = torch.tensor([[1000.0], [0.0]])
    e = torch.eye(2)
    out = reference.soft_token_embedding(h, w, e, softcap=1.0)
    p0 = torch.softmax(torch.tensor([torch.tanh(torch.tensor(1000.0)).item(), 0.0]), -1)[0]
    assert torch.allclose(out[0, 0], p0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_output_dtype_is_the_inputs_promoted_dtype(dtype):
    h, w, e, _ = make_inputs(Case(vocab=9, d=4, dtype=dtype))
    assert reference.soft_token_embedding(h, w, e).dtype == dtype
    assert reference.soft_token_embedding(h.float(), w.float(), e).dtype == torch.promote_types(torch.float32, dtype)


def test_reference_huge_logits_finite():
    h, w, e, _ = make_inputs(Case(vocab=50, d=8, logit_scale=1e4, peaked=True))
    assert torch.isfinite(reference.soft_token_embedding(h, w, e)).all()
