"""Merging: each method on tiny hand-computed tensors, the streaming engine on tiny HF folders
(filters, shards, dtype, mismatch checks, loading), config validation, and end-to-end recipe runs.

"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipes.merge import methods
from recipes.merge.engine import (
    Selection,
    SVDCache,
    classify,
    merge_models,
    parse_layers,
)
from runner import registry
from runner.errors import ConfigError
from runner.progress import Record, recorded
from runner.run import run, validate
from tests.conftest import make_tiny_model, problems_of

T = torch.tensor


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# --------------------------------------------------------------------------------------------
# Methods on tiny tensors

ZERO6 = torch.zeros(6)
D1 = T([3.0, -1.0, 2.0, 0.5, -4.0, 1.0])  # density 0.5 keeps the top 3 |.|: 3, 2, -4
D2 = T([-2.0, 2.5, 1.0, -3.0, 0.5, 1.5])  # keeps -2, 2.5, -3


@pytest.mark.parametrize("kwargs,expected", [
    # weights [1, 3]: weighted sums [-3, 7.5, 2, -9, -4, 0] elect signs [-, +, +, -, -, +(tie)];
    # entry 0 keeps only D2's -2 (weighted -6 / 3), entry 2 only D1's 2, entry 5 was trimmed in both
    ({}, [-2.0, 2.5, 2.0, -3.0, -4.0, 0.0]),
    ({"normalize": False}, [-6.0, 7.5, 2.0, -9.0, -4.0, 0.0]),  # the weighted sum of agreeing entries
])
def test_ties_trims_elects_and_averages_by_hand(kwargs, expected):
    close(methods.ties([D1, D2], ZERO6, density=0.5, weights=[1.0, 3.0], **kwargs), expected)


def test_ties_scales_by_lam_around_a_nonzero_base():
    base = torch.ones(6)
    out = methods.ties([base + D1, base + D2], base, density=0.5, weights=[1.0, 3.0], lam=0.5)
    close(out, [0.0, 2.25, 2.0, -0.5, -1.0, 1.0])  # 1 + 0.5 * [-2, 2.5, 2, -3, -4, 0]


@pytest.mark.parametrize("normalize,expected", [(False, [-2.0, 1.0]), (True, [2.0, 1.0])])
def test_ties_votes_on_weighted_deltas_so_a_negated_task_keeps_its_entry(normalize, expected):
    # weights [1, -1]: weighted deltas [1, -2] and [1, 0]; entry 0 sums to -1, elects -, and only the
    # negated task agrees: -2, or divided by its weight -1 with normalize (mergekit's arithmetic).
    # Comparing raw signs (both +) would zero it. Entry 1: the first task's 1 alone (a zero never votes).
    out = methods.ties([T([1.0, 1.0]), T([2.0, 0.0])], torch.zeros(2), density=1.0, weights=[1.0, -1.0],
                       normalize=normalize)
    close(out, expected)


@pytest.mark.parametrize("block", [2, 3, 1 << 22])
def test_ties_keeps_exactly_k_with_ties_at_the_cut_in_row_major_order(monkeypatch, block):
    # density 0.5 of 6 entries keeps k = 3: the 3 above the cut, then the first two of the three 2s;
    # the count carries across blocks (block 2 and 3 split the tied entries)
    monkeypatch.setattr(methods, "BLOCK", block)
    delta = T([[1.0, 2.0, -2.0], [2.0, 0.5, 3.0]])
    close(methods.ties([delta], torch.zeros(2, 3), density=0.5), [[0.0, 2.0, -2.0], [0.0, 0.0, 3.0]])


def test_ties_in_blocks_equals_ties_in_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 29, generator=g)
    models = [base + torch.randn(37, 29, generator=g) for _ in range(3)]
    kwargs = dict(density=0.3, weights=[0.5, -1.0, 2.0], lam=0.7)
    whole = methods.ties(models, base, **kwargs)
    monkeypatch.setattr(methods, "BLOCK", 100)
    torch.testing.assert_close(methods.ties(models, base, **kwargs), whole, rtol=0, atol=0)
    kept = [(methods.ties([m], base, density=0.3) - base) != 0 for m in models]
    assert all(int(k.sum()) == int(0.3 * base.numel()) for k in kept)  # mergekit's count, per task vector


def test_ties_sign_ties_go_positive():
    # weighted sums are exactly 0: the + entries win, alone
    close(methods.ties([T([1.0, -2.0]), T([-1.0, 2.0])], torch.zeros(2), density=1.0), [1.0, 2.0])


def dare_expected(deltas, density, rescale, seed):
    """The kept and rescaled task vectors, drawing the keep masks exactly as DARE does, in model order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in deltas:
        kept = d * (torch.rand(d.shape, generator=g) < density)
        if rescale == "l1":
            kept = kept * (d.abs().sum() / kept.abs().sum())
        elif rescale == "density":
            kept = kept / density
        out.append(kept)
    return out


