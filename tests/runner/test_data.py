import json

import pytest
from omegaconf import OmegaConf

from runner.config import DataConfig
from runner.data import (
    IGNORE,
    build_dataset,
    check_data_spec,
    collate,
    pack,
    shift_labels,
    tokenize_record,
)
from runner.errors import ConfigError


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), kw)


def decode_labels(tok, labels):
    return tok.decode([x for x in labels if x != IGNORE])


def test_chat_record_trains_only_on_the_assistant_turn(toy_tokenizer):
    tok = toy_tokenizer
    msgs = [{"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "2+3=5"}]
    ids, labels = tokenize_record({"messages": msgs}, tok, chat=True)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<s>", "<|user|>"]
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    prompt_len = len(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert all(x == IGNORE for x in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]
    assert decode_labels(tok, labels) == "2+3=5</s>"  # the answer and the end-of-turn token


def test_multi_turn_chat_masks_every_non_assistant_token(toy_tokenizer):
    tok = toy_tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2=?"},
            {"role": "assistant", "content": "4"}]
    ids, labels = tokenize_record({"messages": msgs}, tok, chat=True)
    assert tok.convert_ids_to_tokens([x for x in labels if x != IGNORE]) == ["2", "</s>", "4", "</s>"]


def test_prompt_response_without_template_masks_the_prompt(toy_tokenizer):
    tok = toy_tokenizer
    ids, labels = tokenize_record({"prompt": "7+8=", "response": "15"}, tok, chat=False)
    assert tok.decode(ids) == "<s>7+8=15</s>"
    assert decode_labels(tok, labels) == "15</s>"


def test_text_record_trains_on_everything(toy_tokenizer):
    ids, labels = tokenize_record({"text": "7+8=15"}, toy_tokenizer, chat=False)
    assert labels == ids and toy_tokenizer.decode(ids) == "<s>7+8=15</s>"


def test_build_dataset_never_predicts_the_first_token(toy_tokenizer):
    examples = build_dataset(data_cfg(format="instruct", num_examples=20, seed=1), toy_tokenizer)
    assert len(examples) == 20
    assert all(ex["labels"][0] == IGNORE for ex in examples)


def test_packing_keeps_masks_and_separates_documents(toy_tokenizer):
    cfg = data_cfg(format="instruct", num_examples=200, max_length=32, packing=True, seed=0)
    unpacked = build_dataset(data_cfg(format="instruct", num_examples=200, max_length=32, seed=0), toy_tokenizer)
    rows = build_dataset(cfg, toy_tokenizer)
    assert all(len(r["input_ids"]) == 32 == len(r["labels"]) for r in rows)
    flat_ids = [t for ex in unpacked for t in ex["input_ids"]]
    assert [t for r in rows for t in r["input_ids"]] == flat_ids[: 32 * len(rows)]
    trained = sum(x != IGNORE for r in rows for x in r["labels"])
    assert 0 < trained <= sum(x != IGNORE for ex in unpacked for x in ex["labels"])
    bos = toy_tokenizer.bos_token_id
    for r in rows:  # a document's first token (BOS) is never a target
        assert all(lab == IGNORE for tok, lab in zip(r["input_ids"], r["labels"]) if tok == bos)


def test_pack_tail_and_errors():
    exs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}] * 3
    rows = pack(exs, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 1], [2, 3, 1, 2]]
    assert [r["labels"] for r in rows] == [[IGNORE, 2, 3, IGNORE], [IGNORE, 3, IGNORE, 2]]
    with pytest.raises(ConfigError, match="fewer than"):
        pack(exs[:1], 8)


def test_collate_and_shift():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [IGNORE]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    targets, mask = shift_labels(batch["labels"])
    assert targets.tolist() == [[6, 7], [0, 0]] and mask.tolist() == [[True, True], [False, False]]


def test_jsonl_with_field_mapping(tmp_path, toy_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"{i}+1=?", "a": str(i + 1)}) for i in range(5)) + "\n")
    cfg = data_cfg(source="jsonl", path=str(path), fields={"prompt": "q", "response": "a"}, system_prompt="Be brief.")
    assert check_data_spec(cfg) == []
    examples = build_dataset(cfg, toy_tokenizer)
    assert len(examples) == 5
    assert toy_tokenizer.decode(examples[2]["input_ids"]) == "<s><|system|>Be brief.<|user|>2+1=?<|assistant|>3</s>"
    assert decode_labels(toy_tokenizer, examples[2]["labels"]) == "3</s>"


