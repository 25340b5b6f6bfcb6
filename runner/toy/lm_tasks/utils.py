"""Datasets and scoring for the toy lm-eval tasks (referenced from the YAML files beside it).

The test problems are generated from the toy world's fixed seed, so no data file is needed and the
tasks resolve from any working directory.
"""

import datasets

from runner.toy.tasks import TaskSpec, final_answer, mc_choices, pass_at_k, render, test_problems

PASS_KS = (1, 2, 4, 8, 16)  # the k of pass@k reported by the sampled tasks (those <= the sample count)


def _dataset(rows):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _qa(split, style="symbols"):
    return [{"question": p.question(style), "answer": str(p.answer)} for p in test_problems(TaskSpec(), split)]


def load_easy(**kwargs):
    return _dataset(_qa("easy"))


def load_hard(**kwargs):
    return _dataset(_qa("hard"))


def load_words(**kwargs):
    """The easy and hard test problems asked in words ("7times9plus17=?"), alternating so
    that a `limit` takes both kinds."""
    easy, hard = _qa("easy", "words"), _qa("hard", "words")
    return _dataset([row for pair in zip(easy, hard) for row in pair] + easy[len(hard):] + hard[len(easy):])


def load_mc(**kwargs):
    """Each choice is a whole answer in the default phrasing ("40+33=73"), as a chat model would say it."""
    rows = []
    for p in test_problems(TaskSpec(), "easy"):
        choices, label = mc_choices(p)
        rows.append({"question": p.question(), "choices": [f"{p.expression()}={c}" for c in choices], "label": label})
    return _dataset(rows)


def load_plain(**kwargs):
    spec = TaskSpec()
    problems = test_problems(spec, "easy") + test_problems(spec, "hard")
    return _dataset([{"text": render(p, "plain")["text"]} for p in problems])


def score_generation(doc, results):
    """Exact match on the final integer after the think block is removed."""
    return {"exact_match": float(final_answer(results[0]) == int(doc["answer"]))}


def keep_all(resps, docs):
    """The filter of the sampled tasks: every sample goes to scoring (lm-eval keeps only the first by default)."""
    return resps


def score_samples(doc, results):
    """pass@k (the unbiased estimator over the n samples of one problem) and the share of distinct final answers."""
    answers = [final_answer(r) for r in results[0]]
    n, correct = len(answers), sum(a == int(doc["answer"]) for a in answers)
    scores = {f"pass@{k}": pass_at_k(n, correct, k) for k in PASS_KS if k <= n}
    scores["distinct_answers"] = len(set(answers)) / n
    return scores