@pytest.fixture(scope="module")
def dare_inputs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, generator=g)
    return base, [torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)]


@pytest.mark.parametrize("rescale", ["l1", "density", "none"])
def test_dare_linear_reproduces_the_seeded_mask_and_rescale(dare_inputs, rescale):
    base, deltas = dare_inputs
    out = methods.dare_linear([base + d for d in deltas], base, density=0.6, weights=[1.0, 2.0], lam=0.5,
                              rescale=rescale, generator=torch.Generator().manual_seed(7))
    k1, k2 = dare_expected(deltas, 0.6, rescale, seed=7)
    close(out, base + 0.5 * (k1 + 2 * k2))


def test_dare_rescale_modes_on_one_task_vector(dare_inputs):
    base, (d, _) = dare_inputs
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(d.shape, generator=g) < 0.5
    assert 0 < keep.sum() < keep.numel()

    def kept(rescale):
        return methods.dare_linear([base + d], base, density=0.5, rescale=rescale,
                                   generator=torch.Generator().manual_seed(3)) - base

    l1, by_density, none = kept("l1"), kept("density"), kept("none")
    for k in (l1, by_density, none):
        assert torch.equal(k == 0, ~keep)  # dropped entries are exactly zero, kept ones are not
    close(l1.abs().sum(), d.abs().sum())  # mergekit: the L1 norm of the full task vector is restored
    close(by_density[keep], (d / 0.5)[keep], atol=1e-5, rtol=1e-6)  # the paper: divide by the keep probability
    close(none[keep], d[keep], atol=1e-6, rtol=1e-6)


def test_dare_ties_elects_signs_and_dare_linear_does_not():
    base, tensors = torch.zeros(3), [T([1.0, -2.0, 3.0]), T([-3.0, 1.0, 1.0])]
    kw = {"density": 1.0, "generator": torch.Generator().manual_seed(0)}  # density 1 keeps every entry
    close(methods.dare_linear(tensors, base, **kw), [-2.0, -1.0, 4.0])  # plain sum
    # signs [-, -, +]: entry 0 keeps -3, entry 1 keeps -2, entry 2 keeps both; summed, not averaged
    close(methods.dare_ties(tensors, base, **kw), [-3.0, -2.0, 4.0])


def test_dare_ties_matches_the_seeded_masks(dare_inputs):
    base, deltas = dare_inputs
    out = methods.dare_ties([base + d for d in deltas], base, density=0.7, weights=[0.5, 1.5],
                            generator=torch.Generator().manual_seed(11))
    weighted = torch.stack([w * k for w, k in zip((0.5, 1.5), dare_expected(deltas, 0.7, "l1", seed=11))])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    close(out, base + (weighted * (torch.sign(weighted) == sign)).sum(0))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_per_seed(dare_inputs, method):
    base, deltas = dare_inputs
    fn = registry.get("merge_method", method)

    def merged(seed):
        return fn([base + d for d in deltas], base, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(merged(5), merged(5))
    assert not torch.equal(merged(5), merged(6))


def test_slerp_endpoints_are_the_inputs_exactly():
    v0, v1 = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(methods.slerp([v0, v1], t=0.0), v0)
    assert torch.equal(methods.slerp([v0, v1], t=1.0), v1)


E0, E1 = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 1.0], [0.0, 0.0]])  # orthogonal once flattened


