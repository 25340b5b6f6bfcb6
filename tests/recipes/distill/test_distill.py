"""The distill recipe: chunked loss, vocabulary checks, on-policy pieces, toy runs end to end."""

import json

import pytest
import torch

from recipes.distill.objective import KDObjective
from recipes.distill.onpolicy import (
    GKD,
    Sampling,
    opd_advantage_and_loss,
    prompts_of,
    rollout,
)
from runner import registry
from runner.config import DataConfig
from runner.data import IGNORE, build_dataset, collate
from runner.errors import ConfigError
from runner.models import check_same_vocab, load_model
from runner.run import run, validate


@pytest.fixture(scope="module")
def batch(toy_tokenizer):
    examples = build_dataset(DataConfig(source="toy", format="instruct", num_examples=6, max_length=32, seed=0),
                             toy_tokenizer)
    return collate(examples, toy_tokenizer.pad_token_id)


def grads_of(objective, student, teacher, batch):
    student.zero_grad()
    out = objective(student, teacher, batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in student.named_parameters()}


def kd_loss(name):
    return registry.get("kd_loss", name)


@pytest.mark.parametrize("name,params,extra", [
    ("fkl", {}, {}),
    ("akl", {"mu": 0.5}, {"kd_ratio": 0.7}),
    ("jsd", {"beta": 0.3}, {"loca_alpha": 0.9, "temperature": 2.0}),
    ("fkl", {}, {"topk": 5}),
])
def test_chunked_loss_equals_unchunked_in_value_and_gradient(pair, batch, name, params, extra):
    student, teacher, tok = pair
    divergence = kd_loss(name)
    naive = KDObjective(divergence, params, chunk_size=0, vocab_size=len(tok), **extra)
    chunked = KDObjective(divergence, params, chunk_size=7, vocab_size=len(tok), **extra)
    out_a, grads_a = grads_of(naive, student, teacher, batch)
    out_b, grads_b = grads_of(chunked, student, teacher, batch)
    assert out_a.num_tokens == out_b.num_tokens > 7  # several chunks
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), abs=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_kd_ratio_mixes_ce(pair, batch):
    student, teacher, tok = pair
    kd_only = KDObjective(kd_loss("fkl"), kd_ratio=1.0, vocab_size=len(tok))(student, teacher, batch)
    half = KDObjective(kd_loss("fkl"), kd_ratio=0.5, vocab_size=len(tok))(student, teacher, batch)
    assert half.loss.item() == pytest.approx(0.5 * kd_only.logs["kd"] + 0.5 * kd_only.logs["ce"], rel=1e-5)
    ce = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"]).loss.item()
    assert kd_only.logs["ce"] == pytest.approx(ce, rel=1e-5)  # CE is plain next-token cross-entropy


def test_all_masked_batch_is_zero(pair, batch):
    student, teacher, tok = pair
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    for chunk in (0, 4):
        out = KDObjective(kd_loss("fkl"), chunk_size=chunk, kd_ratio=0.5, vocab_size=len(tok))(student, teacher, empty)
        assert out.loss.item() == 0.0 and out.num_tokens == 0


def test_vocabularies_must_match(toy_tokenizer, tmp_path):
    from runner.toy.tokenizer import train_tokenizer

    other = train_tokenizer(["1+1=2", "hello world"] * 50, vocab_size=300)
    with pytest.raises(ConfigError, match="teacher and student use different vocabularies"):
        check_same_vocab(other, toy_tokenizer, "teacher", "student")
    check_same_vocab(toy_tokenizer, toy_tokenizer, "teacher", "student")


def test_padded_vocabulary_rows_are_ignored(pair, batch, caplog):
    from recipes.distill import Distill

    student, teacher, tok = pair
    padded = load_model({"path": str(teacher.name_or_path), "dtype": "float32"})[0]
    padded.resize_token_embeddings(len(tok) + 64)

    class Ctx:
        import logging

        log = logging.getLogger("test")

    assert Distill._common_vocab(student, padded, len(tok), Ctx) == len(tok)
    objective = KDObjective(kd_loss("fkl"), vocab_size=len(tok))
    assert torch.isfinite(objective(student, padded, batch).loss)
    short = load_model({"path": str(teacher.name_or_path), "dtype": "float32"})[0]
    short.resize_token_embeddings(len(tok) - 10)
    with pytest.raises(ConfigError, match="fewer rows"):
        Distill._common_vocab(student, short, len(tok), Ctx)


def test_rollout_replaces_responses_with_student_samples(pair, batch, toy_tokenizer):
    student, _, tok = pair
    torch.manual_seed(0)
    new = rollout(student, batch, Sampling(max_new_tokens=5), tok.pad_token_id, tok.eos_token_id)
    prompts = prompts_of(batch)
    for i, p in enumerate(prompts):
        ids, labels = new["input_ids"][i].tolist(), new["labels"][i].tolist()
        assert ids[: len(p)] == p and all(x == IGNORE for x in labels[: len(p)])
        n = int(new["attention_mask"][i].sum())
        assert 1 <= n - len(p) <= 5 and labels[len(p): n] == ids[len(p): n]


