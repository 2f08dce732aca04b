"""Typed artifacts that pass between stages and are written to / read from the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def save(self, path: Path) -> None:
        from quantgate.rundir import atomic_write_text

        atomic_write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path):  # -> Self (py3.11)
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


class CalibrationInfo(Artifact):
    """What calibrated the model: enough to reproduce it and to key caches."""

    dataset: str
    num_samples: int
    seq_len: int
    seed: int
    content_sha256: str
    tokens: int
    seconds: float
    auto_quantize: dict[str, Any] | None = None
    """Format auto_quantize: the budget and how many layers got each format (None otherwise)."""


class Checkpoint(Artifact):
    """An exported checkpoint directory: the artifact evaluated, registered and deployed."""

    path: str
    format: str
    quant_algo: str | None
    dtype: str
    size_bytes: int
    export_seconds: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def hf_quant_config(self) -> dict[str, Any] | None:
        f = self.dir / "hf_quant_config.json"
        return json.loads(f.read_text()) if f.is_file() else None


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
