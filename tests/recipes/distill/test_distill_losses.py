"""KD divergences against hand-derived values and the invariants of spec distill.md section 9."""

import math

import pytest
import torch

from recipes.distill import losses
from runner import registry

P = [0.5, 0.3, 0.2]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def logits(probs):
    return torch.tensor(probs).log().unsqueeze(0)  # softmax(log p) = p


def kd(name, s=Q, t=P, **params):
    return registry.get("kd_loss", name)(logits(s), logits(t), torch.ones(1, dtype=torch.bool), **params).item()


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


FKL = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
RKL = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)


def test_hand_computed_values_on_a_three_token_vocabulary():
    assert kd("fkl") == pytest.approx(FKL, abs=1e-6) and FKL == pytest.approx(0.223805, abs=1e-6)
    assert kd("rkl") == pytest.approx(RKL, abs=1e-6) and RKL == pytest.approx(0.193795, abs=1e-6)
    assert kd("tvd") == pytest.approx(0.3, abs=1e-6)
    m = [0.35, 0.4, 0.25]
    assert kd("jsd", beta=0.5) == pytest.approx(0.5 * kl(P, m) + 0.5 * kl(Q, m), abs=1e-6)
    assert kd("jsd", beta=0.5) == pytest.approx(0.050875, abs=1e-6)
    assert kd("sfkl", skew_alpha=0.1) == pytest.approx(kl(P, [0.23, 0.48, 0.29]), abs=1e-6)
    assert kd("srkl", skew_alpha=0.1) == pytest.approx(kl(Q, [0.47, 0.32, 0.21]), abs=1e-6)
    # AKL, mu=0.5: teacher order [0.5, 0.3, 0.2] has cumulative mass [0.5, 0.8, 1.0]; the head is the
    # top token, gaps 0.3 (head) and 0.2 + 0.1 (tail), so the weights are 1/2 and 1/2.
    assert kd("akl", mu=0.5) == pytest.approx(0.5 * FKL + 0.5 * RKL, abs=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "sfkl", "srkl", "jsd", "tvd", "akl"])
def test_nonnegative_and_zero_at_equality(name):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, 50, generator=g), torch.randn(4, 7, 50, generator=g)
    mask = torch.ones(4, 7, dtype=torch.bool)
    loss = registry.get("kd_loss", name)
    assert loss(s, t, mask).item() >= 0
    assert loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_skew_at_zero_is_the_plain_kl_and_jsd_endpoints_follow_trl():
    g = torch.Generator().manual_seed(1)
    s, t, mask = torch.randn(3, 5, 20, generator=g), torch.randn(3, 5, 20, generator=g), torch.ones(3, 5, dtype=torch.bool)
    get = lambda n: registry.get("kd_loss", n)  # noqa: E731
    assert get("sfkl")(s, t, mask, skew_alpha=0.0).item() == pytest.approx(get("fkl")(s, t, mask).item(), abs=1e-6)
    assert get("srkl")(s, t, mask, skew_alpha=0.0).item() == pytest.approx(get("rkl")(s, t, mask).item(), abs=1e-6)
    assert get("jsd")(s, t, mask, beta=0.0).item() == pytest.approx(get("fkl")(s, t, mask).item(), abs=1e-6)
    assert get("jsd")(s, t, mask, beta=1.0).item() == pytest.approx(get("rkl")(s, t, mask).item(), abs=1e-6)
    # symmetric at beta = 0.5
    assert get("jsd")(s, t, mask, beta=0.5).item() == pytest.approx(get("jsd")(t, s, mask, beta=0.5).item(), abs=1e-6)
    # the interior tends to 0 near the endpoints, not to the KLs (TRL's documented behaviour)
    assert get("jsd")(s, t, mask, beta=1e-4).item() < 0.01 * get("fkl")(s, t, mask).item()


def test_tvd_is_bounded_by_one():
    s = torch.tensor([[[30.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0, 30.0]]])
    value = registry.get("kd_loss", "tvd")(s, t, torch.ones(1, 1, dtype=torch.bool)).item()
    assert 0.99 < value <= 1.0


def test_akl_is_forward_kl_when_the_tail_gap_is_zero():
    # teacher and student agree exactly on the tail tokens (the same logits there, and the same head
    # mass), differ only inside the head: g_tail = 0, so AKL = KL(p||q)
    t = torch.tensor([[[3.0, 2.0, 0.1, 0.0]]]).log_softmax(-1)
    p = t.exp()[0, 0]
    q = torch.tensor([p[1], p[0], p[2], p[3]])  # swap the two head tokens
    s = q.log().view(1, 1, 4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    mu = float(p[0] + p[1]) + 1e-4  # head = the first two tokens
    akl = registry.get("kd_loss", "akl")(s, t, mask, mu=mu).item()
    assert akl == pytest.approx(registry.get("kd_loss", "fkl")(s, t, mask).item(), abs=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "sfkl", "srkl", "jsd", "tvd", "akl"])
def test_all_masked_batch_gives_zero_with_finite_gradient(name):
    s = torch.randn(2, 3, 10, requires_grad=True)
    value = registry.get("kd_loss", name)(s, torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["fkl", "rkl", "sfkl", "srkl", "jsd", "akl"])
def test_zero_probability_tokens_give_no_nan(name):
    s = torch.tensor([[[0.0, 1.0, float("-inf")]]], requires_grad=True)
    t = torch.tensor([[[2.0, float("-inf"), float("-inf")]]])
    value = registry.get("kd_loss", name)(s, t, torch.ones(1, 1, dtype=torch.bool))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_token_mean_counts_only_masked_tokens():
    s, t = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    mask = torch.tensor([[True, False, True, False]])
    per = losses.forward_kl(losses.log_probs(s), losses.log_probs(t))
    assert registry.get("kd_loss", "fkl")(s, t, mask).item() == pytest.approx(((per[0, 0] + per[0, 2]) / 2).item(), abs=1e-6)


def test_temperature_divides_both_logits_without_t_squared():
    from recipes.distill.objective import KDObjective

    s, t, targets = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 8, (6,))
    fkl = registry.get("kd_loss", "fkl")
    hot, _ = KDObjective(fkl, temperature=2.0)._sums(s, t, targets, generated=False)
    cold, _ = KDObjective(fkl)._sums(s / 2, t / 2, targets, generated=False)
    assert hot.item() == pytest.approx(cold.item(), abs=1e-5)
    assert hot.item() == pytest.approx(6 * fkl(s / 2, t / 2, torch.ones(6, dtype=torch.bool)).item(), abs=1e-5)


def test_loca_invariants():
    alpha = 0.9
    t = torch.tensor([[0.1, 2.0, 0.5, -1.0], [3.0, 0.2, 0.1, 0.0]]).log_softmax(-1)
    labels = torch.tensor([2, 0])  # row 0: the teacher's top token (1) is wrong; row 1: it is right
    cal = losses.loca_calibrate(t, labels, alpha).exp()
    p = t.exp()
    assert torch.allclose(cal.sum(-1), torch.ones(2), atol=1e-6)
    others = [0, 1, 3]
    ratios = cal[0, others] / p[0, others]
    assert torch.allclose(ratios, ratios[0].expand(3), atol=1e-6)  # non-label ratios kept
    assert (cal[0, 2] - cal[0, others].max()).item() == pytest.approx(1 - alpha, abs=1e-6)
    assert torch.allclose(cal[1], p[1])  # a right teacher is left alone
