"""The correctness oracle: cases that reach every configuration family, inputs with realistic logits, and
checks strong enough that a broken kernel fails them (``--canary`` proves it, see ``canaries``).

What makes it strong:

* **Logits with a std of 3** (``LOGIT_STD``, the 2-4 of real LM heads): W rows of unit norm, hidden rows
  of norm ``3 sqrt(d)``. With the 0.05-0.125 of unit-norm hidden rows, softmax is nearly uniform and a
  dropped vocabulary tile or a zeroed gradient hides under the error floor.
* **The log-sum-exp** the forward saves (``gircse::soft_token_embedding``'s second output) is checked in
  fp32 against the fp64 truth: a missing tile or a mis-scaled split moves it by the share of the
  softmax mass it holds (~1e-4 and up), against an fp32 floor of ~1e-6. The bf16 output itself is
  rounded at ~4e-3 and cannot show such errors.
* **Bounds relative to the true values**, with no floor: bound = the same-dtype PyTorch error + ``ATOL``
  x max|truth| (lse: ``LSE_BASELINE_FACTOR`` x the fp32 PyTorch error + ``LSE_RTOL`` x max|lse|), and
  every check must fail an all-zero answer (max|truth| > bound), so no gradient can pass as zero.
* **Every configuration family** (``family``): the issue's batches B = 1, 16, 17, 33, 64, 512 for bf16,
  one case per further family a dtype reaches (fp32 takes other tiles), a batch-invariant case, a
  tied / untied twin, -inf masks in the bias, and the uneven shape (``shapes.UNEVEN``).
"""
from __future__ import annotations

import dataclasses
import functools

from .report import sticky_cuda_error
from .shapes import CORRECTNESS_BATCHES, FAMILY_SEARCH_BATCHES, SMALL_CORRECTNESS_BATCHES

LOGIT_STD = 3.0
LSE_BASELINE_FACTOR = 4.0
LSE_RTOL = 4e-6
# (mask, bias) of the bf16 cases, in the order of the batches: no bias, a sparse mask, a plain bias, the
# tail masked, no bias, all but the last 100 entries masked.
VARIATIONS = ((None, False), ("sparse", True), (None, True), ("tail", True), (None, False), ("head", True))


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    rows: int
    dtype: str              # "bfloat16" | "float32"
    tied: bool
    mask: str | None        # tests/gircse_kernels/op_cases.MASKS: -inf entries of the bias
    bias: bool
    batch_invariant: bool = False

    @property
    def label(self) -> str:
        flags = [self.dtype, "tied" if self.tied else "untied"] + ([f"mask {self.mask}"] if self.mask else []) + \
            (["bias"] if self.bias and not self.mask else []) + (["batch-invariant"] if self.batch_invariant else [])
        return f"{self.model} B={self.rows} " + " ".join(flags)


