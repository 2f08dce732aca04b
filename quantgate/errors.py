"""Errors that the CLI maps to exit codes, each rendered as one line."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of `quantgate run` (documented in the README)."""

    PASS = 0
    REGRESSION = 1
    BAD_INPUT = 2
    ERROR = 3
    INCONCLUSIVE = 4
    ANOMALOUS = 5


class QuantgateError(Exception):
    """Base class: `str(err)` is the one line the user sees."""

    exit_code: ExitCode = ExitCode.ERROR


class RecipeError(QuantgateError):
    """The recipe (or an override) is wrong: names the file, the key path and what is expected."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class PreflightError(QuantgateError):
    """The run cannot work on this machine/stack (missing backend, unsupported GPU, prompt too long)."""

    exit_code = ExitCode.BAD_INPUT


class StageError(QuantgateError):
    """A stage failed at run time."""

    exit_code = ExitCode.ERROR

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}")
