"""Fixtures shared by the distill tests."""

import pytest

from runner.models import load_model


@pytest.fixture(scope="module")
def pair(tiny_llama, tiny_qwen3):
    """(student, teacher, tokenizer): a tiny qwen3 student and a tiny llama teacher on the toy tokenizer."""
    student, tok = load_model({"path": str(tiny_qwen3), "dtype": "float32"})
    teacher, _ = load_model({"path": str(tiny_llama), "dtype": "float32"})
    return student, teacher, tok
