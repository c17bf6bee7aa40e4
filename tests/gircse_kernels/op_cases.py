"""Shared shape grid and oracles for every backend's tests of the op.

Oracle: compute the truth in fp64 with the reference (from the inputs as rounded to the case's dtype),
then require ``backend_err <= ATOL[dtype] * scale``, ``scale`` being the largest magnitude of the true
result (at least 0.05). The truth is checked on every case too: the plain PyTorch formula evaluated in
the inputs' dtype (``naive``) must lie within ``NAIVE_SLACK * ATOL[dtype] * scale`` of it, so a wrong
reference fails loudly instead of widening its own bound (it used to be added to the tolerance).
A fused fp32-accumulating kernel should not be worse than PyTorch.
"""
from __future__ import annotations

import dataclasses

import torch

from gircse_kernels import reference

# Stated tolerances (absolute, relative to max |truth|).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# The same-dtype PyTorch formula must be this close to the truth (in ATOL units). On the grid it stays
# below 0.93 (fp16 weight gradients); the slack leaves room for other CPUs' and GPUs' matmul paths.
NAIVE_SLACK = 2.0


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple = (3,)
    vocab: int = 1000
    d: int = 96
    d_embed: int | None = None  # None: same as d
    dtype: torch.dtype = torch.float32
    tied: bool = False
    bias: bool = False
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 3.0  # typical |logit|; 1e4 for the "huge logits" cases
    peaked: bool = False  # some LM-head rows equal to hidden rows (near one-hot distributions)
    mask: str | None = None  # vocabulary mask in the bias (-inf entries): see MASKS
    seed: int = 0

    @property
    def de(self) -> int:
        return self.d if (self.tied or self.d_embed is None) else self.d_embed

    def __str__(self) -> str:
        parts = [f"lead{'x'.join(map(str, self.lead))}", f"V{self.vocab}", f"d{self.d}", f"de{self.de}",
                 str(self.dtype).replace("torch.", "")]
        for flag in ("tied", "bias", "peaked"):
            if getattr(self, flag):
                parts.append(flag)
        if self.mask is not None:
            parts.append(f"mask-{self.mask}")
        if self.temperature != 1.0:
            parts.append(f"T{self.temperature}")
        if self.softcap is not None:
            parts.append(f"cap{self.softcap}")
        if self.logit_scale != 3.0:
            parts.append(f"scale{self.logit_scale:g}")
        return "-".join(parts)


# Vocabulary masks (entries of the bias set to -inf), each a hazard for an online softmax:
#   tail: the last 40% masked (the last tiles and splits are empty).
#   head: all but the last 100 entries masked, so the first tile of every split but the last is
#         entirely -inf (an online softmax must not compute exp(-inf - -inf)), and whole splits are
#         empty (the combine must skip them).
#   sparse: one entry in 97 survives: most tiles are fully masked, some hold one survivor.
#   one: a single survivor (p is one-hot).
#   all: every entry masked: each row is an all -inf row, which torch.softmax (and so the reference)
#        turns into NaN; see check_fully_masked.
MASKS = ("tail", "head", "sparse", "one", "all")


def vocab_mask(mask: str, vocab: int) -> torch.Tensor:
    """Boolean [V]: True where the vocabulary entry is masked (bias = -inf)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    j = torch.arange(vocab)
    if mask == "tail":
        return j >= vocab - (2 * vocab) // 5
    if mask == "head":
        return j < vocab - min(100, vocab)
    if mask == "sparse":
        return j % 97 != 96 % vocab
    if mask == "one":
        return j != vocab // 3
    return torch.ones(vocab, dtype=torch.bool)


def make_inputs(case: Case, device="cpu", requires_grad=False):
    """(hidden, lm_head_weight, embed_weight, bias) in ``case.dtype``; E is W when tied. A masked case
    always has a bias (zero where ``case.bias`` is False) with -inf at the masked entries."""
    g = torch.Generator().manual_seed(case.seed)
    hidden = torch.randn(*case.lead, case.d, generator=g, dtype=torch.float64)
    weight = torch.randn(case.vocab, case.d, generator=g, dtype=torch.float64)
    hidden /= hidden.norm(dim=-1, keepdim=True)
    weight /= weight.norm(dim=-1, keepdim=True)
    if case.peaked:
        flat = hidden.reshape(-1, case.d)
        n = min(flat.shape[0], case.vocab)
        weight[:n] = flat[:n]  # row i of W points exactly along hidden row i
    hidden *= case.logit_scale ** 0.5
    weight *= case.logit_scale ** 0.5
    embed = None if case.tied else torch.randn(case.vocab, case.de, generator=g, dtype=torch.float64)
    bias = torch.randn(case.vocab, generator=g, dtype=torch.float64) if case.bias else None
    if case.mask is not None:
        bias = torch.zeros(case.vocab, dtype=torch.float64) if bias is None else bias
        bias[vocab_mask(case.mask, case.vocab)] = float("-inf")
    tensors = [hidden, weight, embed, bias]
    out = [None if t is None else t.to(device=device, dtype=case.dtype).requires_grad_(requires_grad)
           for t in tensors]
    if case.tied:
        out[2] = out[1]
    return tuple(out)


def naive(hidden, weight, embed, bias, temperature=1.0, softcap=None):
    """The plain formula in the inputs' own dtype: the PyTorch baseline error."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.softmax(z.float(), -1).to(z.dtype) @ embed


