"""COLA calibration curation (stage 3: k-means on activation sketches) and its use by the quantize recipe."""

import pytest
import torch

from recipes.quantize import calibration as C
from runner.models import load_model
from tests.conftest import problems_of
from tests.recipes.quantize.test_quantize import levels_per_group, quant_run


def select(x: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    return C.nearest_to_centres(x, *C.kmeans(x, k, seed))


def candidate_rows(n=24, seqlen=16, seed=0, vocab=40):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model({"path": str(tiny_llama), "dtype": "float32"})[0].eval()


# --- the spec's checks ---------------------------------------------------------------------------

def test_k_equal_to_the_pool_selects_everything(tiny):
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert select(x, 20) == list(range(20))  # every point is its own centre
    rows = candidate_rows(12)
    assert C.cola_select(tiny, rows, 12, batch_size=5, seed=0) == list(range(12))


def test_picks_are_unique_and_at_most_k():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    picks = select(x, 7)
    assert len(picks) == len(set(picks)) == 7
    # 5 distinct points repeated 6 times: k=8 leaves at least 3 clusters empty, and they give no row
    distinct = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    dup = distinct.repeat(6, 1)
    picks = select(dup, 8)
    assert len(picks) == len(set(picks)) == 5
    assert {tuple(dup[i].tolist()) for i in picks} == {tuple(p.tolist()) for p in distinct}  # one per distinct point


def test_two_separated_clusters_give_one_pick_each_the_member_nearest_its_mean():
    gen = torch.Generator().manual_seed(2)
    a = 0.1 * torch.randn(30, 4, generator=gen, dtype=torch.float64) + 10
    b = 0.1 * torch.randn(30, 4, generator=gen, dtype=torch.float64) - 10
    x = torch.cat([a, b])
    for seed in range(3):
        picks = select(x, 2, seed)
        # the centres converge to the two means; the pick is the member nearest its own cluster's mean
        assert picks == [int((a - a.mean(0)).norm(dim=1).argmin()), 30 + int((b - b.mean(0)).norm(dim=1).argmin())]


def test_same_seed_same_selection(tiny):
    rows = candidate_rows(40, seed=3)
    first = C.cola_select(tiny, rows, 6, batch_size=16, seed=7)
    assert C.cola_select(tiny, rows, 6, batch_size=7, seed=7) == first  # the batching does not matter either
    assert len(first) == len(set(first)) <= 6 and all(0 <= i < 40 for i in first)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c1, l1 = C.kmeans(x, 5, seed=11)
    c2, l2 = C.kmeans(x, 5, seed=11)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)


# --- pooling and the sketch ----------------------------------------------------------------------

def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                           [[5.0, 6.0], [-1.0, 0.0], [2.0, 3.0]]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = C.masked_mean(hidden, mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [2.0, 3.0]]))


def test_sketch_of_a_padded_row_equals_the_unpadded_row(tiny):
    rows = candidate_rows(3, seqlen=10, seed=5)
    padded = torch.cat([rows, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, 10, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long)], dim=1)
    plain = C.activation_sketch(tiny, rows, batch_size=3, seed=0)
    assert plain.shape == (3, 64)
    assert torch.allclose(C.activation_sketch(tiny, padded, 3, 0, attention_mask=mask), plain, atol=1e-5)
    # without the mask the padding moves the sketch: the mask is what keeps it out
    assert not torch.allclose(C.activation_sketch(tiny, padded, 3, 0), plain, atol=1e-3)


def test_sketch_normalises_each_layer():
    # a fake model whose two "layers" output constant vectors of very different scales: after the
    # per-layer L2 normalisation the sketch is the projection of two unit vectors, whatever the scale
    class Layer(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, h):
            return h * 0 + self.value

    class Fake(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.config = type("Config", (), {"hidden_size": 2})()
            self.embed = torch.nn.Embedding(10, 2)
            self.layers = torch.nn.ModuleList([Layer(torch.tensor([3.0, 4.0])), Layer(torch.tensor([0.0, scale]))])

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = layer(h)
            return h

    rows = torch.tensor([[1, 2, 3]])
    small, large = (C.activation_sketch(Fake(s), rows, 1, seed=0, dim=4) for s in (0.01, 1000.0))
    projection = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2
    expected = torch.tensor([[0.6, 0.8, 0.0, 1.0]]) @ projection
    assert torch.allclose(small, expected, atol=1e-6) and torch.allclose(large, expected, atol=1e-6)


# --- calibration rows and the recipe -------------------------------------------------------------

def test_cola_rows_come_from_the_pool_of_the_random_draw(compose, toy_tokenizer, tiny):
    data = compose(["recipe=quantize", "data.num_examples=400"]).data
    random_rows = C.calibration_rows(data, toy_tokenizer, 4, 32, seed=0)
    pool = C.calibration_rows(data, toy_tokenizer, 4 * 3, 32, seed=0)  # the same shuffle, 3x the rows
    cola = C.calibration_rows(data, toy_tokenizer, 4, 32, seed=0, select="cola", pool=3, model=tiny, batch_size=8)
    assert torch.equal(random_rows, pool[:4])
    assert cola.shape == (4, 32)
    assert all(any(torch.equal(r, p) for p in pool) for r in cola)


def test_calibration_rows_refuses_bad_arguments(compose, toy_tokenizer):
    data = compose(["recipe=quantize", "data.num_examples=50"]).data
    with pytest.raises(ValueError, match="'kmeans': choose one of random, cola"):
        C.calibration_rows(data, toy_tokenizer, 4, 32, 0, select="kmeans")
    with pytest.raises(ValueError, match="needs the model"):
        C.calibration_rows(data, toy_tokenizer, 4, 32, 0, select="cola")


@pytest.mark.parametrize("overrides,expected", [
    ("quant.calib_select=kmeans", "quant.calib_select: 'kmeans' is not allowed"),
    ("quant.calib_pool=0", "quant.calib_pool: 0 is out of range; it must be >= 1"),
    ("quant.method=rtn", "quant.calib_select: 'cola' chooses calibration rows, but 'rtn' uses none"),
])
def test_cola_config_errors(compose, overrides, expected):
    found = problems_of(compose(["recipe=cola_gptq_quantize", *overrides.split()]))
    assert any(expected in p for p in found), found


def test_cola_gptq_recipe_runs_and_calibrates_on_other_rows(compose, tiny_llama, tmp_path):
    small = ["quant.bits=3", "quant.calib_samples=6", "quant.calib_seqlen=32", "quant.calib_pool=4",
             "data.num_examples=400"]
    from runner.progress import Record, recorded

    with recorded() as bars:
        results, run_dir = quant_run(compose, tiny_llama, tmp_path, "recipe=cola_gptq_quantize", *small)
    assert results["status"] == "completed"
    assert Record("calibration (cola)", 6 * 4, 6 * 4) in bars  # the activations of every candidate row
    assert Record("quantize gptq", 2, 2) in bars
    assert results["config"]["quant"]["calib_select"] == "cola"
    quant_run(compose, tiny_llama, tmp_path, "recipe=gptq_quantize", *small, name="random")
    cola_w = load_model({"path": str(run_dir / "checkpoint"), "dtype": "float32"})[0].state_dict()
    random_w = load_model({"path": str(tmp_path / "random" / "checkpoint"), "dtype": "float32"})[0].state_dict()
    key = "model.layers.1.self_attn.q_proj.weight"
    assert levels_per_group(cola_w[key], 16) <= 8 and not torch.equal(cola_w[key], random_w[key])
