"""What a run does, in order: `plan(recipe)` returns its stages.

    quantized recipe:  model -> baseline -> calibrate -> probe -> [backend stages] -> export
                       -> evaluate -> golden -> fidelity -> gate
    16-bit recipe:     model -> baseline -> candidate_is_baseline_artifact
                       -> candidate_is_baseline_results -> golden -> gate

The runner (quantgate/runner.py) executes a plan; sinks (quantgate/sinks/) turn its artifacts
into files, MLflow records, registry versions and reports. `quantgate plan RECIPE` prints it.
"""

from __future__ import annotations

from quantgate import formats
from quantgate.recipe import Recipe
from quantgate.stages import Stage
from quantgate.stages.baseline import EvaluateBaseline
from quantgate.stages.evaluate import BaselineArtifact, BaselineIsCandidate, EvaluateCandidate
from quantgate.stages.judge import GoldenDiff, Judge, MeasureExportFidelity
from quantgate.stages.model import ResolveModel
from quantgate.stages.quantize import Calibrate, Export, ProbeCalibrated


def plan(recipe: Recipe) -> list[Stage]:
    from quantgate.engines import backend_stages

    fmt = formats.get_format(recipe.quantization.format)
    if not fmt.quantized:
        return [ResolveModel(), EvaluateBaseline(), BaselineArtifact(), BaselineIsCandidate(), GoldenDiff(), Judge(candidate_is_baseline=True)]
    probe = [ProbeCalibrated()] if recipe.evaluation.golden.enabled else []
    return [
        ResolveModel(),
        EvaluateBaseline(),
        Calibrate(),
        *probe,  # reads the in-memory model: before export, which mutates it
        *backend_stages(recipe),
        Export(),
        EvaluateCandidate(),
        GoldenDiff(),
        *([MeasureExportFidelity()] if probe else []),
        Judge(),
    ]


def describe(stages: list[Stage]) -> str:
    """The plan as text: one line per stage with what it needs and produces."""
    width = max(len(s.name) for s in stages)
    lines = []
    for i, s in enumerate(stages, 1):
        io = f"{', '.join(s.needs) or '-'} -> {s.produces}"
        kind = "" if s.persistent else " (in memory)"
        lines.append(f"{i:2d}. {s.name.ljust(width)}  {io}{kind}: {s.describe()}")
    return "\n".join(lines)
