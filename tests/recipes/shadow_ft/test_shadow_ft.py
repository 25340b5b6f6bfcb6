"""Shadow-FT: graft arithmetic per tensor, LoRA grafts equal the dense sum, checks, and toy runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.merge.engine import Selection, merge_models
from recipes.shadow_ft import PROJECTIONS, graft
from runner.errors import ConfigError
from runner.progress import Record, recorded
from runner.run import run, validate
from runner.tensorio import TensorSource
from tests.conftest import REPO, make_tiny_model, problems_of


def tensors_of(folder):
    source = TensorSource(folder)
    return {k: source.get(k).float() for k in source.keys()}


def is_projection(key):
    return bool(set(PROJECTIONS) & set(key.split(".")))


@pytest.fixture(scope="module")
def trio(tmp_path_factory, toy_tokenizer):
    """base, tuned base and instruct: one architecture, different weights."""
    root = tmp_path_factory.mktemp("shadow")
    return {name: make_tiny_model(root / name, toy_tokenizer, "llama", seed)
            for name, seed in (("base", 1), ("tuned", 2), ("instruct", 3))}


def test_graft_method_by_hand():
    instruct, tuned, base = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -1.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(graft([instruct, tuned], base), torch.tensor([3.0, 1.0]))  # I + (T - B)
    assert torch.equal(graft([instruct, tuned], base, scale=0.5), torch.tensor([2.0, 1.5]))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_graft_recipe_touches_only_the_projections(compose, trio, tmp_path, scale):
    cfg = compose(["recipe=graft", f"base.path={trio['base']}", f"tuned_base.path={trio['tuned']}",
                   f"instruct.path={trio['instruct']}", f"graft.scale={scale}", "eval=none",
                   f"output_root={tmp_path}"])
    with recorded() as bars:
        results = run(cfg, tmp_path / "run")
    b, t, i = (tensors_of(trio[k]) for k in ("base", "tuned", "instruct"))
    out = tensors_of(tmp_path / "run" / "checkpoint")
    assert set(out) == set(i)
    assert bars == [Record("graft", len(i), len(i))]  # one step per tensor written
    grafted = [k for k in i if is_projection(k)]
    assert len(grafted) == 2 * 7  # two layers of q/k/v/o/gate/up/down
    for k in i:
        if is_projection(k):
            torch.testing.assert_close(out[k], i[k] + scale * (t[k] - b[k]), rtol=0, atol=1e-6)
        else:  # embeddings, norms, lm_head: Instruct's, bit for bit
            assert torch.equal(out[k], i[k]), k
    record = results["shadow_ft"]
    assert {k: v for k, v in record.items() if k != "relative_delta"} == {
        "tune": "none", "lora": False, "scale": scale, "grafted_tensors": 14, "instruct_tensors": len(i) - 14}
    norm = {name: sum(float(w[k].square().sum()) for k in grafted) for name, w in
            (("base", b), ("instruct", {k: i[k] - b[k] for k in i}), ("tuned_base", {k: t[k] - b[k] for k in t}))}
    assert record["relative_delta"] == pytest.approx({"instruct": (norm["instruct"] / norm["base"]) ** 0.5,
                                                      "tuned_base": (norm["tuned_base"] / norm["base"]) ** 0.5})
    config = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_lora_graft_equals_the_dense_sum(trio, tmp_path):
    """A LoRA-tuned base merged and grafted gives W_I + (alpha / r) B A on the adapted weights, and W_I elsewhere."""
    from runner.lora import LoraConfig, with_lora
    from runner.models import load_model, save_checkpoint

    model, tokenizer = load_model({"path": str(trio["base"]), "dtype": "float32"})
    lora = LoraConfig(enabled=True, rank=4, targets="q_proj,down_proj")
    peft_model = with_lora(model, lora)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            with torch.no_grad():  # peft starts B at zero; give both factors values
                module.lora_A["default"].weight.copy_(torch.randn(module.lora_A["default"].weight.shape, generator=g))
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g))
            key = name.replace("base_model.model.", "") + ".weight"
            factors[key] = (module.lora_B["default"].weight.clone(), module.lora_A["default"].weight.clone())
    assert len(factors) == 4  # q_proj and down_proj in two layers
    save_checkpoint(peft_model.merge_and_unload(), tokenizer, tmp_path / "tuned")

    merge_models([trio["instruct"], tmp_path / "tuned"], trio["base"], graft, {"scale": 1.0}, tmp_path / "out",
                 selection=Selection(contains=tuple(PROJECTIONS)), outside=trio["instruct"], donor=trio["instruct"],
                 dtype=None, max_shard_size="2GB", seed=0)
    i, out = tensors_of(trio["instruct"]), tensors_of(tmp_path / "out")
    scaling = 2 * lora.rank / lora.rank  # alpha defaults to 2 * rank
    for k in i:
        if k in factors:
            b_mat, a_mat = factors[k]
            torch.testing.assert_close(out[k], i[k] + scaling * b_mat @ a_mat, rtol=0, atol=1e-5)
        else:  # not adapted: the tuned base equals the base, so the graft adds exactly nothing
            assert torch.equal(out[k], i[k]), k


def test_a_projection_left_at_instruct_is_named_in_a_warning(compose, trio, tmp_path, caplog):
    cfg = compose(["recipe=graft", f"base.path={trio['base']}", f"tuned_base.path={trio['tuned']}",
                   f"instruct.path={trio['instruct']}", "graft.patterns=[q_proj,k_proj,v_proj,o_proj]", "eval=none",
                   f"output_root={tmp_path}"])
    with caplog.at_level("WARNING", logger="runner"):
        run(cfg, tmp_path / "run")
    [warning] = [r.getMessage() for r in caplog.records if "match no graft.patterns" in r.getMessage()]
    assert warning.startswith("6 projection tensors match no graft.patterns and stay Instruct's: ")
    assert "model.layers.0.mlp.down_proj.weight" in warning and "q_proj" not in warning


def test_fused_projections_are_grafted_as_the_reference_matches_them(tmp_path, toy_tokenizer):
    """Phi-3 stores fused qkv_proj and gate_up_proj tensors: the reference's substring rule grafts them
    (through v_proj and up_proj), as it does every other projection; norms and embeddings stay Instruct's."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from runner.models import save_checkpoint

    folders = {}
    for name, seed in (("base", 0), ("tuned", 1), ("instruct", 2)):
        torch.manual_seed(seed)
        config = Phi3Config(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, pad_token_id=toy_tokenizer.pad_token_id)
        folders[name] = save_checkpoint(Phi3ForCausalLM(config), toy_tokenizer, tmp_path / name)
    out = tmp_path / "out"
    merge_models([folders["instruct"], folders["tuned"]], folders["base"], graft, {"scale": 1.0}, out,
                 selection=Selection(contains=tuple(PROJECTIONS)), outside=folders["instruct"],
                 donor=folders["instruct"], dtype=None, max_shard_size="2GB", seed=0)
    b, t, i, o = (tensors_of(f) for f in (folders["base"], folders["tuned"], folders["instruct"], out))
    fused = [k for k in o if "qkv_proj" in k or "gate_up_proj" in k]
    assert len(fused) == 4  # two layers, qkv and gate_up each
    for k in o:
        expected = i[k] + (t[k] - b[k]) if "_proj" in k else i[k]
        assert torch.allclose(o[k], expected, atol=1e-6), k


