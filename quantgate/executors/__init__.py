"""Executors: where a list of recipe jobs runs.

    local   one after another in this process, sharing an in-memory baseline (today's matrix)
    ray     one Ray task per recipe on a Ray cluster (RAY_ADDRESS, or a local one), each asking
            for the resources its recipe needs; imported only when chosen

An executor takes jobs (recipe, source, fresh) and returns one RecipeOutcome per job, in job
order; the caller (runner.run_recipes, later a search) keeps the MLflow parent run, the matrix
report and the exit code. Every executor runs the same runner.run_recipe in a run directory on
shared storage, so resume, the baseline cache and exactly-once registration work the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantgate.errors import ExitCode, QuantgateError
from quantgate.registry import lookup

if TYPE_CHECKING:
    from quantgate.recipe import Recipe
    from quantgate.runner import RecipeOutcome

EXECUTORS = {
    "local": "quantgate.executors.local:LocalExecutor",
    "ray": "quantgate.executors.ray:RayExecutor",
}
# What an executor needs installed beyond quantgate, checked without importing it.
REQUIRES = {"ray": ("ray", "pip install ray (or pip install 'quantgate[ray]')")}


class ExecutorError(QuantgateError):
    """Unknown executor name or a missing executor package: bad input, exit 2."""

    exit_code = ExitCode.BAD_INPUT


@dataclass
class Job:
    """One recipe to run: what an executor schedules."""

    recipe: Recipe
    source: str
    fresh: bool = False


class Executor:
    """Runs jobs and returns their outcomes in job order. `parent` is the matrix's MLflow parent
    (sinks.mlflow.MatrixParent) or None; `close` releases what `run` acquired (a Ray connection)."""

    name = "executor"

    def run(self, jobs: list[Job], *, parent: Any = None) -> list[RecipeOutcome]:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default."""


def check_executor(name: str) -> None:
    """Bad input (exit 2, one line) for an unknown name or a missing package; imports nothing."""
    try:
        lookup(EXECUTORS, name, "executor")
    except KeyError as err:
        raise ExecutorError(f"--executor: {err.args[0]}") from None
    if name in REQUIRES:
        module, hint = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise ExecutorError(f"--executor {name} needs the {module} package, which is not installed: {hint}")


def get_executor(name: str) -> Executor:
    """A fresh executor by name (see EXECUTORS); ExecutorError (exit 2) for an unknown name."""
    check_executor(name)
    module, cls = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
