"""Masked SFT: selectors on hand-made probabilities, normalisation, PSFT, and toy runs."""

import json
import math

import pytest
import torch

from recipes.sft_mask import selectors
from recipes.sft_mask.objective import MaskedSFT, Proximal, psft_token_loss
from runner.config import DataConfig
from runner.data import IGNORE, build_dataset, collate
from runner.errors import ConfigError
from runner.models import load_model
from runner.run import checked, run, validate
from runner.train import causal_lm_loss

PROBS = torch.tensor([[0.05, 0.1, 0.5, 0.09, 0.9]])
LOGP = PROBS.log()
MASK = torch.tensor([[True, True, True, True, False]])  # the last token is not a response token


@pytest.mark.parametrize("kwargs,expected", [
    ({"tau": 0.1}, [False, True, True, False, False]),  # p = tau is kept; masked-out tokens never are
    ({"tau": 0.1, "direction": "lower"}, [True, True, False, True, False]),
    ({"tau": 0.08, "direction": "middle", "tau_high": 0.4}, [False, True, False, True, False]),
])
def test_profit_gates_on_hand_made_probabilities(kwargs, expected):
    assert selectors.profit(LOGP, MASK, **kwargs)[0].tolist() == expected


def test_profit_random_drops_the_configured_share_reproducibly():
    logp, mask = torch.zeros(1, 20000), torch.ones(1, 20000, dtype=torch.bool)
    keep = selectors.profit(logp, mask, tau=0.3, direction="random", generator=torch.Generator().manual_seed(0))
    assert 0.68 < keep.float().mean().item() < 0.72  # tau is the share dropped
    again = selectors.profit(logp, mask, tau=0.3, direction="random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_dft_weights_are_the_probabilities():
    assert torch.allclose(selectors.dft(LOGP, MASK), PROBS * MASK)


def test_rho1_keeps_the_top_fraction_by_excess_loss():
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]]))
    ref = torch.zeros_like(logp)  # the reference is certain: excess loss = -log p, highest for small p
    mask = torch.ones_like(logp, dtype=torch.bool)
    keep = selectors.rho1(logp, mask, keep_ratio=0.6, reference_logprobs=ref)
    assert keep.sum().item() == math.ceil(0.6 * 10)
    assert keep[0].tolist() == [True] * 6 + [False] * 4


def test_quantile_by_probability_and_entropy():
    keep = selectors.quantile(LOGP, MASK, rho=0.5)
    assert keep[0].tolist() == [False, True, True, False, False]  # top 2 of the 4 response tokens by p
    entropy = torch.tensor([[3.0, 0.1, 0.2, 2.0, 9.0]])
    assert selectors.quantile(LOGP, MASK, rho=0.25, by="entropy", entropy=entropy)[0].tolist() == \
        [True, False, False, False, False]


@pytest.fixture(scope="module")
def model_and_batch(tiny_llama, toy_tokenizer):
    model, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    rows = build_dataset(DataConfig(source="toy", format="instruct", num_examples=6, max_length=32, seed=0,
                                    variation=0.5), toy_tokenizer)
    return model, collate(rows, toy_tokenizer.pad_token_id)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_keeping_every_token_is_plain_ce(model_and_batch):
    model, batch = model_and_batch
    ce = causal_lm_loss(model, batch)
    for objective in (MaskedSFT(chunk_size=5), MaskedSFT(selectors.profit, {"tau": 0.0}, chunk_size=1024)):
        out = objective(model, batch, 0)
        assert out.loss.item() == pytest.approx(ce.loss.item(), rel=1e-5)
        assert out.num_tokens == int(ce.num_tokens) and out.logs["kept_fraction"] == 1.0
    a, b = grads(model, ce.loss), grads(model, MaskedSFT(chunk_size=5)(model, batch, 0).loss)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_normalisation_modes_differ_exactly_as_specified(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0][targets != IGNORE]
    params = {"tau": picked.exp().median().item()}  # keeps about half the tokens
    all_tokens = MaskedSFT(selectors.profit, params, norm="all_tokens")(model, batch, 0)
    kept_tokens = MaskedSFT(selectors.profit, params, norm="kept_tokens")(model, batch, 0)
    n_all = int((batch["labels"][:, 1:] != IGNORE).sum())
    n_kept = all_tokens.logs["kept_fraction"] * n_all
    assert 0 < n_kept < n_all
    assert all_tokens.num_tokens == n_all and kept_tokens.num_tokens == pytest.approx(n_kept)
    # the same kept-token sum, divided by all response tokens or by the kept ones
    assert all_tokens.loss.item() * n_all == pytest.approx(kept_tokens.loss.item() * n_kept, rel=1e-5)


