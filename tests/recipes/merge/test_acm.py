"""ACM (recipes/merge/acm.py): the histogram NMI estimator by hand and against its statistics, the
per-layer coefficient maps, the engine's per-layer task-vector scaling, config errors, and an
end-to-end run of acm_ta_merge on tiny models.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from recipes.merge import acm, methods
from recipes.merge.engine import Selection, merge_models
from runner import registry
from runner.models import load_model
from runner.run import run, validate
from tests.conftest import make_tiny_model, problems_of


@pytest.fixture(scope="module")
def trio(tmp_path_factory, toy_tokenizer):
    """A base and two 'fine-tuned' tiny llamas (2 decoder layers each)."""
    root = tmp_path_factory.mktemp("acm-models")
    return [make_tiny_model(root / f"m{seed}", toy_tokenizer, "llama", seed) for seed in (1, 2, 3)]


def tensors_of(folder):
    return load_file(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------
# The estimator


def test_nmi_of_a_tiny_discrete_case_by_hand():
    # 2 bins over [0, 1]: x = (0, 0, 1, 1), y = (0, 0, 0, 1); joint cells (0,0): 1/2, (1,0): 1/4, (1,1): 1/4
    # p_x = (1/2, 1/2), p_y = (3/4, 1/4)
    # I = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2 = 3/2 ln 2 - 3/4 ln 3; H_x = ln 2; H_y = 2 ln 2 - 3/4 ln 3
    mi = 1.5 * math.log(2) - 0.75 * math.log(3)
    hx, hy = math.log(2), 2 * math.log(2) - 0.75 * math.log(3)
    expected = mi / math.sqrt(hx * hy)
    assert expected == pytest.approx(0.345592, abs=1e-6)
    x, y = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert acm.histogram_nmi(x, y, bins=2) == pytest.approx(expected, abs=1e-12)
    # the same pairs scaled and shifted together fall in the same bins: the joint standardisation is implicit
    assert acm.histogram_nmi(3 * x - 7, 3 * y - 7, bins=2) == pytest.approx(expected, abs=1e-12)
    assert acm.nmi_from_counts(torch.tensor([[2, 0], [1, 1]])) == pytest.approx(expected, abs=1e-12)


def test_nmi_of_a_three_bin_case_by_hand():
    # values 0, 1, 2 on 3 bins; y = x except one (2 -> 1): joint (0,0) 2/6, (1,1) 2/6, (2,2) 1/6, (2,1) 1/6
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    h_x = math.log(3)  # uniform
    h_y = -(2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6) + 1 / 6 * math.log(1 / 6))
    mi = (2 / 6 * math.log((2 / 6) / (2 / 6 * 2 / 6)) + 2 / 6 * math.log((2 / 6) / (2 / 6 * 3 / 6))
          + 1 / 6 * math.log((1 / 6) / (2 / 6 * 1 / 6)) + 1 / 6 * math.log((1 / 6) / (2 / 6 * 3 / 6)))
    assert acm.histogram_nmi(x, y, bins=3) == pytest.approx(mi / math.sqrt(h_x * h_y), abs=1e-12)


def test_identical_activations_give_nmi_one_and_raw_lambda_zero():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    assert acm.histogram_nmi(x, x.clone()) == 1.0
    assert acm.histogram_nmi(torch.full((10,), 2.5), torch.full((10,), 2.5)) == 1.0  # one value: identical
    assert acm.ratios([1.0, 1.0, 1.0], "raw") == [0.0, 0.0, 0.0]


def test_a_constant_side_carries_no_information():
    assert acm.histogram_nmi(torch.zeros(100), torch.linspace(-1, 1, 100)) == 0.0


def test_independent_gaussians_give_nmi_near_zero_within_the_estimators_bias():
    """For independent X, Y the plug-in MI on a B x B histogram has 2 N I ~ chi^2 with at most (B-1)^2 degrees
    of freedom (the G-test), so I < ((B-1)^2 + 6 sqrt(2 (B-1)^2)) / (2N) but for 6-sigma luck; dividing by
    sqrt(H_x H_y) bounds the NMI. With B = 64 and N = 2^18 that is about 0.003."""
    g = torch.Generator().manual_seed(0)
    n, bins = 2 ** 18, 64
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    counts = acm.joint_counts(x, y, lo, hi, bins).double()
    p = counts / n
    px, py = p.sum(1), p.sum(0)
    hx, hy = -float((px[px > 0] * px[px > 0].log()).sum()), -float((py[py > 0] * py[py > 0].log()).sum())
    dof = (bins - 1) ** 2
    bound = (dof + 6 * math.sqrt(2 * dof)) / (2 * n) / math.sqrt(hx * hy)
    assert bound < 0.004
    assert 0 <= acm.histogram_nmi(x, y, bins) < bound
    # the bound is tight enough to see a weak dependence (rho 0.3: I = -ln(1 - 0.09) / 2 = 0.047 nats)
    z = 0.3 * x + math.sqrt(1 - 0.09) * y
    assert acm.histogram_nmi(x, z, bins) > 3 * bound


def test_layer_nmi_hooks_the_decoder_layer_outputs_and_streams_batches_exactly(trio, toy_tokenizer):
    base, _ = load_model({"path": str(trio[0])})
    tuned, _ = load_model({"path": str(trio[1])})
    rows = torch.randint(3, len(toy_tokenizer), (6, 24), generator=torch.Generator().manual_seed(0))
    outs_b, outs_t = acm._layer_outputs(base, rows), acm._layer_outputs(tuned, rows)
    with torch.no_grad():
        hs = base(input_ids=rows, output_hidden_states=True).hidden_states
    # hidden_states[l + 1] is layer l's output, except the last, which HF returns after the final norm
    assert torch.equal(outs_b[0], hs[1].flatten())
    with torch.no_grad():
        assert torch.allclose(base.model.norm(outs_b[1].view(hs[2].shape)), hs[2])
    # two passes over batches of 4 and 2 rows fill the same histograms as the whole set at once
    streamed = acm.layer_nmi(base, tuned, rows, batch_size=4, bins=16)
    whole = [acm.histogram_nmi(b, t, bins=16) for b, t in zip(outs_b, outs_t)]
    assert streamed == pytest.approx(whole, abs=1e-12)
    assert acm.layer_nmi(base, base, rows, batch_size=4) == [1.0, 1.0]  # identical models


# --------------------------------------------------------------------------------------------
# The coefficient maps


def test_mean_preserving_map_averages_to_lambda():
    nmi = [0.9, 0.75, 0.4, 0.62, 0.1]
    r = acm.ratios(nmi, "mean")
    c = [1 - n for n in nmi]
    assert r == pytest.approx([ci / (sum(c) / len(c)) for ci in c], abs=1e-12)
    assert sum(r) / len(r) == pytest.approx(1.0, abs=1e-12)  # lambda_l = lam * r averages to lam
    assert r[0] < r[1] < r[3] < r[2] < r[4]  # high NMI (redundant layer), small coefficient
    assert acm.ratios(nmi, "raw") == pytest.approx(c, abs=1e-12)


@pytest.mark.parametrize("value", [0.1, 0.3, 0.77, 1.0])
def test_equal_nmi_across_layers_gives_the_global_lambda_exactly(value):
    assert acm.ratios([value] * 7, "mean") == [1.0] * 7
    assert acm.ratios([value] * 3, "raw") == [1.0 - value] * 3


def test_unknown_map_is_an_error():
    with pytest.raises(ValueError, match="mapping 'softmax' is not one of mean, raw"):
        acm.ratios([0.5], "softmax")


# --------------------------------------------------------------------------------------------
# The engine's per-layer scaling


def merge(trio, out, method, params, scales=None):
    base, *models = trio
    return merge_models(models, base, registry.get("merge_method", method), params, out, selection=Selection(),
                        outside=models[0], donor=models[-1], dtype=None, max_shard_size="2GB", seed=0,
                        runtime=registry.contract("merge_method", method).runtime, task_vector_scales=scales)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weights": [0.5, 0.5], "lam": 0.7}),
    ("ties", {"density": 0.2, "weights": [0.5, 0.5]}),
])
def test_equal_nmi_reduces_acm_to_the_plain_merge_exactly(trio, tmp_path, method, params):
    factors = acm.ratios([0.42, 0.42], "mean")
    merge(trio, tmp_path / "plain", method, params)
    merge(trio, tmp_path / "acm", method, params, scales={layer: [factors[layer]] * 2 for layer in (0, 1)})
    plain, scaled = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "acm")
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


def test_per_layer_per_model_coefficients_scale_each_task_vector(trio, tmp_path):
    # TA: layer l gets base + lam * sum_i w_i r_il delta_i; tensors outside the layers keep lam
    scales = {0: [0.25, 1.5], 1: [1.75, 0.0]}
    merge(trio, tmp_path / "acm", "task_arithmetic", {"weights": [0.5, 0.5], "lam": 0.7}, scales)
    out = tensors_of(tmp_path / "acm")
    base, a, b = (tensors_of(p) for p in trio)
    for k in out:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        ra, rb = scales[layer] if layer is not None else (1.0, 1.0)
        expected = base[k] + 0.7 * (0.5 * ra * (a[k] - base[k]) + 0.5 * rb * (b[k] - base[k]))
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6, msg=k)
    assert torch.equal(out["model.embed_tokens.weight"],
                       methods.task_arithmetic([a["model.embed_tokens.weight"], b["model.embed_tokens.weight"]],
                                               base["model.embed_tokens.weight"], weights=[0.5, 0.5], lam=0.7))


def test_one_factor_per_layer_is_lambda_l_times_the_merge(trio, tmp_path):
    # the spec's form theta_l = theta_base + lambda_l merge(tau_l): TIES with every task vector of layer l
    # scaled by s equals TIES with lam * s there (trimming and sign election do not see a common positive scale)
    s = 0.375
    merge(trio, tmp_path / "acm", "ties", {"density": 0.2, "weights": [0.5, 0.5]}, {0: [s, s], 1: [s, s]})
    merge(trio, tmp_path / "lam", "ties", {"density": 0.2, "weights": [0.5, 0.5], "lam": s})
    scaled, by_lam = tensors_of(tmp_path / "acm"), tensors_of(tmp_path / "lam")
    for k in scaled:
        if k.startswith("model.layers."):
            torch.testing.assert_close(scaled[k], by_lam[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("recipe", ["acm_ta_merge", "acm_ties_merge"])
def test_named_acm_recipes_are_valid_and_keep_their_parents_settings(compose, recipe):
    cfg = compose([f"recipe={recipe}"])
    assert type(validate(cfg)).__name__ == "Merge"
    assert cfg.merge.acm.enabled is True
    plain = compose([f"recipe={recipe.removeprefix('acm_')}"])
    assert {k: v for k, v in cfg.merge.items() if k != "acm"} == dict(plain.merge)


@pytest.mark.parametrize("overrides,expected", [
    ("recipe=mi_merge merge.acm.enabled=true",
     "merge.acm.enabled: ACM sets per-layer coefficients of task vectors; merge.method=interpolate merges none. "
     "Use one of dare_linear, dare_ties, task_arithmetic, ties"),
    ("recipe=linear_merge merge.acm.enabled=true", "merge.method=linear merges none"),
    ("recipe=acm_ta_merge merge.acm.map=softmax", "merge.acm.map: 'softmax' is not allowed"),
    ("recipe=acm_ta_merge merge.acm.bins=1", "merge.acm.bins: 1 is out of range; it must be >= 2"),
    ("recipe=acm_ta_merge merge.acm.samples=0", "merge.acm.samples: 0 is out of range; it must be >= 1"),
    ("recipe=acm_ta_merge +merge.acm.bin=32", "merge.acm.bin"),
    ("recipe=acm_ties_merge data.source=jsonl data.path=/no/such/file.jsonl", "data.path"),
])
def test_acm_config_errors_name_the_key(compose, overrides, expected):
    found = problems_of(compose(overrides.split()))
    assert any(expected in p for p in found), found


def test_data_is_checked_only_when_acm_reads_it(compose):
    validate(compose(["recipe=ta_merge", "data.source=jsonl", "data.path=/no/such/file.jsonl"]))


# --------------------------------------------------------------------------------------------
# End to end (tiny models stand in for the toy zoo to stay fast)


def test_acm_ta_merge_recipe_end_to_end(compose, trio, tmp_path):
    base, a, b = trio
    cfg = compose(["recipe=acm_ta_merge", f"base.path={base}", f"models=[{{path: {a}}},{{path: {b}}}]",
                   "data.num_examples=200", "merge.acm.samples=6", "merge.acm.seqlen=32", "merge.acm.batch_size=4",
                   "eval=toy_quick", "eval.limit=2", "eval.max_gen_toks=8", f"output_root={tmp_path}"])
    results = run(cfg, tmp_path / "run")
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["recipe"] == "acm_ta_merge"
    assert "toy_arith/exact_match" in results["metrics"]
    record = results["merge"]["acm"]
    assert record["map"] == "mean" and record["rows"] == 6 and record["seqlen"] == 32
    assert set(record["nmi"]) == set(record["lam"]) == {"models[0]", "models[1]"}
    for name in record["nmi"]:
        nmi, lam = record["nmi"][name], record["lam"][name]
        assert len(nmi) == len(lam) == 2 and all(0 <= v <= 1 for v in nmi)
        assert lam == pytest.approx([0.7 * r for r in acm.ratios(nmi, "mean")], abs=1e-12)
        assert sum(lam) / len(lam) == pytest.approx(0.7, abs=1e-12)
    out, tb, ta, tt = (tensors_of(p) for p in (tmp_path / "run" / "checkpoint", base, a, b))
    for k in out:
        if k.startswith("model.layers."):
            layer = int(k.split(".")[2])
            la, lb = record["lam"]["models[0]"][layer], record["lam"]["models[1]"][layer]
            expected = tb[k] + 0.5 * la * (ta[k] - tb[k]) + 0.5 * lb * (tt[k] - tb[k])
            torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6, msg=k)
        else:  # embeddings and the final norm take the global lam
            assert torch.equal(out[k], methods.task_arithmetic([ta[k], tt[k]], tb[k], weights=[0.5, 0.5], lam=0.7)), k
