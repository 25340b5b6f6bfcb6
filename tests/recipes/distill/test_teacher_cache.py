"""The teacher top-k cache: storage, the bucketed divergence, and reuse across runs of a sweep."""

import math

import numpy as np
import pytest
import torch

from recipes.distill import teacher_cache as tc
from recipes.distill.losses import loca_calibrate
from recipes.distill.objective import KDObjective
from runner import registry
from runner.config import DataConfig
from runner.data import build_dataset, collate
from runner.errors import ConfigError
from runner.run import run, validate


@pytest.mark.parametrize("vocab,bits", [(2, 1), (657, 10), (1024, 10), (1025, 11), (128256, 17), (151936, 18)])
def test_ids_take_the_fewest_bits_and_round_trip(vocab, bits):
    assert tc.id_bits(vocab) == bits
    ids = np.random.default_rng(0).integers(0, vocab, size=(37, 64))
    ids[0] = vocab - 1  # the largest id fits
    packed = tc.pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (37, math.ceil(64 * bits / 8))
    assert np.array_equal(tc.unpack_ids(packed, 64, bits), ids)


def test_storage_per_token_at_a_real_vocabulary():
    # 64 ids of 18 bits (144 bytes) and 66 half-precision log-probs (132 bytes): under the 300 target
    assert tc.CacheSpec(64, 1.0, 151936).bytes_per_token() == 276
    assert tc.CacheSpec(64, 1.0, 657).bytes_per_token() == 80 + 132


def test_buckets_by_hand():
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]] * 2)
    top = torch.tensor([[0, 1], [0, 1]])
    labels = torch.tensor([3, 1])  # outside the top-2, inside it
    got = tc.bucket_logprobs(p.log(), top, labels).exp()
    assert torch.allclose(got[0], torch.tensor([0.4, 0.3, 0.1, 0.2]))  # rest = 0.15 + 0.05
    assert torch.allclose(got[1], torch.tensor([0.4, 0.3, 0.0, 0.3]))  # the label's mass is in the top-2
    assert tc.label_bucket(top, labels).tolist() == [2, 1]


