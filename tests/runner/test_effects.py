import json
import math
from pathlib import Path

import pytest
import yaml

from runner import effects
from runner.effects import Sample, compare, compare_drop, verdict


def test_verdict_rule():
    assert verdict(0.21, 0.1) == "reproduced"
    assert verdict(0.2, 0.1) == "inconclusive"  # exactly 2 SE is not more than 2 SE
    assert verdict(-0.21, 0.1) == "contradicted"
    assert verdict(0.0, 0.0) == "inconclusive"
    assert verdict(1e-9, 0.0) == "reproduced"  # no noise at all: any lead counts


def _s(value, items=None):
    return Sample(value, items)


def test_compare_by_hand():
    # three seeds; per-seed differences 0.1, 0.3, 0.2 -> mean 0.2, SE_seeds = sd / sqrt(3) = 0.1 / sqrt(3)
    a = [_s(0.6, {"t:0": 1.0, "t:1": 0.2}), _s(0.8, {"t:0": 1.0, "t:1": 0.6}), _s(0.7, {"t:0": 1.0, "t:1": 0.4})]
    b = [_s(0.5, {"t:0": 0.8, "t:1": 0.2}), _s(0.5, {"t:0": 0.8, "t:1": 0.2}), _s(0.5, {"t:0": 0.8, "t:1": 0.2})]
    out = compare(a, b)
    assert out["diff"] == pytest.approx(0.2)
    assert out["se_seeds"] == pytest.approx(0.1 / math.sqrt(3))
    # per problem, averaged over seeds: t:0 1.0 - 0.8 = 0.2, t:1 0.4 - 0.2 = 0.2 -> sd 0, SE_problems 0
    assert out["se_items"] == pytest.approx(0.0)
    assert out["se"] == pytest.approx(0.1 / math.sqrt(3))


def test_compare_an_arm_without_randomness_pairs_with_every_seed():
    items = {f"t:{i}": float(i % 2) for i in range(4)}  # 0, 1, 0, 1
    once = [_s(0.5, items)]
    seeded = [_s(0.6, {k: v for k, v in items.items()}), _s(0.4, dict(items))]
    out = compare(seeded, once)
    # differences +0.1 and -0.1 against the one run: sd 0.1414, SE_seeds = 0.1414 / sqrt(2) = 0.1
    assert out["diff"] == pytest.approx(0.0) and out["se_seeds"] == pytest.approx(0.1)
    # both deterministic and identical per problem: only zeros
    assert compare(once, once) == {"diff": 0.0, "se": 0.0, "se_seeds": 0.0, "se_items": 0.0}
    # no per-problem record: the problems' share of the SE is unknown and left out
    assert compare([_s(0.7)], [_s(0.5)])["se_items"] is None


def test_compare_pairs_problems_not_positions():
    a = [_s(0.5, {"t:0": 1.0, "t:1": 0.0, "t:2": 1.0, "t:3": 0.0})]
    b = [_s(0.25, {"t:0": 1.0, "t:1": 0.0, "t:2": 0.0, "t:3": 0.0})]
    out = compare(a, b)  # per-problem differences 0, 0, 1, 0: mean 0.25, sd 0.5, SE 0.25
    assert out["diff"] == pytest.approx(0.25) and out["se_items"] == pytest.approx(0.25)


def test_drop_claim_by_hand():
    hard_full = [_s(0.5, {"h:0": 1.0, "h:1": 0.0})]
    hard_quant = [_s(0.25, {"h:0": 0.5, "h:1": 0.0})]
    easy_full = [_s(1.0, {"e:0": 1.0, "e:1": 1.0})]
    easy_quant = [_s(0.9, {"e:0": 0.9, "e:1": 0.9})]
    out = compare_drop({"hard": hard_quant, "easy": easy_quant}, {"hard": hard_full, "easy": easy_full}, "hard", "easy")
    assert out["diff"] == pytest.approx((1 - 0.25 / 0.5) - (1 - 0.9 / 1.0))  # 0.5 - 0.1
    assert out["se_items"] > 0 and out["se_seeds"] == 0.0


