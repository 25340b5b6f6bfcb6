import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from runner.config import EvalConfig, SamplingConfig
from runner.evaluate import check_eval_spec, evaluate, flatten_metrics, shipped_task_names
from runner.toy.tasks import TaskSpec
from runner.toy.tasks import test_problems as problems_of_split


def bigram_model(tokenizer, chain: list[str]) -> LlamaForCausalLM:
    """A one-layer llama that is exactly a bigram table: each token in `chain` is followed by the next.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding
    (one-hot); the LM head then maps it to the next token. Tokens off the chain go to EOS.
    """
    vocab = len(tokenizer)
    hidden = vocab + (-vocab) % 4  # room for a one-hot of every token, split evenly over 2 heads
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in chain]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[tokenizer.eos_token_id, :] = 1.0
        for cur, nxt in zip(ids, ids[1:]):
            model.lm_head.weight[nxt, cur] = 10.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_eval_stage_matches_a_hand_computed_exact_match(toy_tokenizer, tmp_path):
    limit = 100
    easy = problems_of_split(TaskSpec(), "easy")[:limit]
    answer, count = Counter(p.answer for p in easy).most_common(1)[0]
    assert count >= 2
    # every response is "<think>1</think>{answer}": a think block (stripped before scoring), then one number
    model = bigram_model(toy_tokenizer, ["<|assistant|>", "<think>", "1", "</think>", str(answer), "</s>"])
    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith", "toy_arith_hard"], limit=limit, batch_size=16))
    result = evaluate(model, toy_tokenizer, ev, tmp_path, label="bigram")

    hard = problems_of_split(TaskSpec(), "hard")[:limit]
    assert result.metrics["toy_arith/exact_match"] == pytest.approx(count / limit)
    assert result.metrics["toy_arith_hard/exact_match"] == pytest.approx(sum(p.answer == answer for p in hard) / limit)
    assert result.metrics["toy_arith/think_rate"] == 1.0
    assert result.metrics["toy_arith/response_tokens"] == 4.0  # <think> 1 </think> answer
    samples = [json.loads(line) for line in (tmp_path / "samples_toy_arith.jsonl").read_text().splitlines()]
    assert len(samples) == limit and samples[0]["resps"][0][0] == f"<think>1</think>{answer}"
    raw = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert raw["results"]["toy_arith"]["exact_match,none"] == pytest.approx(count / limit)


def test_eval_stage_covers_every_toy_task_kind(tiny_llama, tmp_path):
    from runner.models import load_model

    model, tok = load_model({"path": str(tiny_llama), "dtype": "float32"})
    ev = OmegaConf.structured(EvalConfig(tasks=shipped_task_names(), limit=8, batch_size=8, log_samples=False))
    metrics = evaluate(model, tok, ev, tmp_path).metrics
    for key in ("toy_arith/exact_match", "toy_arith_hard/exact_match", "toy_arith_mc/acc", "toy_arith_mc/acc_norm",
                "toy_ppl/byte_perplexity", "toy_ppl/bits_per_byte", "toy_arith/response_tokens"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert 0.0 <= metrics["toy_arith_mc/acc"] <= 1.0 and metrics["toy_ppl/bits_per_byte"] > 0
    assert not list(tmp_path.glob("samples_*"))


def test_flatten_metrics():
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1,
                 "exact_match_stderr,strict-match": 0.1}}
    assert flatten_metrics(raw) == {"t/acc": 0.5, "t/exact_match@strict-match": 1.0,
                                    "t/exact_match_stderr@strict-match": 0.1}


def test_eval_spec_checks(tmp_path):
    ok = OmegaConf.structured(EvalConfig(tasks=["toy_arith"]))
    assert check_eval_spec(ok) == []
    bad = OmegaConf.structured(EvalConfig(tasks=["toy_arth"], include_path=[str(tmp_path / "nope")]))
    assert check_eval_spec(bad) == [f"eval.include_path: folder '{tmp_path / 'nope'}' not found"]
    custom = tmp_path / "tasks"
    custom.mkdir()
    (custom / "mine.yaml").write_text("task: my_task\n")
    assert check_eval_spec(OmegaConf.structured(EvalConfig(tasks=["my_task"], include_path=[str(custom)]))) == []


def test_unknown_task_gets_a_suggestion():
    problems = check_eval_spec(OmegaConf.structured(EvalConfig(tasks=["toy_arth"])))
    assert len(problems) == 1 and "eval.tasks: unknown task 'toy_arth'. Did you mean 'toy_arith'?" in problems[0]


