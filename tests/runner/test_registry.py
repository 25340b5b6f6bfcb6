import pytest

from runner import registry
from runner.errors import ConfigError


@pytest.fixture
def clean_kind():
    registry.load_builtins()  # before clearing: a later lookup would register them again
    saved = dict(registry._REGISTRY["merge_method"])
    registry._REGISTRY["merge_method"].clear()
    yield "merge_method"
    registry._REGISTRY["merge_method"].clear()
    registry._REGISTRY["merge_method"].update(saved)


def test_register_and_get(clean_kind):
    @registry.register(clean_kind, "linear", aliases=("avg",))
    def linear(tensors, base, weights=None):
        return sum(tensors)

    assert registry.get(clean_kind, "linear") is linear
    assert registry.get(clean_kind, "avg") is linear
    assert registry.names(clean_kind) == ["avg", "linear"]


def test_default_name_is_function_name(clean_kind):
    @registry.register(clean_kind)
    def slerp(tensors, base):
        return tensors[0]

    assert registry.get(clean_kind, "slerp") is slerp


def test_unknown_name_lists_valid_names_and_closest(clean_kind):
    for name in ("linear", "slerp", "ties"):
        registry.register(clean_kind, name)(lambda tensors, base: None)
    with pytest.raises(ConfigError) as err:
        registry.get(clean_kind, "slurp", key="merge.method")
    msg = str(err.value)
    assert "merge.method: unknown merge_method 'slurp'" in msg
    assert "Did you mean 'slerp'?" in msg
    assert "Valid names: linear, slerp, ties" in msg


def test_unknown_name_without_close_match_has_no_suggestion(clean_kind):
    registry.register(clean_kind, "linear")(lambda tensors, base: None)
    with pytest.raises(ConfigError) as err:
        registry.get(clean_kind, "zzzz")
    assert "Did you mean" not in str(err.value)


def test_duplicate_registration_is_refused(clean_kind):
    registry.register(clean_kind, "linear")(lambda tensors, base: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(clean_kind, "linear")(lambda tensors, base: 1)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown registry kind"):
        registry.register("kd_losses", "fkl")
    with pytest.raises(ValueError, match="kinds are"):
        registry.names("nope")


def test_all_design_kinds_exist():
    assert set(registry.KINDS) == {"recipe", "kd_loss", "token_selector", "merge_method", "quantizer",
                                   "bit_allocator", "noise_model", "model_source", "data_source", "task_dir",
                                   "checkpoint_metric"}


def test_check_params_binds_config_keys_to_the_signature():
    def akl(student_logits, teacher_logits, mask, labels=None, *, mu=0.5):
        return 0

    assert registry.check_params(akl, {"mu": 0.6}, key="loss", skip=4) == []
    problems = registry.check_params(akl, {"muu": 0.6}, key="loss", skip=4)
    assert problems == ["loss.muu: unknown parameter. Did you mean 'mu'? Allowed: mu"]
    # the leading, caller-supplied arguments are not config keys
    assert registry.check_params(akl, {"mask": 1}, key="loss", skip=4)[0].startswith("loss.mask: unknown")


def test_check_params_reports_missing_required_and_accepts_var_kwargs():
    def ties(tensors, base, *, density, weights=None):
        return 0

    assert registry.check_params(ties, {}, key="merge", skip=2) == ["merge.density: required parameter is missing"]

    def anything(tensors, base, **params):
        return 0

    assert registry.check_params(anything, {"whatever": 1}, key="merge", skip=2) == []


def test_the_core_imports_no_recipe_no_world_and_not_the_pipeline():
    """runner/*.py never imports `recipes`, the toy world or (but for the entry points) the pipeline:
    they plug in through the registry, and the pipeline calls the job function, not the other way."""
    import ast

    from tests.conftest import REPO

    entry_points = {"cli.py", "check.py", "pipeline.py", "report.py", "effects.py"}
    for path in sorted((REPO / "runner").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m == "recipes" or m.startswith(("recipes.", "runner.toy")) for m in imported), path.name
        if path.name not in entry_points:
            assert not any(m.startswith("runner.pipeline") for m in imported), path.name
