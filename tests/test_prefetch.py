"""Background one-time work (Stage.prefetch): ModelOpt's CUDA extensions compile in a child process
while the baseline runs, and calibration waits for it inside its `modelopt_cuda_extensions` clock."""

import json
from typing import ClassVar

import pytest

from quantgate.recipe import load_recipe
from quantgate.runner import Run
from quantgate.stages import Stage, quantize


class _Toy(Stage):
    produces: ClassVar[str] = ""

    def __init__(self, name: str, needs: tuple[str, ...] = (), persistent: bool = True) -> None:
        self.name, self.produces, self.needs, self.persistent = name, name, needs, persistent  # type: ignore[misc]
        self.prefetched = 0

    def prefetch(self, ctx):
        self.prefetched += 1


def test_only_stages_that_will_run_prefetch(tmp_path):
    """A persistent stage complete with today's key, and an in-memory stage whose consumers are all
    complete, start nothing; a stage still to run does."""
    recipe = load_recipe("recipes/fp8.yaml")
    memory, done, todo = _Toy("calibrated", persistent=False), _Toy("export", ("calibrated",)), _Toy("evaluate", ("export",))
    run = Run(recipe, "recipes/fp8.yaml", [memory, done, todo], tmp_path, {})
    run.manifest.data["stages"]["export"] = {"key": run.key(done)}
    run.prefetch()
    assert (memory.prefetched, done.prefetched, todo.prefetched) == (0, 0, 1)
    del run.manifest.data["stages"]["export"]
    run.prefetch()
    assert (memory.prefetched, done.prefetched, todo.prefetched) == (1, 1, 2)


class _Child:
    def __init__(self) -> None:
        self.waited = 0

    def wait(self) -> int:
        self.waited += 1
        return 0


def test_calibrate_starts_one_compile_on_cuda_only(monkeypatch, tmp_path):
    recipe = load_recipe("recipes/fp8.yaml")
    started = []
    monkeypatch.setattr(quantize, "start_modelopt_cuda_compile", lambda r: started.append(r) or _Child())
    stage = quantize.Calibrate()
    run = Run(recipe, "recipes/fp8.yaml", [stage], tmp_path, {})
    monkeypatch.setattr(quantize, "calibration_device", lambda r: "cpu")
    stage.prefetch(run.ctx)
    assert not started and stage._compiling is None
    monkeypatch.setattr(quantize, "calibration_device", lambda r: "cuda")
    stage.prefetch(run.ctx)
    stage.prefetch(run.ctx)
    assert len(started) == 1 and isinstance(stage._compiling, _Child)
    # a later recipe of the same process (matrix, search) whose extensions are loaded starts none
    monkeypatch.setattr(quantize, "_WARMED", {quantize._warm_key(recipe.quantization, recipe.model.dtype)})
    other = quantize.Calibrate()
    other.prefetch(run.ctx)
    assert len(started) == 1 and other._compiling is None


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_the_child_warms_up_what_the_recipe_quantizes(monkeypatch, fmt):
    """The child gets the recipe's quantization (every field) and the model's dtype."""
    import torch

    recipe = load_recipe("recipes/fp8.yaml", [f"quantization.format={fmt}", "model.dtype=bfloat16"])
    seen = []
    monkeypatch.setattr(quantize, "warm_up_modelopt_cuda", lambda f, q, dtype: seen.append((f.name, q, dtype)))
    payload = json.dumps({"quantization": recipe.quantization.model_dump(mode="json"), "dtype": recipe.model.dtype})
    quantize.warm_up_in_child(payload)
    (name, quantization, dtype), = seen
    assert name == fmt and quantization == recipe.quantization and dtype == torch.bfloat16


def test_the_child_command_reaches_the_warm_up(monkeypatch):
    """The real child command (imports, payload, recipe schema) gets as far as ModelOpt's warm-up,
    which on a machine without CUDA fails there and nowhere earlier."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("on CUDA the child would compile for real")
    recipe = load_recipe("recipes/fp8.yaml")
    done = subprocess.run(quantize.modelopt_compile_command(recipe), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    tail = done.stderr.strip().splitlines()[-1]
    assert "CUDA" in tail or "cuda" in tail, tail
    assert "warm_up_modelopt_cuda" in done.stderr and "Error" in tail