def _f64(inputs):
    tensors = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    if inputs[2] is inputs[1]:
        tensors[2] = tensors[1]
    return tensors


def _err(actual, truth):
    return (actual.double() - truth).abs().max().item()


def assert_matches_truth(actual, truth, baseline, dtype, what="output", natural_scale=0.0):
    """``actual`` within ATOL of the fp64 ``truth``, after checking the truth against ``baseline`` (the
    same-dtype naive formula), an independent computation of the same quantity."""
    # The floor covers exactly-zero truths (V = 1, one-hot softmax) without loosening real cases:
    # ``natural_scale`` is 1% of the product of the input magnitudes that bound this quantity.
    scale = max(truth.abs().max().item(), 0.05, natural_scale)
    err, base = _err(actual, truth), _err(baseline, truth)
    bound = ATOL[dtype] * scale
    assert base <= NAIVE_SLACK * bound, (
        f"{what}: the same-dtype naive formula is {base:.3e} from the reference truth (> {NAIVE_SLACK} x "
        f"{bound:.3e}): the reference, or the test's naive formula, is wrong")
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (pytorch same-dtype {base:.3e})"


def check_forward(op, case: Case, device="cpu"):
    """``op(hidden, W, E, b, temperature=, softcap=)`` vs the fp64 truth and the same-dtype baseline."""
    inputs = make_inputs(case, device)
    kw = dict(temperature=case.temperature, softcap=case.softcap)
    actual = op(*inputs, **kw)
    assert actual.shape == (*case.lead, case.de), actual.shape
    assert actual.dtype == case.dtype
    truth = reference.soft_token_embedding(*[None if t is None else t.cpu() for t in _f64(inputs)], **kw)
    baseline = naive(*inputs, **kw)
    assert_matches_truth(actual.cpu(), truth, baseline.cpu(), case.dtype)


def check_backward(op, case: Case, device="cpu"):
    """Gradients for hidden, W, E, b (W only when tied) vs the fp64 reference autograd."""
    kw = dict(temperature=case.temperature, softcap=case.softcap)
    inputs = make_inputs(case, device, requires_grad=True)
    g = torch.Generator().manual_seed(case.seed + 1)
    grad_out = torch.randn(*case.lead, case.de, generator=g, dtype=torch.float64)  # non-uniform dO
    leaves = [t for i, t in enumerate(inputs) if t is not None and not (case.tied and i == 2)]
    names = [n for i, n in enumerate(["hidden", "lm_head_weight", "embed_weight", "lm_head_bias"])
             if inputs[i] is not None and not (case.tied and i == 2)]

    actual = torch.autograd.grad(op(*inputs, **kw), leaves, grad_out.to(device=device, dtype=case.dtype))
    base_inputs = make_inputs(case, device, requires_grad=True)
    base_leaves = [t for i, t in enumerate(base_inputs) if t is not None and not (case.tied and i == 2)]
    baseline = torch.autograd.grad(naive(*base_inputs, **kw), base_leaves,
                                   grad_out.to(device=device, dtype=case.dtype))
    f64 = _f64([None if t is None else t.cpu() for t in inputs])
    f64_leaves = [t for i, t in enumerate(f64) if t is not None and not (case.tied and i == 2)]
    truth = torch.autograd.grad(reference.soft_token_embedding(*f64, **kw), f64_leaves, grad_out)
    mag = {n: (0.0 if t is None else t.detach().abs().max().item())
           for n, t in zip(["h", "w", "e"], f64[:3])}
    go = grad_out.abs().max().item() / case.temperature
    natural = {"hidden": go * mag["e"] * mag["w"], "lm_head_weight": go * mag["e"] * mag["h"],
               "embed_weight": go, "lm_head_bias": go * mag["e"]}
    for name, a, t, b in zip(names, actual, truth, baseline):
        assert a.dtype == case.dtype and a.shape == t.shape, (name, a.dtype, a.shape)
        assert_matches_truth(a.cpu(), t, b.cpu(), case.dtype, what=f"grad {name}",
                             natural_scale=1e-2 * natural[name])


