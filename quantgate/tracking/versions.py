"""Version and git tags of a run: the stack's package versions (no heavy imports) and the commit."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

_VERSIONED = ("quantgate", "nvidia-modelopt", "transformers", "lm-eval", "torch", "mlflow", "tensorrt-llm")


def _dist_version(name: str) -> str:
    from importlib import metadata

    for candidate in (name, name.replace("-", "_")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(candidate)
    if name == "quantgate":  # running from a source checkout that is not pip-installed
        from quantgate import __version__

        return __version__
    return "not installed"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def version_tags(cwd: str | Path | None = None) -> dict[str, str]:
    """Run tags with the versions of the stack (no heavy imports) and the git commit of `cwd`."""
    tags = {f"quantgate.version.{name}": _dist_version(name) for name in _VERSIONED}
    here = Path(cwd) if cwd is not None else Path.cwd()
    sha = _git(["rev-parse", "HEAD"], here)
    if sha:
        tags["quantgate.git.sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # shown as "Git commit" on the MLflow run page
        status = _git(["status", "--porcelain", "--untracked-files=no"], here)
        if status is not None:
            tags["quantgate.git.dirty"] = "true" if status else "false"
    return tags

