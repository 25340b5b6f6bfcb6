"""Quantizers, bit allocators, the quantize recipe and its packed export."""

import json
import re

import pytest
import torch

from recipes.quantize import allocators as A
from recipes.quantize import quantizers as Q
from recipes.quantize.export import export_packed, load_packed
from runner import registry
from runner.models import decoder_linears, load_model
from runner.progress import Record, recorded
from runner.run import run
from tests.conftest import problems_of


def levels_per_group(w: torch.Tensor, group_size: int) -> int:
    return max(len(torch.unique(g)) for g in Q.groups_of(w, group_size).reshape(-1, Q.groups_of(w, group_size).shape[-1]))


# --- RTN -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_rtn_has_at_most_2_to_the_b_levels_per_group(bits, sym, group_size):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
    assert levels_per_group(Q.rtn(w, bits, group_size, sym=sym), group_size) <= 2**bits


def test_rtn_hand_computed_cases():
    # asymmetric, b=2: range [-1, 5] -> s = 2, z = round(0.5) = 0 (half to even), levels {0, 2, 4, 6}
    w = torch.tensor([[-1.0, 0.0, 2.0, 5.0]])
    assert torch.equal(Q.rtn(w, 2, -1), torch.tensor([[0.0, 0.0, 2.0, 4.0]]))
    # symmetric, b=2: s = absmax / 1.5 = 2, levels {-4, -2, 0, 2}: the top positive weight is clipped to 2
    w = torch.tensor([[-3.0, 0.0, 1.2, 3.0]])
    assert torch.equal(Q.rtn(w, 2, -1, sym=True), torch.tensor([[-4.0, 0.0, 2.0, 2.0]]))
    # an all-zero group stays zero
    assert torch.equal(Q.rtn(torch.zeros(2, 4), 3, 2), torch.zeros(2, 4))


def test_rtn_is_exact_on_weights_already_on_the_asymmetric_grid():
    bits, g = 3, 8
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (4, 3, g), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 2**bits - 1  # both ends of the grid are used in every group
    scale = torch.rand(4, 3, generator=gen) + 0.1
    zero = torch.randint(1, 2**bits - 1, (4, 3), generator=gen).float()  # zero inside: the range spans 0
    w = Q.dequantize(codes, scale, zero).reshape(4, 3 * g)
    assert torch.allclose(Q.rtn(w, bits, g), w, atol=1e-6)


def test_symmetric_grid_is_the_compressed_tensors_grid():
    # s = absmax / ((2^b - 1) / 2) and levels {-2^(b-1) .. 2^(b-1) - 1} * s: one more level below zero
    # than above, so (unlike the asymmetric grid) re-quantizing a symmetric result can move it
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(9))
    out = Q.rtn(w, 3, 16, sym=True)
    scale = Q.groups_of(w, 16).abs().amax(-1, keepdim=True) / 3.5
    steps = Q.groups_of(out, 16) / scale
    assert torch.allclose(steps, steps.round(), atol=1e-5)
    assert steps.round().min() >= -4 and steps.round().max() <= 3


@pytest.mark.parametrize("bits", [2, 4])
def test_rtn_error_is_at_most_half_a_step(bits):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1)) * 3
    grid = {}
    out = Q.rtn(w, bits, 32, grid=grid)
    half_step = grid["scale"].repeat_interleave(32, dim=1) / 2
    assert ((out - w).abs() <= half_step * (1 + 1e-5)).all()
    # the grid that came back reproduces the output, with codes in range
    assert grid["codes"].min() >= 0 and grid["codes"].max() <= 2**bits - 1
    assert torch.equal(Q.dequantize(Q.groups_of(grid["codes"], 32), grid["scale"], grid["zero"]).reshape(w.shape), out)


