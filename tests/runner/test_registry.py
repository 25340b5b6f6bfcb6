import pytest

from runner import registry
from runner.errors import ConfigError


@pytest.fixture
def clean_kind():
    registry.load_builtins()  # before clearing: a later lookup would register them again
    saved = {kind: (dict(registry._REGISTRY[kind]), dict(registry._CONTRACTS[kind])) for kind in ("merge_method", "kd_loss")}
    for kind in saved:
        registry._REGISTRY[kind].clear()
    yield "merge_method"
    for kind, (table, contracts) in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)
        registry._CONTRACTS[kind].clear()
        registry._CONTRACTS[kind].update(contracts)


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
                                   "bit_allocator", "quant_transform", "noise_model", "model_source", "data_source",
                                   "task_dir", "checkpoint_metric", "logger"}


def test_the_contract_binds_config_keys_to_the_signature(clean_kind):
    @registry.register("kd_loss", "akl", ranges={"mu": (0, 1, "open")})
    def akl(student_logits, teacher_logits, mask, labels=None, *, mu: float = 0.5):
        return 0

    assert registry.check_component("kd_loss", "akl", {"mu": 0.6}, key="loss") == []
    problems = registry.check_component("kd_loss", "akl", {"muu": 0.6}, key="loss")
    assert problems == ["loss.muu: unknown parameter. Did you mean 'mu'? Allowed: mu"]
    # the leading, caller-supplied arguments are not config keys
    assert registry.check_component("kd_loss", "akl", {"mask": 1}, key="loss")[0].startswith("loss.mask: unknown")
    assert registry.check_component("kd_loss", "akl", {"mu": 0}, key="loss") == [
        "loss.mu: 0 is out of range; it must be > 0 and <= 1"]
    assert registry.check_component("kd_loss", "akl", {"mu": "high"}, key="loss") == ["loss.mu: 'high' is not a number"]
    assert registry.check_component("kd_loss", "akl", {"mu": True}, key="loss") == ["loss.mu: True is not a number"]
    assert registry.contract("kd_loss", "akl").params["mu"].default == 0.5


def test_the_contract_reports_missing_required_and_accepts_var_kwargs(clean_kind):
    @registry.register(clean_kind, "ties")
    def ties(tensors, base, *, density: float, weights=None):
        return 0

    assert registry.check_component(clean_kind, "ties", {}, key="merge") == ["merge.density: required parameter is missing"]
    # a parameter the recipe supplies (noise-eval's swept one) is not missing
    assert registry.check_component(clean_kind, "ties", {}, key="merge", supplied={"density": "merge.sweep"}) == []
    assert registry.check_component(clean_kind, "ties", {}, key="merge", supplied={"densty": "merge.sweep"}) == [
        "merge.sweep: 'densty' is not a parameter of merge method 'ties'; choose one of density, weights"]

    @registry.register(clean_kind, "anything")
    def anything(tensors, base, **params):
        return 0

    assert registry.check_component(clean_kind, "anything", {"whatever": 1}, key="merge") == []


def test_the_contract_holds_choices_runtime_arguments_and_joint_rules(clean_kind):
    def both_or_neither(params, key):
        return [] if ("lo" in params) == ("hi" in params) else [f"{key}: set lo and hi together"]

    @registry.register(clean_kind, "clip", choices={"mode": ("soft", "hard")}, runtime=("generator",),
                       check=both_or_neither)
    def clip(tensors, base, *, mode="soft", lo=None, hi=None, generator=None):
        return 0

    c = registry.contract(clean_kind, "clip")
    assert set(c.params) == {"mode", "lo", "hi"} and c.runtime == ("generator",)
    assert registry.check_component(clean_kind, "clip", {"mode": "sof"}, key="merge") == [
        "merge.mode: 'sof' is not allowed. Did you mean 'soft'? Choose one of soft, hard"]
    assert registry.check_component(clean_kind, "clip", {"generator": 1}, key="merge") == [
        "merge.generator: supplied at run time, not by the config"]
    assert registry.check_component(clean_kind, "clip", {"lo": 0.1}, key="merge") == ["merge: set lo and hi together"]
    assert registry.check_component(clean_kind, "clip", {"lo": 0.1, "hi": 0.9}, key="merge") == []


def test_a_range_for_a_parameter_the_function_lacks_is_refused_at_registration(clean_kind):
    with pytest.raises(ValueError, match=r"ranges or choices for \['rho'\]"):
        registry.register(clean_kind, "bad", ranges={"rho": (0, 1)})(lambda tensors, base, *, density=0.5: 0)


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
