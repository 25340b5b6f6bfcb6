"""G-OPD / ExOPD with a free reference (reward correction) and TrRa (training-time realignment).

Hand-computed cases from the spec (new_methods.md sections 1 and 2, "Checks"), the aggregation
modes, bad configs, and short toy runs of the named recipes.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from recipes.distill.objective import KDObjective
from recipes.distill.onpolicy import GOPD, Sampling, aggregate, opd_advantage, opd_advantage_and_loss
from recipes.distill.realign import fuse_logits
from runner import registry
from runner.config import DataConfig
from runner.data import IGNORE, build_dataset, collate, shift_labels
from runner.errors import ConfigError
from runner.models import load_model
from runner.run import run, validate


@pytest.fixture(scope="module")
def batch(toy_tokenizer):
    examples = build_dataset(DataConfig(source="toy", format="thinking", num_examples=4, max_length=40, seed=0),
                             toy_tokenizer)
    return collate(examples, toy_tokenizer.pad_token_id)


# --------------------------------------------------------------------------------------------
# G-OPD: advantage, optimum, on-policy step, reference


def test_gopd_advantage_hand_values():
    s, t = torch.tensor([-1.0]), torch.tensor([-0.5])
    assert opd_advantage(s, t, torch.tensor([-2.0]), 1.25).item() == pytest.approx(0.875)  # 1.25*1.5 - 1.0
    for ref in (torch.tensor([-2.0]), torch.tensor([-0.1]), torch.tensor([-9.0]), None):
        assert opd_advantage(s, t, ref, 1.0).item() == pytest.approx(0.5)  # lam = 1: the reference drops out


def _expected_policy_gradient(logits, teacher_logp, ref_logp, lam):
    """E_{y~pi}[A(y) grad log pi(y)] over a whole (tiny) vocabulary, through the recipe's own loss."""
    logits = logits.clone().requires_grad_(True)
    logp = logits.log_softmax(-1)
    _, loss = opd_advantage_and_loss(logp, logp.detach(), teacher_logp, ref_logp, lam, 0.2)
    (logp.detach().exp() * loss).sum().backward()  # the expectation under pi of the per-token loss
    return -logits.grad


def test_gopd_optimum_is_the_geometric_extrapolation():
    teacher, ref, lam = torch.tensor([0.6, 0.4]).log(), torch.tensor([0.5, 0.5]).log(), 2.0
    closed = ((1 - lam) * ref + lam * teacher).softmax(-1)  # pi proportional to ref^(1-lam) * T^lam
    assert closed.tolist() == pytest.approx([0.6923, 0.3077], abs=1e-4)  # = [0.36, 0.16] / 0.52
    # the expected G-OPD policy gradient vanishes there (A is then the constant log Z) ...
    assert _expected_policy_gradient(closed.log(), teacher, ref, lam).abs().max() < 1e-6
    # ... and following it from the reference reaches it
    z = torch.zeros(2)
    for _ in range(3000):
        z = z + 0.5 * _expected_policy_gradient(z, teacher, ref, lam)
    assert z.softmax(-1).tolist() == pytest.approx([0.6923, 0.3077], abs=1e-3)


