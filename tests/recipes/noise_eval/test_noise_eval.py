"""Noise-eval: statistics of each noise model, exact restore, seeding, redundancy, checks, a toy run (pcm: test_pcm.py)."""

import json
import math

import pytest
import torch

from recipes.noise_eval import (
    apply_noise,
    generator_for,
    noise,
    redundant_layers,
    restore,
)
from runner.models import decoder_linears, load_model
from runner.progress import Record, recorded
from runner.run import run
from tests.conftest import problems_of

W = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_prog_max_adds_sigma_times_the_max():
    err = noise.prog_max(W, g(), sigma=0.05) - W
    assert abs(err.mean().item()) < 1e-3
    assert err.std().item() == pytest.approx(0.05 * W.abs().max().item(), rel=0.02)
    rows = noise.prog_max(W, g(), sigma=0.05, per_row=True) - W  # the max of each row sets its noise
    ratio = rows.std(dim=1) / (0.05 * W.abs().amax(dim=1))
    assert ratio.mean().item() == pytest.approx(1.0, rel=0.02)


def test_prog_rel_scales_with_each_weight():
    rel = noise.prog_rel(W, g(), sigma=0.1) / W - 1
    assert rel.std().item() == pytest.approx(0.1, rel=0.02) and abs(rel.mean().item()) < 2e-3


@pytest.mark.parametrize("model,params", [("prog_max", {"sigma": 0.0}), ("prog_rel", {"sigma": 0.0}),
                                          ("stuck_at", {"p_fault": 0.0})])
def test_zero_noise_is_exact(model, params):
    assert torch.equal(getattr(noise, model)(W, g(), **params), W)


def test_stuck_at_fractions():
    positive = W.abs() + 0.01  # every weight uses its g+ device; g- is off
    w_max = positive.max()
    sa0 = noise.stuck_at(positive, g(), p_fault=0.05, sa1_share=0.0)
    assert (sa0 == 0).float().mean().item() == pytest.approx(0.05, abs=0.003)  # g+ stuck off: the weight is lost
    assert torch.equal(sa0[sa0 != 0], positive[sa0 != 0])
    sa1 = noise.stuck_at(positive, g(), p_fault=0.05, sa1_share=1.0)
    # g+ stuck at g_max alone gives max|W|; g- stuck on alone gives w - max|W|; both give 0
    assert (sa1 == w_max).float().mean().item() == pytest.approx(0.05 * 0.95, abs=0.003)
    assert torch.allclose(sa1[(sa1 < 0)], (positive - w_max)[(sa1 < 0)])


def test_levels_count_and_error():
    symmetric = torch.cat([W, -W])  # both ends of the grid are reached
    for levels in (16, 33):
        out = noise.levels(symmetric, g(), levels=levels)
        n = (levels - 1) // 2
        assert out.unique().numel() == 2 * n + 1
        assert (out - symmetric).abs().max().item() <= W.abs().max().item() / n / 2 + 1e-6


def test_read_noise_is_resampled_every_forward():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    clean = layer(x)
    handle = layer.register_forward_hook(noise.ReadNoise(0.1, g()))
    first, second = layer(x), layer(x)
    handle.remove()
    assert not torch.equal(first, second)
    assert (first - clean).std().item() == pytest.approx(0.1 * clean.std().item(), rel=0.1)
    assert torch.equal(layer(x), clean)


# --------------------------------------------------------------------------------------------
# On a tiny model


@pytest.fixture
def tiny(tiny_llama):
    model, tokenizer = load_model({"path": str(tiny_llama), "dtype": "float32"})
    targets = decoder_linears(model)
    clean = {name: m.weight.detach().clone() for name, m, _ in targets}
    return model, targets, clean


def test_targets_are_the_decoder_linears(tiny):
    model, targets, _ = tiny
    names = [name for name, _, _ in targets]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)


def test_zero_noise_and_restore_are_bit_exact(tiny):
    model, targets, clean = tiny
    ids = torch.tensor([[1, 5, 9, 14]])
    reference = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_noise(targets, clean, noise.prog_max, {"sigma": 0.0}, 0, set(), 1, 0.0)
    assert torch.equal(model(ids).logits, reference)
    hooks = apply_noise(targets, clean, noise.prog_max, {"sigma": 0.1}, 0, set(), 1, 0.05)
    assert not torch.equal(model(ids).logits, reference)
    for h in hooks:
        h.remove()
    restore(targets, clean)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, reference)


def noisy_weights(targets, clean, seed, redundant=frozenset(), copies=1, sigma=0.1):
    apply_noise(targets, clean, noise.prog_max, {"sigma": sigma}, seed, set(redundant), copies, 0.0)
    out = {name: m.weight.detach().clone() for name, m, _ in targets}
    restore(targets, clean)
    return out


def test_seeding_is_per_module_and_order_free(tiny):
    _, targets, clean = tiny
    a, again, other = (noisy_weights(targets, clean, s) for s in (0, 0, 1))
    reversed_order = noisy_weights(list(reversed(targets)), clean, 0)
    assert all(torch.equal(a[k], again[k]) and torch.equal(a[k], reversed_order[k]) for k in a)
    assert all(not torch.equal(a[k], other[k]) for k in a)
    assert not torch.equal(generator_for(0, "x").initial_seed() * torch.ones(1),
                           generator_for(0, "y").initial_seed() * torch.ones(1))


