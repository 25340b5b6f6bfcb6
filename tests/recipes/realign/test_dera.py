"""Decoding-time realignment (DeRa): the fused model object, its decoding and scoring, the recipe.

Spec checks (new_methods.md section 2): lam = 0 / 1 give the reference / aligned model (greedy tokens
and log-likelihoods), lam = 2 on z_al = [1, 0], z_ref = [0, 0] gives p = [0.8808, 0.1192], a constant
per position changes nothing. Beyond the reference demo: a left-padded batch decodes as its rows do one
by one, and the fusion comes before temperature.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import StoppingCriteriaList

from recipes.realign.dera import DeRa
from runner.errors import ConfigError
from runner.models import load_model
from runner.run import run
from tests.conftest import make_tiny_model, problems_of, run_cli

# one prompt much longer than the rest: decoding the short ones without their mask (as the reference demo
# does) changes their answers here, so the batch-vs-row test below can fail
QUESTIONS = ["7*9+17=?", "3+4=?", "12*11+40=?", "23+45=?", "8*6+9=?", "Compute 12*11+40 and 7*8+3; then: 9*9+9=?"]


@pytest.fixture(scope="module")
def zoo():
    """The shipped toy pair: toy-instruct answers directly, toy-thinking in a think block."""
    instruct, tok = load_model({"path": "toy-instruct", "dtype": "float32"})
    thinking, _ = load_model({"path": "toy-thinking", "dtype": "float32"})
    return instruct.eval(), thinking.eval(), tok


def prompts(tok, questions=QUESTIONS):
    """Chat prompts of different lengths, left-padded as lm-eval pads them."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc.attention_mask == 0).any(), "the batch must have left padding to test it"
    return enc.input_ids, enc.attention_mask


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at every position are the given row."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)
        self.head = torch.nn.Linear(1, len(row), bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


# --------------------------------------------------------------------------------------------
# The fused logits


@pytest.mark.parametrize("z_al,z_ref,lam,expected", [
    ([1.0, 0.0], [0.0, 0.0], 2.0, [0.8808, 0.1192]),  # the spec's check: softmax([2, 0])
    ([2.0, 0.0, -1.0], [0.0, 1.0, 1.0], 0.5, [0.5065, 0.3072, 0.1863]),  # fused [1, 0.5, 0]
    ([2.0, 0.0, -1.0], [0.0, 1.0, 1.0], 0.0, [0.1554, 0.4223, 0.4223]),  # the reference
    ([2.0, 0.0, -1.0], [0.0, 1.0, 1.0], 1.0, [0.8438, 0.1142, 0.0420]),  # the aligned model
])
def test_fused_probabilities_by_hand(z_al, z_ref, lam, expected):
    model = DeRa(FixedLogits(z_al), FixedLogits(z_ref), lam)
    p = model(torch.zeros(1, 3, dtype=torch.long)).logits.softmax(-1)
    assert p.shape == (1, 3, len(z_al))
    assert p[0, -1].tolist() == pytest.approx(expected, abs=1e-4)


def test_a_constant_per_position_changes_nothing():
    base = DeRa(FixedLogits([2.0, 0.0, -1.0]), FixedLogits([0.0, 1.0, 1.0]), 1.5)(torch.zeros(1, 1, dtype=torch.long))
    shifted = DeRa(FixedLogits([7.0, 5.0, 4.0]), FixedLogits([-3.0, -2.0, -2.0]), 1.5)(torch.zeros(1, 1, dtype=torch.long))
    assert torch.allclose(base.logits.log_softmax(-1), shifted.logits.log_softmax(-1), atol=1e-6)


def test_forward_fuses_every_position(zoo):
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok)
    with torch.no_grad():
        fused = DeRa(instruct, thinking, 0.25)(ids, attention_mask=mask).logits
        expected = 0.25 * instruct(ids, attention_mask=mask).logits + 0.75 * thinking(ids, attention_mask=mask).logits
    assert fused.dtype == torch.float32 and torch.allclose(fused, expected, atol=1e-5)


def test_output_layers_of_different_widths_are_refused():
    with pytest.raises(ValueError, match="different widths .2 vs 3.; they must share a vocabulary"):
        DeRa(FixedLogits([0.0, 1.0]), FixedLogits([0.0, 1.0, 2.0]), 0.5)


