"""The torch.library op: torch.compile without graph breaks, tied weights, double backward, and the
mixed-precision policy, for every backend that runs here."""
import functools
import os

import pytest
import torch

from gircse_kernels import SoftTokenEmbedding, cpu, reference, soft_token_embedding
from gircse_kernels.autograd import same_storage
from tests.gircse_kernels.op_cases import Case, make_inputs

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not cpu.available(), reason="no C++ extension"))]
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    BACKENDS.append("triton")  # the interpreter runs the kernels on CPU tensors


class Head(torch.nn.Module):
    """A user's module that calls the op in its forward (tied or untied, with a masked bias)."""

    def __init__(self, vocab, d, d_embed, tied, backend):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(d, d)
        self.lm_head = torch.nn.Parameter(torch.randn(vocab, d, generator=g) / d ** 0.5)
        self.embed = self.lm_head if tied else torch.nn.Parameter(torch.randn(vocab, d_embed, generator=g))
        bias = torch.randn(vocab, generator=g)
        bias[vocab // 2:] = float("-inf")  # a vocabulary mask
        self.register_buffer("bias", bias)
        self.backend = backend

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        return soft_token_embedding(h, self.lm_head, self.embed, self.bias, temperature=0.7, backend=self.backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied", [False, True])
def test_compile_fullgraph_matches_eager_values_and_gradients(backend, tied):
    torch._dynamo.reset()
    model = Head(vocab=301, d=32, d_embed=32 if tied else 24, tied=tied, backend=backend)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises here
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_compile_with_inductor_and_dynamic_batch():
    torch._dynamo.reset()
    module = SoftTokenEmbedding(torch.randn(257, 16), torch.randn(257, 8), backend="torch")
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for rows in (3, 7):
        h = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(h), module(h), rtol=1e-6, atol=1e-6)


def test_compiled_graph_holds_the_custom_op_and_no_storage_reads():
    torch._dynamo.reset()
    model = Head(vocab=101, d=16, d_embed=16, tied=True, backend="torch")
    explanation = torch._dynamo.explain(model)(torch.randn(2, 16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = "\n".join(g.code for g in explanation.graphs)
    assert "gircse.soft_token_embedding" in code
    assert "data_ptr" not in code


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_a_clear_error(backend):
    h, w, e, b = make_inputs(Case(lead=(3,), vocab=50, d=16, bias=True), requires_grad=True)
    out = soft_token_embedding(h, w, e, b, backend=backend)
    (gh,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(gh.sum(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weights_get_one_summed_gradient(backend):
    case = Case(lead=(4,), vocab=300, d=24, tied=True, bias=True)
    h, w, _, b = make_inputs(case, requires_grad=True)
    go = torch.randn(4, 24, generator=torch.Generator().manual_seed(3))
    (gw,) = torch.autograd.grad(soft_token_embedding(h, w, w, b, backend=backend), w, go)
    w64 = w.detach().double().requires_grad_(True)
    (rw,) = torch.autograd.grad(reference.soft_token_embedding(h.detach().double(), w64, w64, b.detach().double()),
                                w64, go.double())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_storage_in_two_layouts_is_not_tied(backend):
    """W and E may be views of one storage that are not the same matrix: a square W with E = W.T (same
    pointer, shape and dtype, other strides), or two shapes over one buffer. Neither is a tied head."""
    g = torch.Generator().manual_seed(4)
    vocab, d, d_embed = 40, 40, 24
    w = (2 * torch.randn(vocab, d, generator=g) / d ** 0.5).requires_grad_(True)
    buffer = (2 * torch.randn(vocab * d, generator=g) / d ** 0.5).requires_grad_(True)
    h = torch.randn(3, d, generator=g, requires_grad=True)
    go = torch.randn(3, d, generator=g)
    views = {
        "transposed": (w, lambda t: t, lambda t: t.T),
        "two shapes": (buffer, lambda t: t[:vocab * d].view(vocab, d),
                       lambda t: t[:vocab * d_embed].view(vocab, d_embed)),
    }
    for name, (leaf, as_w, as_e) in views.items():
        assert as_w(leaf).data_ptr() == as_e(leaf).data_ptr() and not same_storage(as_w(leaf), as_e(leaf)), name
        out = soft_token_embedding(h, as_w(leaf), as_e(leaf), backend=backend)
        grads = torch.autograd.grad(out, (h, leaf), go[:, :out.shape[1]])
        h64, leaf64 = (t.detach().double().requires_grad_(True) for t in (h, leaf))
        expected = reference.soft_token_embedding(h64, as_w(leaf64), as_e(leaf64))
        expected_grads = torch.autograd.grad(expected, (h64, leaf64), go[:, :out.shape[1]].double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- mixed precision
def _inputs(dtype=torch.float32):
    h, w, e, b = make_inputs(Case(lead=(6,), vocab=1000, d=96, d_embed=64, bias=True, mask="tail"))
    return h.to(dtype), w, e, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_activations_with_fp32_weights_compute_in_fp32(backend):
    """Without autocast the weights decide: bf16 hidden meets fp32 W / E, nothing is copied but hidden."""
    h, w, e, b = _inputs(torch.bfloat16)
    out = soft_token_embedding(h, w, e, b, backend=backend)
    assert out.dtype == torch.float32
    expected = soft_token_embedding(h.float(), w, e, b, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, reference.soft_token_embedding(h, w, e, b), rtol=1e-5, atol=1e-6)
    hg = h.clone().requires_grad_(True)
    (gh,) = torch.autograd.grad(soft_token_embedding(hg, w, e, b, backend=backend).sum(), hg)
    assert gh.dtype == torch.bfloat16  # each gradient in its own input's dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_in_the_autocast_dtype_and_returns_it(backend):
    """Under autocast: every input is cast to the autocast dtype, the result comes back in it, and the
    backend's own arithmetic is not autocast again (fp32 accumulation): the call equals the same call
    on inputs cast by hand, bit for bit."""
    h, w, e, b = (t.requires_grad_(True) for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_token_embedding(h, w, e, b, backend=backend)
    assert out.dtype == torch.bfloat16
    by_hand = soft_token_embedding(*(t.detach().bfloat16() for t in (h, w, e, b)), backend=backend)
    torch.testing.assert_close(out.detach(), by_hand, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = reference.soft_token_embedding(h.detach(), w.detach(), e.detach(), b.detach())
    assert spec.dtype == torch.bfloat16
    torch.testing.assert_close(out.detach().float(), spec.float(), rtol=0, atol=1.6e-2 * spec.abs().max().item())
    grads = torch.autograd.grad(out.float().sum(), (h, w, e, b))
    assert [g.dtype for g in grads] == [torch.float32] * 4  # back to the fp32 master weights' dtype
    assert all(torch.isfinite(g).all() for g in grads)


def test_autocast_on_another_device_type_does_not_apply():
    h, w, e, b = _inputs()
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert soft_token_embedding(h, w, e, b, backend="torch").dtype == torch.float32


def test_untied_weights_of_two_dtypes_are_promoted():
    h, w, e, b = _inputs()
    out = soft_token_embedding(h, w, e.bfloat16(), b, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, soft_token_embedding(h, w, e.bfloat16().float(), b, backend="torch"))


def test_tied_weight_cast_once_under_autocast(monkeypatch):
    """A tied fp32 matrix under bf16 autocast is cast once and still reaches the backend as one tensor."""
    from gircse_kernels import torch_chunked

    seen = {}
    original = torch_chunked.forward

    def spy(hidden, weight, embed, bias, **kw):
        seen["tied"] = kw["tied"]
        seen["same"] = weight is embed
        return original(hidden, weight, embed, bias, **kw)

    monkeypatch.setattr(torch_chunked, "forward", spy)
    h, w, _, b = make_inputs(Case(lead=(2,), vocab=200, d=16, tied=True, bias=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft_token_embedding(h, w, w, b, backend="torch")
    assert seen == {"tied": True, "same": True}


# ---------------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_batch_invariant_rows(dtype):
    case = Case(lead=(37,), vocab=5000, d=64, dtype=dtype, bias=True)
    h, w, e, b = make_inputs(case)
    op = functools.partial(soft_token_embedding, backend="torch", batch_invariant=True)
    hg = h.clone().requires_grad_(True)
    full = op(hg, w, e, b)
    go = torch.randn(full.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    (gfull,) = torch.autograd.grad(full, hg, go)
    for i in (0, 17, 36):
        hi = h[i:i + 1].clone().requires_grad_(True)
        alone = op(hi, w, e, b)
        (gi,) = torch.autograd.grad(alone, hi, go[i:i + 1])
        assert torch.equal(alone[0], full[i]) and torch.equal(gi[0], gfull[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wants", ["hidden", "all"])
def test_flop_counter_sees_the_op(backend, wants):
    """FlopCounterMode counts the custom ops' matmuls: the forward as the reference's two GEMMs count,
    the backward as the gradients asked for need them (dp, then dh, dW, dE; no recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    rows, vocab, width, embed_width = 3, 101, 8, 5
    h = torch.randn(rows, width, requires_grad=True)
    w = torch.randn(vocab, width, requires_grad=wants == "all")
    e = torch.randn(vocab, embed_width, requires_grad=wants == "all")

    def counted(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad():
        assert counted(lambda: soft_token_embedding(h, w, e, backend=backend)) == counted(
            lambda: reference.soft_token_embedding(h, w, e)) == 2 * rows * vocab * (width + embed_width)
    forward = 2 * rows * vocab * (width + embed_width)
    backward = 2 * rows * vocab * (embed_width + width) if wants == "hidden" else 4 * forward // 2
    assert counted(lambda: soft_token_embedding(h, w, e, backend=backend).sum().backward()) == forward + backward
