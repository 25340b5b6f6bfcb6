"""Synthetic integer arithmetic: the tasks of the toy world.

A problem is operands joined by operators and evaluated left to right. ``easy`` problems add two
numbers (``23+45``, operands 0..`TaskSpec.max_value`); ``hard`` ones multiply two small numbers and
add a third (``7*9+17``, factors 0..`TaskSpec.mul_max`). A small model can add several numbers in
one step (a sum is linear in the operands), but a product followed by a sum takes two lookups,
which is where working step by step pays off. Each problem renders in three formats:

- ``plain``: pretraining text, either a fact (``23+45=68``, ``7*9=63``) or worked text
  (``7*9+17:7*9=63,63+17=80``);
- ``instruct``: a chat, question -> short answer (``7*9+17=80``, or with `variation` another
  phrasing such as ``The answer is 80.``);
- ``thinking``: a chat, question -> ``<think>7*9+17:7*9=63,63+17=80</think>80``.

Chat questions are written with symbols (``7*9+17=?``) or, as a skill no zoo model is trained on,
with the operators in words (``7times9plus17=?``).

Test problems are a fixed function of `TaskSpec.world_seed` and never appear in training data:
sampling rejects every held-out problem, and every problem whose working contains a held-out
addition fact, so an easy test fact is never seen at all (its mirror image, b+a, may be).
Multiplication facts are all seen: the hard split tests combining known facts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from runner.evaluate import THINK_CLOSE, THINK_OPEN

FORMATS = ("plain", "instruct", "thinking")
DIFFICULTIES = ("easy", "hard", "mixed")
OPERATORS = ("+", "-", "*")
OPERATOR_WORDS = {"+": "plus", "-": "minus", "*": "times"}
QUESTION_STYLES = ("symbols", "words")
MUL_FACT_SHARE = 0.3  # share of pretraining facts that are products

_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?(" + re.escape(THINK_CLOSE) + r"|$)", re.S)
_INTEGER = re.compile(r"-?\d+")

# Interchangeable phrasings around the core answer (the DESIGN's optional surface variation).
# The first is the default: restating the expression lets a model reuse the facts it saw in
# pretraining text ("23+45=68") instead of learning to compute at a new position.
PHRASINGS = (
    "{q}={a}",
    "{a}",
    "The answer is {a}.",
    "It is {a}.",
    "Result: {a}",
    "So the total is {a}.",
)


@dataclass(frozen=True)
class TaskSpec:
    """The difficulty knobs of the toy world. Changing any of them changes every split."""

    max_value: int = 49  # addends are drawn from 0..max_value
    mul_max: int = 12  # factors of hard problems are drawn from 0..mul_max
    world_seed: int = 1234  # fixes the held-out test problems
    test_size: int = 300  # problems per held-out split

    def __post_init__(self):
        if self.max_value < 2 or self.mul_max < 2:
            raise ValueError(f"max_value and mul_max must be >= 2, got {self.max_value} and {self.mul_max}")

    @property
    def largest_running_value(self) -> int:
        return max(self.max_value, self.mul_max ** 2)


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.operators:
            object.__setattr__(self, "operators", ("+",) * (len(self.operands) - 1))
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad or len(self.operators) != len(self.operands) - 1:
            raise ValueError(f"need {len(self.operands) - 1} operators from {OPERATORS}, got {self.operators}")

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def running_values(self) -> list[int]:
        values = [self.operands[0]]
        for op, x in zip(self.operators, self.operands[1:]):
            v = values[-1]
            values.append(v + x if op == "+" else v - x if op == "-" else v * x)
        return values

    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.operators, self.operands[1:]):
            parts += [op, str(x)]
        return "".join(parts)

    def steps(self) -> list[str]:
        """The working: one two-operand fact per operator."""
        values = self.running_values()
        return [
            f"{values[i]}{op}{x}={values[i + 1]}"
            for i, (op, x) in enumerate(zip(self.operators, self.operands[1:]))
        ]

    def facts(self) -> list[tuple[int, str, int]]:
        values = self.running_values()
        return [(values[i], op, x) for i, (op, x) in enumerate(zip(self.operators, self.operands[1:]))]

    def question(self, style: str = "symbols") -> str:
        """``23+45=?``, or with the operators in words (``23plus45=?``): the skill the shadow-ft toy
        transfers. No spaces: " 23" would be a token no zoo model has seen, not the "23" it knows."""
        if style == "words":
            parts = [str(self.operands[0])]
            for op, x in zip(self.operators, self.operands[1:]):
                parts += [OPERATOR_WORDS[op], str(x)]
            return f"{''.join(parts)}=?"
        return f"{self.expression()}=?"


# --------------------------------------------------------------------------------------------
# Held-out test problems


def _draw(rng: random.Random, spec: TaskSpec, difficulty: str) -> Problem:
    if difficulty == "easy":
        return Problem((rng.randint(0, spec.max_value), rng.randint(0, spec.max_value)), ("+",))
    factors = (rng.randint(0, spec.mul_max), rng.randint(0, spec.mul_max))
    return Problem((*factors, rng.randint(0, spec.max_value)), ("*", "+"))


@lru_cache(maxsize=16)
def test_problems(spec: TaskSpec, difficulty: str) -> tuple[Problem, ...]:
    """The held-out problems of one split (``easy`` or ``hard``), in a fixed order."""
    if difficulty not in ("easy", "hard"):
        raise ValueError(f"test splits are 'easy' and 'hard', got {difficulty!r}")
    rng = random.Random(f"{spec.world_seed}-test-{difficulty}")
    seen: dict[Problem, None] = {}
    possible = (spec.max_value + 1) ** 2 if difficulty == "easy" else (spec.mul_max + 1) ** 2 * (spec.max_value + 1)
    target = min(spec.test_size, possible // 4)
    while len(seen) < target:
        seen.setdefault(_draw(rng, spec, difficulty))
    return tuple(seen)


@lru_cache(maxsize=16)
def _held_out(spec: TaskSpec) -> tuple[frozenset, frozenset]:
    easy_facts = {p.facts()[0] for p in test_problems(spec, "easy")}
    return frozenset(easy_facts), frozenset(test_problems(spec, "hard"))


def is_held_out(spec: TaskSpec, problem: Problem) -> bool:
    easy_facts, hard = _held_out(spec)
    return problem in hard or any(f in easy_facts for f in problem.facts())


# --------------------------------------------------------------------------------------------
# Training problems and rendering


def sample_problem(rng: random.Random, spec: TaskSpec, difficulty: str, *, fact_range: bool = False) -> Problem:
    """One training problem that is not held out.

    `fact_range` makes easy problems pretraining facts instead: products of factors up to
    `mul_max`, and sums whose first operand is any running value a hard problem can reach, so
    pretraining text holds every step the working of a hard problem uses.
    """
    if difficulty == "mixed":
        difficulty = rng.choice(("easy", "hard"))
    while True:
        if difficulty == "easy" and fact_range:
            if rng.random() < MUL_FACT_SHARE:
                problem = Problem((rng.randint(0, spec.mul_max), rng.randint(0, spec.mul_max)), ("*",))
            else:
                problem = Problem((rng.randint(0, spec.largest_running_value), rng.randint(0, spec.max_value)), ("+",))
        else:
            problem = _draw(rng, spec, difficulty)
        if not is_held_out(spec, problem):
            return problem


def working(problem: Problem) -> str:
    """The plain-text working: ``23+45=68`` or ``7*9+17:7*9=63,63+17=80``.

    No spaces: the byte-level pre-tokenizer would make " 68" and "68" different tokens.
    """
    if len(problem.operands) == 2:
        return problem.steps()[0]
    return f"{problem.expression()}:{','.join(problem.steps())}"


def think_text(problem: Problem) -> str:
    return f"{THINK_OPEN}{working(problem)}{THINK_CLOSE}"


def answer_text(problem: Problem, rng: random.Random | None = None, variation: float = 0.0,
                default: str = PHRASINGS[0]) -> str:
    """The answer in the `default` phrasing, or with probability `variation` in another one."""
    if rng is not None and variation > 0 and rng.random() < variation:
        template = rng.choice([p for p in PHRASINGS if p != default])
    else:
        template = default
    return template.format(a=problem.answer, q=problem.expression())


def render(problem: Problem, fmt: str, rng: random.Random | None = None, variation: float = 0.0,
           style: str = "symbols") -> dict:
    """One example: ``{"text": ...}`` for plain, ``{"messages": [...]}`` for the chat formats
    (the question in `style`)."""
    if fmt == "plain":
        return {"text": working(problem)}
    if fmt == "instruct":
        response = answer_text(problem, rng, variation)
    elif fmt == "thinking":
        # after the working, the bare answer (the working already restates the problem)
        response = think_text(problem) + answer_text(problem, rng, variation, default="{a}")
    else:
        raise ValueError(f"unknown format {fmt!r}; formats are {FORMATS}")
    return {"messages": [{"role": "user", "content": problem.question(style)}, {"role": "assistant", "content": response}]}


def make_examples(
    spec: TaskSpec,
    fmt: str,
    difficulty: str,
    n: int,
    seed: int,
    variation: float = 0.0,
    style: str = "symbols",
) -> list[dict]:
    """`n` training examples, a deterministic function of all arguments."""
    rng = random.Random(f"{seed}-{fmt}-{difficulty}")
    return [
        render(sample_problem(rng, spec, difficulty, fact_range=fmt == "plain"), fmt, rng, variation, style)
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Scoring helpers shared with the lm-eval task files


def strip_think(response: str) -> str:
    """The response with its think block removed; an unterminated block removes everything after it."""
    return _THINK_BLOCK.sub("", response)


def final_answer(response: str) -> int | None:
    """The last integer outside the think block, or None."""
    found = _INTEGER.findall(strip_think(response))
    return int(found[-1]) if found else None


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n is correct:
    1 - C(n - c, k) / C(n, k), the unbiased estimator of Chen et al. (2021), as a stable product."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    miss = 1.0
    for i in range(k):
        miss *= (n - correct - i) / (n - i)
    return 1.0 - miss


def mc_choices(problem: Problem, n_choices: int = 4) -> tuple[list[str], int]:
    """Answer choices (the correct one plus near misses) and the index of the correct one."""
    rng = random.Random(f"mc-{problem.expression()}")
    wrong: list[int] = []
    for delta in rng.sample([-10, -2, -1, 1, 2, 10, 11, -11], k=8):
        candidate = problem.answer + delta
        if candidate >= 0 and candidate not in wrong:
            wrong.append(candidate)
        if len(wrong) == n_choices - 1:
            break
    choices = wrong + [problem.answer]
    rng.shuffle(choices)
    return [str(c) for c in choices], choices.index(problem.answer)