# --------------------------------------------------------------------------------------------
# Decoding


def continuation(out: torch.Tensor, prompt_len: int, pad: int) -> list[list[int]]:
    return [[t for t in row[prompt_len:] if t != pad] for row in out.tolist()]


@pytest.mark.parametrize("lam,role", [(1.0, "aligned"), (0.0, "reference")])
def test_greedy_ends_reproduce_each_model(zoo, lam, role):
    """Spec check 4 (and its mirror): lam = 1 decodes the aligned model's greedy tokens, lam = 0 the reference's,
    through HF's own generate on the same left-padded batch."""
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok)
    own = {"aligned": instruct, "reference": thinking}[role]
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = own.generate(ids, **kwargs)
    got = DeRa(instruct, thinking, lam).generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_the_two_ends_answer_differently(zoo):
    """What the test above compares is not trivial: Instruct answers directly, Thinking thinks first."""
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok, QUESTIONS[:5])
    texts = {lam: tok.batch_decode(DeRa(instruct, thinking, lam).generate(ids, attention_mask=mask, max_new_tokens=30,
                                                                            do_sample=False)[:, ids.shape[1]:])
             for lam in (0.0, 1.0)}
    assert not any("<think>" in t for t in texts[1.0]) and all("<think>" in t for t in texts[0.0])


@pytest.mark.parametrize("lam", [0.5, 1.5])
def test_a_left_padded_batch_decodes_as_its_rows_alone(zoo, lam):
    instruct, thinking, tok = zoo
    model = DeRa(instruct, thinking, lam)
    ids, mask = prompts(tok)
    batched = continuation(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False), ids.shape[1],
                           tok.pad_token_id)
    for i, question in enumerate(QUESTIONS):
        row = ids[i, mask[i].bool()][None]
        alone = continuation(model.generate(row, max_new_tokens=30, do_sample=False), row.shape[1], tok.pad_token_id)
        assert batched[i] == alone[0], question


def test_sampling_at_lam_one_is_the_aligned_models(zoo):
    """Same seed, same samples as HF's generate: the sampling settings and their defaults (top_k 50) agree."""
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=True, temperature=1.3, top_p=0.9)
    torch.manual_seed(3)
    expected = instruct.generate(ids, **kwargs)
    torch.manual_seed(3)
    got = DeRa(instruct, thinking, 1.0).generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_fusion_comes_before_the_temperature(zoo):
    """The scores sampled from are (lam z_al + (1 - lam) z_ref) / T, not lam z_al / T + (1 - lam) z_ref."""
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok)
    seen = []

    def spy(input_ids, scores, **kwargs):
        seen.append(scores.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    DeRa(instruct, thinking, 0.5).generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, temperature=0.5,
                                           top_k=0, stopping_criteria=StoppingCriteriaList([spy]))
    with torch.no_grad():
        z_al, z_ref = (m(ids, attention_mask=mask).logits[:, -1] for m in (instruct, thinking))
    assert torch.allclose(seen[0], (0.5 * z_al + 0.5 * z_ref) / 0.5, atol=1e-4)
    assert not torch.allclose(seen[0], 0.5 * z_al / 0.5 + 0.5 * z_ref, atol=1e-2)


def test_stopping_criteria_and_padding_after_the_end(zoo):
    """A row that ends (EOS) is padded while the others go on, as HF's generate does."""
    instruct, thinking, tok = zoo
    ids, mask = prompts(tok)
    out = DeRa(instruct, thinking, 1.0).generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                                 pad_token_id=tok.pad_token_id)
    for row in out[:, ids.shape[1]:].tolist():
        if tok.eos_token_id in row:
            end = row.index(tok.eos_token_id)
            assert all(t == tok.pad_token_id for t in row[end + 1:])
    assert out.shape[1] < ids.shape[1] + 40  # Instruct's answers all end well before the limit


def test_unsupported_generation_arguments_are_refused(zoo):
    instruct, thinking, tok = zoo
    with pytest.raises(TypeError, match=r"unsupported generation arguments \['num_beams'\]"):
        DeRa(instruct, thinking, 0.5).generate(torch.tensor([[1, 5]]), num_beams=4)