def make_inputs(vocab, d, de, dtype, device, *, rows, tied, bias, mask=None, seed=0, logit_std=LOGIT_STD):
    """(hidden, W, E, bias) generated on the device (fast at 7B sizes): unit-norm W rows and hidden rows
    of norm ``logit_std * sqrt(d)``, so the logits h W^T have a std of ``logit_std`` over the vocabulary;
    E ~ N(0, 1) (tied: E is W); a random bias with ``mask`` entries at -inf."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, device=device)
    weight = torch.randn(vocab, d, generator=g, device=device)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * (logit_std * d ** 0.5)
    weight = weight / weight.norm(dim=-1, keepdim=True)
    embed = weight if tied else torch.randn(vocab, de, generator=g, device=device)
    b = torch.randn(vocab, generator=g, device=device) if bias or mask is not None else None
    if mask is not None:
        from tests.gircse_kernels.op_cases import vocab_mask

        b[vocab_mask(mask, vocab).to(device)] = float("-inf")
    out = [t if t is None else t.to(dtype) for t in (hidden, weight, embed, b)]
    if tied:
        out[2] = out[1]
    return out


# -------------------------------------------------------------------------------------------------
# Configuration families
# -------------------------------------------------------------------------------------------------
def family(rows: int, shape, dtype_name: str, sms: int, batch_invariant: bool = False) -> str:
    """The code path a full forward + backward call takes: the GEMM path, or the fused kernels with their
    row block, split-V or not, dh folded into the tile kernel or not, and one or several row passes of
    the tile kernel (gradient rows stored once, or fp32 rows accumulated per row block)."""
    import torch

    from gircse_kernels.triton.config import choose_config

    vocab, d, de, _ = shape
    cfg = choose_config(rows, vocab, d, de, getattr(torch, dtype_name), sms, batch_invariant=batch_invariant)
    if cfg.kind == "gemm":
        return "gemm"
    passes = "one tile row pass" if rows <= cfg.backward_tiles.block_m else "tile row blocks"
    dh = "dh folded" if cfg.fold_backward else "dh kernel"
    return f"{cfg.kind} {cfg.forward.block_m}-row, {dh}, {passes}" + (", invariant" if batch_invariant else "")


@functools.lru_cache(maxsize=64)
def families_of(shape, dtype_name: str, sms: int) -> dict:
    """Every family the dispatcher returns for ``shape`` over ``FAMILY_SEARCH_BATCHES``: family -> batches."""
    found = {}
    for rows in FAMILY_SEARCH_BATCHES:
        found.setdefault(family(rows, shape, dtype_name, sms), []).append(rows)
    return found


def correctness_cases(models: dict, sms: int, *, small: bool, batches=None) -> list[Case]:
    """The cases of the correctness section. With ``batches`` given, exactly those (bf16, the variations
    in turn); by default the family-covering batches, plus a case for each family of bf16 or fp32 they
    miss, a tied / untied twin where d = d_e, and a batch-invariant case per model."""
    explicit = batches is not None
    batches = tuple(batches) if explicit else (SMALL_CORRECTNESS_BATCHES if small else CORRECTNESS_BATCHES)
    cases = []
    for name, shape in models.items():
        vocab, d, de, tied = shape
        own = [Case(name, rows, "bfloat16", tied, *VARIATIONS[i % len(VARIATIONS)]) for i, rows in enumerate(batches)]
        middle = batches[min(2, len(batches) - 1)]
        if d == de:
            own.append(Case(name, middle, "bfloat16", not tied, None, True))
        if not explicit:
            for dtype in ("bfloat16", "float32"):
                reached = {family(c.rows, shape, dtype, sms) for c in own if c.dtype == dtype}
                for fam, rows in families_of(shape, dtype, sms).items():
                    if fam in reached:
                        continue
                    rep = next((b for b in batches if b in rows), rows[0])
                    mask, bias = VARIATIONS[(len(own) + 3) % len(VARIATIONS)]
                    own.append(Case(name, rep, dtype, tied, mask, bias))
                    reached.add(fam)
            own.append(Case(name, middle, "bfloat16", tied, "tail", True, batch_invariant=True))
        cases += own
    return cases


def families_report(models: dict, cases: list[Case], sms: int) -> list[dict]:
    """Per model and dtype, each family the dispatcher returns (over B = 1..4096) and the case batches that
    reached it (an empty list: not checked)."""
    out = []
    for name, shape in models.items():
        for dtype in ("bfloat16", "float32"):
            for fam, rows in families_of(shape, dtype, sms).items():
                hit = sorted({c.rows for c in cases if c.model == name and c.dtype == dtype and not c.batch_invariant
                              and family(c.rows, shape, dtype, sms) == fam})
                out.append(dict(model=name, dtype=dtype, family=fam, batches=f"{rows[0]}-{rows[-1]}", cases=hit))
    return out


# -------------------------------------------------------------------------------------------------
# One case
# -------------------------------------------------------------------------------------------------
def _leaves(inputs, dtype=None):
    """Fresh leaves requiring grad (cast to ``dtype``); a tied E stays the same tensor as W."""
    h, w, e, b = (None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in inputs)
    if inputs[2] is inputs[1]:
        e = w
    return h, w, e, b


def _outputs_and_grads(fn, leaves, grad_out):
    import torch

    h, w, e, b = leaves
    unique = [h, w] + ([] if e is w else [e]) + ([] if b is None else [b])
    out = fn(h, w, e, b)
    return [out.detach(), *torch.autograd.grad(out, unique, grad_out.to(out.dtype))]


def _naive(h, w, e, b):
    """The plain formula in the inputs' own dtype: the PyTorch error a bound starts from."""
    import torch

    z = h @ w.T + (0 if b is None else b)
    return torch.softmax(z.float(), -1).to(z.dtype) @ e


def _logits(h, w, b, dtype):
    z = h.to(dtype) @ w.to(dtype).T
    return z if b is None else z + b.to(dtype)


def _compare(got, truth, bound) -> dict:
    import torch

    err = (got.double() - truth).abs().max().item()
    finite = bool(torch.isfinite(got).all())
    return dict(error=err, bound=bound, ok=bool(finite and err <= bound))