@pytest.mark.parametrize("v0,v1,t,expected", [
    (E0, E1, 0.5, [[math.sqrt(0.5), math.sqrt(0.5)], [0, 0]]),  # sin(pi/4) / sin(pi/2) each
    (E0, E1, 1 / 3, [[math.sqrt(3) / 2, 0.5], [0, 0]]),  # sin(pi/3), sin(pi/6): stays on the unit circle
    (2 * E0, 3 * E1, 0.5, [[2 * math.sqrt(0.5), 3 * math.sqrt(0.5)], [0, 0]]),  # weights apply to raw tensors
    # cos(angle) = 0.99 < 0.9995 is still slerped: half way is the half angle
    (T([1.0, 0.0]), T([0.99, math.sqrt(1 - 0.99**2)]), 0.5,
     [math.cos(math.acos(0.99) / 2), math.sin(math.acos(0.99) / 2)]),
])
def test_slerp_by_hand(v0, v1, t, expected):
    close(methods.slerp([v0, v1], t=t), expected)


@pytest.mark.parametrize("v1", [T([2.0, 4.0, 6.0]), T([1.0, 2.0, 3.02]), T([-1.0, -2.0, -3.0])])
def test_slerp_falls_back_to_lerp_for_nearly_parallel_tensors(v1):
    v0 = T([1.0, 2.0, 3.0])  # v1: parallel, |cos| = 0.999995 > 0.9995, antiparallel
    assert torch.equal(methods.slerp([v0, v1], t=0.3), torch.lerp(v0, v1, 0.3))


def test_linear_weighted_mean_and_sum():
    tensors, w = [T([1.0, 2.0]), T([3.0, 4.0]), T([5.0, 6.0])], [1.0, 2.0, 1.0]
    close(methods.linear(tensors, weights=w), [3.0, 4.0])  # [12, 16] / 4
    close(methods.linear(tensors, weights=w, normalize=False), [12.0, 16.0])
    close(methods.linear(tensors), [3.0, 4.0])  # equal weights by default
    with pytest.raises(ValueError, match="weights has 2 entries for 3 models"):
        methods.linear(tensors, weights=[1.0, 1.0])


def test_task_arithmetic_by_hand():
    base = T([1.0, 1.0])
    out = methods.task_arithmetic([T([2.0, 0.0]), T([1.0, 3.0])], base, weights=[0.5, 2.0], lam=0.7)
    close(out, [1.35, 3.45])  # deltas [1, -1], [0, 2]: 1 + 0.7 * [0.5, -0.5 + 4]


def test_interpolate_endpoints_exact_and_a_quarter_by_hand():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(methods.interpolate([a, b], lam=0.0), a)
    assert torch.equal(methods.interpolate([a, b], lam=1.0), b)
    close(methods.interpolate([T([0.0, 4.0]), T([8.0, -4.0])], lam=0.25), [2.0, 2.0])


@pytest.mark.parametrize("sigma,expected", [
    ([1.0, 1.0, 1.0, 1.0], 4.0),
    ([5.0, 0.0, 0.0], 1.0),
    ([3.0, 1.0], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),  # sigma, not sigma^2
])
def test_effective_rank(sigma, expected):
    assert methods.effective_rank(T(sigma)) == pytest.approx(expected, abs=1e-6)


SIGMA = [10.0, 5.0, 1.0, 0.1, 0.01, 0.001]  # eRank 2.38: k = ceil = 3 (floor or round would give 2)