def test_jsonl_problems_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\nnot json\n{"question": "x"}\n')
    problems = check_data_spec(data_cfg(source="jsonl", path=str(path)))
    assert problems[0].startswith(f"data.path: {path}:2 is not valid JSON")
    assert f"{path}:3 has none of the fields" in problems[1] and "found: question" in problems[1]
    assert check_data_spec(data_cfg(source="jsonl", path=str(tmp_path / "missing.jsonl")))[0].endswith("not found")
    assert "source" in check_data_spec(data_cfg(source="parquet"))[0]


def test_an_empty_or_unreadable_file_gets_its_own_message(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert check_data_spec(data_cfg(source="jsonl", path=str(empty))) == [
        f"data.path: {empty} is empty (no records; a JSONL file has one JSON object per line)"]
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"text": "caf\xe9"}\n')
    [problem] = check_data_spec(data_cfg(source="jsonl", path=str(binary)))
    assert problem.startswith(f"data.path: cannot read {binary} (UnicodeDecodeError:")


def test_a_file_without_a_trainable_example_is_refused_in_validation(tmp_path, toy_tokenizer, compose, tiny_llama):
    from runner.data import check_trainable
    from tests.conftest import problems_of

    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1+2+3+4+5+6+7+8+9=?" * 3, "response": "45"}) + "\n" for _ in range(3)))
    data = data_cfg(source="jsonl", path=str(path), max_length=8)
    expected = ("data: no example has a trainable token: none of the 3 keeps a response token within "
                "data.max_length=8 (the responses are empty or the prompts fill the length)")
    assert check_trainable(data, toy_tokenizer) == [expected]
    assert check_trainable(data_cfg(source="jsonl", path=str(path), max_length=256), toy_tokenizer) == []
    with pytest.raises(ConfigError, match="fill the length"):
        build_dataset(data, toy_tokenizer)  # what the recipe would have met after the baseline evaluation
    # through the recipe's validation, with its model's tokenizer, before any work
    overrides = ["recipe=sft", f"model.path={tiny_llama}", "data=jsonl", f"data.path={path}", "data.max_length=8"]
    assert problems_of(compose(overrides)) == [expected]


def test_chat_template_required_for_messages(toy_tokenizer):
    from runner.data import use_chat_template

    with pytest.raises(ConfigError, match="chat records"):
        tokenize_record({"messages": [{"role": "assistant", "content": "x"}]}, toy_tokenizer, chat=False)
    cfg = data_cfg(chat_template=True)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="has no chat template"):
        use_chat_template(cfg, NoTemplate())


def test_overlong_examples_are_dropped_not_silently_trained_on_prompt(toy_tokenizer):
    cfg = data_cfg(format="thinking", difficulty="hard", num_examples=10, max_length=9)
    with pytest.raises(ConfigError, match="no example has a trainable token"):
        build_dataset(cfg, toy_tokenizer)


def test_uncached_hub_dataset_is_refused_before_work():
    problems = check_data_spec(data_cfg(source="hub", name="someone/not-a-cached-dataset"))
    assert len(problems) == 1 and problems[0].startswith("data.name: cannot load hub dataset 'someone/not-a-cached-dataset'")
    assert "HF_DATASETS_OFFLINE" in problems[0]


def test_many_records_are_tokenized_in_chunks_under_one_progress_bar(toy_tokenizer, monkeypatch):
    import runner.data as D
    from runner.progress import Record, recorded

    chats = [{"messages": [{"role": "user", "content": f"{i}+1=?"}, {"role": "assistant", "content": f"{i + 1}"}]}
             for i in range(7)]
    records = chats + [{"prompt": "1+1=", "response": "2"}, {"text": "3+4=7"}] * 2
    whole = D.tokenize_records(records, toy_tokenizer, chat=True)  # within one chunk: no bar
    monkeypatch.setattr(D, "TOKENIZE_CHUNK", 3)
    with recorded() as bars:
        chunked = D.tokenize_records(records, toy_tokenizer, chat=True)
    assert chunked == whole
    assert bars == [Record("tokenize data", len(records), len(records))]
