"""icr_loss / info_nce against hand computations."""
import math

import pytest
import torch

from gircse.losses import icr_loss, info_nce


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _hand_infonce(qs, ps, ns, tau):
    """Pure-python InfoNCE: candidates = all positives, then each row's negatives."""
    docs = list(ps) + [n for row in ns for n in row]
    losses = []
    for i, q in enumerate(qs):
        logits = [_cos(q, d) / tau for d in docs]
        lse = math.log(sum(math.exp(v) for v in logits))
        losses.append(lse - logits[i])
    return sum(losses) / len(losses)


def test_icr_hand_computed_example():
    # B=2, H=1, K=2, d=2
    q = [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [1.0, -1.0]]]
    p = [[[1.0, 0.5], [0.5, 1.0]], [[1.0, 1.0], [0.0, -1.0]]]
    n = [[[[0.0, 1.0], [1.0, 0.0]]], [[[0.3, 1.0], [-1.0, -1.0]]]]
    tau, lam = 0.5, 0.7
    steps = [_hand_infonce([qq[k] for qq in q], [pp[k] for pp in p], [[nn[0][k]] for nn in n], tau) for k in range(2)]
    expected = steps[0] + steps[1] + lam * max(math.log(steps[1]) - math.log(steps[0]), 0.0)
    total, per_step = icr_loss(torch.tensor(q), torch.tensor(p), torch.tensor(n), temperature=tau, lam=lam)
    assert per_step.shape == (2,)
    assert per_step.tolist() == pytest.approx(steps, rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # Here L_2 < L_1: no penalty ...
    assert steps[1] < steps[0]
    assert total.item() == pytest.approx(steps[0] + steps[1], rel=1e-5)
    # ... and with the steps swapped (L_2 > L_1) the penalty lam * (log L_2 - log L_1) appears.
    total_sw, _ = icr_loss(torch.tensor(q).flip(1), torch.tensor(p).flip(1), torch.tensor(n).flip(2),
                           temperature=tau, lam=lam)
    expected_sw = steps[0] + steps[1] + lam * (math.log(steps[0]) - math.log(steps[1]))
    assert total_sw.item() == pytest.approx(expected_sw, rel=1e-5)


def test_icr_lam0_k1_is_plain_infonce():
    torch.manual_seed(0)
    q, p, n = torch.randn(5, 1, 8), torch.randn(5, 1, 8), torch.randn(5, 3, 1, 8)
    total, per_step = icr_loss(q, p, n, lam=0.0)
    assert torch.allclose(total, info_nce(q[:, 0], p[:, 0], n[:, :, 0]))
    assert torch.allclose(per_step[0], total)
    # K=1: the regularizer is empty whatever lam
    assert torch.allclose(icr_loss(q, p, n, lam=3.0)[0], total)
    # without hard negatives too, and equal to torch's cross entropy on cosine logits / tau
    total, _ = icr_loss(q, p, None, temperature=0.05, lam=0.0)
    logits = torch.nn.functional.cosine_similarity(q[:, 0, None], p[None, :, 0], dim=-1) / 0.05
    assert torch.allclose(total, torch.nn.functional.cross_entropy(logits, torch.arange(5)), atol=1e-5)


def test_icr_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    q, p, n = torch.randn(4, 3, 16), torch.randn(4, 3, 16), torch.randn(4, 2, 3, 16)
    ref_total, ref_steps = icr_loss(q, p, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, steps = icr_loss(q, p, n)
    assert total.dtype == torch.float32 and steps.dtype == torch.float32
    assert torch.allclose(total, ref_total) and torch.allclose(steps, ref_steps)
    # bf16 inputs are upcast (loss in fp32)
    total_bf16, _ = icr_loss(q.bfloat16(), p.bfloat16(), n.bfloat16())
    assert total_bf16.dtype == torch.float32


def test_icr_gradients_flow_and_shapes_checked():
    q = torch.randn(3, 2, 4, requires_grad=True)
    p = torch.randn(3, 2, 4, requires_grad=True)
    total, _ = icr_loss(q, p)
    total.backward()
    assert q.grad is not None and p.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="B, K, d"):
        icr_loss(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_steps"):
        icr_loss(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4))