def test_mse_clipping_never_increases_the_clipping_objective():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[0, 0] = 12.0  # an outlier: shrinking the range pays off
    plain, clipped = Q.rtn(w, 3, 32), Q.rtn(w, 3, 32, mse_clip=True)
    per_group = lambda x: Q.groups_of((x - w).abs().pow(2.4), 32).sum(-1)  # noqa: E731
    assert (per_group(clipped) <= per_group(plain) + 1e-5).all()
    assert per_group(clipped)[0, 0] < per_group(plain)[0, 0]


def test_hqq_improves_on_its_min_max_start():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    start = Q.hqq(w, 3, 64, iters=1)  # one round: the min-max grid with a float zero
    tuned = Q.hqq(w, 3, 64)
    assert levels_per_group(tuned, 64) <= 8
    assert (tuned - w).abs().mean() < (start - w).abs().mean()


# --- GPTQ ----------------------------------------------------------------------------------------

def correlated_inputs(n=2048, cols=128, rank=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) + 0.1 * torch.randn(n, cols, generator=gen)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_beats_rtn_on_layer_output_error_with_correlated_inputs(bits, act_order):
    x = correlated_inputs()
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    h = 2 / len(x) * x.T @ x
    out_err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()  # noqa: E731
    gptq, rtn = Q.gptq(w, bits, 32, hessian=h, act_order=act_order), Q.rtn(w, bits, 32)
    assert out_err(gptq) < 0.5 * out_err(rtn)
    assert levels_per_group(gptq, 32) <= 2**bits


def test_gptq_with_an_identity_hessian_is_rtn():
    # H = I: no column's error leaks into another (H^-1 is diagonal), so every choice is RTN's
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    grid = {}
    assert torch.equal(Q.gptq(w, 3, 16, hessian=torch.eye(64), grid=grid), Q.rtn(w, 3, 16))
    assert torch.equal(Q.dequantize(Q.groups_of(grid["codes"], 16), grid["scale"], grid["zero"]).reshape(w.shape),
                       Q.rtn(w, 3, 16))


def test_gptq_zeroes_dead_inputs_and_falls_back_to_rtn_without_a_positive_hessian(caplog):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    x = correlated_inputs(cols=32)
    x[:, 5] = 0  # an input that is never active
    out = Q.gptq(w, 4, 16, hessian=2 / len(x) * x.T @ x)
    assert torch.equal(out[:, 5], torch.zeros(8))
    assert torch.equal(Q.gptq(w, 4, 16, hessian=-torch.eye(32)), Q.rtn(w, 4, 16))
    assert "falls back to RTN" in caplog.text


# --- PTQTP ---------------------------------------------------------------------------------------

def test_ptqtp_planes_are_ternary_and_the_error_never_rises():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(7))
    t1, t2, a1, a2, errors = Q.ptqtp_planes(w, 64)
    assert set(t1.unique().tolist()) <= {-1.0, 0.0, 1.0} and set(t2.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]
    out = Q.ptqtp(w, 0, 64)
    assert torch.allclose(out, (a1.unsqueeze(-1) * t1 + a2.unsqueeze(-1) * t2).reshape(w.shape))
    assert ((out - w).norm() / w.norm()).item() == pytest.approx(errors[-1], rel=1e-5)
    assert levels_per_group(out, 64) <= 9  # a1*t1 + a2*t2 takes at most 9 values per group


def test_ptqtp_recovers_a_single_scaled_trit_plane():
    gen = torch.Generator().manual_seed(8)
    t = torch.randint(-1, 2, (4, 32), generator=gen).float()
    t[:, 0] = 1  # no all-zero group
    w = 0.37 * t
    assert torch.allclose(Q.ptqtp(w, 0, 16), w, atol=1e-6)


# --- bit accounting ------------------------------------------------------------------------------

def bit_accounting(method, bits, group_size, in_features, sym):
    return registry.contract("quantizer", method).storage.accounting(bits, group_size, in_features, sym)