def two_answer_model(tokenizer, first: str, second: str, gap: float) -> LlamaForCausalLM:
    """The bigram model whose response is one of two numbers, then EOS: after the assistant marker the
    logits of `first` and `second` are 10 and 10 - gap, far above every other token's."""
    model = bigram_model(tokenizer, ["<|assistant|>", first, "</s>"])
    cur, nxt = (tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", second))
    with torch.no_grad():
        model.lm_head.weight[nxt, cur] = 10.0 - gap
        model.lm_head.weight[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(second)] = 10.0
    return model


def _common_answers(limit):
    easy = problems_of_split(TaskSpec(), "easy")[:limit]
    (a, count_a), (b, count_b) = Counter(p.answer for p in easy).most_common(2)
    return str(a), str(b), count_a, count_b


def test_pass_at_k_from_samples_matches_the_two_answer_model(toy_tokenizer, tmp_path):
    limit, n = 60, 16
    a, b, count_a, count_b = _common_answers(limit)
    model = two_answer_model(toy_tokenizer, a, b, gap=0.0)  # each answer half the time
    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith_passk"], limit=limit, batch_size=64))
    metrics = evaluate(model, toy_tokenizer, ev, tmp_path).metrics
    # with 16 samples per problem both answers appear (all but surely: each is missed with p = 2^-16),
    # so pass@16 is exactly the share of problems answered a or b, and 2 of 16 answers are distinct
    assert metrics["toy_arith_passk/pass@16"] == pytest.approx((count_a + count_b) / limit)
    assert metrics["toy_arith_passk/distinct_answers"] == pytest.approx(2 / n)
    assert 0.3 * (count_a + count_b) / limit < metrics["toy_arith_passk/pass@1"] < 0.7 * (count_a + count_b) / limit
    assert metrics["toy_arith_passk/response_tokens"] == 1.0  # over all 16 samples of every problem
    samples = [json.loads(line) for line in (tmp_path / "samples_toy_arith_passk.jsonl").read_text().splitlines()]
    assert len(samples) == limit and all(len(s["filtered_resps"][0]) == n for s in samples)


def test_eval_sampling_sets_n_and_temperature(toy_tokenizer, tmp_path):
    limit = 60
    a, b, count_a, _ = _common_answers(limit)
    model = two_answer_model(toy_tokenizer, a, b, gap=0.1)  # p(a) = 0.52 at temperature 1, ~1 at 0.01
    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith_passk", "toy_arith"], limit=limit, batch_size=64,
                                         sampling=SamplingConfig(n=4, temperature=0.01, top_p=0.9)))
    metrics = evaluate(model, toy_tokenizer, ev, tmp_path).metrics
    assert {k for k in metrics if "pass@" in k} == {f"toy_arith_passk/pass@{k}" for k in (1, 2, 4)}
    for k in (1, 2, 4):  # all but greedy: every sample is the likelier answer
        assert metrics[f"toy_arith_passk/pass@{k}"] == pytest.approx(count_a / limit)
    assert metrics["toy_arith_passk/distinct_answers"] == pytest.approx(1 / 4)
    assert metrics["toy_arith/exact_match"] == pytest.approx(count_a / limit)  # the greedy task is untouched


def test_the_lm_eval_command_is_built_from_the_eval_block(tmp_path):
    from runner.evaluate import lm_eval_command

    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith", "toy_arith_hard"], limit=40, num_fewshot=3,
                                         max_gen_toks=64, enable_thinking=False, batch_size=8, seed=7))
    out = lm_eval_command(ev, tmp_path, chat=True, dtype="bfloat16", device="cpu")
    assert out["exact"] and out["note"] is None
    assert out["command"] == (
        f"lm_eval --model hf --model_args pretrained={tmp_path.resolve()},dtype=bfloat16,enable_thinking=False "
        f"--tasks toy_arith,toy_arith_hard --batch_size 8 --device cpu --seed 7,7,7,7 "
        f"--include_path {shipped_task_dir()} --apply_chat_template --limit 40 --num_fewshot 3 "
        f"--gen_kwargs max_gen_toks=64")
    sampled = OmegaConf.structured(EvalConfig(tasks=["toy_arith_passk"], sampling=SamplingConfig(n=4)))
    out = lm_eval_command(sampled, tmp_path, chat=False, dtype="float32", device="cpu")
    assert not out["exact"] and "eval.sampling" in out["note"] and "--apply_chat_template" not in out["command"]


def shipped_task_dir() -> str:
    from runner import registry

    return str(next(iter(registry.entries("task_dir").values())))


@pytest.mark.e2e
def test_the_recorded_lm_eval_command_reproduces_the_run_metrics(compose, tiny_llama, tmp_path):
    """The command in results.json, run as printed, scores the checkpoint within 0.005 of the run."""
    import glob
    import os
    import shlex
    import subprocess
    import sys

    from runner.run import run

    cfg = compose(["recipe=sft", f"model.path={tiny_llama}", "train.steps=4", "train.batch_size=8",
                   "data.num_examples=64", "eval=toy_quick", "eval.limit=24", "eval.baseline=true"])
    record = run(cfg, tmp_path / "run")
    command = record["eval_command"]
    assert command["exact"] and "--apply_chat_template" in command["command"]
    assert record["baseline_eval_command"]["command"].startswith(
        f"lm_eval --model hf --model_args pretrained={tiny_llama.resolve()},")
    program, *args = shlex.split(command["command"])
    assert program == "lm_eval"  # run as the venv's module: PATH may not hold the venv's scripts
    proc = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "cli" / "**" / "results_*.json"), recursive=True)
    cli = flatten_metrics(json.loads(open(path).read())["results"])
    scored = [k for k in record["metrics"] if k.endswith("/exact_match")]
    assert scored
    for key in scored:
        assert abs(cli[key] - record["metrics"][key]) <= 0.005, (key, cli[key], record["metrics"][key])
