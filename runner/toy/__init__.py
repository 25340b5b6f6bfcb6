"""The toy world, plugged into the runner through its source hooks (the core never imports it):

- model source ``toy``: the zoo's names (toy-base, toy-instruct, ...) resolve to the shipped entries;
- data source ``toy``: synthetic arithmetic in the plain, instruct and thinking formats;
- task folder ``toy``: the lm-eval tasks in `lm_tasks/`;
- checkpoint metric ``heldout/response_entropy``: mean next-token entropy over the response tokens of
  the held-out chats (varied phrasings), per chat (`premises.response_entropy`).

`recipes` imports this package, so the toy world is there wherever the registry is.
"""

from __future__ import annotations

from pathlib import Path

from runner.registry import register


class ZooSource:
    label = "a toy zoo name"

    def names(self) -> list[str]:
        from runner.toy import zoo

        return zoo.names()

    def resolve(self, name: str) -> Path:
        from runner.toy import zoo

        return zoo.ensure(name)


class ToyData:
    def check(self, data, key: str) -> list[str]:
        from runner.registry import not_allowed
        from runner.toy.tasks import DIFFICULTIES, FORMATS, QUESTION_STYLES

        return [not_allowed(f"{key}.{name}", data[name], allowed)
                for name, allowed in (("format", FORMATS), ("difficulty", DIFFICULTIES),
                                      ("question_style", QUESTION_STYLES)) if data[name] not in allowed]

    def load(self, data) -> list[dict]:
        from runner.toy.tasks import TaskSpec, make_examples

        return make_examples(TaskSpec(), data.format, data.difficulty, data.num_examples or 20000, data.seed,
                             data.variation, data.question_style)


def heldout_response_entropy(model, tokenizer) -> list[float]:
    from runner.toy import premises

    return premises.response_entropy(model, premises.heldout_chats(tokenizer, "instruct", variation=0.5))


register("model_source", "toy")(ZooSource())
register("data_source", "toy")(ToyData())
register("task_dir", "toy")(Path(__file__).resolve().parent / "lm_tasks")
register("checkpoint_metric", "heldout/response_entropy")(heldout_response_entropy)