def check_grad_filter_bound(op, device="cpu"):
    """``grad_filter_eps`` > 0 drops some gradient (peaked case) but stays within the documented bound
    of ``gircse_kernels.grad_filter``; eps = 0 is exact and reproducible (bit-equal to a rerun)."""
    from gircse_kernels.grad_filter import gradient_filter_bound

    case = Case(lead=(4,), vocab=3000, d=32, peaked=True, logit_scale=40.0, bias=True)
    h, w, e, b = make_inputs(case, device, requires_grad=True)
    go = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).to(device)
    exact = torch.autograd.grad(op(h, w, e, b), (h, w, e, b), go)
    eps = 1e-4
    filtered = torch.autograd.grad(op(h, w, e, b, grad_filter_eps=eps), (h, w, e, b), go)
    bound = gradient_filter_bound(*(t.detach().cpu() for t in (h, w, e, b)), go.cpu(), eps=eps)
    skipped_something = False
    for name, x, y in zip(["hidden", "lm_head_weight", "embed_weight", "lm_head_bias"], exact, filtered):
        err = (x - y).abs().max().item()
        skipped_something |= err > 0
        assert err <= bound[name], (name, err, bound[name])
    assert skipped_something  # the filter really dropped tiles in this peaked case
    again = torch.autograd.grad(op(h, w, e, b, grad_filter_eps=0.0), (h, w, e, b), go)
    for x, y in zip(exact, again):
        assert torch.equal(x, y)

    # Several row blocks (160 rows: 1-3 blocks in every backend): 128 near-uniform rows give every column
    # p ~ 1 / V > eps, 32 peaked rows put almost all mass on one column each. No column is below eps for
    # the whole batch, yet a backend skips tiles for the peaked rows' block: the bound must count, per
    # row, every column with p_ij < eps (a batch-wide count is 0 here, and the fused Triton kernels'
    # error exceeded that bound).
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 32, generator=g).to(device)
    hidden = torch.cat([0.01 * torch.randn(128, 32, generator=g).to(device), w[:32]])
    hidden.requires_grad_(True)
    go = torch.randn(160, 32, generator=g).to(device)
    exact = torch.autograd.grad(op(hidden, w, w, None), hidden, go)[0]
    filtered = torch.autograd.grad(op(hidden, w, w, None, grad_filter_eps=eps), hidden, go)[0]
    bound = gradient_filter_bound(hidden.detach().cpu(), w.cpu(), w.cpu(), None, go.cpu(), eps=eps)["hidden"]
    err = (exact - filtered).abs().amax(dim=1)
    assert err.max().item() <= bound, (err.max().item(), bound)
    assert err[:128].max().item() == 0.0  # the near-uniform rows' block: nothing below eps, nothing skipped