def test_gopd_step_is_minus_mean_advantage_and_its_gradient(pair, batch, monkeypatch):
    from recipes.distill import onpolicy

    student, teacher, tok = pair
    reference, _ = load_model({"path": student.config._name_or_path, "dtype": "float32"})
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(onpolicy, "rollout", lambda model, b, *args: b)  # the dataset rows as the "samples"
    _, mask = shift_labels(batch["labels"])
    for agg in ("token_mean", "seq_mean_token_mean"):
        gopd = GOPD(teacher, reference, lambda m: m, 1.25, 0.2, Sampling(), tok.pad_token_id, tok.eos_token_id, agg)
        student.zero_grad()
        out = gopd(student, batch, 0)
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in student.named_parameters()}
        # by hand: A from the three models' log-probs; ratio 1, so loss = -mean(A), grad = -mean(A grad log pi)
        student.zero_grad()
        logp = onpolicy._token_logps(student, batch)
        with torch.no_grad():
            adv = 1.25 * (onpolicy._token_logps(teacher, batch) - onpolicy._token_logps(reference, batch))
            adv = adv - (logp.detach() - onpolicy._token_logps(reference, batch))
        if agg == "token_mean":
            weights = mask / mask.sum()
        else:
            weights = mask / mask.sum(-1, keepdim=True) / mask.shape[0]
        assert out.loss.item() == pytest.approx(-(adv * weights).sum().item(), rel=1e-5)
        assert out.num_tokens == (mask.sum() if agg == "token_mean" else mask.shape[0])
        (-(adv * logp * weights).sum()).backward()
        for n, p in student.named_parameters():
            assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_gopd_needs_a_reference_only_off_scale_one(pair, batch, monkeypatch):
    from recipes.distill import onpolicy

    student, teacher, tok = pair
    with pytest.raises(ConfigError, match="onpolicy.reward_scale: 1.25 needs a reference model"):
        GOPD(teacher, None, lambda m: m, 1.25, 0.2, Sampling(), 0, 2)
    with pytest.raises(ConfigError, match="needs the reference model's log-probs"):
        opd_advantage(torch.zeros(1), torch.zeros(1), None, 0.8)

    class Untouchable(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("the reference was run at reward scale 1")

    monkeypatch.setattr(onpolicy, "rollout", lambda model, b, *args: b)
    gopd = GOPD(teacher, Untouchable(), lambda m: m, 1.0, 0.2, Sampling(), tok.pad_token_id, tok.eos_token_id)
    assert gopd.reference is None
    out = gopd(student, batch, 0)
    assert math.isfinite(out.loss.item())


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # the last row has no response
    value, count = aggregate(loss, mask, "token_mean")
    assert (value.item(), count.item()) == (pytest.approx(10 / 4), 4)
    value, count = aggregate(loss, mask, "seq_mean_token_mean")
    assert (value.item(), count.item()) == (pytest.approx((2.0 + 4.0) / 2), 2)
    # split into micro-batches, the training loop's count-weighted mean gives the same step value
    parts = [aggregate(loss[i:i + 1], mask[i:i + 1], "seq_mean_token_mean") for i in range(3)]
    pooled = sum(v * c for v, c in parts) / sum(c for _, c in parts)
    assert pooled.item() == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------
# TrRa: the fused target and its loss


def test_fused_target_endpoints_and_extrapolation():
    torch.manual_seed(0)
    z_al, z_ref = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    assert torch.allclose(fuse_logits(z_al, z_ref, 0.0).softmax(-1), z_ref.softmax(-1), atol=1e-6)
    assert torch.allclose(fuse_logits(z_al, z_ref, 1.0).softmax(-1), z_al.softmax(-1), atol=1e-6)
    p = fuse_logits(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), 2.0).softmax(-1)
    assert p.tolist() == pytest.approx([0.8808, 0.1192], abs=1e-4)  # softmax([2, 0])