@pytest.fixture(scope="module")
def timber_pair():
    """(base, instruct) 8x6 whose delta has the singular values SIGMA."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(8, 6, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    base = torch.randn(8, 6, generator=g)
    return base, (base.double() + u @ torch.diag(T(SIGMA, dtype=torch.float64)) @ v.T).float()


def test_timber_keeps_ceil_erank_directions(timber_pair):
    base, instruct = timber_pair
    p = T(SIGMA) / sum(SIGMA)
    assert math.ceil(math.exp(-float((p * p.log()).sum()))) == 3
    assert torch.equal(methods.timber([instruct], base, tail_scale=1.0), instruct)

    delta = (instruct - base).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    truncated = methods.timber([instruct], base, tail_scale=0.0) - base
    assert int(torch.linalg.matrix_rank(truncated, atol=1e-3)) == 3
    close(truncated.double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=0)  # the best rank-3 approximation

    scaled = methods.timber([instruct], base, tail_scale=0.2) - base
    close(torch.linalg.svdvals(scaled.double()), [10, 5, 1, 0.02, 0.002, 0.0002], atol=1e-5, rtol=0)


def test_timber_leaves_1d_tensors_at_instruct():
    base, instruct = torch.zeros(8), torch.randn(8)
    assert torch.equal(methods.timber([instruct], base, tail_scale=0.0), instruct)


def test_timber_svd_cache_is_written_once_and_reused(timber_pair, tmp_path, monkeypatch):
    base, instruct = timber_pair
    expected = methods.timber([instruct], base, tail_scale=0.5)
    cache = SVDCache(tmp_path)
    first = methods.timber([instruct], base, tail_scale=0.2, key="w", svd_cache=cache)
    assert len(list(cache.dir.glob("w-*.safetensors"))) == 1
    close(first, methods.timber([instruct], base, tail_scale=0.2))

    def no_svd(*a, **k):
        raise AssertionError("the SVD was recomputed instead of read from the cache")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    assert torch.equal(methods.timber([instruct], base, tail_scale=0.5, key="w", svd_cache=cache), expected)


# --------------------------------------------------------------------------------------------
# The engine on tiny HF folders

@pytest.fixture(scope="module")
def trio(tmp_path_factory, toy_tokenizer):
    """Three tiny llamas of one architecture with different weights."""
    root = tmp_path_factory.mktemp("merge-models")
    return [make_tiny_model(root / f"m{seed}", toy_tokenizer, "llama", seed) for seed in (1, 2, 3)]


def tensors_of(folder):
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    return {k: v for f in sorted(files) for k, v in load_file(folder / f).items()}


def merge(inputs, out, method="interpolate", params=None, *, base=None, outside=None, donor=None,
          selection=None, dtype=None, max_shard_size="2GB", seed=0, svd_cache=None):
    return merge_models(list(inputs), base, registry.get("merge_method", method), params or {}, out,
                        selection=selection or Selection(), outside=outside or inputs[0], donor=donor or inputs[-1],
                        dtype=dtype, max_shard_size=max_shard_size, seed=seed, svd_cache=svd_cache,
                        runtime=registry.contract("merge_method", method).runtime)


@pytest.mark.parametrize("lam,which", [(0.0, 0), (1.0, 1)])
def test_engine_interpolate_endpoints_are_the_inputs(trio, tmp_path, lam, which):
    with recorded() as bars:
        stats = merge(trio[:2], tmp_path / "out", params={"lam": lam})
    out, expected = tensors_of(tmp_path / "out"), tensors_of(trio[which])
    assert out.keys() == expected.keys() and stats["merged_tensors"] == len(expected) == 20
    assert bars == [Record("merge", 20, 20)]  # one step per tensor written
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], expected[k]) for k in expected)


@pytest.mark.parametrize("key,expected", [
    ("model.layers.3.self_attn.q_proj.weight", (3, "attention")),
    ("model.layers.0.mlp.up_proj.weight", (0, "mlp")),
    ("model.layers.12.input_layernorm.weight", (12, "norms")),
    ("model.layers.1.post_attention_layernorm.weight", (1, "norms")),
    ("model.embed_tokens.weight", (None, "embeddings")),
    ("model.norm.weight", (None, "norms")),
    ("lm_head.weight", (None, "lm_head")),
    ("model.rotary_emb.inv_freq", (None, "other")),
])
def test_classify(key, expected):
    assert classify(key) == expected


def test_parse_layers_and_selection():
    assert parse_layers("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_layers(" 12 - 14 ") == {12, 13, 14} and parse_layers(None) is None
    for bad, message in [("5-2", "range '5-2' runs backwards"), ("abc", "'abc' is not a layer list"),
                         ("1,,2", "is not a layer list"), ("-1", "is not a layer list")]:
        with pytest.raises(ConfigError, match=f"merge.layers: .*{message}"):
            parse_layers(bad)
    # a layer filter leaves out everything outside the decoder layers; a module filter alone does not
    assert not Selection(layers={0})("model.embed_tokens.weight")
    assert Selection(modules=("embeddings",))("model.embed_tokens.weight")
    assert not Selection(layers={0}, modules=("mlp",))("model.layers.0.self_attn.q_proj.weight")


def test_engine_filters_merge_only_the_selected_tensors(trio, tmp_path):
    a, b, c = trio
    stats = merge([a, b], tmp_path / "out", params={"lam": 0.5}, outside=c,
                  selection=Selection(layers={1}, modules=("mlp",)))
    out, ta, tb, tc = (tensors_of(p) for p in (tmp_path / "out", a, b, c))
    selected = {f"model.layers.1.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert stats == {"merged_tensors": 3, "copied_tensors": len(tc) - 3, "dtype": "float32"}
    for k in tc:
        expected = torch.lerp(ta[k], tb[k], 0.5) if k in selected else tc[k]
        assert torch.equal(out[k], expected), k


def shard_sizes(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = {}
    for key, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(key)
    return index, shards


def test_engine_reads_and_writes_sharded_folders(trio, tmp_path):
    a, b, _ = trio
    for src, name in ((a, "a"), (b, "b")):  # re-save each input in shards of at most 20 KB (lam 0: the first input)
        merge([src, src], tmp_path / name, params={"lam": 0.0}, max_shard_size="20KB")
        assert len(shard_sizes(tmp_path / name)[1]) > 3
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", params={"lam": 0.5}, max_shard_size="30KB")

    ta, tb = tensors_of(a), tensors_of(b)
    out = tmp_path / "out"
    index, shards = shard_sizes(out)
    assert set(index["weight_map"]) == set(ta)
    n = len(shards)
    assert sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)  # no stray single file
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ta.values())
    for shard, keys in shards.items():
        stored = load_file(out / shard)
        assert set(stored) == set(keys)
        # a shard stays under the limit unless it holds one tensor larger than the limit
        assert len(keys) == 1 or sum(t.numel() * t.element_size() for t in stored.values()) <= 30_000
    merged = tensors_of(out)
    assert all(torch.equal(merged[k], torch.lerp(ta[k], tb[k], 0.5)) for k in ta)


def test_engine_output_dtype_is_cast_once_and_recorded(trio, tmp_path):
    a, b, _ = trio
    stats = merge([a, b], tmp_path / "out", params={"lam": 0.3}, dtype="bfloat16")
    ta, tb, out = tensors_of(a), tensors_of(b), tensors_of(tmp_path / "out")
    assert stats["dtype"] == "bfloat16"
    assert all(torch.equal(out[k], torch.lerp(ta[k], tb[k], 0.3).to(torch.bfloat16)) for k in ta)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    merge([a, b], tmp_path / "default", params={"lam": 0.3})  # without the option: the donor's dtype
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "float32"


def pad_vocab(src, dst, rows=8):
    """A copy of `src` whose embedding has `rows` extra (zero) rows."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    emb = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(rows, emb.shape[1])])
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, vocab_size=emb.shape[0] + rows)))
    return dst


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, toy_tokenizer, trio):
    root = tmp_path_factory.mktemp("odd-models")
    return {
        "wide": make_tiny_model(root / "wide", toy_tokenizer, "llama", 4, hidden=48),
        "deep": make_tiny_model(root / "deep", toy_tokenizer, "llama", 4, layers=3),
        "qwen3": make_tiny_model(root / "qwen3", toy_tokenizer, "qwen3", 4),
        "vocab": pad_vocab(trio[1], root / "vocab"),
    }


