"""A run is a list of stages (see quantgate/plan.py); this module defines what a stage is.

A stage is a small typed unit: its name, the artifacts it needs (by name), the artifact it
produces, what besides its inputs decides its output (`identity`), and `run`. Persistent stages
write their artifact to the run directory and read it back on resume; ephemeral ones (the
calibrated model, which lives only in memory) run again whenever a later stage needs them.
The runner (quantgate/runner.py) owns everything else: run directory, lock, manifest, resume,
clock, logging, fault injection and the sinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from quantgate.recipe import Recipe

# What `Stage.load` returns when the run directory has no usable artifact (None can be a value).
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


@dataclass
class RunContext:
    """What every stage may read: the recipe, where to write, and run-wide services."""

    recipe: Recipe
    run_dir: Path
    clock: Any  # runner.StageClock
    baseline_memo: dict[str, Any] = field(default_factory=dict)  # shared by the recipes of a matrix


class Stage:
    """One step of a run. Subclasses set the class attributes and implement `run` (and, when
    persistent, `save` / `load`)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[str]
    persistent: ClassVar[bool] = True  # artifact written to the run dir, reused on resume
    always: ClassVar[bool] = False  # cheap and keyed by its output (e.g. the model's content hash)

    def identity(self, recipe: Recipe) -> Any:
        """What, besides the stage's inputs, decides its output. Hashed into the stage key: a stage
        whose key changed runs again, and so does everything downstream of it."""
        return None

    def prefetch(self, ctx: RunContext) -> None:
        """Called once at the start of a run for each stage that will run: start slow one-time work
        that needs none of the stage's inputs (compiling CUDA extensions) in the background; `run`
        waits for it. Work started here must be safe to abandon and to redo."""

    def run(self, ctx: RunContext, **inputs: Any) -> Any:
        raise NotImplementedError

    def save(self, ctx: RunContext, value: Any) -> dict[str, Any]:
        """Write the artifact to the run directory (atomically); returns manifest details."""
        return {}

    def load(self, ctx: RunContext) -> Any:
        """Read the artifact back (MISSING: absent or unreadable, so the stage runs again)."""
        return MISSING

    def value_key(self, value: Any) -> str:
        """For `always` stages: the part of the output that keys what depends on it."""
        return ""

    def describe(self) -> str:
        first_paragraph = (self.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(first_paragraph.split())
