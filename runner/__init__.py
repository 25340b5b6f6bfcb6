"""The runner: a config-driven experiment runner for LLM post-training research.

`runner/` is the framework (config, registries, models, data, the training loop, the lm-eval stage,
the toy world); it knows no method's math. Methods live in the `recipes` package and register
themselves with `runner.registry` when `recipes` is imported.
"""

__version__ = "0.1.0"
