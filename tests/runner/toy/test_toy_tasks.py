import random
import re

import pytest

from runner.toy import tasks
from runner.toy.tasks import Problem, TaskSpec, render

SPEC = TaskSpec()


def test_problem_arithmetic_and_rendering():
    p = Problem((23, 45, 17))
    assert p.answer == 85
    assert p.expression() == "23+45+17"
    assert p.question() == "23+45+17=?"
    assert p.steps() == ["23+45=68", "68+17=85"]
    assert tasks.render(p, "plain") == {"text": "23+45+17:23+45=68,68+17=85"}
    assert tasks.render(Problem((2, 3)), "plain") == {"text": "2+3=5"}
    chat = tasks.render(p, "thinking")["messages"]
    assert chat[0] == {"role": "user", "content": "23+45+17=?"}
    assert chat[1]["content"] == "<think>23+45+17:23+45=68,68+17=85</think>85"
    assert tasks.render(p, "instruct")["messages"][1]["content"] == "23+45+17=85"
    assert tasks.render(Problem((2, 3)), "thinking")["messages"][1]["content"] == "<think>2+3=5</think>5"


def test_operators_run_left_to_right():
    p = Problem((7, 9, 17), ("*", "+"))
    assert p.answer == 80 and p.question() == "7*9+17=?"
    assert tasks.render(p, "plain") == {"text": "7*9+17:7*9=63,63+17=80"}
    assert tasks.render(p, "thinking")["messages"][1]["content"] == "<think>7*9+17:7*9=63,63+17=80</think>80"
    assert Problem((20, 5, 7), ("-", "+")).steps() == ["20-5=15", "15+7=22"]


def test_test_splits_are_fixed_and_distinct():
    easy, hard = tasks.test_problems(SPEC, "easy"), tasks.test_problems(SPEC, "hard")
    assert len(easy) == len(set(easy)) == SPEC.test_size
    assert len(hard) == len(set(hard)) == SPEC.test_size
    assert all(p.operators == ("+",) and max(p.operands) <= SPEC.max_value for p in easy)
    assert all(p.operators == ("*", "+") and max(p.operands[:2]) <= SPEC.mul_max and p.operands[2] <= SPEC.max_value
               for p in hard)
    tasks.test_problems.cache_clear()
    assert tasks.test_problems(SPEC, "easy") == easy  # a pure function of the world seed


@pytest.mark.parametrize("fmt", ["plain", "instruct", "thinking"])
def test_training_data_never_contains_a_test_problem_or_easy_test_fact(fmt):
    easy_facts = {p.steps()[0] for p in tasks.test_problems(SPEC, "easy")}
    hard_questions = {p.expression() for p in tasks.test_problems(SPEC, "hard")}
    easy_questions = {p.expression() for p in tasks.test_problems(SPEC, "easy")}
    rng = random.Random(0)
    for _ in range(5000):
        p = tasks.sample_problem(rng, SPEC, "mixed", fact_range=fmt == "plain")
        assert p.expression() not in hard_questions and p.expression() not in easy_questions
        assert not any(step in easy_facts for step in p.steps())


def test_examples_are_deterministic_per_seed():
    a = tasks.make_examples(SPEC, "instruct", "mixed", 50, seed=3)
    assert a == tasks.make_examples(SPEC, "instruct", "mixed", 50, seed=3)
    assert a != tasks.make_examples(SPEC, "instruct", "mixed", 50, seed=4)


def test_variation_changes_phrasing_not_the_answer():
    examples = tasks.make_examples(SPEC, "instruct", "easy", 300, seed=0, variation=1.0)
    responses = [e["messages"][1]["content"] for e in examples]
    shapes = {re.sub(r"\d+", "#", r) for r in responses}
    assert len(shapes) == len(tasks.PHRASINGS) - 1  # every other phrasing, never the default
    assert "#+#=#" not in shapes and "#" in shapes
    for e in examples:
        q = e["messages"][0]["content"].removesuffix("=?")
        assert tasks.final_answer(e["messages"][1]["content"]) == eval(q)  # noqa: S307 (our own arithmetic)


