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


def test_icr_k3_regularizer_is_the_mean_over_steps():
    """K = 3 with the loss rising at both transitions: the penalty is lam * mean (not sum) of the two
    log-ratio increases; at K = 2 the two would be indistinguishable."""
    torch.manual_seed(4)
    tau, lam = 0.5, 0.7
    q, p, n = torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64), \
        torch.randn(3, 2, 3, 4, dtype=torch.float64)

    def hand(q, p, n):
        return [_hand_infonce(q[:, k].tolist(), p[:, k].tolist(), n[:, :, k].tolist(), tau) for k in range(3)]

    order = sorted(range(3), key=lambda k: hand(q, p, n)[k])  # steps by increasing loss: L_1 < L_2 < L_3
    q, p, n = q[:, order], p[:, order], n[:, :, order]
    steps = hand(q, p, n)
    assert steps[0] < steps[1] < steps[2]
    rises = [math.log(steps[1]) - math.log(steps[0]), math.log(steps[2]) - math.log(steps[1])]
    expected = sum(steps) + lam * sum(rises) / 2
    total, per_step = icr_loss(q, p, n, temperature=tau, lam=lam)
    assert per_step.tolist() == pytest.approx(steps, rel=1e-9)
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert abs((sum(steps) + lam * sum(rises)) - expected) > 1e-3  # the sum would be told apart
    # One rise of two (L_1 < L_2 > L_3): half of it.
    q2, p2, n2 = q[:, [0, 2, 1]], p[:, [0, 2, 1]], n[:, :, [0, 2, 1]]
    total2, _ = icr_loss(q2, p2, n2, temperature=tau, lam=lam)
    assert total2.item() == pytest.approx(sum(steps) + lam * (math.log(steps[2]) - math.log(steps[0])) / 2, rel=1e-9)
    # The authors' reduction: the mean of the step losses, the same penalty.
    total_mean, _ = icr_loss(q, p, n, temperature=tau, lam=lam, step_reduction="mean")
    assert total_mean.item() == pytest.approx(sum(steps) / 3 + lam * sum(rises) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="step_reduction must be one of"):
        icr_loss(q, p, n, step_reduction="max")


def test_icr_gradients_match_finite_differences():
    """gradcheck in fp64 (the loss keeps fp64): every input's gradient, with hard negatives, K = 3 and a
    penalty that is active (the steps are ordered so the loss rises)."""
    torch.manual_seed(5)
    q = torch.randn(3, 3, 5, dtype=torch.float64)
    p = torch.randn(3, 3, 5, dtype=torch.float64)
    n = torch.randn(3, 2, 3, 5, dtype=torch.float64)
    _, per_step = icr_loss(q, p, n, temperature=0.3)
    order = per_step.argsort().tolist()
    q, p, n = (t.clone().requires_grad_(True) for t in (q[:, order], p[:, order], n[:, :, order]))
    assert torch.autograd.gradcheck(lambda q, p, n: icr_loss(q, p, n, temperature=0.3, lam=0.7)[0], (q, p, n))
    assert torch.autograd.gradcheck(lambda q, p: icr_loss(q, p, None, temperature=0.3, lam=0.7)[0], (q, p))


def test_icr_shapes_and_options_checked():
    with pytest.raises(ValueError, match="B, K, d"):
        icr_loss(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_steps"):
        icr_loss(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            icr_loss(torch.randn(3, 2, 4), torch.randn(3, 2, 4), temperature=bad)
    with pytest.raises(ValueError, match="lam"):
        icr_loss(torch.randn(3, 2, 4), torch.randn(3, 2, 4), lam=-0.5)
    import numpy as np  # numpy scalars are numbers

    q, p = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(icr_loss(q, p, temperature=np.float32(0.5), lam=np.float64(1.0))[0],
                       icr_loss(q, p, temperature=0.5, lam=1.0)[0])