def test_effective_bits():
    assert bit_accounting("rtn", 2, 128, 4096, sym=False) == {"code_bits": 2, "effective_bits": 2 + 18 / 128}
    assert bit_accounting("gptq", 4, 128, 4096, sym=True)["effective_bits"] == 4.125
    assert bit_accounting("rtn", 4, -1, 64, sym=False)["effective_bits"] == 4 + 20 / 64  # per-channel: g = in
    assert bit_accounting("hqq", 4, 64, 4096, sym=False)["effective_bits"] == 4.5
    ptqtp = bit_accounting("ptqtp", 0, 128, 4096, sym=False)
    assert ptqtp["code_bits"] == pytest.approx(3.1699, abs=1e-4) and ptqtp["effective_bits"] == 3.2 + 0.25


# --- allocators ----------------------------------------------------------------------------------

def random_layers(n=6, seed=0, sizes=None):
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or [(32, 32)] * n
    return {i: {"self_attn.q_proj": torch.randn(*s, generator=gen), "mlp.down_proj": torch.randn(s[1], s[0], generator=gen)}
            for i, s in enumerate(sizes)}


def test_greedy_allocation_respects_the_budget_and_is_maximal():
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        sizes = {i: int(torch.randint(1, 50, (1,), generator=gen)) for i in range(n)}
        scores = {i: float(torch.rand(1, generator=gen)) for i in range(n)}
        budget = 2 + 2 * float(torch.rand(1, generator=gen))
        bits = A.greedy(scores, sizes, budget, [2, 3, 4])
        assert A.mean_bits(bits, sizes) <= budget + 1e-12
        used = sum(sizes[i] * b for i, b in bits.items())
        # no layer could still go one level up within the budget
        assert all(bits[i] == 4 or used + sizes[i] > budget * sum(sizes.values()) + 1e-9 for i in bits)


def test_greedy_meets_a_reachable_budget_exactly_and_favours_high_scores():
    sizes = {i: 100 for i in range(4)}
    bits = A.greedy({0: 0.1, 1: 0.9, 2: 0.5, 3: 0.9}, sizes, 2.5, [2, 3, 4])
    assert A.mean_bits(bits, sizes) == 2.5
    assert bits == {0: 2, 1: 4, 2: 2, 3: 2}  # the top layer first, to the top choice; ties go shallow
    assert A.greedy({0: 0.0, 1: 0.0}, {0: 1, 1: 1}, 2.0, [2, 3, 4]) == {0: 2, 1: 2}


def test_uniform_allocator_and_budget_errors():
    layers = random_layers(3)
    assert A.uniform(layers, 3.7, [2, 3, 4]) == {0: 3, 1: 3, 2: 3}
    with pytest.raises(ValueError, match="outside the bit choices"):
        A.lieq(layers, 1.5, [2, 3, 4])
    with pytest.raises(ValueError, match="outside the bit choices"):
        A.nsds(layers, 4.5, [2, 3, 4])


def test_manual_allocator_checks_layers_choices_and_budget():
    layers = random_layers(4)
    assert A.manual(layers, 2.25, [2, 3, 4], bits={"2": 3}) == {0: 2, 1: 2, 2: 3, 3: 2}
    for bits, message in [({7: 3}, "layers must be among"), ({1: 5}, "bits among"), ({0: 3, 1: 3}, "over avg_bits")]:
        with pytest.raises(ValueError, match=message):
            A.manual(layers, 2.25, [2, 3, 4], bits=bits)


