"""Errors a user can cause, reported as one clear message without a traceback."""

from __future__ import annotations


class RunnerError(Exception):
    """Base class for errors the CLI reports as a message instead of a traceback."""


class ConfigError(RunnerError):
    """One or more problems with the composed config, found before any work starts.

    Holds every problem found so a user can fix them all at once.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return f"invalid config: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid config ({len(self.problems)} problems):\n{lines}"


class TrainingDiverged(RunnerError):
    """The loss or the gradient norm became NaN or infinite; training stopped."""