# --------------------------------------------------------------------------------------------
# Scoring through lm-eval


def loglikelihoods(model, tok, requests):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return lm, [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]


def test_loglikelihoods_through_hflm(zoo):
    """lam = 1 scores as the aligned model does; lam = 0.5 scores with the fused log-softmax, by hand."""
    instruct, thinking, tok = zoo
    requests = [("<|user|>7*9+17=?<|assistant|>", "7*9+17=80"), ("<|user|>3+4=?<|assistant|>", "3+4=7"),
                ("<|user|>3+4=?<|assistant|>", "3+4=8"), ("12*11+40=", "172")]
    _, aligned = loglikelihoods(instruct, tok, requests)
    _, at_one = loglikelihoods(DeRa(instruct, thinking, 1.0), tok, requests)
    assert at_one == pytest.approx(aligned, abs=1e-4)

    lm, at_half = loglikelihoods(DeRa(instruct, thinking, 0.5), tok, requests)
    for (context, cont), got in zip(requests, at_half):
        ctx_ids = lm.tok_encode(context)
        cont_ids = lm.tok_encode(context + cont)[len(ctx_ids):]
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            fused = 0.5 * instruct(ids).logits + 0.5 * thinking(ids).logits
        logp = fused.log_softmax(-1)[0, len(ctx_ids) - 1:-1].gather(-1, torch.tensor(cont_ids)[:, None])
        assert got == pytest.approx(logp.sum().item(), abs=1e-4)
    assert at_half != pytest.approx(aligned, abs=1e-3)


# --------------------------------------------------------------------------------------------
# The recipe


@pytest.mark.parametrize("overrides,expected", [
    ("", "realign.lam: missing; give DeRa's weight on the aligned model"),
    ("realign.lam=0.5 eval=none", "eval.tasks: empty; DeRa only evaluates the fused model"),
    ("realign.lam=0.5 +realign.beta=2", "realign.beta: unknown"),
    ("realign.lam=0.5 aligned.path=./missing", "aligned.path: './missing' is not a folder"),
    ("realign.lam=0.5 model.path=toy-base", "model: set, but recipe kind 'dera' does not use it"),
])
def test_dera_config_errors(compose, overrides, expected):
    found = problems_of(compose(["recipe=dera_eval", *overrides.split()]))
    assert any(expected in p for p in found), found


def test_a_reference_with_another_tokenizer_is_refused_before_any_weights(compose, tmp_path, monkeypatch):
    import runner.models
    from runner.toy.tokenizer import train_tokenizer

    other = make_tiny_model(tmp_path / "other", train_tokenizer(["1+1=2", "hello world"] * 50, vocab_size=300))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizers were compared")

    monkeypatch.setattr(runner.models, "load_model", no_weights)
    cfg = compose(["recipe=dera_eval", "realign.lam=0.5", f"reference.path={other}", "eval=toy_quick",
                   f"output_root={tmp_path}"])
    with pytest.raises(ConfigError, match="aligned and reference use different vocabularies"):
        run(cfg, tmp_path / "run")


@pytest.mark.e2e
def test_dera_eval_from_the_command_line(tmp_path):
    """lam = 1 through the whole runner scores every task as the aligned model (the baseline) does."""
    proc = run_cli(["recipe=dera_eval", "realign.lam=1", "eval.baseline=true", "eval.limit=6", "eval.max_gen_toks=32",
                    "eval.tasks=[toy_arith_hard,toy_arith_mc,toy_ppl]", f"output_root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("*/*-dera_eval"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["checkpoint"] is None and not (run_dir / "checkpoint").exists()
    assert results["realign"] == {"method": "dera", "lam": 1.0, "aligned": "toy-instruct", "reference": "toy-thinking"}
    metrics, baseline = results["metrics"], results["baseline_metrics"]
    assert {"toy_arith_hard/exact_match", "toy_arith_hard/response_tokens", "toy_arith_mc/acc",
            "toy_ppl/bits_per_byte"} <= set(metrics)
    assert metrics == pytest.approx(baseline, rel=1e-5)
