"""The local executor: recipes one after another in this process (the default).

The recipes of a matrix share one in-memory baseline memo, so the baseline is read from the cache
(or evaluated) once per process; the MLflow parent is opened by the first child that records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantgate.executors import Executor, Job

if TYPE_CHECKING:
    from quantgate.runner import RecipeOutcome


class LocalExecutor(Executor):
    name = "local"

    def run(self, jobs: list[Job], *, parent: Any = None) -> list[RecipeOutcome]:
        from quantgate.runner import run_recipe

        memo: dict[str, Any] = {}
        return [run_recipe(j.recipe, j.source, fresh=j.fresh, baseline_memo=memo, parent=parent) for j in jobs]