def test_redundancy_divides_the_error_by_sqrt_r(tiny):
    _, targets, clean = tiny
    every_layer = {0, 1}
    errors = {}
    for r in (1, 4):
        w = noisy_weights(targets, clean, 0, every_layer, r)
        errors[r] = torch.cat([(w[k] - clean[k]).flatten() for k in w]).std().item()
    assert errors[1] / errors[4] == pytest.approx(math.sqrt(4), rel=0.05)
    only_shallow = noisy_weights(targets, clean, 0, {0}, 4)
    plain = noisy_weights(targets, clean, 0)
    assert all(torch.equal(only_shallow[k], plain[k]) for k in plain if ".layers.1." in k)


def test_redundant_layer_ranges():
    assert redundant_layers("shallow", 8, None) == {0, 1}
    assert redundant_layers("middle", 8, None) == {3, 4}
    assert redundant_layers("deep", 8, 3) == {5, 6, 7}
    assert redundant_layers("none", 8, 3) == set()


@pytest.mark.parametrize("overrides,expected", [
    ("noise.model=gausian", "noise.model: unknown noise_model 'gausian'"),
    ("noise.param=tau", "noise.param: 'tau' is not a parameter of noise model 'prog_max'; choose one of sigma, per_row"),
    ("noise.sweep=[-0.1,0.1]", "noise.sweep: [-0.1] out of range for sigma; it must be >= 0.0"),
    ("noise.seeds=[]", "noise.seeds: empty"),
    ("+noise.sigma=0.1", "noise.sigma: set, but it is the swept parameter"),
    ("recipe=stuck_at +noise.sa1_share=2", "noise.sa1_share: 2 is out of range"),
    ("noise.model=levels noise.param=levels noise.sweep=[2,16]", "noise.sweep: [2.0] out of range for levels"),
    ("noise.model=levels noise.param=levels noise.sweep=[16.5]", "noise.sweep: [16.5] are not whole numbers of levels"),
    ("+noise.per_rows=true", "noise.per_rows: unknown parameter. Did you mean 'per_row'?"),
    ("noise.redundancy=top", "noise.redundancy: 'top' is not allowed"),
    ("eval=none", "eval.tasks: empty"),
    ("recipe=pcm_drift noise.sweep=[-1.0,3600.0]", "noise.sweep: [-1.0] out of range for t_inference; it must be >= 0.0"),
])
def test_noise_config_errors(compose, overrides, expected):
    found = problems_of(compose(["recipe=memristor_noise", *overrides.split()]))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("recipe", ["memristor_noise", "pcm_drift", "stuck_at", "noise_redundancy"])
def test_named_noise_recipes_are_valid(compose, recipe):
    from runner.run import validate

    assert type(validate(compose([f"recipe={recipe}"]))).__name__ == "NoiseEval"


def test_memristor_noise_run_reports_the_curve(compose, tiny_llama, tmp_path):
    from runner.report import main as report

    cfg = compose(["recipe=memristor_noise", f"model.path={tiny_llama}", "noise.sweep=[0.0,0.5]", "noise.seeds=[0,1]",
                   "noise.save_trials=true", "eval.limit=4", "eval.max_gen_toks=6", f"output_root={tmp_path}"])
    with recorded() as bars:
        results = run(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["checkpoint"] is None
    # one step per level and seed, and each trial's evaluation as a line of its own inside it
    assert [b for b in bars if b.description.startswith("noise")] == [Record("noise prog_max", 4, 4)]
    trial_evals = [b for b in bars if b.description.startswith("evaluate sigma=")]
    assert [b.description for b in trial_evals] == [f"evaluate sigma={v} seed {s}" for v in (0.0, 0.5) for s in (0, 1)]
    assert all(b.total == b.completed == 2 * 4 for b in trial_evals)  # toy_quick: two tasks of 4 problems
    curve = results["noise"]["curve"]
    assert [p["value"] for p in curve] == [0.0, 0.5] and all(p["seeds"] == 2 for p in curve)
    assert len(results["noise"]["trials"]) == 4
    assert curve[0]["std"]["toy_arith/exact_match"] == 0.0  # no noise: both seeds see the same model
    assert results["metrics"]["toy_arith/exact_match@sigma=0.5"] == curve[1]["mean"]["toy_arith/exact_match"]
    assert (tmp_path / "run" / "noise_curve.png").is_file()
    saved = load_model({"path": str(tmp_path / "run" / "trials" / "sigma=0.5" / "seed1"), "dtype": "float32"})[0]
    clean = load_model({"path": str(tiny_llama), "dtype": "float32"})[0]
    state, noisy = clean.state_dict(), saved.state_dict()
    changed = {k for k in state if not torch.equal(state[k], noisy[k])}
    assert changed and all("proj" in k for k in changed)  # the saved trial is the noisy model, digital parts exact
    assert json.loads((tmp_path / "run" / "results.json").read_text())["noise"]["param"] == "sigma"
    assert report([str(tmp_path / "run"), "--curves", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").is_file()
    assert "± 0.000" in (tmp_path / "report.md").read_text()
