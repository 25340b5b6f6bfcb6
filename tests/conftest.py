"""Shared fixtures: offline environment, the shipped toy zoo, tiny models, Hydra composition."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Zoo names resolve to the shipped entries (the same weights on every machine); a test of the build
# path sets RUNNER_TOY_PROFILE=smoke itself. Anything cached (Timber's SVDs, builds) goes to a temp folder.
os.environ.pop("RUNNER_TOY_PROFILE", None)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each worker (and the command lines it starts) computes on one
    # thread, so two workers never fight over the cores.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if "RUNNER_CACHE_DIR" not in os.environ:
        os.environ["RUNNER_CACHE_DIR"] = str(tmp_path_factory.mktemp("runner-cache"))
    yield Path(os.environ["RUNNER_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from runner.train import reset_accelerator_state

    reset_accelerator_state()
    yield
    reset_accelerator_state()


@pytest.fixture(scope="session")
def toy_tokenizer():
    from runner.toy.zoo import build_tokenizer

    return build_tokenizer()


def problems_of(cfg) -> list[str]:
    """The problems the job's checks report for a composed config (it must report some)."""
    from runner.cli import validate_job
    from runner.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate_job(cfg)
    return err.value.problems


def make_tiny_model(path: Path, tokenizer, model_type: str = "llama", seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random tiny causal LM with the toy tokenizer, saved as an HF folder."""
    from runner.models import save_checkpoint
    from runner.toy.zoo import Arch, new_model

    arch = Arch(model_type=model_type, hidden=hidden, layers=layers, heads=4, intermediate=2 * hidden)
    model = new_model(arch, tokenizer, seed)
    save_checkpoint(model, tokenizer, path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, toy_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", toy_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, toy_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", toy_tokenizer, "qwen3")


@pytest.fixture
def compose():
    """compose(overrides) -> the job config exactly as `python -m runner` would build it."""
    from runner.compose import compose_job

    return lambda overrides=(): compose_job(list(overrides))


def run_cli(args, cwd, timeout=600, env=None):
    """Run `python -m runner ...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
