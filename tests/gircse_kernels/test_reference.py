import pytest
import torch

from gircse_kernels import reference
from tests.gircse_kernels.op_cases import Case, assert_matches_truth, make_inputs, naive


def test_reference_matches_textbook_formula_in_fp64():
    h, w, e, b = make_inputs(Case(lead=(4,), vocab=11, d=8, d_embed=5, bias=True), requires_grad=False)
    h, w, e, b = (t.double() for t in (h, w, e, b))
    expected = torch.softmax((h @ w.T + b) / 0.7, -1) @ e
    assert torch.allclose(reference.soft_token_embedding(h, w, e, b, temperature=0.7), expected)


def test_reference_matches_textbook_with_temperature_and_softcap():
    """Temperature first, then the cap, as documented: z = c tanh(((h W^T + b) / T) / c)."""
    h, w, e, b = (t.double() for t in make_inputs(Case(lead=(4,), vocab=13, d=8, d_embed=5, bias=True,
                                                       logit_scale=20.0)))
    temperature, cap = 0.7, 2.5
    scaled = (h @ w.T + b) / temperature
    expected = torch.softmax(cap * torch.tanh(scaled / cap), -1) @ e
    actual = reference.soft_token_embedding(h, w, e, b, temperature=temperature, softcap=cap)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    # The case tells the orders apart: capping first, or a cap ignored, is far from it.
    capped_first = torch.softmax(cap * torch.tanh((h @ w.T + b) / cap) / temperature, -1) @ e
    uncapped = torch.softmax(scaled, -1) @ e
    for wrong in (capped_first, uncapped):
        assert (wrong - expected).abs().max() > 1e-2


def test_oracle_rejects_a_wrong_truth():
    """A wrong reference must not widen its own bound: here the 'truth' forgets the softcap, and a
    correct result (the same-dtype formula with the cap) is refused because the formula is far from it."""
    case = Case(lead=(3,), vocab=100, d=16, logit_scale=30.0)
    h, w, e, _ = make_inputs(case)
    right = naive(h, w, e, None, softcap=3.0)
    wrong_truth = reference.soft_token_embedding(h.double(), w.double(), e.double())  # no softcap
    with pytest.raises(AssertionError, match="naive formula is .* from the reference truth"):
        assert_matches_truth(right, wrong_truth, right, case.dtype)
    truth = reference.soft_token_embedding(h.double(), w.double(), e.double(), softcap=3.0)
    assert_matches_truth(right, truth, right, case.dtype)


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
