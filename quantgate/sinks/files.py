"""Run-directory files for people and CI: verdict table, JUnit, Markdown summary, per-item JSONL
of both sides, and the self-contained HTML report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.rundir import atomic_write_text
from quantgate.sinks import Sink

if TYPE_CHECKING:
    from quantgate.runner import Run
    from quantgate.stages import Stage

log = logging.getLogger("quantgate")


def write_item_jsonl(path: Path, baseline: Any, candidate: Any) -> None:
    """Per-item results of both sides, one JSON line per (task, item)."""
    lines = []
    for task, bt in baseline.tasks.items():
        ct = candidate.tasks.get(task)
        cand_items = {i.doc_id: i for i in ct.items} if ct else {}
        for item in bt.items:
            c = cand_items.get(item.doc_id)
            lines.append(json.dumps({"task": task, "doc_id": item.doc_id, "prompt_hash": item.prompt_hash,
                                     "baseline": item.model_dump(exclude={"doc_id", "prompt_hash"}, exclude_none=True),
                                     "candidate": c.model_dump(exclude={"doc_id", "prompt_hash"}, exclude_none=True) if c else None}))
    atomic_write_text(path, "\n".join(lines) + "\n")


class FilesSink(Sink):
    name = "files"

    def stage_done(self, run: Run, stage: Stage, value: Any) -> None:
        if stage.produces != "verdict":
            return
        from quantgate import formats
        from quantgate.report import junit_xml, summary_markdown, verdict_table

        fmt = formats.get_format(run.recipe.quantization.format)
        atomic_write_text(run.run_dir / "verdict.txt", verdict_table(value))
        atomic_write_text(run.run_dir / "junit.xml", junit_xml(value, run.recipe.name))
        atomic_write_text(run.run_dir / "summary.md", summary_markdown(value, f"quantgate: {run.recipe.name} ({fmt.name})"))
        write_item_jsonl(run.run_dir / "items.jsonl", run.get("baseline").results, run.get("candidate"))

    def run_done(self, run: Run) -> None:
        from quantgate.rundir import atomic_write_json

        # outcome.json first: the report reads it.
        atomic_write_json(run.run_dir / "outcome.json", run.outcome.to_dict())
        write_report(run.run_dir)


def write_report(run_dir: Path) -> Path | None:
    """The HTML report of one run (a diagnostic: a report that cannot be drawn never fails the run)."""
    try:
        from quantgate.reports.html import write_run_report
    except ImportError:
        return None
    try:
        return write_run_report(run_dir)
    except Exception as err:
        log.warning("HTML report not written: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