def test_mismatched_checkpoints_fail_before_writing(trio, tmp_path, toy_tokenizer):
    wide = make_tiny_model(tmp_path / "wide", toy_tokenizer, "llama", 4, hidden=48)
    deep = make_tiny_model(tmp_path / "deep", toy_tokenizer, "llama", 4, layers=3)
    for other, expected in ((wide, "model.embed_tokens.weight: shape [657, 32] in"), (deep, "tensor names differ")):
        with pytest.raises(ConfigError) as err:
            merge_models([trio["instruct"], other], trio["base"], graft, {}, tmp_path / "out",
                         selection=Selection(contains=tuple(PROJECTIONS)), outside=trio["instruct"],
                         donor=trio["instruct"], dtype=None, max_shard_size="2GB", seed=0)
        assert any(expected in p for p in err.value.problems), err.value.problems
        assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("overrides,expected", [
    ("recipe=graft tuned_base=null", "tuned_base: graft.tune=none needs a 'tuned_base' model"),
    ("recipe=shadow_ft base=null", "base: graft.tune=base needs a 'base' model"),
    ("recipe=instruct_ft model@base=toy-base", "base: set, but graft.tune=instruct does not use it"),
    ("recipe=graft lora.enabled=true", "lora.enabled: graft.tune=none trains nothing"),
    ("recipe=shadow_ft graft.patterns=[]", "graft.patterns: [] must list module names"),
    ("recipe=shadow_ft graft.scale=-1", "graft.scale: -1.0 is out of range"),
    ("recipe=shadow_ft graft.tune=tuned", "graft.tune: 'tuned' is not allowed"),
    ("recipe=shadow_ft graft.max_shard_size=huge", "graft.max_shard_size: 'huge' is not a size"),
    ("recipe=shadow_ft +graft.patern=[q_proj]", "graft.patern: unknown key"),
    ("recipe=shadow_ft data.question_style=prose", "data.question_style: 'prose' is not allowed"),
])
def test_shadow_ft_config_errors(compose, overrides, expected):
    found = problems_of(compose(overrides.split()))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("recipe", ["shadow_ft", "instruct_ft", "shadow_ft_lora", "instruct_ft_lora", "graft"])
