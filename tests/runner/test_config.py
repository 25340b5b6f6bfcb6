"""Config validation: every user error is one clear message naming the key, before any work."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from runner.errors import ConfigError
from runner.run import validate
from tests.conftest import problems_of


def test_default_config_is_valid(compose):
    recipe = validate(compose([]))
    assert type(recipe).__name__ == "SFT"


def test_unknown_recipe_lists_the_available_ones(compose):
    with pytest.raises(MissingConfigException) as err:
        compose(["recipe=sftt"])
    assert "Could not find 'recipe/sftt'" in str(err.value)
    assert "sft" in err.value.options


def test_misspelled_key_is_refused_while_composing(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.lrr=1e-4"])
    assert "lrr" in str(err.value.__cause__) and "TrainConfig" in str(err.value.__cause__)


def test_wrong_type_is_refused_while_composing(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.lr=fast"])
    cause = str(err.value.__cause__)
    assert "could not be converted to Float" in cause and "train.lr" in cause


@pytest.mark.parametrize("role", ["model", "teacher", "student", "base", "instruct", "thinking", "tuned_base",
                                  "reference"])
def test_a_model_option_that_does_not_exist_is_an_error_for_every_role(compose, role):
    from runner.compose import check_options, options

    key = "model" if role == "model" else f"model@{role}"
    assert "toy-teacher" in options("model") and "qwen3-0.6b-base" in options("model")
    assert check_options([f"{key}=toy-teacherr"]) == [
        f"{key}: no model option 'toy-teacherr' (conf/model/). Did you mean 'toy-teacher'? Options: "
        + ", ".join(options("model"))]
    assert check_options([f"{key}=toy-teacher"]) == [] and check_options([f"{key}=null"]) == []
    assert check_options([f"{key}=toy-base,toy-teacherr"])[0].startswith(f"{key}: no model option 'toy-teacherr'")
    # no option given: the recipe's own default; an option given: that model
    assert compose(["recipe=distill"]).teacher.path == "toy-teacher"
    assert compose([f"{key}=toy-base"])[role].path == "toy-base"


def test_the_other_options_and_roles_are_checked_too():
    from runner.compose import check_options

    assert check_options(["recipe=profitsft"])[0].startswith("recipe: no recipe option 'profitsft' (conf/recipe/). "
                                                              "Did you mean 'profit_sft'?")
    assert check_options(["eval=toy_quik"])[0].startswith("eval: no eval option 'toy_quik' (conf/eval/). Did you mean")
    assert check_options(["model@teachr=toy-base"])[0].startswith("model@teachr: 'teachr' is not a model role. "
                                                                   "Did you mean 'teacher'?")
    assert check_options(["recipe=sft", "train.lr=1", "hydra/launcher=joblib", "model=choice(toy-base)"]) == []
    # a parent config (its name starts with _) is not a recipe of its own
    assert check_options(["recipe=_merge_common"])[0].startswith("recipe: no recipe option '_merge_common'")


def test_a_role_the_recipe_leaves_empty_can_be_set(compose):
    cfg = compose(["recipe=sft", "teacher.path=toy-teacher", "teacher.dtype=float32"])
    assert cfg.teacher.path == "toy-teacher" and cfg.teacher.dtype == "float32"
    assert compose(["recipe=distill", "teacher.dtype=bfloat16"]).teacher.path == "toy-teacher"  # the recipe's, kept
    assert compose(["recipe=sft"]).teacher is None


def test_a_sweep_leaves_out_the_roles_a_recipe_does_not_take(compose):
    from runner.cli import leave_out_unused_roles

    cfg = compose(["recipe=instruct_ft", "base.path=toy-base"])
    assert leave_out_unused_roles(cfg) == ["base"] and cfg.base is None
    cfg = compose(["recipe=shadow_ft", "base.path=toy-base"])
    assert leave_out_unused_roles(cfg) == [] and cfg.base.path == "toy-base"
    cfg = compose(["recipe=ta_merge", "instruct.path=toy-instruct"])  # task arithmetic takes base and models
    assert leave_out_unused_roles(cfg) == ["instruct"]


@pytest.mark.parametrize("override,expected", [
    ("train.lr=-1", "train.lr: -1.0 is out of range; it must be > 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 is out of range; it must be >= 0 and <= 1"),
    ("train.batch_size=0", "train.batch_size: 0 is out of range; it must be >= 1"),
    ("train.lr_scheduler=cosin", "train.lr_scheduler: 'cosin' is not allowed. Did you mean 'cosine'?"),
    ("model.dtype=fp8", "model.dtype: 'fp8' is not allowed."),
    ("data.variation=2", "data.variation: 2.0 is out of range; it must be >= 0 and <= 1"),
    ("eval.limit=0", "eval.limit: 0 is out of range; it must be >= 1"),
    ("data.format=chat", "data.format: 'chat' is not allowed. Choose one of plain, instruct, thinking"),
    ("kind=sftt", "kind: unknown recipe 'sftt'. Did you mean 'sft'? Valid names: dera, distill, "),
    ("+typo=3", "typo: unknown top-level key."),
    ("+loss.mu=0.5", "loss: set, but recipe kind 'sft' does not read a 'loss' block"),
    ("model@teacher=toy-teacher", "teacher: set, but recipe kind 'sft' does not use it (it uses: model); remove it"),
    ("model.path=toy-bsae", "model.path: 'toy-bsae' is not a folder, a packaged model (smollm2-135m-instruct, "
                            "smollm2-135m-instruct-l10), a toy zoo name (toy-base"),
    ("model.path=./no/such/folder", "model.path: './no/such/folder' is not a folder"),
    ("data=jsonl", "data.path: missing; give the JSONL file to train on"),
    ("data=jsonl data.path=/no/such.jsonl", "data.path: file '/no/such.jsonl' not found"),
    ("train.resume=/no/such/run", "train.resume: '/no/such/run' is not a checkpoint folder"),
    ("plugins=[no_such_plugin_module]", "plugins: cannot import 'no_such_plugin_module'"),
])
def test_value_errors_name_the_key(compose, override, expected):
    found = problems_of(compose(override.split()))
    assert any(expected in p for p in found), found


def test_all_problems_are_reported_at_once(compose):
    found = problems_of(compose(["train.lr=-1", "train.batch_size=0", "+typo=1"]))
    assert len(found) == 3
    assert str(ConfigError(found)).startswith("invalid config (3 problems):\n  - ")


def test_missing_required_role(compose):
    cfg = compose([])
    cfg.model = None
    found = problems_of(cfg)
    assert found == ["model: recipe kind 'sft' needs a 'model' model; set model.path=<toy zoo name, folder or hub id>"]


def test_model_group_sets_a_role(compose):
    cfg = compose(["model=toy-instruct"])
    assert cfg.model.path == "toy-instruct" and cfg.model.dtype == "float32"
    assert compose(["model=qwen3-0.6b"]).model.path == "Qwen/Qwen3-0.6B"


def test_seed_flows_into_train_and_data(compose):
    cfg = compose(["seed=7"])
    assert cfg.train.seed == 7 and cfg.data.seed == 7


@pytest.mark.parametrize("override,key", [
    ("recipe=akl_distill loss.kd_ratio=abc", "kd_ratio"),
    ("recipe=shadow_ft graft.scale=big", "scale"),
    ("recipe=memristor_noise noise.redundancy_r=two", "redundancy_r"),
])
def test_a_wrongly_typed_method_key_is_one_clear_problem(compose, override, key):
    found = problems_of(compose(override.split()))
    assert len(found) == 1 and key in found[0], found