def test_fused_target_ignores_a_constant_per_position():
    torch.manual_seed(1)
    z_al, z_ref = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    shift = 10 * torch.randn(2, 5, 1)  # one constant per (row, position), different across positions
    base = fuse_logits(z_al, z_ref, 1.5).softmax(-1)
    assert torch.allclose(fuse_logits(z_al + shift, z_ref, 1.5).softmax(-1), base, atol=1e-5)
    assert torch.allclose(fuse_logits(z_al, z_ref - shift, 1.5).softmax(-1), base, atol=1e-5)
    with pytest.raises(ValueError, match="share a vocabulary"):
        fuse_logits(z_al, z_ref[..., :5], 1.5)


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given: a parameter for the student, a constant otherwise."""

    def __init__(self, logits, trainable=False):
        super().__init__()
        self.z = torch.nn.Parameter(torch.tensor([logits]), requires_grad=trainable)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.z)


# four tokens, the last two the response: logits at positions 1 and 2 predict them (causal shift)
TOY_BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[IGNORE, IGNORE, 1, 0]])}
ALIGNED = [[9.0, -9.0], [1.0, 0.0], [0.0, 3.0], [4.0, 0.0]]  # positions 0 and 3 are never scored
REFERENCE = [[0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
STUDENT = [[0.0, 5.0], [0.0, 0.0], [0.0, 5.0], [0.0, 0.0]]


@pytest.mark.parametrize("name,expected", [
    # position 1: p* = softmax(2*[1,0] - [0,0]) = [0.8808, 0.1192], pi = [0.5, 0.5];
    # position 2: p* = softmax(2*[0,3] - [0,1]) = softmax([0,5]) = pi, so its divergence is 0
    ("fkl", (0.8808 * math.log(0.8808 / 0.5) + 0.1192 * math.log(0.1192 / 0.5)) / 2),  # 0.32781 / 2
    ("rkl", (0.5 * math.log(0.5 / 0.8808) + 0.5 * math.log(0.5 / 0.1192)) / 2),  # 0.43378 / 2
])
def test_trra_loss_by_hand(name, expected):
    student = Fixed(STUDENT, trainable=True)
    objective = KDObjective(registry.get("kd_loss", name), reference=Fixed(REFERENCE), realign_lam=2.0)
    out = objective(student, Fixed(ALIGNED), TOY_BATCH)
    assert out.loss.item() == pytest.approx(expected, abs=2e-4)
    assert out.num_tokens == 2
    if name == "fkl":  # d KL(p*||pi) / dz = (pi - p*) / n at the scored positions only
        out.loss.backward()
        grad = student.z.grad[0]
        assert grad[1].tolist() == pytest.approx([(0.5 - 0.8808) / 2, (0.5 - 0.1192) / 2], abs=1e-4)
        assert grad[0].abs().max() == 0 and grad[3].abs().max() == 0 and grad[2].abs().max() < 1e-6


def test_trra_chunked_equals_full_logits(pair, batch):
    student, teacher, tok = pair
    reference, _ = load_model({"path": student.config._name_or_path, "dtype": "float32"})
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    results = []
    for chunk in (0, 7):
        objective = KDObjective(registry.get("kd_loss", "fkl"), chunk_size=chunk, vocab_size=len(tok),
                                reference=reference, realign_lam=1.5)
        student.zero_grad()
        out = objective(student, teacher, batch)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert a == pytest.approx(b, rel=1e-5) and a > 0
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5), n
    # lam = 1 with a reference is plain KD toward the teacher
    plain = KDObjective(registry.get("kd_loss", "fkl"), vocab_size=len(tok))(student, teacher, batch).loss
    fused1 = KDObjective(registry.get("kd_loss", "fkl"), vocab_size=len(tok), reference=reference,
                         realign_lam=1.0)(student, teacher, batch).loss
    assert fused1.item() == pytest.approx(plain.item(), abs=1e-7)  # z_ref + 1 * (z_al - z_ref) rounds


# --------------------------------------------------------------------------------------------
# Configs and toy runs


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=trra_distill", "teacher=null"], "teacher: recipe kind 'distill' needs a 'teacher' model"),
    (["recipe=trra_distill", "onpolicy.mode=gopd", "data.packing=false"],
     "loss.realign.enabled: TrRa is teacher-forced on dataset batches; it needs onpolicy.mode=off"),
    (["recipe=trra_distill", "loss.realign.lam=high"], "loss.realign.lam"),
    (["recipe=opd_distill", "model@reference=toy-base"], "reference: set, but only G-OPD with onpolicy.reward_scale != 1"),
    (["recipe=fkl_distill", "reference.path=toy-base"], "reference: set, but only G-OPD"),
    (["recipe=exopd_distill", "onpolicy.agg=seq_mean"], "onpolicy.agg: 'seq_mean' is not allowed"),
])
def test_gopd_trra_config_errors(compose, overrides, expected):
    with pytest.raises(Exception) as err:
        validate(compose(overrides))
    problems = getattr(err.value, "problems", None) or [str(err.value)]
    assert any(expected in p for p in problems), problems


def test_recipes_declare_their_reference(compose):
    from runner.cli import leave_out_unused_roles

    assert compose(["recipe=opd_distill"]).onpolicy.reward_scale == 1.0
    assert compose(["recipe=exopd_rc_distill"]).reference.path == "toy-base"
    cfg = compose(["recipe=trra_distill"])
    assert (cfg.teacher.path, cfg.student.path, cfg.data.format) == ("toy-instruct", "toy-thinking", "thinking")
    # a sweep across recipes keeps the reference only for the jobs that use it
    cfg = compose(["recipe=opd_distill", "model@reference=toy-base"])
    assert leave_out_unused_roles(cfg) == ["reference"] and cfg.reference is None


TINY = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.save_every=0", "data.num_examples=200",
        "eval=none"]


def test_trra_distill_runs_and_starts_at_the_reference(compose, tmp_path):
    results = run(compose(["recipe=trra_distill", *TINY]), tmp_path / "trra")
    assert results["status"] == "completed"
    assert results["distill"]["reference"] == "student start" and results["distill"]["realign_lam"] == 1.5
    # at lam = 0 the target is the reference, which the policy starts at: the first loss is 0
    results = run(compose(["recipe=trra_distill", *TINY, "train.steps=1", "loss.realign.lam=0"]), tmp_path / "lam0")
    history = [json.loads(line) for line in (tmp_path / "lam0" / "train_log.jsonl").read_text().splitlines()]
    assert abs(history[0]["kd"]) < 1e-6


@pytest.mark.parametrize("recipe,reference", [("opd_distill", None), ("exopd_rc_distill", "toy-base")])
def test_opd_recipes_run(compose, tmp_path, recipe, reference):
    results = run(compose([f"recipe={recipe}", *TINY, "onpolicy.max_new_tokens=8"]), tmp_path / recipe)
    assert results["status"] == "completed"
    assert results["distill"].get("reference") == reference