def sensitive_layers(n=6, special=3, seed=0):
    """Random layers, except `special`: a low-rank spectrum with heavy-tailed entries."""
    layers = random_layers(n, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for name, w in layers[special].items():
        low_rank = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
        spikes = torch.zeros_like(w).flatten()
        spikes[torch.randint(0, w.numel(), (5,), generator=gen)] = 40.0
        layers[special][name] = low_rank + 0.05 * w + spikes.reshape(w.shape)
    return layers


@pytest.mark.parametrize("allocate", [A.lieq, A.nsds, lambda *a: A.lieq(*a, metric="energy")])
def test_allocators_rank_a_sensitive_layer_first(allocate):
    layers = sensitive_layers()
    allocation = allocate(layers, 2 + 1 / 6, [2, 3, 4])  # room for one layer at 3 bits
    assert max(allocation.scores, key=allocation.scores.get) == 3
    assert allocation == {i: 3 if i == 3 else 2 for i in range(6)}


def test_compactness_and_energy_on_hand_spectra():
    assert A.compactness(torch.ones(8)) == pytest.approx(0.0, abs=1e-6)  # flat spectrum: erank = rank
    assert A.compactness(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.75)  # rank one: erank 1 of 4
    assert A.energy_concentration(torch.tensor([3.0, 1.0, 1.0, 1.0]), top=0.25) == pytest.approx(9 / 12)
    # a rank-one matrix: stable rank 1, so the deficit is 1 - 1/min(m, n)
    assert A.stable_rank_deficit(torch.outer(torch.arange(1.0, 5), torch.ones(4))) == pytest.approx(0.75, abs=1e-5)
    s = A.mad_sigmoid({0: 1.0, 1: 2.0, 2: 3.0})
    assert s[1] == pytest.approx(0.5) and s[0] + s[2] == pytest.approx(1.0)


# --- the recipe ----------------------------------------------------------------------------------

def quant_run(compose, model_path, tmp_path, *overrides, name="run"):
    cfg = compose(["recipe=quantize", f"model.path={model_path}", "eval=none", "quant.group_size=16",
                   f"output_root={tmp_path}", *overrides])
    return run(cfg, tmp_path / name), tmp_path / name


def test_rtn_recipe_quantizes_decoder_linears_only_and_writes_meta(compose, tiny_llama, tmp_path):
    with recorded() as bars:
        results, run_dir = quant_run(compose, tiny_llama, tmp_path, "quant.bits=2")
    assert results["status"] == "completed"
    assert bars == [Record("quantize rtn", 2, 2)]  # one step per decoder layer
    before = load_model({"path": str(tiny_llama), "dtype": "float32"})[0]
    after = load_model({"path": str(run_dir / "checkpoint"), "dtype": "float32"})[0]
    targets = {f"{n}.weight" for n, _, _ in decoder_linears(after)}
    old, new = before.state_dict(), after.state_dict()
    for key in old:
        if key in targets:
            assert not torch.equal(old[key], new[key]) and levels_per_group(new[key], 16) <= 4
        else:  # embeddings (tied with lm_head here), norms: untouched
            assert torch.equal(old[key], new[key]), key
    meta = json.loads((run_dir / "checkpoint" / "quant_meta.json").read_text())
    assert set(meta["modules"]) == {k[: -len(".weight")] for k in targets}
    module = meta["modules"]["model.layers.0.mlp.down_proj"]
    assert module["bits"] == 2 and module["group_size"] == 16 and module["method"] == "rtn"
    assert module["effective_bits"] == 2 + 18 / 16
    assert results["metrics"]["quant/code_bits"] == 2 and results["metrics"]["quant/effective_bits"] == 2 + 18 / 16
    assert results["quant"]["layers"]["1"]["bits"] == 2
    error_sq = sum(float((new[k] - old[k]).pow(2).sum()) for k in targets)
    norm_sq = sum(float(old[k].pow(2).sum()) for k in targets)
    assert results["metrics"]["quant/weight_error"] == pytest.approx((error_sq / norm_sq) ** 0.5, rel=1e-5)


def test_group_size_that_does_not_divide_falls_back_to_per_channel(compose, tiny_llama, tmp_path):
    results, _ = quant_run(compose, tiny_llama, tmp_path, "quant.group_size=48")  # hidden 32, intermediate 64
    assert {m["group_size"] for m in results["quant"]["modules"].values()} == {-1}


def test_targets_and_ignore_select_modules(compose, tiny_llama, tmp_path):
    with recorded() as bars:
        results, _ = quant_run(compose, tiny_llama, tmp_path, "quant.targets=[mlp]", "quant.ignore=[layers\\.1\\.]")
    assert sorted(results["quant"]["modules"]) == [f"model.layers.0.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]
    assert bars == [Record("quantize rtn", 1, 1)]  # the layers that have a target


def test_lieq_recipe_allocates_per_layer_bits_within_the_budget(compose, tiny_llama, tmp_path):
    results, _ = quant_run(compose, tiny_llama, tmp_path, "quant.allocator=lieq", "quant.avg_bits=2.5")
    layers = results["quant"]["layers"]
    assert sorted(layer["bits"] for layer in layers.values()) == [2, 3]  # two equal layers, 2.5 bits
    assert results["quant"]["code_bits"] == 2.5
    assert all(m["bits"] == layers[str(m["layer"])]["bits"] for m in results["quant"]["modules"].values())
    assert all(layer["score"] is not None for layer in layers.values())


def test_gptq_recipe_calibrates_on_the_data_config(compose, tiny_llama, tmp_path):
    with recorded() as bars:
        results, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=gptq_quantize", "quant.bits=3",
                                     "quant.calib_samples=8", "quant.calib_seqlen=32", "quant.group_size=16")
    assert [b for b in bars if b.description.startswith("quantize")] == [Record("quantize gptq", 2, 2)]
    rtn, _ = quant_run(compose, tiny_llama, tmp_path, "quant.bits=3", name="rtn")
    gptq_w = load_model({"path": str(run_dir / "checkpoint"), "dtype": "float32"})[0].state_dict()
    rtn_w = load_model({"path": str(tmp_path / "rtn" / "checkpoint"), "dtype": "float32"})[0].state_dict()
    key = "model.layers.1.self_attn.q_proj.weight"
    assert levels_per_group(gptq_w[key], 16) <= 8 and not torch.equal(gptq_w[key], rtn_w[key])


def test_packed_export_reloads_to_the_same_weights(compose, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    results, run_dir = quant_run(compose, tiny_llama, tmp_path, "quant.export=compressed_tensors", "quant.bits=4")
    fake = load_model({"path": str(run_dir / "checkpoint"), "dtype": "float32"})[0].state_dict()
    assert results["quant"]["packed"] == str(run_dir / "packed")
    config = json.loads((run_dir / "packed" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    for reloaded in (load_packed(run_dir / "packed"),
                     AutoModelForCausalLM.from_pretrained(run_dir / "packed", dtype=torch.float32,
                                                          quantization_config=CompressedTensorsConfig(dequantize=True))):
        state = reloaded.state_dict()
        assert set(state) == set(fake) and all(torch.equal(state[k], fake[k]) for k in fake)


def test_mixed_bit_export_reloads_every_module_with_its_own_scheme(tiny_llama, tmp_path):
    model = load_model({"path": str(tiny_llama), "dtype": "float32"})[0]
    grids, meta = {}, {}
    for name, module, layer in decoder_linears(model):
        bits, sym, g = (2, False, 16) if layer == 0 else (4, name.endswith("down_proj"), -1)
        grids[name] = {}
        quantize = Q.rtn if layer == 0 else Q.gptq
        extra = {} if layer == 0 else {"hessian": torch.eye(module.in_features) + 0.5}
        module.weight.data.copy_(quantize(module.weight.data, bits, g, sym=sym, grid=grids[name], **extra))
        meta[name] = {"bits": bits, "group_size": g, "sym": sym}
    export_packed(model, None, grids, meta, tmp_path / "packed")
    state, fake = load_packed(tmp_path / "packed").state_dict(), model.state_dict()
    assert all(torch.equal(state[k], fake[k]) for k in fake)
    groups = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["symmetric"]) for g in groups.values()) == [
        (2, False), (4, False), (4, True)]


@pytest.mark.parametrize("overrides,expected", [
    ("quant.bits=9", "quant.bits: 9 is out of range; it must be >= 1 and <= 8"),
    ("quant.bits=0", "quant.bits: 0 is out of range"),
    ("quant.group_size=0", "quant.group_size: 0 is not allowed"),
    ("quant.group_size=-4", "quant.group_size: -4 is not allowed"),
    ("quant.method=gtpq", "quant.method: unknown quantizer 'gtpq'. Did you mean 'gptq'?"),
    ("quant.allocator=leiq quant.avg_bits=2.5", "quant.allocator: unknown bit_allocator 'leiq'. Did you mean 'lieq'?"),
    ("quant.allocator=lieq", "quant.avg_bits: the allocator needs a budget in [2, 4]"),
    ("quant.allocator=lieq quant.avg_bits=5", "quant.avg_bits: 5.0 is outside the bit choices' range [2, 4]"),
    ("quant.allocator=lieq quant.avg_bits=2.5 quant.bit_choices=[2,16]", "quant.bit_choices: [2, 16] must be"),
    ("quant.avg_bits=2.5", "quant.avg_bits: set, but no quant.allocator distributes it"),
    ("quant.allocator=lieq quant.avg_bits=2.5 +quant.allocator_params.metrc=energy",
     "quant.allocator_params.metrc: unknown parameter. Did you mean 'metric'?"),
    ("recipe=ptqtp_quantize quant.allocator=lieq quant.avg_bits=2.5", "quantizer 'ptqtp' has a fixed code size"),
    ("recipe=hqq_quantize quant.sym=true", "quant.sym: quantizer 'hqq' has no symmetric grid"),
    ("recipe=hqq_quantize quant.export=compressed_tensors", "quant.export: compressed_tensors stores integer grids"),
    ("+quant.mse_clp=true", "quant.mse_clp: unknown parameter. Did you mean 'mse_clip'?"),
    ("recipe=gptq_quantize +quant.hessian=1", "quant.hessian: supplied at run time"),  # rtn takes none: unknown there
    ("quant.targets=['(mlp']", "quant.targets: '(mlp' is not a valid regular expression"),
    ("quant.export=gguf", "quant.export: 'gguf' is not allowed"),
])
def test_quantize_config_errors(compose, overrides, expected):
    found = problems_of(compose(["recipe=quantize", *overrides.split()]))
    assert any(expected in p for p in found), found


def test_bad_config_writes_no_checkpoint(compose, tiny_llama, tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError):
        quant_run(compose, tiny_llama, tmp_path, "quant.bits=12")
    assert not (tmp_path / "run" / "checkpoint").exists()
    # errors that need the model's layers are caught before anything is quantized or written
    for overrides, message in [(["quant.targets=[nothing]"], "no decoder linear layer"),
                               (["quant.allocator=manual", "quant.avg_bits=2.5", "+quant.allocator_params.bits={5:3}"],
                                "quant.allocator_params: manual bits {5: 3}: layers must be among [0, 1]"),
                               (["recipe=lieq_quantize", "quant.allocator_params.metric=entropy"],
                                "quant.allocator_params.metric: 'entropy' is not allowed")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            quant_run(compose, tiny_llama, tmp_path, *overrides, name="late")
        assert not (tmp_path / "late" / "checkpoint").exists()


@pytest.mark.parametrize("recipe", ["quantize", "rtn_quantize", "rtn2_quantize", "gptq_quantize", "hqq_quantize",
                                    "ptqtp_quantize", "lieq_quantize", "nsds_quantize"])
def test_named_quantize_recipes_are_valid(compose, recipe):
    from runner.run import validate

    assert type(validate(compose([f"recipe={recipe}"]))).__name__ == "Quantize"


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_rtn_grid_matches_compressed_tensors(sym, bits):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=16)
    groups = Q.groups_of(w, 16)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    theirs = fake_quantize(w, scale, torch.round(zero), args)
    assert torch.allclose(Q.rtn(w, bits, 16, sym=sym), theirs, atol=1e-6)