@pytest.mark.parametrize("other,expected", [
    ("wide", ["model.layers.0.self_attn.q_proj.weight: shape [32, 32] in ", "but [48, 48] in "]),
    ("deep", ["tensor names differ between", "only in", "model.layers.2."]),
    ("qwen3", ["architectures differ", "'llama'", "'qwen3'", "self_attn.k_norm.weight"]),
    ("vocab", ["model.embed_tokens.weight: shape [657, 32]", "but [665, 32]", "vocabulary rows differ"]),
])
def test_engine_refuses_mismatched_inputs_before_writing(trio, odd_models, tmp_path, other, expected):
    out = tmp_path / "merged" / "out"
    with pytest.raises(ConfigError) as err:
        merge([trio[0], odd_models[other]], out, params={"lam": 0.5})
    message = str(err.value)
    assert message.startswith("invalid config") and "merge inputs do not match" in message
    assert all(part in message for part in expected), message
    assert not out.parent.exists()  # nothing written, not even a temp folder


def test_engine_hidden_size_mismatch_does_not_blame_the_vocabulary(trio, odd_models, tmp_path):
    with pytest.raises(ConfigError) as err:
        merge([trio[0], odd_models["wide"]], tmp_path / "out", params={"lam": 0.5})
    embed = [p for p in err.value.problems if "embed_tokens" in p]
    assert embed and "[657, 32]" in embed[0] and "[657, 48]" in embed[0]
    # same rows, different width: no advice to pad the vocabulary
    assert "vocabulary rows differ" not in embed[0], embed[0]


