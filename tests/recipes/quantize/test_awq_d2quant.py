"""AWQ and D²Quant: the calibration-driven transforms (quant.transform) around the quantizers."""

import copy
import json
import re

import pytest
import torch

from recipes.quantize import quantizers as Q
from recipes.quantize.awq import AWQ, apply_clip, awq_scales, clip_ranges, scale_into
from recipes.quantize.calibration import decoder_layers, first_layer_inputs, layer_output
from recipes.quantize.d2quant import D2Quant, dsq, dsq_error, dsq_scale_step
from recipes.quantize.transforms import LINEARS, ChannelMean, LayerStep
from runner.models import load_model
from runner.run import run
from tests.conftest import problems_of
from tests.recipes.quantize.test_quantize import correlated_inputs, levels_per_group

SMALL = ["eval=none", "quant.group_size=16", "quant.calib_samples=8", "quant.calib_seqlen=32", "data.num_examples=64"]


def fp32(path):
    return load_model({"path": str(path), "dtype": "float32"})[0]


def calib_inputs(model, n=8, seqlen=24, seed=0):
    rows = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return first_layer_inputs(model, rows, 4)


def rtn_step(model, inputs, bits=2, group_size=16, index=0):
    """A LayerStep for decoder layer `index` whose quantizer is RTN and that writes the weights as they come."""
    layer = decoder_layers(model)[index]
    targets = {n: layer.get_submodule(n) for n in LINEARS}

    def record(n, w, *measure):
        targets[n].weight.data.copy_(w)

    return LayerStep(index=index, layer=layer, inputs=inputs, targets=targets, config=model.config, needs_hessian=False,
                     grid_of=lambda n: (bits, group_size, False),
                     quantize_weight=lambda n, w, h: (Q.rtn(w, bits, group_size), None), record=record)


def quant_run(compose, model_path, tmp_path, *overrides, name="run"):
    recipe = [] if any(o.startswith("recipe=") for o in overrides) else ["recipe=quantize"]
    cfg = compose([*recipe, f"model.path={model_path}", *SMALL, f"output_root={tmp_path}", *overrides])
    return run(cfg, tmp_path / name), tmp_path / name


# --- AWQ -----------------------------------------------------------------------------------------

def test_awq_scales_are_one_at_alpha_zero_and_normalised_to_max_times_min_one():
    x = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 5 + 1e-3
    assert torch.equal(awq_scales(x, 0.0), torch.ones(64))  # check 1: α = 0 is plain RTN
    for alpha in (0.05, 0.5, 0.95):  # check 2
        s = awq_scales(x, alpha)
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
        assert torch.argmax(s) == torch.argmax(x)  # larger mean activation, larger scale


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
def test_scaling_without_quantization_leaves_the_layer_output_unchanged(model, request):
    # check 3: the four groups' scales folded into the previous ops change nothing
    net = fp32(request.getfixturevalue(model))
    inputs = calib_inputs(net)
    layer = decoder_layers(net)[0]
    gen = torch.Generator().manual_seed(1)
    sub = dict(layer.named_modules())
    with torch.no_grad():
        before = [layer_output(layer, a, kw) for a, kw in inputs]
        for prev, linears in [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                              ("self_attn.v_proj", ["self_attn.o_proj"]),
                              ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                              ("mlp.up_proj", ["mlp.down_proj"])]:
            s = torch.rand(sub[linears[0]].in_features, generator=gen) * 4 + 0.25
            scale_into(sub[prev], [sub[n] for n in linears], s)
        after = [layer_output(layer, a, kw) for a, kw in inputs]
    for b, a in zip(before, after):
        assert float((a - b).norm() / b.norm()) <= 1e-5


def test_rtn_asymmetric_grid_is_awqs_on_groups_with_both_signs():
    # AWQ's pseudo_quantize_tensor, written out: s = (max - min)/(2^b - 1), z = clamp(-round(min/s), 0, 2^b - 1)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    for bits in (2, 3, 4):
        g = w.reshape(-1, 16)
        assert ((g.amin(1) < 0) & (g.amax(1) > 0)).all()
        s = (g.amax(1, keepdim=True) - g.amin(1, keepdim=True)).clamp(min=1e-5) / (2**bits - 1)
        z = (-torch.round(g.amin(1, keepdim=True) / s)).clamp(0, 2**bits - 1)
        awq = ((torch.clamp(torch.round(g / s) + z, 0, 2**bits - 1) - z) * s).reshape(w.shape)
        assert torch.allclose(Q.rtn(w, bits, 16), awq, atol=1e-6)