def check_fully_masked(op, device="cpu", dtype=torch.float32, tied=False):
    """Every vocabulary entry masked: the op behaves exactly like ``torch.softmax`` of an all -inf
    row, as the reference does: the output is NaN, and so is every gradient (hidden, W, E, bias)."""
    case = Case(lead=(3,), vocab=700, d=96, dtype=dtype, tied=tied, mask="all")
    inputs = make_inputs(case, device, requires_grad=True)
    out = op(*inputs)
    assert out.shape == (3, 96) and out.dtype == dtype
    assert torch.isnan(out).all(), "fully masked rows must give NaN, like torch.softmax of an all -inf row"
    leaves = [t for i, t in enumerate(inputs) if not (tied and i == 2)]
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    ref_inputs = make_inputs(case, "cpu", requires_grad=True)
    ref_leaves = [t for i, t in enumerate(ref_inputs) if not (tied and i == 2)]
    ref_out = reference.soft_token_embedding(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, torch.randn_like(ref_out))
    for name, g, r in zip(["hidden", "lm_head_weight", "embed_weight", "lm_head_bias"], grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.equal(torch.isnan(g.cpu()), torch.isnan(r)), f"grad {name}: NaN pattern differs from torch"


# The grid every backend runs: odd V, B=1, 3-D leading dims, all dtypes, tied/untied, bias,
# temperature, softcap (alone and with temperature), peaked and huge logits, large d, masked
# vocabularies.
GRID = [
    Case(lead=(1,), vocab=1, d=16),
    Case(lead=(3,), vocab=7, d=16, bias=True),
    Case(lead=(17,), vocab=1000, d=96),
    Case(lead=(1,), vocab=1000, d=96, dtype=torch.bfloat16),
    Case(lead=(2, 3), vocab=1000, d=96, dtype=torch.float16, tied=True),
    Case(lead=(17,), vocab=1000, d=96, dtype=torch.bfloat16, bias=True, temperature=0.5),
    Case(lead=(3,), vocab=1000, d=96, softcap=5.0, logit_scale=30.0),
    Case(lead=(3,), vocab=1000, d=96, dtype=torch.bfloat16, tied=True, peaked=True, logit_scale=50.0),
    Case(lead=(3,), vocab=1000, d=16, logit_scale=1e4, peaked=True),
    Case(lead=(3,), vocab=1000, d=16, dtype=torch.bfloat16, logit_scale=1e4, peaked=True, bias=True),
    Case(lead=(3,), vocab=7, d=576, d_embed=96, dtype=torch.float16),
    Case(lead=(17,), vocab=1000, d=576, tied=True),
    Case(lead=(3,), vocab=1000, d=576, dtype=torch.bfloat16, tied=True, softcap=30.0, logit_scale=20.0),
    Case(lead=(1,), vocab=50257, d=96),
    Case(lead=(3,), vocab=50257, d=16, dtype=torch.bfloat16, tied=True, bias=True),
    Case(lead=(2,), vocab=100, d=1536, d_embed=1536),
    Case(lead=(3,), vocab=37, d=1536, dtype=torch.bfloat16, tied=True),
    # temperature and softcap together, both with real effect (|z / T| well beyond the cap)
    Case(lead=(4,), vocab=1000, d=96, bias=True, temperature=0.5, softcap=4.0, logit_scale=20.0),
    Case(lead=(4,), vocab=1000, d=96, dtype=torch.bfloat16, temperature=2.0, softcap=4.0, logit_scale=40.0),
    # fp16 across the paths
    Case(lead=(17,), vocab=1000, d=96, dtype=torch.float16, bias=True, temperature=0.5),
    Case(lead=(1,), vocab=5003, d=64, dtype=torch.float16),
    Case(lead=(3,), vocab=1000, d=16, dtype=torch.float16, logit_scale=1e3, peaked=True),
    Case(lead=(5,), vocab=777, d=200, d_embed=150, dtype=torch.float16, softcap=10.0, logit_scale=20.0),
    # masked vocabularies (see MASKS)
    Case(lead=(5,), vocab=1000, d=96, mask="tail"),
    Case(lead=(17,), vocab=5000, d=48, mask="head"),
    Case(lead=(1,), vocab=5000, d=48, dtype=torch.bfloat16, mask="head", bias=True),
    Case(lead=(3,), vocab=3001, d=96, dtype=torch.bfloat16, mask="sparse"),
    Case(lead=(2,), vocab=999, d=96, dtype=torch.float16, mask="one"),
    Case(lead=(3,), vocab=1000, d=96, mask="tail", temperature=0.7, softcap=5.0, logit_scale=30.0),
    Case(lead=(3,), vocab=2000, d=576, dtype=torch.bfloat16, tied=True, mask="head"),
    Case(lead=(3,), vocab=777, d=200, d_embed=150, mask="sparse", bias=True),
]
