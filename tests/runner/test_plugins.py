"""A plugin of each component kind, written outside the repository as the README's "Add a method"
shows, loaded with ``plugins=[...]`` and run end to end."""

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from runner import registry
from runner.run import run

TINY_TRAIN = ["train.steps=2", "train.batch_size=8", "data.num_examples=32", "data.max_length=32", "eval=none"]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(name, source) writes a module outside the repository; the registry and the module are
    put back afterwards, so no other test sees what it registered."""
    registry.load_builtins()
    saved = {kind: (dict(registry._REGISTRY[kind]), dict(registry._CONTRACTS[kind])) for kind in registry.KINDS}
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = []

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return f"plugins=[{name}]"

    yield write
    for kind, (table, contracts) in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)
        registry._CONTRACTS[kind].clear()
        registry._CONTRACTS[kind].update(contracts)
    for name in names:
        sys.modules.pop(name, None)


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_a_kd_loss_plugin(plugin, compose, tiny_llama, tiny_qwen3, tmp_path):
    # exactly the README's example: the registered function is what the recipe calls
    load = plugin("my_kd", """
        import torch
        from runner.registry import register

        CALLS = []

        @register("kd_loss", "my_kl", ranges={"alpha": (0, 1)})
        def my_kl(student_logits, teacher_logits, mask, labels=None, *, alpha: float = 0.5):
            CALLS.append(alpha)
            s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
            per_token = (t.exp() * (t - s)).sum(-1)  # forward KL
            return (alpha * per_token * mask).sum() / mask.sum().clamp(min=1)
        """)
    cfg = compose(["recipe=distill", load, "loss.name=my_kl", "loss.alpha=0.25", f"teacher.path={tiny_llama}",
                   f"student.path={tiny_qwen3}", *TINY_TRAIN])
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed" and record["train"]["steps"] == 2
    assert sys.modules["my_kd"].CALLS and set(sys.modules["my_kd"].CALLS) == {0.25}
    bad = compose(["recipe=distill", load, "loss.name=my_kl", "loss.alpha=2"])
    with pytest.raises(Exception, match=r"loss.alpha: 2 is out of range"):
        run(bad, tmp_path / "bad")


def test_a_token_selector_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_selector", """
        from runner.registry import register

        @register("token_selector", "even_positions")
        def even_positions(token_logprobs, mask, *, keep_first: bool = True):
            keep = mask.clone()
            keep[..., 1::2] = False
            return keep
        """)
    record = run(compose(["recipe=profit_sft", load, "selector.name=even_positions", f"model.path={tiny_llama}",
                          *TINY_TRAIN, "train.log_every=1"]), tmp_path / "run")
    assert record["status"] == "completed"
    assert 0 < record["sft_mask"]["mean_kept_fraction"] < 1  # about half the response tokens


def test_a_merge_method_plugin(plugin, compose, tiny_llama, tiny_qwen3, tmp_path):
    load = plugin("my_merge", """
        from runner.registry import Inputs, register

        @register("merge_method", "take_second", inputs=Inputs(("instruct", "thinking")))
        def take_second(tensors, base=None):
            return tensors[1].clone()
        """)
    other = tmp_path / "other"
    from runner.models import load_model, save_checkpoint

    model, tok = load_model({"path": str(tiny_llama), "dtype": "float32"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_checkpoint(model, tok, other)
    record = run(compose(["recipe=merge", load, "merge.method=take_second", f"instruct.path={tiny_llama}",
                          f"thinking.path={other}", "eval=none"]), tmp_path / "run")
    out, expected = weights(tmp_path / "run" / "checkpoint"), weights(other)
    assert record["merge"]["method"] == "take_second" and all(torch.equal(out[k], expected[k]) for k in out)


def test_a_quantizer_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_quant", """
        import torch
        from runner.registry import register

        @register("quantizer", "sign", ranges={"scale": (0, None, "open")})
        def sign(weight, bits, group_size, *, scale: float = 1.0):
            return weight.sign() * weight.abs().mean() * scale
        """)
    record = run(compose(["recipe=quantize", load, "quant.method=sign", "quant.scale=1.0", f"model.path={tiny_llama}",
                          "eval=none"]), tmp_path / "run")
    w = weights(tmp_path / "run" / "checkpoint")["model.layers.0.mlp.down_proj.weight"]
    assert w.abs().unique().numel() == 1  # every weight is +-mean|W|
    assert record["quant"]["effective_bits"] > 0


def test_a_bit_allocator_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_alloc", """
        from runner.registry import register

        @register("bit_allocator", "first_gets_most")
        def first_gets_most(layers, avg_bits, choices):
            first = min(layers)
            return {layer: (max(choices) if layer == first else min(choices)) for layer in layers}
        """)
    record = run(compose(["recipe=quantize", load, "quant.allocator=first_gets_most", "quant.avg_bits=3",
                          f"model.path={tiny_llama}", "eval=none"]), tmp_path / "run")
    assert {i: layer["bits"] for i, layer in record["quant"]["layers"].items()} == {"0": 4, "1": 2}


def test_a_quant_transform_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_transform", """
        from dataclasses import dataclass

        import torch
        from runner.registry import register

        @register("quant_transform", "halve_down", ranges={"factor": (0, None, "open")})
        @dataclass
        class HalveDown:
            factor: float = 2.0
            exportable = False

            def problems(self, model):
                return []

            @torch.no_grad()
            def __call__(self, step):
                up, down = step.layer.mlp.up_proj, step.layer.mlp.down_proj
                up.weight.mul_(self.factor)  # h = act(gate) * up is linear in up: the layer is unchanged
                down.weight.div_(self.factor)
                step.stats["rows"] = sum(args[0].shape[0] if args else kw["hidden_states"].shape[0]
                                         for args, kw in step.inputs)
                return step.outputs()  # the recipe quantizes every target afterwards
        """)
    record = run(compose(["recipe=quantize", load, "quant.transform=halve_down", "+quant.transform_params.factor=4",
                          f"model.path={tiny_llama}", "quant.calib_samples=4", "quant.calib_seqlen=16",
                          "data.num_examples=32", "eval=none"]), tmp_path / "run")
    quant = record["quant"]
    assert quant["transform"]["name"] == "halve_down" and quant["transform"]["params"] == {"factor": 4.0}
    assert [layer["rows"] for layer in quant["transform"]["layers"].values()] == [4, 4]
    assert len(quant["modules"]) == 14  # every decoder linear still quantized


def test_a_noise_model_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_noise", """
        import torch
        from runner.registry import register

        @register("noise_model", "zero_out", ranges={"p": (0, 1)})
        def zero_out(weight, generator, *, p: float):
            keep = torch.rand(weight.shape, generator=generator) >= p
            return weight * keep
        """)
    record = run(compose(["recipe=memristor_noise", load, "noise.model=zero_out", "noise.param=p", "noise.sweep=[0,1]",
                          "noise.seeds=[0]", f"model.path={tiny_llama}", "eval.limit=4"]), tmp_path / "run")
    assert record["noise"]["model"] == "zero_out" and [p["value"] for p in record["noise"]["curve"]] == [0, 1]


def test_a_logger_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_logger", """
        import json
        from pathlib import Path
        from runner.registry import register

        @register("logger", "steps_file")
        class StepsFile:
            def __init__(self, run_dir, config=None, resumed_from=None):
                self.path = Path(run_dir) / "steps.json"
                self.steps = []

            def log(self, step, metrics):
                self.steps.append(step)

            def close(self):
                self.path.write_text(json.dumps(self.steps))
        """)
    run(compose(["recipe=sft", load, "train.loggers=[jsonl,steps_file]", f"model.path={tiny_llama}", *TINY_TRAIN,
                 "train.log_every=1"]), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "steps.json").read_text()) == [1, 2]


def test_a_recipe_plugin(plugin, compose, tiny_llama, tmp_path):
    load = plugin("my_recipe", """
        from runner.recipe import Recipe, RecipeResult
        from runner.registry import register

        @register("recipe", "count_parameters")
        class CountParameters(Recipe):
            roles = ("model",)

            def run(self, cfg, ctx):
                model, tokenizer = ctx.load_model("model")
                return RecipeResult(stats={"parameters": float(sum(p.numel() for p in model.parameters()))})
        """)
    record = run(compose(["recipe=sft", load, "kind=count_parameters", f"model.path={tiny_llama}", "eval=none"]),
                 tmp_path / "run")
    assert record["kind"] == "count_parameters" and record["metrics"]["parameters"] > 0


@pytest.mark.e2e
def test_a_plugin_through_the_command_line(tmp_path, tiny_llama, tiny_qwen3):
    """The report that started this: `recipe=distill loss.name=my_kl plugins=[myplug]` from a folder
    outside the repository, through `python -m runner`."""
    import os

    from tests.conftest import run_cli

    (tmp_path / "myplug.py").write_text(textwrap.dedent("""
        from runner.registry import register

        @register("kd_loss", "my_kl")
        def my_kl(student_logits, teacher_logits, mask, labels=None, *, alpha: float = 0.5):
            s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
            return (alpha * (t.exp() * (t - s)).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        """))
    proc = run_cli(["recipe=distill", "loss.name=my_kl", "plugins=[myplug]", f"teacher.path={tiny_llama}",
                    f"student.path={tiny_qwen3}", *TINY_TRAIN, f"output_root={tmp_path}"], cwd=tmp_path,
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    record = json.loads(next((tmp_path / "runs").glob("*/*-distill/results.json")).read_text())
    assert record["status"] == "completed" and record["config"]["loss"]["name"] == "my_kl"