def test_clip_search_at_shrink_zero_keeps_the_weights_and_never_raises_the_error():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    w[0, 5] = 9.0  # an outlier: clipping its group pays off
    x = correlated_inputs(n=256, cols=64)
    top = Q.groups_of(w, 16).abs().amax(-1)
    # check 4: only shrink 0 tried -> the full range, and clamping to it changes nothing
    cap = clip_ranges(w, x, 3, 16, max_shrink=0.05)
    assert torch.equal(cap, top)
    fc = torch.nn.Linear(64, 32, bias=False)
    fc.weight.data.copy_(w)
    apply_clip(fc, cap, 16)
    assert torch.equal(fc.weight.data, w)

    def err(clipped):  # per row and group, the objective the search minimises
        q = Q.groups_of(Q.rtn(clipped, 3, 16), 16).unsqueeze(1)
        return ((Q.groups_of(x, 16).unsqueeze(0) * (q - Q.groups_of(w, 16).unsqueeze(1))).sum(-1) ** 2).mean(1)

    cap = clip_ranges(w, x, 3, 16)
    assert (cap <= top).all() and (cap >= 0.55 * top - 1e-6).all()
    apply_clip(fc, cap, 16)
    assert (err(fc.weight.data) <= err(w) + 1e-6).all()
    assert cap[0, 0] < top[0, 0]


def test_awq_at_alpha_zero_without_clipping_is_rtn(compose, tiny_llama, tmp_path):
    awq, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=awq_quantize", "quant.bits=3",
                             "+quant.transform_params.n_grid=1", "+quant.transform_params.clip=false")
    rtn, rtn_dir = quant_run(compose, tiny_llama, tmp_path, "quant.bits=3", name="rtn")
    a, r = fp32(run_dir / "checkpoint").state_dict(), fp32(rtn_dir / "checkpoint").state_dict()
    assert all(torch.equal(a[k], r[k]) for k in r)
    assert awq["quant"]["weight_error"] == pytest.approx(rtn["quant"]["weight_error"], rel=1e-6)
    assert set(awq["quant"]["transform"]["layers"]["0"]["alpha"].values()) == {0.0}


