"""Token-level KD divergences, registered as ``kd_loss``.

Call shape (DESIGN.md): ``loss(student_logits, teacher_logits, mask, labels=None, **params)`` with
logits ``[..., V]`` already aligned (position t predicts token t+1) and ``mask`` marking the tokens
that count; the result is the token-mean over ``mask`` (0 when nothing is masked in, never NaN).

Conventions (spec distill.md sections 0-2), p = teacher, q = student:

- softmax in fp32; mixtures built in log space (``logsumexp``), so no ``log(0)``;
- the values are true divergences: forward KL is KL(p||q), not the cross-entropy H(p, q) that
  DistiLLM logs (the gradient is the same; the logged value is smaller by the teacher entropy H(p));
- temperature divides both logit tensors and is 1 by default, with no T^2 factor (as every
  reference LLM KD code does);
- vocabulary entries with probability 0 (logit -inf) contribute 0, never NaN.

Each registered loss is the token-mean of a per-token divergence of the two log-softmaxes; the
recipe's objective (`recipes.distill.objective`) calls it on each chunk of response tokens, after the
temperature (and LoCa or top-k, when asked) has shaped both distributions. A plugin registers a
function of the same shape and is called the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from runner.registry import register

PerToken = Callable[..., torch.Tensor]


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `per_token` over positions where `mask` is true; 0 when there are none."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _finite(logp: torch.Tensor) -> torch.Tensor:
    # -inf log-probs belong to zero probabilities; 0 * finite keeps products and gradients clean.
    return logp.masked_fill(torch.isinf(logp), 0.0)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per position from log-probs, summed over the last axis."""
    return (logp_a.exp() * (_finite(logp_a) - _finite(logp_b))).sum(-1)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w*a + (1-w)*b) computed in log space."""
    if weight_a <= 0.0:
        return logp_b
    if weight_a >= 1.0:
        return logp_a
    # finite inputs: logaddexp(-inf, -inf) has a NaN gradient even where the result is never used
    lowest = torch.finfo(logp_a.dtype).min
    return torch.logaddexp(logp_a.clamp(min=lowest) + math.log(weight_a), logp_b.clamp(min=lowest) + math.log1p(-weight_a))


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mode-covering."""
    return _kl(t, s)


def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking."""
    return _kl(s, t)


def skew_forward_kl(s: torch.Tensor, t: torch.Tensor, *, skew_alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM SKL: KL(p || a*p + (1-a)*q); a=0 is forward KL."""
    return _kl(t, _mix(t, s, skew_alpha))


def skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, *, skew_alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM SRKL: KL(q || (1-a)*p + a*q); a=0 is reverse KL."""
    return _kl(s, _mix(s, t, skew_alpha))


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """TRL's generalized JSD: beta*KL(p||M) + (1-beta)*KL(q||M), M = beta*p + (1-beta)*q.

    As in TRL, the endpoints are the plain KLs (beta=0: forward KL(p||q), beta=1: reverse KL(q||p));
    the interior formula itself tends to 0 near them, so small or large beta mostly scales the
    gradient. DistiLLM's ``jsd`` with lam=0.9 is beta=0.1 here.
    """
    if beta <= 0.0:
        return _kl(t, s)
    if beta >= 1.0:
        return _kl(s, t)
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def total_variation(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q|, in [0, 1]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def adaptive_kl(s: torch.Tensor, t: torch.Tensor, *, mu: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """AKL (Wu et al., COLING 2025): w_head * KL(p||q) + w_tail * KL(q||p).

    Sort the teacher's probabilities in descending order; the head is the tokens whose cumulative
    teacher mass is <= mu, plus the top-1 (the token that crosses mu falls in the tail). The gaps
    g = sum |p - q| over head and tail (student detached) give w_head = g_head / (g_head + g_tail)
    and w_tail = 1 - w_head, both without gradient.
    """
    with torch.no_grad():
        p, q = t.exp(), s.detach().exp()
        p_sorted, order = p.sort(dim=-1, descending=True)
        q_sorted = q.gather(-1, order)
        tail = p_sorted.cumsum(-1) > mu
        tail[..., 0] = False
        gap = (p_sorted - q_sorted).abs()
        g_tail = (gap * tail).sum(-1)
        g_head = (gap * ~tail).sum(-1)
        w_head = g_head / (g_head + g_tail + eps)
    return w_head * _kl(t, s) + (1.0 - w_head) * _kl(s, t)


def loca_calibrate(teacher_logp: torch.Tensor, labels: torch.Tensor, alpha: float = 0.9,
                   tokens: int | None = None) -> torch.Tensor:
    """LoCa (Yang, Wu, Yang, ECAI 2024): move the teacher's mass to the label where its argmax is wrong.

    At positions where the teacher's top token k differs from the label g, with s = alpha /
    (1 - p_g + p_k): p_i -> s * p_i for i != g and p_g -> 1 - s * (1 - p_g). The result sums to 1,
    keeps the ratios among non-label tokens, and puts the label ahead of every other token by
    exactly 1 - alpha. Positions where the teacher is right are unchanged. Works in log space;
    returns calibrated log-probs. Needs ground-truth labels, so never for student-generated text.
    `tokens`: only the first `tokens` entries are single tokens and may be the teacher's top one; the
    entries after them are buckets of many tokens (a cached teacher's rest), scaled like any non-label.
    """
    labels = labels.clamp(min=0).unsqueeze(-1)
    logp_g = teacher_logp.gather(-1, labels)
    logp_k, top = teacher_logp[..., :tokens].max(-1, keepdim=True)
    wrong = top != labels
    p_g, p_k = logp_g.exp(), logp_k.exp()
    log_s = math.log(alpha) - torch.log1p(p_k - p_g)
    calibrated = teacher_logp + log_s
    label_logp = torch.log1p(-(log_s.exp() * (1.0 - p_g))).clamp(max=0.0)
    calibrated = calibrated.scatter(-1, labels, label_logp)
    return torch.where(wrong, calibrated, teacher_logp)


def _token_mean_of(divergence: PerToken, student_logits, teacher_logits, mask, **params) -> torch.Tensor:
    return token_mean(divergence(log_probs(student_logits), log_probs(teacher_logits), **params), mask)


@register("kd_loss", "fkl")
def fkl(student_logits, teacher_logits, mask, labels=None) -> torch.Tensor:
    """Forward KL(p || q) (classic KD)."""
    return _token_mean_of(forward_kl, student_logits, teacher_logits, mask)


@register("kd_loss", "rkl")
def rkl(student_logits, teacher_logits, mask, labels=None) -> torch.Tensor:
    """Reverse KL(q || p)."""
    return _token_mean_of(reverse_kl, student_logits, teacher_logits, mask)


@register("kd_loss", "sfkl", ranges={"skew_alpha": (0.0, 1.0)})
def sfkl(student_logits, teacher_logits, mask, labels=None, *, skew_alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew forward KL."""
    return _token_mean_of(skew_forward_kl, student_logits, teacher_logits, mask, skew_alpha=skew_alpha)


@register("kd_loss", "srkl", ranges={"skew_alpha": (0.0, 1.0)})
def srkl(student_logits, teacher_logits, mask, labels=None, *, skew_alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL."""
    return _token_mean_of(skew_reverse_kl, student_logits, teacher_logits, mask, skew_alpha=skew_alpha)


@register("kd_loss", "jsd", ranges={"beta": (0.0, 1.0)})
def jsd(student_logits, teacher_logits, mask, labels=None, *, beta: float = 0.5) -> torch.Tensor:
    """TRL's generalized Jensen-Shannon divergence."""
    return _token_mean_of(generalized_jsd, student_logits, teacher_logits, mask, beta=beta)


@register("kd_loss", "tvd")
def tvd(student_logits, teacher_logits, mask, labels=None) -> torch.Tensor:
    """Total variation distance."""
    return _token_mean_of(total_variation, student_logits, teacher_logits, mask)


@register("kd_loss", "akl", ranges={"mu": (0.0, 1.0, "open"), "eps": (0.0, None, "open")})
def akl(student_logits, teacher_logits, mask, labels=None, *, mu: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """AKL: forward and reverse KL weighted by the head and tail gaps."""
    return _token_mean_of(adaptive_kl, student_logits, teacher_logits, mask, mu=mu, eps=eps)