def test_named_recipes_are_valid(compose, recipe):
    assert type(validate(compose([f"recipe={recipe}"]))).__name__ == "ShadowFT"


TINY_TRAIN = ["train.steps=6", "train.batch_size=4", "train.save_every=0", "train.log_every=2",
              "data.num_examples=40", "eval=none"]


def test_shadow_ft_trains_base_and_grafts_its_delta(compose, trio, tmp_path):
    cfg = compose(["recipe=shadow_ft", f"base.path={trio['base']}", f"instruct.path={trio['instruct']}",
                   *TINY_TRAIN, f"output_root={tmp_path}"])
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["train"]["steps"] == 6
    b, i = tensors_of(trio["base"]), tensors_of(trio["instruct"])
    tuned, out = tensors_of(tmp_path / "run" / "tuned_base"), tensors_of(tmp_path / "run" / "checkpoint")
    assert any(not torch.equal(tuned[k], b[k]) for k in b)  # the base was trained
    for k in i:
        expected = i[k] + (tuned[k] - b[k]) if is_projection(k) else i[k]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_lora_recipes_make_low_rank_changes(compose, trio, tmp_path):
    for recipe, anchor in (("shadow_ft_lora", "instruct"), ("instruct_ft_lora", "instruct")):
        overrides = [f"recipe={recipe}", f"instruct.path={trio['instruct']}", *TINY_TRAIN, f"output_root={tmp_path}"]
        if recipe == "shadow_ft_lora":
            overrides.append(f"base.path={trio['base']}")
        results = run(compose(overrides), tmp_path / recipe)
        assert results["status"] == "completed" and results["shadow_ft"]["lora"] is True
        start, out = tensors_of(trio[anchor]), tensors_of(tmp_path / recipe / "checkpoint")
        changed = [k for k in start if not torch.allclose(out[k], start[k], atol=1e-7)]
        assert changed and all(is_projection(k) for k in changed), changed
        # each change is (alpha / r) B A with r = 8: rank at most 8 on these 32- and 64-wide matrices
        assert all(torch.linalg.matrix_rank(out[k] - start[k], atol=1e-5) <= 8 for k in changed)


GRAFT_MEMORY_SCRIPT = """
import sys
from pathlib import Path
from recipes.shadow_ft import PROJECTIONS, graft
from recipes.merge.engine import Selection, merge_models

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

root = Path(sys.argv[1])
before = peak_mb()
merge_models([root / "instruct", root / "tuned"], root / "base", graft, {}, root / "out",
             selection=Selection(contains=tuple(PROJECTIONS)), outside=root / "instruct", donor=root / "instruct",
             dtype=None, max_shard_size="4MB", seed=0)
print(peak_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_streamed_graft_holds_far_less_than_its_inputs(tmp_path, toy_tokenizer):
    """Three 16-layer checkpoints of ~41 MB each: the graft's peak memory stays near one output shard."""
    for name, seed in (("base", 1), ("tuned", 2), ("instruct", 3)):
        make_tiny_model(tmp_path / name, toy_tokenizer, "llama", seed, hidden=256, layers=16)
    inputs_mb = sum(f.stat().st_size for f in tmp_path.glob("*/model.safetensors")) / 2**20
    done = subprocess.run([sys.executable, "-c", GRAFT_MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          check=True, cwd=REPO)
    peak_mb = float(done.stdout.strip().splitlines()[-1])
    assert inputs_mb > 100
    print(f"graft peak above imports: {peak_mb:.1f} MB for {inputs_mb:.1f} MB of inputs")
    assert peak_mb < inputs_mb / 3, (peak_mb, inputs_mb)  # less than one of the three models