def test_awq_recipe_folds_scales_into_the_norms_and_keeps_the_bits(compose, tiny_llama, tmp_path):
    from runner.progress import Record, recorded

    with recorded() as bars:
        results, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=awq_quantize")
    assert [b for b in bars if b.description.startswith("quantize")] == [Record("quantize awq + rtn", 2, 2)]
    before, after = fp32(tiny_llama), fp32(run_dir / "checkpoint")
    old, new = before.state_dict(), after.state_dict()
    assert not torch.equal(old["model.layers.0.input_layernorm.weight"], new["model.layers.0.input_layernorm.weight"])
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    for key in [k for k in new if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)]:
        assert levels_per_group(new[key], 16) <= 16, key
    meta = json.loads((run_dir / "checkpoint" / "quant_meta.json").read_text())
    assert meta["code_bits"] == 4 and meta["effective_bits"] == 4 + 20 / 16  # scales and clipping add no bits
    layer0 = meta["transform"]["layers"]["0"]
    assert meta["transform"]["name"] == "awq" and len(layer0["alpha"]) == 4  # no GQA: v -> o is searched
    assert set(layer0["clip_shrink"]) == {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not q, k
    # the quantized model stays close to the original on text (4 bits)
    ids = torch.randint(0, before.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = before(ids).logits.log_softmax(-1), after(ids).logits.log_softmax(-1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 0.05


def test_awq_skips_the_v_to_o_group_under_gqa(compose, toy_tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from runner.models import save_checkpoint

    config = AutoConfig.for_model("llama", vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  tie_word_embeddings=True, pad_token_id=toy_tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_checkpoint(AutoModelForCausalLM.from_config(config), toy_tokenizer, tmp_path / "gqa")
    results, _ = quant_run(compose, tmp_path / "gqa", tmp_path, "recipe=awq_quantize")
    alpha = results["quant"]["transform"]["layers"]["0"]["alpha"]
    assert len(alpha) == 3 and not any(k.startswith("self_attn.v_proj") for k in alpha)


def test_awq_packed_export_reloads_to_the_same_weights(compose, tiny_llama, tmp_path):
    from recipes.quantize.export import load_packed

    results, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=awq_quantize",
                                 "quant.export=compressed_tensors")
    fake, packed = fp32(run_dir / "checkpoint").state_dict(), load_packed(run_dir / "packed").state_dict()
    assert set(packed) == set(fake) and all(torch.equal(packed[k], fake[k]) for k in fake)


# --- D²Quant -------------------------------------------------------------------------------------

def test_dsq_without_rounds_is_the_base_quantizer():
    # check 1: s^c = 1 and N = 0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    q, s, errors = dsq(w, lambda x, h: Q.rtn(x, 2, 16), 0)
    assert torch.equal(q, Q.rtn(w, 2, 16)) and torch.equal(s, torch.ones(64)) and len(errors) == 1
    x = correlated_inputs(cols=64)
    h = 2 / len(x) * x.T @ x
    q, s, _ = dsq(w, lambda x, hs: Q.gptq(x, 2, 16, hessian=hs), 0, h, "output")
    assert torch.equal(q, Q.gptq(w, 2, 16, hessian=h)) and torch.equal(s, torch.ones(64))


def test_merged_channel_scales_in_up_give_the_explicit_mlp_output():
    # check 2: down = Q·diag(s) explicitly, or Q with up's rows (and its grid's scales) times s
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Cfg:
        hidden_size, intermediate_size, mlp_bias, hidden_act = 32, 64, False, "silu"

    torch.manual_seed(0)
    explicit = LlamaMLP(Cfg())
    merged = copy.deepcopy(explicit)
    w = explicit.down_proj.weight.detach()
    q, s, _ = dsq(w, lambda x, h: Q.rtn(x, 2, 16), 5)
    up_q = Q.rtn(explicit.up_proj.weight.detach(), 2, 16)
    with torch.no_grad():
        explicit.up_proj.weight.copy_(up_q)
        explicit.down_proj.weight.copy_(q * s)
        merged.up_proj.weight.copy_(up_q * s.unsqueeze(1))
        merged.down_proj.weight.copy_(q)
        x = torch.randn(4, 10, 32)
        a, b = explicit(x), merged(x)
    assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(a.abs().max()))
    assert levels_per_group(merged.up_proj.weight.detach(), 16) <= 4  # still one 2-bit grid per row and group
    assert not torch.equal(s, torch.ones_like(s))


@pytest.mark.parametrize("objective", ["weight", "output"])
def test_the_least_squares_step_never_raises_the_error(objective):
    # check 3
    gen = torch.Generator().manual_seed(5)
    x = correlated_inputs(cols=64, seed=1)
    h = 2 / len(x) * x.T @ x if objective == "output" else None
    for trial in range(5):
        w = torch.randn(24, 64, generator=gen)
        s = torch.rand(64, generator=gen) + 0.5
        q = Q.rtn(w / s, 2, 16)
        new = dsq_scale_step(w, q, s, h)
        assert dsq_error(w, q, new, h) <= dsq_error(w, q, s, h) * (1 + 1e-6)
    _, _, errors = dsq(w, lambda x, hs: Q.rtn(x, 2, 16), 6, h, objective)
    assert all(errors[i + 1] <= errors[i] * (1 + 1e-6) for i in range(0, len(errors) - 1, 2))  # every LS step
    assert min(errors) < errors[0]


def test_dsq_weight_objective_matches_the_closed_form():
    w = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
    q = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    # s_0 = <(2,4),(1,2)>/5 = 2, s_1 = <(1,-1),(1,0)>/1 = 1
    assert torch.equal(dsq_scale_step(w, q, torch.ones(2)), torch.tensor([2.0, 1.0]))
    q[:, 1] = 0  # a zero column keeps its scale
    assert dsq_scale_step(w, q, torch.tensor([1.0, 3.0]))[1] == 3.0


@pytest.mark.parametrize("dac", [True, False])
def test_dac_aligns_the_mlp_input_mean_with_full_precision_attention(tiny_llama, dac):
    # check 4: mean over calibration tokens of H - (H~ + μ) is 0, seen through the quantized gate and up
    # (μ is folded into their biases); without DAC it is not
    model = fp32(tiny_llama)
    inputs = calib_inputs(model)
    fp_layer = copy.deepcopy(decoder_layers(model)[0])
    fp_norm, norm = ChannelMean(), ChannelMean()

    step = rtn_step(model, inputs)
    D2Quant(iters=3, dac=dac)(step)
    layer = step.layer
    assert (layer.mlp.gate_proj.bias is not None) == dac and model.config.mlp_bias == dac
    h = fp_layer.post_attention_layernorm.register_forward_hook(fp_norm)
    hq = layer.mlp.register_forward_pre_hook(lambda m, args: norm(m, None, args[0]))
    with torch.no_grad():
        for a, kw in inputs:
            layer_output(fp_layer, a, kw)
            layer_output(layer, a, kw)
    h.remove()
    hq.remove()
    for fc in (layer.mlp.gate_proj, layer.mlp.up_proj):
        bias = fc.bias if dac else 0
        gap = fc.weight @ fp_norm.mean - (fc.weight @ norm.mean + bias)
        scale = float((fc.weight @ fp_norm.mean).abs().max())
        assert (float(gap.abs().max()) <= 1e-4 * scale) == dac
    if dac:
        assert torch.equal(layer.mlp.down_proj.bias, torch.zeros_like(layer.mlp.down_proj.bias))


def test_d2quant_recipe_writes_a_plain_llama_checkpoint(compose, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    results, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=d2quant_quantize")
    meta = json.loads((run_dir / "checkpoint" / "quant_meta.json").read_text())
    assert meta["code_bits"] == 2 and meta["effective_bits"] == 2 + 18 / 16  # DSQ adds no bits
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 2
    layer0 = meta["transform"]["layers"]["0"]
    assert layer0["dsq_error"]["best"] <= layer0["dsq_error"]["start"] and layer0["dac_shift"] > 0
    loaded, info = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint", dtype=torch.float32,
                                                        output_loading_info=True)
    assert loaded.config.mlp_bias and not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    for name in ("gate_proj", "up_proj", "down_proj"):  # up's rows carry s^c: still one 2-bit grid per row and group
        assert levels_per_group(state[f"model.layers.1.mlp.{name}.weight"], 16) <= 4
    assert float(state["model.layers.0.mlp.gate_proj.bias"].abs().sum()) > 0


def test_d2quant_runs_dsq_alone_on_qwen3(compose, tiny_qwen3, tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("quant.transform_params.dac: DAC folds its correction")):
        quant_run(compose, tiny_qwen3, tmp_path, "recipe=d2quant_quantize", "quant.method=rtn")
    assert not (tmp_path / "run" / "checkpoint").exists()
    results, run_dir = quant_run(compose, tiny_qwen3, tmp_path, "recipe=d2quant_quantize", "quant.method=rtn",
                                 "+quant.transform_params.dac=false", name="dsq")
    assert results["status"] == "completed"
    assert results["quant"]["transform"]["layers"]["1"]["dac_shift"] == 0
    # weight errors are measured in the original basis: up_proj's rows carry s^c, yet its error is plain RTN's
    rtn, _ = quant_run(compose, tiny_qwen3, tmp_path, "quant.bits=2", name="rtn")
    for layer in (0, 1):
        ours, plain = (r["quant"]["modules"][f"model.layers.{layer}.mlp.up_proj"] for r in (results, rtn))
        assert ours["error_sq"] / ours["norm_sq"] == pytest.approx(plain["error_sq"] / plain["norm_sq"], rel=1e-4)


# --- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,expected", [
    ("quant.transform=awk", "quant.transform: unknown quant_transform 'awk'. Did you mean 'awq'?"),
    ("recipe=awq_quantize +quant.transform_params.n_grid=0", "quant.transform_params.n_grid: 0 is out of range"),
    ("recipe=awq_quantize +quant.transform_params.max_shrink=0",
     "quant.transform_params.max_shrink: 0 is out of range"),
    ("recipe=d2quant_quantize +quant.transform_params.iter=3",
     "quant.transform_params.iter: unknown parameter. Did you mean 'iters'?"),
    ("recipe=d2quant_quantize quant.transform_params.objective=activations",
     "quant.transform_params.objective: 'activations' is not allowed"),
    ("+quant.transform_params.iters=3", "quant.transform_params: iters set, but quant.transform is None"),
    ("recipe=d2quant_quantize quant.export=compressed_tensors", "quant.export: transform 'd2quant' changes more"),
])
def test_transform_config_errors(compose, overrides, expected):
    found = problems_of(compose(["recipe=quantize", *overrides.split()]))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("recipe", ["awq_quantize", "d2quant_quantize"])
def test_named_transform_recipes_are_valid(compose, recipe):
    from runner.run import validate

    assert type(validate(compose([f"recipe={recipe}"]))).__name__ == "Quantize"