def test_loca_on_buckets_is_loca_then_buckets():
    """LoCa scales every non-label token alike, so calibrating the buckets equals bucketing the calibrated teacher."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(50, 40, generator=g).mul(2).log_softmax(-1)
    labels = torch.randint(0, 40, (50,), generator=g)
    top = logp.topk(6).indices
    full_then_bucket = tc.bucket_logprobs(loca_calibrate(logp, labels, 0.8), top, labels)
    bucket_then_loca = loca_calibrate(tc.bucket_logprobs(logp, top, labels), tc.label_bucket(top, labels), 0.8, tokens=7)
    assert torch.allclose(full_then_bucket.exp(), bucket_then_loca.exp(), atol=1e-6)


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    return build_dataset(DataConfig(source="toy", format="instruct", num_examples=12, max_length=48, seed=0),
                         toy_tokenizer)


@pytest.fixture(scope="module")
def built(pair, examples, tmp_path_factory):
    """Two entries of the tiny teacher on `examples`: k = 8 and k = the whole vocabulary."""
    _, teacher, tok = pair
    folders = {}
    for k in (8, len(tok)):
        folders[k] = tmp_path_factory.mktemp("tcache") / f"k{k}"
        tc.build(folders[k], teacher, examples, tc.CacheSpec(k, 1.0, len(tok)), tok.pad_token_id, batch_size=5,
                 chunk_size=13)
    return {k: tc.TeacherCache(f) for k, f in folders.items()}


def batch_of(examples, rows, pad_id):
    batch = collate([examples[i] for i in rows], pad_id)
    batch["index"] = torch.tensor(rows)
    return batch


def test_entry_holds_every_response_token_and_the_teachers_top_k(pair, examples, built):
    _, teacher, tok = pair
    cache = built[8]
    rows = [5, 0, 3]  # any order: a shuffled batch
    ids, logp = cache.rows(torch.tensor(rows))
    batch = batch_of(examples, rows, tok.pad_token_id)
    mask = batch["labels"][:, 1:] != -100
    assert ids.shape == (int(mask.sum()), 8) and logp.shape == (int(mask.sum()), 10)
    with torch.no_grad():
        full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    full = full[:, : len(tok)].log_softmax(-1)
    assert torch.equal(ids, full.topk(8).indices)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(logp)), atol=3e-3)  # fp16 values still sum to 1
    assert cache.meta["tokens"] == int(sum((torch.tensor(e["labels"][1:]) != -100).sum() for e in examples))


@pytest.mark.parametrize("name,params,extra", [
    ("fkl", {}, {}),
    ("rkl", {}, {"temperature": 1.0}),
    ("jsd", {"beta": 0.5}, {}),
    ("tvd", {}, {}),
    ("akl", {"mu": 0.5}, {"kd_ratio": 0.7}),
])
def test_cached_loss_against_the_live_teacher(pair, examples, built, name, params, extra):
    """The whole vocabulary cached gives the live loss (up to fp16 storage); top-8 gives at most it."""
    student, teacher, tok = pair
    batch = batch_of(examples, [2, 7, 4, 9], tok.pad_token_id)
    loss = registry.get("kd_loss", name)
    live = KDObjective(loss, params, vocab_size=len(tok), **extra)(student, teacher, batch).loss
    every = KDObjective(loss, params, vocab_size=len(tok), cache=built[len(tok)], **extra)(student, None, batch).loss
    top8 = KDObjective(loss, params, vocab_size=len(tok), cache=built[8], **extra)(student, None, batch)
    assert every.item() == pytest.approx(live.item(), rel=2e-3)
    if name != "akl":  # f-divergences shrink under coarsening; AKL's weights are not one
        assert top8.loss.item() <= live.item() + 1e-6
    top8.loss.backward()  # gradients reach the student
    assert all(p.grad is not None for p in student.parameters())
    student.zero_grad()


def test_chunked_and_whole_cached_losses_agree(pair, examples, built):
    student, _, tok = pair
    batch = batch_of(examples, [1, 6, 11], tok.pad_token_id)
    kwargs = dict(vocab_size=len(tok), cache=built[8], loca_alpha=0.9, kd_ratio=0.5)
    naive = KDObjective(registry.get("kd_loss", "srkl"), {"skew_alpha": 0.1}, chunk_size=0, **kwargs)
    chunked = KDObjective(registry.get("kd_loss", "srkl"), {"skew_alpha": 0.1}, chunk_size=5, **kwargs)
    assert naive(student, None, batch).loss.item() == pytest.approx(chunked(student, None, batch).loss.item(), abs=1e-5)


def test_building_shows_one_bar_over_the_rows(pair, examples, tmp_path):
    from runner.progress import recorded

    _, teacher, tok = pair
    with recorded() as bars:
        tc.build(tmp_path / "k4", teacher, examples, tc.CacheSpec(4, 1.0, len(tok)), tok.pad_token_id, batch_size=5)
    assert [(b.description, b.total, b.completed) for b in bars] == [("teacher top-4", 12, 12)]


def test_a_batch_that_does_not_match_the_entry_is_refused(pair, examples, built, toy_tokenizer):
    student, _, tok = pair
    other = build_dataset(DataConfig(source="toy", format="thinking", num_examples=3, max_length=48, seed=5), toy_tokenizer)
    batch = batch_of(other, [0, 1, 2], tok.pad_token_id)
    with pytest.raises(RuntimeError, match="does not belong to this data"):
        KDObjective(registry.get("kd_loss", "fkl"), vocab_size=len(tok), cache=built[8])(student, None, batch)


def test_the_key_follows_every_input(examples):
    spec = tc.CacheSpec(64, 1.0, 657)
    data = tc.data_fingerprint(examples)
    base = tc.cache_key(spec, "teacher-a", data, {"dtype": "float32"})
    changed = [
        tc.cache_key(tc.CacheSpec(32, 1.0, 657), "teacher-a", data, {"dtype": "float32"}),
        tc.cache_key(tc.CacheSpec(64, 2.0, 657), "teacher-a", data, {"dtype": "float32"}),
        tc.cache_key(spec, "teacher-b", data, {"dtype": "float32"}),
        tc.cache_key(spec, "teacher-a", tc.data_fingerprint(examples[1:]), {"dtype": "float32"}),
        tc.cache_key(spec, "teacher-a", data, {"dtype": "bfloat16"}),
    ]
    assert len({base, *changed}) == 6
    edited = [dict(e) for e in examples]
    edited[3] = {"input_ids": edited[3]["input_ids"], "labels": [-100] * len(edited[3]["labels"])}
    assert tc.data_fingerprint(edited) != data  # the loss mask is part of the data


CACHED_TINY = ["train.steps=4", "train.batch_size=8", "train.save_every=0", "data.num_examples=200", "eval=none"]


def test_a_sweep_computes_the_teacher_once_and_never_reads_a_stale_entry(compose, tmp_path, tiny_llama, monkeypatch):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_llama, teacher)
    where = tmp_path / "topk"
    common = [*CACHED_TINY, f"teacher.path={teacher}", f"loss.teacher_cache={where}", "loss.teacher_cache_k=16"]
    first = run(compose(["recipe=fkl_distill", *common]), tmp_path / "fkl")
    loads = []
    import runner.recipe

    original = runner.recipe.RunContext.load_model
    monkeypatch.setattr(runner.recipe.RunContext, "load_model",
                        lambda self, role, **kw: loads.append(role) or original(self, role, **kw))
    second = run(compose(["recipe=rkl_distill", *common]), tmp_path / "rkl")
    assert first["distill"]["teacher_cache"]["built"] and not second["distill"]["teacher_cache"]["built"]
    assert first["distill"]["teacher_cache"]["folder"] == second["distill"]["teacher_cache"]["folder"]
    assert loads == ["student"]  # the second run never loads the teacher
    assert first["distill"]["teacher_cache"]["bytes_per_token"] == math.ceil(16 * 10 / 8) + 2 * 18

    # another teacher (same path, new weights): a new entry, never the stale one
    from safetensors.torch import load_file, save_file

    weights = load_file(teacher / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, teacher / "model.safetensors", metadata={"format": "pt"})
    third = run(compose(["recipe=fkl_distill", *common]), tmp_path / "fkl2")
    assert third["distill"]["teacher_cache"]["built"]
    assert len(list(where.iterdir())) == 2


def test_auto_runs_gopd_live(compose, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="runner")
    results = run(compose(["recipe=gopd_distill", *CACHED_TINY, "train.steps=2", "onpolicy.max_new_tokens=4",
                           "loss.teacher_cache=auto"]), tmp_path / "gopd")
    assert "teacher_cache" not in results["distill"]
    assert "teacher cache: not used (G-OPD trains only on student rollouts" in caplog.text


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=gopd_distill", "loss.teacher_cache=/tmp/somewhere"], "loss.teacher_cache: a folder is given, but G-OPD"),
    (["recipe=trra_distill", "loss.teacher_cache=/tmp/somewhere"], "loss.teacher_cache: a folder is given, but TrRa"),
    (["recipe=fkl_distill", "loss.teacher_cache=auto", "loss.topk=80"], "loss.topk: 80 exceeds loss.teacher_cache_k=64"),
    (["recipe=fkl_distill", "loss.teacher_cache_k=0"], "loss.teacher_cache_k: 0 is out of range"),
])
def test_teacher_cache_config_errors(compose, overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_a_file_is_not_a_cache_folder(compose, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError) as err:
        validate(compose(["recipe=fkl_distill", f"loss.teacher_cache={path}"]))
    assert any("is a file; give a folder" in p for p in err.value.problems)


def test_k_beyond_the_vocabulary_is_refused_before_weights_load(compose, tmp_path):
    with pytest.raises(ConfigError, match="loss.teacher_cache_k: 100000 exceeds the vocabulary"):
        run(compose(["recipe=fkl_distill", *CACHED_TINY, "loss.teacher_cache=auto", "loss.teacher_cache_k=100000"]),
            tmp_path / "run")


def test_a_named_folder_needs_a_local_teacher(compose, tmp_path, monkeypatch):
    """A hub teacher has no files to fingerprint: a named cache folder is refused before any weights load."""
    from recipes.distill import Distill

    monkeypatch.setattr("recipes.distill.resolve_model_path", lambda spec: "org/remote-teacher")
    cfg = compose(["recipe=fkl_distill", f"loss.teacher_cache={tmp_path / 'topk'}"])

    class Ctx:
        import logging

        log = logging.getLogger("test")

    loss, onpolicy = Distill.blocks["loss"](teacher_cache=str(tmp_path / "topk")), Distill.blocks["onpolicy"]()
    with pytest.raises(ConfigError, match="loss.teacher_cache: the teacher 'toy-teacher' is not a local folder"):
        Distill()._use_teacher_cache(cfg, loss, onpolicy, 657, Ctx)
    assert not Distill()._use_teacher_cache(cfg, Distill.blocks["loss"](teacher_cache="auto"), onpolicy, 657, Ctx)