def test_gkd_draws_student_batches_at_the_configured_rate(pair):
    student, teacher, tok = pair
    gkd = GKD(KDObjective(kd_loss("jsd")), teacher, lambda m: m, 0.3, Sampling(), 0, 2, seed=5)
    draws = [gkd.uses_student(s) for s in range(2000)]
    assert 0.27 < sum(draws) / 2000 < 0.33
    assert draws == [gkd.uses_student(s) for s in range(2000)]  # a function of (seed, step)


def test_gopd_scores_every_model_at_the_rollout_temperature(pair, batch, monkeypatch):
    from recipes.distill import onpolicy

    student, teacher, tok = pair
    ids, attention = batch["input_ids"][:2], batch["attention_mask"][:2]
    small = {"input_ids": ids, "attention_mask": attention, "labels": batch["labels"][:2]}
    with torch.no_grad():  # the hand-made score: log-softmax of logits / T at the next token
        logits = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1] / 0.7
    targets = small["labels"][:, 1:]
    expected = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0]
    got = onpolicy._token_logps(teacher, small, 0.7)
    keep = targets != IGNORE
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)
    seen = []
    real = onpolicy._token_logps
    monkeypatch.setattr(onpolicy, "_token_logps", lambda model, b, t=1.0: seen.append(t) or real(model, b, t))
    monkeypatch.setattr(onpolicy, "rollout", lambda model, b, *args: b)
    gopd = onpolicy.GOPD(teacher, teacher, lambda m: m, 1.25, 0.2, Sampling(temperature=0.7), tok.pad_token_id,
                         tok.eos_token_id)
    gopd(student, small, 0)
    assert seen == [0.7, 0.7, 0.7]  # student, teacher, reference


def test_opd_advantage_and_clip():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    teacher = torch.tensor([-0.5, -3.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -1.0])
    adv, loss = opd_advantage_and_loss(logp, logp.detach(), teacher, ref, reward_scale=1.25, clip_eps=0.2)
    expected = 1.25 * (teacher - ref) - (logp.detach() - ref)
    assert torch.allclose(adv, expected)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -expected)  # ratio 1: the policy-gradient step on the advantage
    # a ratio above 1 + eps with a positive advantage is clipped: no gradient
    x = torch.tensor([0.0], requires_grad=True)
    _, clipped = opd_advantage_and_loss(x, torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([-1.0]), 1.0, 0.2)
    clipped.sum().backward()
    assert x.grad.item() == 0.0


DISTILL_TINY = ["train.steps=20", "train.batch_size=8", "train.log_every=5", "train.save_every=0",
                "data.num_examples=300", "eval=toy_quick", "eval.limit=8"]


def test_akl_distill_on_the_toy_world(compose, tmp_path):
    cfg = compose(["recipe=akl_distill", *DISTILL_TINY, f"output_root={tmp_path}"])
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["recipe"] == "akl_distill" and results["kind"] == "distill"
    history = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert history[-1]["kd"] < history[0]["kd"]  # the student's KD loss went down
    assert set(results["metrics"]) == set(results["baseline_metrics"]) >= {"toy_arith/exact_match"}
    assert results["distill"] == {"loss": "akl", "mode": "off", "lora": False, "compared_vocab": results["distill"]["compared_vocab"]}


@pytest.mark.parametrize("recipe", ["gkd_distill", "gopd_distill", "neo_distill", "loca_distill"])
def test_other_distill_recipes_run(compose, tmp_path, recipe):
    from safetensors.torch import load_file

    overrides = [f"recipe={recipe}", *DISTILL_TINY, "train.steps=4", "eval=none"]
    if recipe in ("gkd_distill", "gopd_distill"):
        overrides.append("onpolicy.max_new_tokens=8")
    results = run(compose(overrides), tmp_path / recipe)
    assert results["status"] == "completed"
    weights = load_file(tmp_path / recipe / "checkpoint" / "model.safetensors")
    assert not any("lora" in k for k in weights)  # LoRA merged into a plain checkpoint
    every_weight = sum(w.numel() for k, w in weights.items())  # tied: lm_head is not stored twice
    trainable = results["train"]["trainable_parameters"]
    if recipe == "neo_distill":  # the adapters only: rank r times (in + out) per linear layer
        assert 0 < trainable < every_weight / 2
    else:
        assert trainable == every_weight


@pytest.mark.parametrize("override,expected", [
    ("loss.name=kll", "loss.name: unknown kd_loss 'kll'. Did you mean"),
    ("+loss.muu=0.3", "loss.muu: unknown parameter. Did you mean 'mu'?"),
    ("loss.mu=1.5", "loss.mu: 1.5 is out of range"),
    ("loss.kd_ratio=2", "loss.kd_ratio: 2.0 is out of range"),
    ("+onpolicy.mode=gkd", "data.packing: on-policy modes answer each example's prompt"),
    ("+onpolicy.mod=gkd", "onpolicy.mod: unknown key. Did you mean 'mode'?"),
    ("+lora.rank=0", "lora.rank: 0 is out of range"),
])
def test_distill_config_errors(compose, override, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose(["recipe=akl_distill", override]))
    assert any(expected in p for p in err.value.problems), err.value.problems
