"""MTP-D: the spec's checks, the heads' wiring, speculative decoding against greedy, saving, config
errors, and one short run of the named recipe."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from recipes.mtp_d import held_out_prompts
from recipes.mtp_d import speculative as spec
from recipes.mtp_d.heads import MTPModel, extend_heads, load_heads, new_heads, save_heads
from recipes.mtp_d.objective import MTPDObjective, topn_kl
from runner.data import IGNORE
from runner.errors import ConfigError
from runner.models import load_model
from runner.run import run, validate

V = 11


def _labels(t: int, masked=()) -> torch.Tensor:
    labels = torch.arange(1, t + 1).remainder(V).unsqueeze(0).repeat(2, 1)
    labels[:, 0] = IGNORE
    for b, i in masked:
        labels[b, i] = IGNORE
    return labels


# --------------------------------------------------------------------------------------------
# The spec's checks


def test_check1_heads_equal_to_the_main_head_at_i_plus_k_give_kl_zero():
    torch.manual_seed(0)
    t, K = 9, 3
    main = torch.randn(2, t, V) * 3
    labels = _labels(t, masked=[(0, 5), (1, 8)])  # a prompt token inside, padding at the end
    heads = []
    for k in range(1, K + 1):
        h = torch.randn(2, t - k, V) * 3  # position i of head k: equal to main at i+k where its target counts
        target = labels[:, k + 1:]
        keep = target != IGNORE
        h[:, : t - k - 1][keep] = main[:, k: t - 1][keep]
        heads.append(h)
    out = MTPDObjective(top_n=V).combine({"main": main, "heads": heads, "heads_kl": []}, labels)
    for k in range(1, K + 1):
        assert out.logs[f"kl_{k}"] == pytest.approx(0.0, abs=1e-6)
    # with N < |V| the renormalised teacher is not p: the value is -log(mass of q's top N), by hand
    out_n = MTPDObjective(top_n=3).combine({"main": main, "heads": heads, "heads_kl": []}, labels)
    q = main.softmax(-1)
    expected = -q.topk(3, dim=-1).values.sum(-1).log()  # per position of the main head
    keep = labels[:, 2:] != IGNORE
    assert out_n.logs["kl_1"] == pytest.approx(float(expected[:, 1: t - 1][keep].mean()), rel=1e-5)


def _tiny_mtp(path, k=2, seed=0):
    torch.manual_seed(seed)
    lm, tok = load_model({"path": str(path), "dtype": "float32"})
    return MTPModel(lm, new_heads(lm, k)), tok


def _batch(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_check2_the_kl_term_alone_leaves_no_gradient_on_the_main_head_and_trunk(tiny_llama):
    mtp, tok = _tiny_mtp(tiny_llama)
    batch = _batch(tok)
    kl_only = MTPDObjective(beta=1.0, ce_weight=0.0, frozen_trunk=False, main_weight=0.0)
    kl_only(mtp, batch).loss.backward()
    trunk = [(n, p.grad) for n, p in mtp.lm.named_parameters()]
    assert trunk and all(g is None or not g.any() for _, g in trunk), [n for n, g in trunk if g is not None and g.any()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mtp.heads[1].block.parameters())
    # the heads' CE does reach the trunk when it is not frozen (so the check above can fail)
    mtp.zero_grad()
    MTPDObjective(beta=0.0, ce_weight=1.0, frozen_trunk=False, main_weight=0.0)(mtp, batch).loss.backward()
    assert mtp.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert mtp.lm.base_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_check3_drafts_5_7_3_against_main_5_7_9_accept_two_and_emit_three():
    emitted = spec.verify([5, 7, 3], [5, 7, 9, 4])
    assert emitted == [5, 7, 9] and len(emitted) - 1 == 2
    assert spec.verify([1, 2], [3, 2, 2]) == [3]  # the first draft wrong: only the main head's token
    assert spec.verify([1, 2], [1, 2, 6]) == [1, 2, 6]  # all accepted, plus the bonus
    assert spec.verify([], [8]) == [8]  # no drafts: plain greedy


def test_check4_top_n_with_n_equal_to_the_vocabulary_is_the_full_kl():
    torch.manual_seed(1)
    s, t = torch.randn(7, V) * 2, torch.randn(7, V) * 2
    full = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(topn_kl(s, t, V), full, atol=1e-6)
    assert torch.allclose(topn_kl(s, t, 10 * V), full, atol=1e-6)  # N beyond |V| is |V|
    assert (topn_kl(s, t, 3) >= 0).all()  # the student's mass on the top N is at most 1


# --------------------------------------------------------------------------------------------
# Masking and wiring


def test_masked_positions_do_not_enter_the_loss():
    torch.manual_seed(2)
    t = 8
    labels = _labels(t, masked=[(0, 6), (1, 3)])
    main = torch.randn(2, t, V)
    heads = [torch.randn(2, t - 1, V), torch.randn(2, t - 2, V)]
    base = MTPDObjective().combine({"main": main, "heads": heads, "heads_kl": []}, labels)
    # change the head logits only where no target counts: at masked targets and past the end (i+k+1 >= t)
    changed = [h.clone() for h in heads]
    for k, h in enumerate(changed, 1):
        dead = torch.ones(2, t - k, dtype=torch.bool)
        dead[:, : t - k - 1] = labels[:, k + 1:] == IGNORE
        h[dead] = 100 * torch.randn(int(dead.sum()), V)
    out = MTPDObjective().combine({"main": main, "heads": changed, "heads_kl": []}, labels)
    assert float(out.loss) == pytest.approx(float(base.loss), rel=1e-6)
    for k in (1, 2):  # CE_k by hand on the counted positions
        keep = labels[:, k + 1:] != IGNORE
        ce = F.cross_entropy(heads[k - 1][:, : t - k - 1][keep], labels[:, k + 1:][keep])
        assert out.logs[f"ce_{k}"] == pytest.approx(float(ce), rel=1e-5)


def test_an_all_masked_batch_gives_zero_and_a_gradient_path():
    labels = torch.full((2, 6), IGNORE)
    out = MTPDObjective().combine({"main": torch.randn(2, 6, V), "heads": [torch.randn(2, 5, V, requires_grad=True)],
                                   "heads_kl": []}, labels)
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0 and out.loss.requires_grad


def test_module_position_zero_ignores_its_token_and_modules_are_causal(tiny_llama):
    mtp, tok = _tiny_mtp(tiny_llama)
    ids = torch.randint(3, len(tok), (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h0, _ = mtp.trunk(ids)
        a = mtp.run_module(1, mtp.heads[0], ids, h0[:, :9])
        other = ids.clone()
        other[0, 1] = (other[0, 1] + 1) % len(tok)  # module 1 reads t_{i+1}: index 1 is its position 0
        b = mtp.run_module(1, mtp.heads[0], other, h0[:, :9])
        later = ids.clone()
        later[0, 7] = (later[0, 7] + 1) % len(tok)  # module 1 reads index 7 at position 6
        c = mtp.run_module(1, mtp.heads[0], later, h0[:, :9])
    assert torch.equal(a[:, 0], b[:, 0])  # the embedding at position 0 is zeroed
    assert torch.allclose(a[:, :6], c[:, :6], atol=1e-6) and not torch.allclose(a[:, 6], c[:, 6])
    out = mtp(ids)
    assert [h.shape[1] for h in out["heads"]] == [9, 8]  # head k has T-k positions


def test_looped_extension_copies_head_k_minus_1_mod_K_plus_1(tiny_llama):
    mtp, _ = _tiny_mtp(tiny_llama, k=2)
    heads = extend_heads(mtp.heads, 5)
    sources = [0, 1, 0, 1, 0]  # head k (1-based) from head ((k-1) mod 2) + 1
    for k, j in enumerate(sources):
        for (name, p), q in zip(heads[k].state_dict().items(), mtp.heads[j].state_dict().values()):
            assert torch.equal(p, q), name
    with torch.no_grad():
        heads[2].eh_proj.weight.add_(1.0)  # a copy, not the same module
    assert not torch.equal(heads[2].eh_proj.weight, heads[0].eh_proj.weight)
    with pytest.raises(ConfigError, match="loss.heads"):
        extend_heads(mtp.heads, 1)


# --------------------------------------------------------------------------------------------
# Speculative decoding


def test_acceptance_figures_by_hand():
    acc = spec.acceptance([2, 0, 1], drafts=2)
    assert acc.alpha == [2 / 3, 1 / 2]  # d_1 ok in 2 of 3 steps; d_2 ok in 1 of the 2 where d_1 was
    assert acc.draft_acceptance_rate == 3 / 6 and acc.tokens_per_forward == 2.0
    assert acc.system_efficiency == (3 + 3) / (3 * 3)


def _prompts(tok, n=4):
    out = []
    for question, _ in held_out_prompts(n):
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False).input_ids)
    return out


def test_speculative_decoding_equals_greedy_with_the_heads(tiny_llama):
    mtp, tok = _tiny_mtp(tiny_llama, k=2)
    mtp.eval()
    for drafts in (1, 2, 3):  # 3 > K: modules reused cyclically
        for prompt in _prompts(tok):
            dec = spec.speculative_decode(mtp, prompt, 12, tok.eos_token_id, drafts)
            assert dec.tokens == spec.greedy(mtp.lm, prompt, 12, tok.eos_token_id)
            assert dec.forwards == len(dec.accepted) + 1


def test_speculative_decoding_equals_greedy_when_drafts_are_partly_right(tiny_llama, monkeypatch):
    # drafts = the true greedy continuation with the third one wrong: every verifying step accepts 2
    mtp, tok = _tiny_mtp(tiny_llama, k=1)
    prompt = _prompts(tok, 1)[0]
    eos = None  # a random model: decode the full budget
    truth = spec.greedy(mtp.lm, prompt, 40, eos)

    def oracle(mtp_, tokens, h0, n):
        done = len(tokens) - len(prompt)
        cont = truth[done: done + n] + [0] * n
        return cont[:2] + [(cont[2] + 1) % len(tok)] + cont[3:n]

    monkeypatch.setattr(spec, "draft", oracle)
    dec = spec.speculative_decode(mtp, prompt, 22, eos, 4)
    assert dec.tokens == truth[:22]
    assert dec.accepted and all(a == 2 for a in dec.accepted)
    assert dec.forwards == 1 + math.ceil((22 - 1) / 3)


# --------------------------------------------------------------------------------------------
# Saving and loading


def test_heads_round_trip(tiny_llama, tiny_qwen3, tmp_path):
    mtp, tok = _tiny_mtp(tiny_llama, k=2, seed=4)
    folder = save_heads(mtp.heads, mtp.lm, tmp_path / "mtp_heads", steps=3, beta=1.0)
    cfg = json.loads((folder / "mtp_heads.json").read_text())
    assert cfg["num_heads"] == 2 and cfg["layer_class"] == "LlamaDecoderLayer" and cfg["trained"]["steps"] == 3
    loaded = load_heads(folder, mtp.lm)
    for (n, p), q in zip(mtp.heads.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    ids = torch.randint(3, len(tok), (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = [h for h in mtp(ids)["heads"]]
        b = [h for h in MTPModel(mtp.lm, loaded)(ids)["heads"]]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    qwen, _ = load_model({"path": str(tiny_qwen3), "dtype": "float32"})
    with pytest.raises(ConfigError, match="loss.init_heads: the heads do not fit this model: model_type 'llama'"):
        load_heads(folder, qwen)
    with pytest.raises(ConfigError, match="holds no MTP heads"):
        load_heads(tmp_path, mtp.lm)


# --------------------------------------------------------------------------------------------
# Config and the named recipes


@pytest.mark.parametrize("override,expected", [
    ("loss.heads=0", "loss.heads: 0 is out of range; it must be >= 1"),
    ("loss.top_n=0", "loss.top_n: 0 is out of range; it must be >= 1"),
    ("loss.beta=-1", "loss.beta: -1.0 is out of range; it must be >= 0"),
    ("loss.accept.drafts=0", "loss.accept.drafts: 0 is out of range; it must be >= 1"),
    ("+loss.topn=5", "loss.topn: unknown key. Did you mean 'top_n'?"),
    ("loss.init_heads=/nonexistent/heads", "loss.init_heads: '/nonexistent/heads' holds no MTP heads"),
    ("loss.ce_weight=0", "loss.ce_weight: with loss.beta=0 and a frozen trunk nothing trains the heads"),
    ("loss.accept.prompts=601", "loss.accept.prompts: 601 asked; the toy test splits hold 600"),
    ("data=jsonl", "loss.accept.prompts: the acceptance check decodes the toy world's held-out test problems"),
])
def test_mtp_d_config_errors(compose, override, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose(["recipe=mtp_heads", override]))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_init_heads_with_fewer_heads_asked_is_an_error(compose, tiny_llama, tmp_path):
    mtp, _ = _tiny_mtp(tiny_llama, k=2)
    save_heads(mtp.heads, mtp.lm, tmp_path / "h")
    with pytest.raises(ConfigError) as err:
        validate(compose(["recipe=mtpd", f"loss.init_heads={tmp_path / 'h'}", "loss.heads=1"]))
    assert any("loss.heads: 1 is fewer than the 2 heads in loss.init_heads" in p for p in err.value.problems)


TINY = ["train.steps=4", "train.batch_size=8", "train.log_every=2", "data.num_examples=200",
        "loss.accept.prompts=4", "loss.accept.max_new_tokens=12"]


def test_mtpd_recipe_trains_heads_keeps_the_model_and_records_acceptance(compose, tmp_path):
    from safetensors.torch import load_file

    from runner.toy.zoo import ensure

    out = run(compose(["recipe=mtpd", "loss.heads=2", *TINY, f"output_root={tmp_path}"]), tmp_path / "k2")
    assert out["status"] == "completed" and out["kind"] == "mtp_d"
    m = out["metrics"]
    assert {"mtp/alpha_1", "mtp/alpha_2", "mtp/draft_acceptance_rate", "mtp/tokens_per_forward"} <= set(m)
    assert 1.0 <= m["mtp/tokens_per_forward"] <= 3.0 and m["mtp/greedy_identical"] == 1.0
    assert out["mtp_d"]["acceptance"]["greedy_identical"] == "4/4"
    log = [json.loads(line) for line in (tmp_path / "k2" / "train_log.jsonl").read_text().splitlines()]
    assert {"ce_main", "ce_1", "kl_1", "ce_2", "kl_2", "agree_2"} <= set(log[-1])
    # frozen trunk: the saved model is the input model, bit for bit; the heads sit beside it
    saved = load_file(str(tmp_path / "k2" / "checkpoint" / "model.safetensors"))
    shipped = load_file(str(ensure("toy-instruct") / "model.safetensors"))
    assert saved.keys() == shipped.keys() and all(torch.equal(saved[k], shipped[k]) for k in saved)
    heads_cfg = json.loads((tmp_path / "k2" / "mtp_heads" / "mtp_heads.json").read_text())
    assert heads_cfg["num_heads"] == 2 and heads_cfg["trained"]["beta"] == 1.0
    # the looped extension: start from these 2 heads, train 4
    out4 = run(compose(["recipe=mtpd", "loss.heads=4", f"loss.init_heads={tmp_path / 'k2' / 'mtp_heads'}", *TINY,
                        "train.steps=2", f"output_root={tmp_path}"]), tmp_path / "k4")
    assert out4["status"] == "completed" and len(out4["mtp_d"]["acceptance"]["alpha"]) == 4
    assert json.loads((tmp_path / "k4" / "mtp_heads" / "mtp_heads.json").read_text())["num_heads"] == 4


@pytest.mark.e2e
def test_mtp_heads_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner", "recipe=mtp_heads", *TINY, "train.steps=2",
                           f"hydra.run.dir={tmp_path / 'run'}", f"output_root={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["mtp_d"]["beta"] == 0.0 and "mtp/tokens_per_forward" in record["metrics"]


def test_accept_command_on_saved_heads_drafts_beyond_k(tiny_llama, tmp_path, capsys):
    from recipes.mtp_d.accept import main

    mtp, _ = _tiny_mtp(tiny_llama, k=2)
    save_heads(mtp.heads, mtp.lm, tmp_path / "h", model=str(tiny_llama))
    assert main([str(tmp_path / "h"), "--drafts", "3", "--prompts", "2", "--max-new-tokens", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drafts"] == 3 and len(report["alpha"]) == 3 and report["greedy_identical"] == "2/2"
    assert main([str(tmp_path), "--prompts", "2"]) == 2
    assert "holds no MTP heads" in capsys.readouterr().err


def test_a_draft_depth_never_reached_has_no_alpha():
    acc = spec.acceptance([0, 1], drafts=3)  # no step accepted 2 drafts, so d_3 was never checked
    assert acc.alpha == [0.5, 0.0, None] and "mtp/alpha_3" not in acc.stats() and "mtp/alpha_2" in acc.stats()
