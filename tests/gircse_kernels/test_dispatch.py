import torch

import gircse_kernels
from gircse_kernels import reference, soft_token_embedding
from tests.gircse_kernels.op_cases import Case, make_inputs


def test_non_contiguous_inputs_and_leading_dims():
    h, w, e, b = make_inputs(Case(lead=(4, 6), vocab=33, d=10, d_embed=7, bias=True))
    h_t = h.transpose(0, 1)  # [6, 4, d], non-contiguous
    w_t = w.T.contiguous().T  # unit row stride, column-major
    e_s = torch.cat([e, e], dim=1)[:, ::2]  # last-dim stride 2
    expected = reference.soft_token_embedding(h_t, w, e_s, b)
    actual = soft_token_embedding(h_t, w_t, e_s, b, backend="torch")
    assert actual.shape == (6, 4, 7)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_shared_storage_different_objects_get_separate_gradients():
    base = torch.randn(40, 12)
    w = base.clone().requires_grad_(True)
    e = w.detach().requires_grad_(True)  # same storage, separate leaf: gradients must stay separate
    assert e.data_ptr() == w.data_ptr()
    h = torch.randn(3, 12)
    ref_w = base.double().requires_grad_(True)
    ref_e = base.double().requires_grad_(True)
    go = torch.randn(3, 12)
    out = soft_token_embedding(h, w, e, backend="torch")
    ref = reference.soft_token_embedding(h.double(), ref_w, ref_e)
    gw, ge = torch.autograd.grad(out, (w, e), go)
    rw, re = torch.autograd.grad(ref, (ref_w, ref_e), go.double())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ge.double(), re, rtol=1e-4, atol=1e-5)


def test_no_grad_path_equals_grad_path():
    h, w, e, b = make_inputs(Case(lead=(5,), vocab=50, d=8, bias=True))
    with torch.no_grad():
        a = soft_token_embedding(h, w, e, b, backend="torch")
    hg = h.clone().requires_grad_(True)
    bgrad = soft_token_embedding(hg, w, e, b, backend="torch")
    assert bgrad.requires_grad
    torch.testing.assert_close(a, bgrad.detach(), rtol=0, atol=0)


def test_public_names():
    for name in ("soft_token_embedding", "SoftTokenEmbedding", "reference", "resolve_backend"):
        assert hasattr(gircse_kernels, name)
    assert hasattr(torch.ops.gircse, "soft_token_embedding")  # the torch.library custom op