@pytest.mark.parametrize("response,expected", [
    ("85", 85),
    ("The answer is 85.", 85),
    ("<think>23+45=68,68+17=85</think>85", 85),
    ("<think>23+45=68,68+17=85</think>", None),  # the working alone is not an answer
    ("<think>23+45=68", None),  # unterminated think block: nothing after it counts
    ("23+45+17 = 85", 85),
    ("no number", None),
    ("-4", -4),
])
def test_final_answer_strips_the_think_block(response, expected):
    assert tasks.final_answer(response) == expected


def test_mc_choices_hold_the_answer_once():
    for p in tasks.test_problems(SPEC, "easy")[:200]:
        choices, label = tasks.mc_choices(p)
        assert len(choices) == 4 and len(set(choices)) == 4
        assert choices[label] == str(p.answer)


def test_pretraining_facts_cover_every_step_of_hard_working():
    rng = random.Random(0)
    facts = [tasks.sample_problem(rng, SPEC, "easy", fact_range=True) for _ in range(20000)]
    products = {p.expression() for p in facts if p.operators == ("*",)}
    assert len(products) == (SPEC.mul_max + 1) ** 2  # the whole multiplication table
    assert max(p.operands[0] for p in facts if p.operators == ("+",)) == SPEC.mul_max ** 2


def test_spec_and_problem_reject_bad_input():
    with pytest.raises(ValueError, match="mul_max"):
        TaskSpec(mul_max=1)
    with pytest.raises(ValueError, match="operators"):
        Problem((1, 2), ("/",))


def test_questions_in_words_keep_the_number_tokens(toy_tokenizer):
    problem = Problem((7, 9, 17), ("*", "+"))
    assert problem.question("words") == "7times9plus17=?"
    chat = render(problem, "instruct", style="words")["messages"]
    assert chat[0]["content"] == "7times9plus17=?" and chat[1]["content"] == "7*9+17=80"  # answered in symbols
    # the numbers tokenize exactly as in the symbol questions the zoo was trained on
    ids = set(toy_tokenizer("7times9plus17=?")["input_ids"])
    assert set(toy_tokenizer("7*9+17=?")["input_ids"]) - ids <= set(toy_tokenizer("*+")["input_ids"])


def test_words_task_alternates_easy_and_hard():
    from runner.toy.lm_tasks.utils import load_words

    rows = load_words()["test"]
    easy, hard = tasks.test_problems(TaskSpec(), "easy"), tasks.test_problems(TaskSpec(), "hard")
    assert len(rows) == len(easy) + len(hard)
    assert rows[0]["question"] == easy[0].question("words") and rows[1]["question"] == hard[0].question("words")
    assert rows[1]["answer"] == str(hard[0].answer)


def test_pass_at_k_matches_hand_computed_values():
    from runner.toy.tasks import pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(16, 4, 8) == pytest.approx(1 - 495 / 12870)  # 1 - C(12,8)/C(16,8)
    for n in (1, 5, 16):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the share correct
            assert pass_at_k(n, c, n) == (1.0 if c else 0.0)  # all n samples: any correct one counts
            ks = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert ks == sorted(ks)  # more tries never hurt
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_sampled_task_scoring():
    from runner.toy.lm_tasks.utils import score_samples

    doc = {"answer": "80"}
    scores = score_samples(doc, [["7*9+17=80", "<think>7*9=63</think>63", "The answer is 80.", "no number"]])
    assert scores["pass@1"] == pytest.approx(0.5) and scores["pass@2"] == pytest.approx(1 - 1 / 6)
    assert scores["pass@4"] == 1.0 and "pass@8" not in scores
    assert scores["distinct_answers"] == pytest.approx(3 / 4)  # 80, 63 and no answer
