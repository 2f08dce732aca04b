"""Content-addressed baseline cache.

The baseline's evaluation results are stored under a key that covers everything that changes
them: model content, tokenizer and chat template, suite data and task YAMLs, library versions,
engine backend and settings, dtype, device type, generation settings, limits and seeds. The key's
parts double as the gate's comparability facts. Entries carry a checksum; a corrupt entry is
rejected and recomputed. Only valid, finite results are stored, and an entry that does not
validate as finite results (e.g. one written by an older version from a NaN model) is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantgate.models import cache_root
from quantgate.rundir import atomic_write_json, atomic_write_text, pid_lock

log = logging.getLogger(__name__)


def baseline_root() -> Path:
    return cache_root() / "baselines"


@contextlib.contextmanager
def fill_lock(name: str) -> Iterator[None]:
    """Hold while checking and filling one cache entry, so two processes (two Ray workers, two
    CLI runs) that need the same entry at the same time do not both compute it: the second waits,
    then finds the entry. An flock on a file under the cache (released by the kernel if the holder
    dies); on a cluster the cache's filesystem must honour flock (docs/cluster.md)."""
    with pid_lock(cache_root() / "locks" / f"{name}.lock",
                  lambda pid: log.info("waiting: cache entry %s is being filled by another quantgate process (pid %s)", name, pid)):
        yield


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _invalid(text: str) -> str | None:
    """Why `text` is not cacheable baseline results (not valid, or not finite), or None."""
    from pydantic import ValidationError

    from quantgate.evaluation.results import EvalResults, nonfinite_in_results, summarize_locations

    try:
        results = EvalResults.model_validate_json(text)
    except (ValueError, ValidationError) as err:
        return f"not valid results ({str(err).splitlines()[0]})"
    bad = nonfinite_in_results(results)
    if bad:
        task, where = next(iter(bad.items()))
        return f"non-finite values in {', '.join(bad)} (first: {task}: {summarize_locations(where, 1)})"
    return None


def load_entry(key: str) -> str | None:
    """The cached results JSON for `key`, or None (missing, corrupt or invalid: those are removed,
    with one log line, and recomputed)."""
    entry = baseline_root() / key
    results, meta = entry / "results.json", entry / "entry.json"
    if not (results.is_file() and meta.is_file()):
        return None
    try:
        text = results.read_text(encoding="utf-8")
        expected = json.loads(meta.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError):
        expected, text = None, ""
    if expected != _sha(text):
        log.warning("baseline cache entry %s is corrupt; recomputing", key)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    why = _invalid(text)
    if why is not None:
        log.warning("baseline cache entry %s is unusable (%s); treating it as a miss", key, why)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return text


def store_entry(key: str, results_json: str, parts: dict[str, Any]) -> None:
    """Store baseline results; refuses (NonFiniteError, exit 3) anything that is not valid,
    finite results, so a NaN baseline is never reused by a later run."""
    from quantgate.evaluation.results import NonFiniteError

    why = _invalid(results_json)
    if why is not None:
        raise NonFiniteError("baseline", f"{why}: refusing to cache or gate it; the model produces NaN/inf (check its weights and dtype)")
    entry = baseline_root() / key
    atomic_write_text(entry / "results.json", results_json)
    atomic_write_json(entry / "entry.json", {"sha256": _sha(results_json), "key_parts": parts})


def list_entries() -> list[dict[str, Any]]:
    out = []
    root = baseline_root()
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        meta = entry / "entry.json"
        if not meta.is_file():
            continue
        try:
            parts = json.loads(meta.read_text())["key_parts"]
        except (OSError, ValueError, KeyError):
            parts = {}
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        out.append({"key": entry.name, "model": parts.get("model_source", "?"), "format": parts.get("dtype", "?"),
                    "backend": parts.get("backend", "?"), "bytes": size, "mtime": meta.stat().st_mtime})
    return out


def clear() -> int:
    root = cache_root()
    n = len(list_entries())
    for sub in ("baselines", "baseline_checkpoints"):
        shutil.rmtree(root / sub, ignore_errors=True)
    return n
