"""Run directories: atomic writes and a manifest of completed stages (what resume relies on)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def staging_dir(final: Path) -> Path:
    """A fresh temp folder beside `final`; publish it with `publish_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a completed staging folder into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class Manifest:
    """`manifest.json` in a run directory: which stages completed, with their outputs."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "manifest.json"
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict[str, Any]:
        return self.data["stages"][stage]

    def mark(self, stage: str, **info: Any) -> None:
        self.data["stages"][stage] = info
        atomic_write_json(self.path, self.data)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


@contextlib.contextmanager
def pid_lock(path: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """An exclusive flock on `path` (released by the kernel if the holder dies), with the
    holder's pid written in it; when another process holds it, `on_wait(pid)` says so once and
    this process waits its turn (the run directory lock, the cache's fill locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            on_wait(fh.read().strip() or "?")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
