import math

import pytest
import torch

from runner.models import load_model
from runner.toy import premises
from runner.toy.zoo import ensure


def test_relative_distance_by_hand():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # ||ref|| = 5
    moved = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([2.0])}  # differs by (0, 1, 2): norm sqrt(5)
    assert premises.relative_distance(moved, ref, ref) == pytest.approx(5 ** 0.5 / 5)
    assert premises.relative_distance(ref, ref, ref) == 0.0


def test_barrier_by_hand():
    lams = (0.0, 0.5, 1.0)
    assert premises.barrier([1.0, 2.5, 2.0], lams) == pytest.approx(1.0)  # the line is at 1.5 halfway
    assert premises.barrier([1.0, 1.2, 2.0], lams) == 0.0  # below the line: no barrier


def test_projection_weights_are_the_decoder_projections(tiny_llama):
    model, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    names = premises.projection_weights(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert all(k.split(".")[-2] in premises.PROJECTIONS for k in names)


def test_measurements_agree_with_their_definitions(tiny_llama, tiny_qwen3, toy_tokenizer):
    a, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    b, _ = load_model({"path": str(tiny_qwen3), "dtype": "float32"})
    rows = premises.heldout_chats(toy_tokenizer, "instruct")[:40]
    assert premises.reverse_kl(a, a, rows) == pytest.approx(0.0, abs=1e-6)
    assert premises.reverse_kl(a, b, rows) > 0
    p = premises.token_probabilities(a, rows)
    assert premises.chat_loss(a, rows) == pytest.approx(float(-p.log().mean()), rel=1e-5)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    twin, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    with torch.no_grad():
        for w in twin.parameters():
            w.mul_(0.9)
    path = premises.interpolation_path(a, twin, rows, lambdas=(0.0, 1.0))
    assert path == pytest.approx([premises.chat_loss(a, rows), premises.chat_loss(twin, rows)], rel=1e-6)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())  # restored


def test_heldout_chats_hold_only_test_problems(toy_tokenizer):
    from runner.toy.tasks import TaskSpec, test_problems

    rows = premises.heldout_chats(toy_tokenizer, "thinking")
    spec = TaskSpec()
    assert len(rows) == len(test_problems(spec, "easy")) + len(test_problems(spec, "hard"))
    first = toy_tokenizer.decode(rows[0]["input_ids"])
    assert test_problems(spec, "easy")[0].question() in first and "<think>" in first


@pytest.fixture(scope="module")
def shipped_models():
    names = ("toy-base", "toy-instruct", "toy-thinking", "toy-teacher", "toy-student")
    loaded = {n: load_model({"path": str(ensure(n)), "dtype": "float32"}) for n in names}
    return {n: m for n, (m, _) in loaded.items()}, loaded["toy-base"][1]


def test_the_shipped_zoo_holds_the_weight_space_premises(shipped_models):
    """The premises that need no generation, on the shipped weights (identical on every machine)."""
    models, tok = shipped_models
    w = {n: premises.projection_weights(models[n]) for n in ("toy-base", "toy-instruct", "toy-thinking")}
    assert premises.relative_distance(w["toy-instruct"], w["toy-base"], w["toy-base"]) <= 0.05
    assert premises.relative_distance(w["toy-thinking"], w["toy-base"], w["toy-base"]) <= 0.05
    rows = premises.heldout_chats(tok, "instruct", variation=0.5)
    assert float(premises.token_probabilities(models["toy-base"], rows).mean()) >= 0.2
    path_rows = premises.heldout_chats(tok, "instruct") + premises.heldout_chats(tok, "thinking")
    assert premises.barrier(premises.interpolation_path(models["toy-instruct"], models["toy-thinking"], path_rows)) <= 0.1


def test_response_tokens_are_sorted_into_answer_and_the_rest(toy_tokenizer):
    from runner.data import IGNORE

    rows = premises.heldout_chats(toy_tokenizer, "instruct")
    row = rows[0]  # "a+b=c</s>": the answer is the last number
    response = [i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert len(row["kinds"]) == len(response) and row["kinds"][-1] == "eos"
    answer = "".join(toy_tokenizer.decode([i]) for i, k in zip(response, row["kinds"]) if k == "answer")
    from runner.toy.tasks import TaskSpec, test_problems

    assert answer == str(test_problems(TaskSpec(), "easy")[0].answer)
    probs = torch.tensor([0.5 if k == "answer" else 0.05 for r in rows[:2] for k in r["kinds"]])
    kept = premises.kept_by_gate(probs, rows[:2])
    assert kept["other"] == 0.0 and kept["easy answer"] == 1.0


def test_response_entropy_by_hand(tiny_llama, toy_tokenizer):
    model, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    rows = premises.heldout_chats(toy_tokenizer, "instruct")[:3]
    per_chat = premises.response_entropy(model, rows)
    assert len(per_chat) == 3
    with torch.no_grad():  # the first chat by hand: entropy at each position that predicts a response token
        row = rows[0]
        logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1]
        at = [i for i, label in enumerate(row["labels"][1:]) if label != -100]
        p = logits[at].softmax(-1)
        assert per_chat[0] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    with torch.no_grad():
        for w in model.lm_head.parameters():
            w.zero_()  # tied: every logit 0 -> the uniform distribution
    assert premises.response_entropy(model, rows[:1])[0] == pytest.approx(math.log(len(toy_tokenizer)), rel=1e-5)
