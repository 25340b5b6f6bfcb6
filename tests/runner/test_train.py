
import pytest
import torch
from omegaconf import OmegaConf

from runner.config import DataConfig, TrainConfig
from runner.data import build_dataset, collate
from runner.errors import TrainingDiverged
from runner.models import load_model
from runner.train import (
    BatchPlan,
    LossOutput,
    causal_lm_loss,
    find_last_state,
    lr_factor,
    make_accelerator,
    train,
)


def train_cfg(**kw):
    base = dict(steps=8, batch_size=8, lr=3e-3, warmup_ratio=0.25, log_every=2, cpu=True, seed=0)
    return OmegaConf.structured(TrainConfig(**{**base, **kw}))


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    return build_dataset(DataConfig(source="toy", format="instruct", num_examples=256, max_length=32, seed=0), toy_tokenizer)


def fresh(tiny_llama):
    return load_model({"path": str(tiny_llama), "dtype": "float32"})[0]


def run_train(model, examples, cfg, run_dir, **kw):
    acc = make_accelerator(cfg)
    result = train(model, examples, kw.pop("loss_fn", causal_lm_loss), cfg, accelerator=acc, run_dir=run_dir, pad_id=0, **kw)
    return acc.unwrap_model(model), result


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedules_hand_computed():
    # 4 warm-up steps climb linearly to the peak, then decay over the remaining 6
    assert [lr_factor("linear", s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor("linear", 4, 10, 4) == 1.0
    assert lr_factor("linear", 7, 10, 4) == pytest.approx(0.5)
    assert lr_factor("cosine", 7, 10, 4) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10, 4) == pytest.approx(0.0)
    assert lr_factor("cosine_with_min_lr", 10, 10, 4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor("constant_with_warmup", 9, 10, 4) == 1.0
    assert lr_factor("constant", 0, 10, 0) == 1.0


def test_batch_plan_splits_one_global_batch_across_processes():
    single = BatchPlan(100, micro_batch=8, world_size=1, rank=0, seed=3)
    r0 = BatchPlan(100, micro_batch=4, world_size=2, rank=0, seed=3)
    r1 = BatchPlan(100, micro_batch=4, world_size=2, rank=1, seed=3)
    for step in range(30):  # crosses several epochs
        assert r0.indices(step) + r1.indices(step) == single.indices(step)
    assert single.per_epoch == 12
    assert sorted(i for s in range(12) for i in single.indices(s)) == sorted(single._perm[:96].tolist())
    assert single.indices(0) != single.indices(12)  # a new permutation each epoch


def test_causal_lm_loss_matches_transformers(tiny_llama, examples):
    model = fresh(tiny_llama)
    batch = collate(examples[:4], pad_id=0)
    out = causal_lm_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert int(out.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())


def test_all_masked_batch_gives_zero_not_nan(tiny_llama, examples):
    batch = collate(examples[:2], pad_id=0)
    batch["labels"][:] = -100
    out = causal_lm_loss(fresh(tiny_llama), batch)
    assert out.loss.item() == 0.0 and int(out.num_tokens) == 0


def test_training_lowers_the_loss(tiny_llama, examples, tmp_path):
    _, result = run_train(fresh(tiny_llama), examples, train_cfg(steps=30, lr=5e-3), tmp_path)
    assert result.steps == 30 and len(result.history) == 15
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 15


def test_gradient_accumulation_equals_the_larger_batch(tiny_llama, examples, tmp_path):
    big, _ = run_train(fresh(tiny_llama), examples, train_cfg(batch_size=8, grad_accum=1), tmp_path / "a")
    small, _ = run_train(fresh(tiny_llama), examples, train_cfg(batch_size=4, grad_accum=2), tmp_path / "b")
    for (k, a), b in zip(weights(big).items(), weights(small).values()):
        assert torch.allclose(a, b, atol=2e-6), k


def test_resume_after_interruption_gives_the_same_weights(tiny_llama, examples, tmp_path):
    cfg = train_cfg(steps=9, save_every=3)
    uninterrupted, _ = run_train(fresh(tiny_llama), examples, cfg, tmp_path / "full")

    def interrupt(step, logs):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(fresh(tiny_llama), examples, cfg, tmp_path / "first", on_step=interrupt)
    last = find_last_state(tmp_path / "first" / "state")
    assert last.name == "step-0000003"
    resumed, result = run_train(fresh(tiny_llama), examples, cfg, tmp_path / "second", resume_from=last)
    assert result.resumed_from == str(last) and result.steps == 9
    assert [h["step"] for h in result.history] == [2, 4, 6, 8, 9]  # history carried over from the first run
    for (k, a), b in zip(weights(uninterrupted).items(), weights(resumed).values()):
        assert torch.equal(a, b), k


def test_checkpoints_are_atomic_and_pruned(tiny_llama, examples, tmp_path):
    run_train(fresh(tiny_llama), examples, train_cfg(steps=8, save_every=2, keep_last=2), tmp_path)
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["step-0000004", "step-0000006"]  # the last two; no temp folders; none at the final step
    assert (tmp_path / "state" / "step-0000006" / "trainer_state.json").is_file()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_llama, examples, tmp_path):
    calls = {"n": 0}

    def flaky(model, batch, step):
        calls["n"] += 1
        out = causal_lm_loss(model, batch, step)
        if calls["n"] == 5:
            return LossOutput(out.loss * float("nan"), out.num_tokens)
        return out

    model = fresh(tiny_llama)
    with pytest.raises(TrainingDiverged) as err:
        run_train(model, examples, train_cfg(steps=8, save_every=2), tmp_path, loss_fn=flaky)
    msg = str(err.value)
    assert "became NaN or infinite at step 5" in msg
    assert "step-0000004" in msg and "Lower train.lr" in msg
    assert (tmp_path / "state" / "step-0000004" / "trainer_state.json").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied


def test_resume_refuses_a_checkpoint_of_another_length(tiny_llama, examples, tmp_path):
    from runner.errors import ConfigError

    run_train(fresh(tiny_llama), examples, train_cfg(steps=4, save_every=2), tmp_path / "a")
    with pytest.raises(ConfigError, match="resume needs the same config"):
        run_train(fresh(tiny_llama), examples, train_cfg(steps=6), tmp_path / "b",
                  resume_from=tmp_path / "a" / "state" / "step-0000002")


def test_too_little_data_for_one_batch_is_a_config_error(tiny_llama, examples, tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="needs at least 16 examples"):
        run_train(fresh(tiny_llama), examples[:10], train_cfg(batch_size=16), tmp_path)