def _fake_run(folder: Path, value: float, items: list[float], *, seed: int, tokens: float = 5.0):
    """A completed run folder as the runner writes one: results.json and lm-eval's logged samples."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "status": "completed", "checkpoint": None, "seed": seed, "timings": {"total_s": 10.0},
        "config": {"model": {"path": "toy-base"}},
        "metrics": {"toy_arith/exact_match": value, "toy_arith/response_tokens": tokens}, "baseline_metrics": {}}))
    (folder / "eval" / "final").mkdir(parents=True)
    with (folder / "eval" / "final" / "samples_toy_arith.jsonl").open("w") as f:
        for i, x in enumerate(items):
            f.write(json.dumps({"doc_id": i, "exact_match": x, "filtered_resps": ["12+3=15"]}) + "\n")


def test_a_family_is_evaluated_and_rendered_from_its_runs(tmp_path):
    fam_dir = tmp_path / "out" / "demo"
    fam_dir.mkdir(parents=True)
    (fam_dir / effects.FAMILY_FILE).write_text(yaml.safe_dump({
        "family": "demo", "description": "a made-up family", "seeds": [0, 1],
        "metrics": {"EM": ["toy_arith/exact_match"], "tokens": ["toy_arith/response_tokens"]},
        "arms": {"good": ["recipe=sft"], "bad": ["recipe=sft"], "same": {"overrides": ["recipe=sft"], "seeded": False},
                 "ghost": ["recipe=sft"]},
        "claims": [
            {"id": "up", "claim": "good beats bad", "source": "paper", "metric": "EM", "higher": "good", "lower": "bad"},
            {"id": "down", "claim": "bad beats good", "source": "paper", "metric": "EM", "higher": "bad", "lower": "good"},
            {"id": "close", "claim": "same comes within 0.5 of good", "source": "paper", "metric": "EM",
             "higher": "same", "lower": "good", "by": -0.5, "show": ["tokens"]},
            {"id": "lost", "claim": "ghost beats good", "source": "paper", "metric": "EM", "higher": "ghost", "lower": "good"},
        ]}))
    for seed in (0, 1):
        _fake_run(fam_dir / "good" / f"seed{seed}", 0.9, [1.0] * 9 + [0.0], seed=seed)
        _fake_run(fam_dir / "bad" / f"seed{seed}", 0.1, [0.0] * 9 + [1.0], seed=seed)
    _fake_run(fam_dir / "same" / "seed0", 0.5, [1.0] * 5 + [0.0] * 5, seed=0)
    docs = tmp_path / "docs"
    rows = effects.render(tmp_path / "out", docs)["demo"]
    assert [r["verdict"] for r in rows] == ["reproduced", "contradicted", "inconclusive", "not run"]
    assert "no completed run of ghost" in rows[3]["why"]
    up = rows[0]
    assert up["diff"] == pytest.approx(0.8) and up["se_seeds"] == 0.0 and up["wall_s"] == 40.0
    # per problem: 9 problems differ by +1 and one by -1 -> SE = sd / sqrt(10)
    assert up["se_items"] == pytest.approx(math.sqrt(sum((x - 0.8) ** 2 for x in [1] * 9 + [-1]) / 9) / math.sqrt(10))
    text = (docs / "effects.md").read_text()
    assert "| demo | 4 | 1 | 1 | 1 | 1 |" in text and "**reproduced**" in text and "tokens 5.000" in text  # "12+3=15" is 5 tokens
    assert (docs / "effects_demo.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "demo" / "effects.json").read_text())[1]["verdict"] == "contradicted"
    from runner.report import main as report

    assert report([str(tmp_path / "out")]) == 0  # `python -m runner.report` renders the same folder in place
    assert (tmp_path / "out" / "effects.md").read_text().split("## Summary")[1] == text.split("## Summary")[1]


def test_bad_claims_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "family": "bad", "description": "", "seeds": [0], "metrics": {"EM": ["toy_arith/exact_match"]},
        "arms": {"a": ["recipe=sft"]},
        "claims": [{"id": "x", "claim": "", "source": "", "metric": "EMM", "higher": "a", "lower": "b"}]}))
    with pytest.raises(effects.ConfigError) as err:
        effects.load_family(bad)
    assert "unknown arm 'b'" in str(err.value) and "unknown metric 'EMM'" in str(err.value)


@pytest.mark.parametrize("name", effects.family_names())
def test_every_arm_of_the_shipped_claims_is_a_valid_run(name, compose):
    """Every arm composes and passes the runner's validation exactly as `make effects` would launch it."""
    from runner.run import validate

    fam = effects.load_family(effects.CLAIMS_DIR / f"{name}.yaml")
    assert fam.name == name and fam.claims
    for arm in fam.arms.values():
        overrides = [o if not o.startswith("seed=") else "seed=1" for o in effects.arm_overrides(fam, arm, fam.seeds)]
        cfg = compose(overrides)
        validate(cfg)
        assert cfg.seed == 1


def test_unknown_family_is_an_error(capsys):
    assert effects.main(["--family", "distil", "--render-only"]) == 2
    assert "unknown distil" in capsys.readouterr().err


def test_claims_are_read_from_todays_file_only_while_its_arms_are_what_ran(tmp_path, monkeypatch):
    spec = {"family": "demo", "description": "", "seeds": [0], "metrics": {"EM": ["toy_arith/exact_match"]},
            "arms": {"a": ["recipe=sft"], "b": ["recipe=sft"]},
            "claims": [{"id": "x", "claim": "a beats b", "source": "s", "metric": "EM", "higher": "a", "lower": "b"}]}
    (tmp_path / "ran.yaml").write_text(yaml.safe_dump(spec))
    ran = effects.load_family(tmp_path / "ran.yaml")
    monkeypatch.setattr(effects, "CLAIMS_DIR", tmp_path / "conf")
    (tmp_path / "conf").mkdir()
    spec["claims"][0]["why"] = "a reason written after the runs"
    (tmp_path / "conf" / "demo.yaml").write_text(yaml.safe_dump(spec))
    assert effects._claims_for(ran).claims[0].why == "a reason written after the runs"
    spec["arms"]["b"] = ["recipe=sft", "train.lr=1e-4"]  # the runs no longer match today's arms
    (tmp_path / "conf" / "demo.yaml").write_text(yaml.safe_dump(spec))
    assert effects._claims_for(ran).claims[0].why is None


def test_response_tokens_of_a_run_without_checkpoint_or_model_role_use_its_first_model_role(tmp_path, tiny_llama):
    # decoding-time realignment evaluates `aligned` and `reference` in memory: no checkpoint, no `model`
    run = tmp_path / "run"
    (run / "eval" / "final").mkdir(parents=True)
    config = {"model": None, "aligned": {"path": str(tiny_llama)}, "reference": {"path": str(tiny_llama)}}
    (run / "results.json").write_text(json.dumps({"checkpoint": None, "config": config}))
    samples = run / "eval" / "final" / "samples_toy_arith.jsonl"
    samples.write_text(json.dumps({"doc_id": 0, "resps": [["1+2=3"]], "filtered_resps": ["1+2=3"]}) + "\n")
    tokens = effects._run_tokenizer(run)("1+2=3", add_special_tokens=False).input_ids
    assert effects._item_scores(samples, "response_tokens", run) == {"toy_arith:0": float(len(tokens))}