def check_case(case: Case, shape, device, canaries=()) -> dict:
    """The Triton backend's log-sum-exp, output and every gradient for ``case`` against an fp64 truth on the
    same rounded inputs. The op is called through the custom op ``soft_token_embedding`` dispatches to, which
    also returns the log-sum-exp the forward saves for the backward. With ``canaries`` ((name, context
    factory) pairs), the same checks of each broken variant, which must fail at least one of them."""
    import torch

    from gircse_kernels import reference
    from gircse_kernels.autograd import soft_token_embedding_op
    from gircse_kernels.triton.config import choose_config, num_sms
    from tests.gircse_kernels.op_cases import ATOL

    vocab, d, de, _ = shape
    de = d if case.tied else de
    dtype = getattr(torch, case.dtype)
    inputs = make_inputs(vocab, d, de, dtype, device, rows=case.rows, tied=case.tied, bias=case.bias, mask=case.mask)
    h, w, e, b = inputs
    go = torch.randn(case.rows, de, generator=torch.Generator(device=device).manual_seed(7), device=device)
    names = ["output", "grad hidden", "grad lm_head_weight"] + ([] if case.tied else ["grad embed_weight"]) + \
        ([] if b is None else ["grad lm_head_bias"])

    with torch.no_grad():
        raw = _logits(h, w, None, torch.float64)
        logit_std = raw.std(dim=-1).mean().item()
        true_lse = torch.logsumexp(raw if b is None else raw + b.double(), dim=-1)
        del raw
        lse32_err = (torch.logsumexp(_logits(h, w, b, torch.float32), dim=-1).double() - true_lse).abs().max().item()
    truth = _outputs_and_grads(reference.soft_token_embedding, _leaves(inputs, torch.float64), go.double())
    baseline_errors = [(ref.double() - true).abs().max().item()
                       for ref, true in zip(_outputs_and_grads(_naive, _leaves(inputs), go), truth)]
    bounds = {n: ref_err + ATOL[dtype] * true.abs().max().item()
              for n, ref_err, true in zip(names, baseline_errors, truth)}
    bounds["lse"] = LSE_BASELINE_FACTOR * lse32_err + LSE_RTOL * max(1.0, true_lse.abs().max().item())
    zero_fails = {n: true.abs().max().item() > bounds[n] for n, true in zip(names, truth)}
    zero_fails["lse"] = true_lse.abs().max().item() > bounds["lse"]

    def evaluate() -> dict:
        saved = {}

        def op(hidden, weight, embed, bias):  # what soft_token_embedding dispatches to, with the lse it saves
            out32, saved["lse"] = soft_token_embedding_op(hidden, weight, embed, bias, 1.0, None, "triton",
                                                          case.batch_invariant, 0.0, embed is weight)
            return out32.to(dtype)
        actual = _outputs_and_grads(op, _leaves(inputs), go)
        checks = {"lse": _compare(saved["lse"], true_lse, bounds["lse"])}
        checks.update({n: _compare(got, true, bounds[n]) for n, got, true in zip(names, actual, truth)})
        return checks

    checks = evaluate()
    for name, check in checks.items():
        check["zero_fails"] = zero_fails[name]
    weak = [n for n, z in zero_fails.items() if not z]
    sms = num_sms(torch.device(device))
    cfg = choose_config(case.rows, vocab, d, de, dtype, sms, batch_invariant=case.batch_invariant)
    entry = dict(path=cfg.kind, family=family(case.rows, shape, case.dtype, sms, case.batch_invariant),
                 logit_std=logit_std, checks=checks, ok=all(c["ok"] for c in checks.values()) and not weak)
    if weak:
        entry["weak_checks"] = weak  # an all-zero answer would pass these: the case cannot tell the op from nothing
    if canaries:
        entry["canaries"] = {}
        for name, broken in canaries:
            try:
                with broken():
                    variant = evaluate()
                failed = [n for n, c in variant.items() if not c["ok"]]
                entry["canaries"][name] = dict(caught=bool(failed), failed=failed)
            except Exception as exc:  # a variant that crashes is caught too (the section reports it)
                if sticky_cuda_error(exc):
                    raise
                entry["canaries"][name] = dict(caught=True, failed=[f"raised {type(exc).__name__}: {str(exc)[:120]}"])
    return entry


def summarize_canaries(cases: list[dict], descriptions: dict) -> list[dict]:
    """Per canary: caught (by any case), how many cases caught it, which checks did."""
    out = []
    for name, description in descriptions.items():
        runs = [c["canaries"][name] for c in cases if name in (c.get("canaries") or {})]
        checks = {}
        for run in runs:
            for check in run["failed"]:
                key = check if not check.startswith("raised") else "raised"
                checks[key] = checks.get(key, 0) + 1
        out.append(dict(name=name, caught=any(r["caught"] for r in runs), cases_caught=sum(r["caught"] for r in runs),
                        cases=len(runs), checks=checks, description=description))
    return out
