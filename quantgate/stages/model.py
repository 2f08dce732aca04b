"""Stage `model`: resolve the recipe's model source to a local HF directory and hash its content."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from quantgate.stages import RunContext, Stage


@dataclass(frozen=True)
class ModelRef:
    dir: Path
    content_hash: str


def model_content_hash(model_dir: Path) -> str:
    """Content hash of the resolved model dir, memoized by (path, sizes, mtimes)."""
    from quantgate import cache
    from quantgate.models import cache_root, dir_content_hash
    from quantgate.rundir import atomic_write_text

    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    stamp = json.dumps([(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = cache_root() / "hashes" / (cache.cache_key({"dir": str(model_dir.resolve()), "stamp": stamp}) + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = dir_content_hash(model_dir)
    atomic_write_text(memo, digest)
    return digest


class ResolveModel(Stage):
    """Resolve the model source (bundled GGUF, local dir, .gguf, hub id) and hash its content."""

    name: ClassVar[str] = "model"
    produces: ClassVar[str] = "model"
    persistent: ClassVar[bool] = False
    always: ClassVar[bool] = True  # the content hash keys everything downstream

    def identity(self, recipe: Any) -> Any:
        return recipe.model.model_dump(mode="json")

    def run(self, ctx: RunContext, **inputs: Any) -> ModelRef:
        from quantgate.models import resolve_model_dir

        model_dir = resolve_model_dir(ctx.recipe.model)
        return ModelRef(model_dir, model_content_hash(model_dir))

    def value_key(self, value: ModelRef) -> str:
        return value.content_hash