def test_engine_failure_mid_stream_leaves_no_output(trio, tmp_path):
    out = tmp_path / "merged" / "out"
    with pytest.raises(ValueError, match="weights has 1 entries for 2 models"):
        merge(trio[:2], out, "linear", {"weights": [1.0]})
    assert list(out.parent.iterdir()) == []  # the temp folder was removed


def test_engine_output_loads_in_transformers_with_the_manual_logits(trio, tmp_path, toy_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b, _ = trio
    merge([a, b], tmp_path / "out", params={"lam": 0.3}, donor=b)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.get_vocab() == toy_tokenizer.get_vocab() and tokenizer.chat_template == toy_tokenizer.chat_template

    manual = AutoModelForCausalLM.from_pretrained(a)
    other = AutoModelForCausalLM.from_pretrained(b).state_dict()
    manual.load_state_dict({k: torch.lerp(v, other[k], 0.3) for k, v in manual.state_dict().items()})
    ids = tokenizer("12+7=19", return_tensors="pt").input_ids
    with torch.no_grad():
        close(merged(ids).logits, manual(ids).logits, atol=1e-6, rtol=1e-6)


def test_engine_dare_is_reproducible_per_seed(trio, tmp_path):
    a, b, c = trio
    params = {"density": 0.5, "weights": [0.5, 0.5]}
    runs = {}
    for name, seed in (("s0", 0), ("again", 0), ("s1", 1)):
        merge([a, b], tmp_path / name, "dare_ties", params, base=c, seed=seed)
        runs[name] = tensors_of(tmp_path / name)
    assert all(torch.equal(runs["s0"][k], runs["again"][k]) for k in runs["s0"])
    assert any(not torch.equal(runs["s0"][k], runs["s1"][k]) for k in runs["s0"])


def test_engine_timber_cache_follows_the_checkpoint(trio, tmp_path, toy_tokenizer):
    base, instruct = trio[0], tmp_path / "instruct"
    cache = SVDCache(tmp_path / "svd")
    make_tiny_model(instruct, toy_tokenizer, "llama", 7)
    merge([instruct], tmp_path / "first", "timber", {"tail_scale": 0.2}, base=base, svd_cache=cache)
    make_tiny_model(instruct, toy_tokenizer, "llama", 8)  # the instruct model is retrained in place
    merge([instruct], tmp_path / "cached", "timber", {"tail_scale": 0.2}, base=base, svd_cache=cache)
    merge([instruct], tmp_path / "fresh", "timber", {"tail_scale": 0.2}, base=base)
    cached, fresh = tensors_of(tmp_path / "cached"), tensors_of(tmp_path / "fresh")
    # the cache is named by the delta's content, so a checkpoint rewritten in place gets new factors
    stale = [k for k in fresh if not torch.allclose(cached[k], fresh[k], atol=1e-5)]
    assert stale == [], f"{len(stale)} tensors were merged from a stale SVD, e.g. {stale[:2]}"


# --------------------------------------------------------------------------------------------
# Config validation through the recipe


@pytest.mark.parametrize("recipe", ["mi_merge", "timber", "linear_merge", "slerp_merge", "ta_merge", "ties_merge",
                                    "dare_merge"])
def test_named_merge_recipes_are_valid(compose, recipe):
    assert type(validate(compose([f"recipe={recipe}"]))).__name__ == "Merge"


@pytest.mark.parametrize("overrides,expected", [
    ("recipe=ties_merge ~merge.density", "merge.density: required parameter is missing"),
    ("recipe=ties_merge merge.density=0", "merge.density: 0 drops every task-vector entry"),
    ("recipe=ties_merge merge.density=1.5", "merge.density: 1.5 is out of range; it must be >= 0.0 and <= 1.0"),
    ("recipe=mi_merge merge.method=tiez", "merge.method: unknown merge_method 'tiez'. Did you mean 'ties'?"),
    ("recipe=slerp_merge merge.t=2", "merge.t: 2 is out of range; it must be >= 0.0 and <= 1.0"),
    ("recipe=timber merge.tail_scale=-1", "merge.tail_scale: -1 is out of range"),
    ("recipe=slerp_merge models=[{path:toy-base},{path:toy-instruct},{path:toy-thinking}]",
     "models: merge.method=slerp needs exactly 2 models, got 3"),
    ("recipe=linear_merge models=[{path:toy-base}] merge.weights=[1]",
     "models: merge.method=linear needs at least 2 models, got 1"),
    ("recipe=ta_merge base=null", "base: merge.method=task_arithmetic needs a 'base' model (base.path=...)"),
    ("recipe=mi_merge +models=[{path:toy-base}]",
     "models: merge.method=interpolate takes its inputs from instruct, thinking, not a list"),
    ("recipe=linear_merge merge.weights=[1,2,3]", "merge.weights: 3 weights for 2 models"),
    ("recipe=mi_merge merge.layers=5-2", "merge.layers: range '5-2' runs backwards"),
    ("recipe=mi_merge merge.layers=abc", "merge.layers: 'abc' is not a layer list like '12-35'"),
    ("recipe=mi_merge merge.modules=[ffn]", "merge.modules: ['ffn'] not allowed; choose from attention, mlp"),
    ("recipe=timber +merge.lam=0.5", "merge.lam: unknown parameter."),
    ("recipe=slerp_merge +merge.lam=0.5", "merge.lam: unknown parameter."),
    ("recipe=mi_merge merge.donor=teacher", "merge.donor: 'teacher' is not one of this merge's inputs"),
    ("recipe=mi_merge merge.outside=base", "merge.outside: 'base' is not one of this merge's inputs"),
    ("recipe=dare_merge +merge.rescale=l2", "merge.rescale: 'l2' is not allowed. Choose one of l1, density, none"),
    ("recipe=dare_merge +merge.generator=3", "merge.generator: supplied at run time, not by the config"),
    ("recipe=mi_merge merge.dtype=fp8", "merge.dtype: 'fp8' is not allowed"),
])
def test_merge_config_errors_name_the_key(compose, overrides, expected):
    found = problems_of(compose(overrides.split()))
    assert any(expected in p for p in found), found


def test_unknown_parameter_lists_only_settable_ones(compose):
    found = problems_of(compose(["recipe=timber", "+merge.lam=0.5"]))
    assert any(p.startswith("merge.lam: unknown parameter.") and "tail_scale" in p for p in found), found
    # the engine's runtime arguments (key, svd_cache) are not offered to the user
    assert not any("svd_cache" in p for p in found), found


@pytest.mark.parametrize("override", ["merge.layers=12-35", "merge.modules=[mlp]", "merge.outside=thinking",
                                      "merge.dtype=bfloat16"])
def test_documented_filter_overrides_compose(compose, override):
    # the overrides mi_merge.yaml and `make mi-sweep MI_ARGS=...` document need no `+`
    validate(compose(["recipe=mi_merge", override]))


@pytest.mark.parametrize("overrides,key", [
    (["recipe=slerp_merge", "merge.t=[0,0.5,1]"], "merge.t"),  # mergekit's per-layer gradient list
    (["recipe=ties_merge", "merge.density=high"], "merge.density"),
])
def test_non_numeric_parameters_are_config_errors(compose, overrides, key):
    found = problems_of(compose(overrides))
    assert any(p.startswith(key) for p in found), found


@pytest.mark.parametrize("override,key", [
    ("merge.donor='models[5]'", "merge.donor"),  # only two models
    ("merge.outside='models[x]'", "merge.outside"),
    ("merge.max_shard_size=big", "merge.max_shard_size"),
])
def test_problems_found_only_at_run_time_are_validated(compose, override, key):
    # found by validate, before any model is opened, not by the run
    found = problems_of(compose(["recipe=linear_merge", override]))
    assert any(p.startswith(key) for p in found), found


# --------------------------------------------------------------------------------------------
# End-to-end runs of the named recipes (tiny models stand in for the toy zoo to stay fast)

def test_mi_merge_recipe_end_to_end(compose, trio, tmp_path):
    a, b, _ = trio
    cfg = compose(["recipe=mi_merge", "merge.lam=0.5", f"instruct.path={a}", f"thinking.path={b}",
                   "eval=toy_quick", "eval.limit=2", "eval.max_gen_toks=8", "eval.baseline=true",
                   f"output_root={tmp_path}"])
    results = run(cfg, tmp_path / "run")
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["recipe"] == "mi_merge" and results["kind"] == "merge"
    ta, tb = tensors_of(a), tensors_of(b)
    assert results["merge"] == {"method": "interpolate", "merged_tensors": len(ta), "copied_tensors": 0,
                                "dtype": "float32"}
    assert results["checkpoint"] == str((tmp_path / "run" / "checkpoint").resolve())
    out = tensors_of(tmp_path / "run" / "checkpoint")
    assert all(torch.equal(out[k], torch.lerp(ta[k], tb[k], 0.5)) for k in ta)
    assert "toy_arith/exact_match" in results["metrics"]  # the merged checkpoint was evaluated
    assert set(results["baseline_metrics"]) == set(results["metrics"])  # and so was Instruct, the baseline


def test_timber_recipe_end_to_end(compose, trio, tmp_path):
    from runner.cache import cache_dir

    base, instruct, _ = trio
    cfg = compose(["recipe=timber", f"base.path={base}", f"instruct.path={instruct}", "eval=none",
                   f"output_root={tmp_path}"])
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["merge"]["merged_tensors"] == 20
    tb, ti, out = tensors_of(base), tensors_of(instruct), tensors_of(tmp_path / "run" / "checkpoint")
    for k, w in ti.items():
        assert torch.equal(out[k], methods.timber([w], tb[k], tail_scale=0.2)), k
    cached = {p.stem.rsplit("-", 1)[0] for p in (cache_dir() / "svd").glob("*.safetensors")}
    assert {k for k, w in ti.items() if w.dim() == 2} <= cached  # one SVD per matrix, ready for a sweep


def test_tensor_source_reads_what_safetensors_wrote(tmp_path):
    """Plain-read tensors equal safetensors' own loading, for each dtype, shape and an empty tensor."""
    from runner.tensorio import TensorSource

    g = torch.Generator().manual_seed(0)
    written = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
               "f16": torch.randn(7, generator=g).half(), "i64": torch.arange(6).view(2, 3),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(written, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    source = TensorSource(tmp_path)
    assert set(source.keys()) == set(written)
    for key, tensor in load_file(str(tmp_path / "model.safetensors")).items():
        read = source.get(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), key
        assert source.shape(key) == list(tensor.shape)