def test_dft_with_kept_tokens_divides_by_the_weighted_token_count_not_the_weight_sum(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0][targets != IGNORE]
    out = MaskedSFT(selectors.dft, {}, norm="kept_tokens")(model, batch, 0)
    # DFT weights every token by its (stop-gradient) probability: all of them are weighted
    assert out.num_tokens == logp.numel()
    assert out.loss.item() == pytest.approx(float((logp.exp() * -logp).sum()) / logp.numel(), rel=1e-4)


def test_all_masked_batch_gives_zero(model_and_batch):
    model, batch = model_and_batch
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    out = MaskedSFT(selectors.profit, {"tau": 0.1}, norm="kept_tokens")(model, empty, 0)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    none_kept = MaskedSFT(selectors.profit, {"tau": 1.0}, norm="kept_tokens")(model, batch, 0)
    assert none_kept.loss.item() == 0.0 and math.isfinite(none_kept.loss.item())


def test_psft_gradient_is_zero_above_the_clip_and_sft_at_ratio_one():
    logp = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -0.8])  # ratios 1, e^0.5 = 1.65 (> 1.28), e^-0.2 = 0.82
    psft_token_loss(logp, old, 0.2, 0.28).sum().backward()
    ratios = torch.exp(logp.detach() - old)
    assert logp.grad[0].item() == pytest.approx(-1.0)  # ratio 1: the SFT gradient of -log p
    assert logp.grad[1].item() == 0.0  # probability rose past 1 + eps_high: no gradient
    assert logp.grad[2].item() == pytest.approx(-ratios[2].item())  # the lower clip never binds (A > 0)


def test_psft_without_lag_is_sft(model_and_batch):
    model, batch = model_and_batch
    psft = MaskedSFT(proximal=Proximal(update_every=1))
    a = grads(model, psft(model, batch, 0).loss)
    b = grads(model, causal_lm_loss(model, batch).loss)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_psft_snapshot_is_refreshed_every_update_every_steps(model_and_batch):
    model, _ = model_and_batch
    prox = Proximal(update_every=3)
    taken = []
    for step in range(7):
        before = prox.taken_at
        prox.refresh(model, step)
        prox.refresh(model, step)  # a second micro-batch of the same step takes nothing new
        if prox.taken_at != before:
            taken.append(step)
    assert taken == [0, 3, 6]


TINY = ["train.steps=12", "train.batch_size=8", "train.log_every=3", "train.save_every=0", "data.num_examples=300",
        "eval=none"]


@pytest.mark.parametrize("recipe", ["profit_sft", "dft_sft", "rho1_sft", "psft"])
def test_masked_sft_recipes_run_on_the_toy_world(compose, tmp_path, recipe):
    results = run(compose([f"recipe={recipe}", *TINY, f"output_root={tmp_path}"]), tmp_path / recipe)
    assert results["status"] == "completed" and results["kind"] == "sft_mask"
    history = [json.loads(line) for line in (tmp_path / recipe / "train_log.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(0 < h["kept_fraction"] <= 1 for h in history)  # logged every step we log
    if recipe == "profit_sft":
        assert results["sft_mask"]["mean_kept_fraction"] < 1.0


def test_rho1_averages_over_the_kept_tokens_as_the_paper_and_profit_over_all_as_its_code(compose):
    # Rho-1's L_SLM divides by N * k% (the kept tokens); ProFit's reference code by every response token
    assert checked(compose(["recipe=rho1_sft"]))[1]["selector"].norm == "kept_tokens"
    assert checked(compose(["recipe=profit_sft"]))[1]["selector"].norm == "all_tokens"


@pytest.mark.parametrize("override,expected", [
    ("selector.name=profitt", "selector.name: unknown token_selector 'profitt'. Did you mean 'profit'?"),
    ("+selector.taus=0.2", "selector.taus: unknown parameter. Did you mean 'tau'?"),
    ("selector.tau=1.5", "selector.tau: 1.5 is out of range"),
    ("selector.direction=up", "selector.direction: 'up' is not allowed"),
    ("+selector.generator=1", "selector.generator: supplied at run time, not by the config"),
    ("selector.norm=tokens", "selector.norm: 'tokens' is not allowed"),
    ("selector.name=rho1", "reference: selector rho1 needs a reference model"),
    ("+loss.eps=0.1", "loss.eps: unknown key. Did you mean"),
])
def test_sft_mask_config_errors(compose, override, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose(["recipe=profit_sft", override]))
    assert any(expected in p for p in err.value.problems), err.value.problems
