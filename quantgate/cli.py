"""Command line: parse, call the runner, map outcomes to exit codes. Nothing heavy at import.

Exit codes: 0 PASS, 1 REGRESSION, 2 bad input, 3 runtime error, 4 INCONCLUSIVE, 5 ANOMALOUS.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantgate import __version__
from quantgate.errors import ExitCode, QuantgateError, RecipeError

log = logging.getLogger("quantgate")


class _NoTraceback(logging.Formatter):
    """The console shows one line per record; tracebacks go to the run's log file only."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoTraceback("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "mlflow", "alembic", "lm-eval", "lm_eval", "transformers", "modelopt", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def _expand(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise RecipeError(p, "", "glob matched no recipe files")
        out.extend(matches)
    # Files starting with '_' are shared bases (extends:), not runnable recipes: skip them in a
    # list (`recipes/*.yaml`), keep one named alone so its problems are reported.
    if len(out) > 1:
        out = [m for m in out if not Path(m).name.startswith("_")]
        if not out:  # only shared bases: nothing would run, and an empty run must not exit 0
            raise RecipeError(" ".join(paths), "", "only shared base files ('_*.yaml'); name a recipe that extends them")
    return out


def _load_all(paths: list[str], overrides: list[str]) -> list[tuple[Any, str]]:
    from quantgate.recipe import load_recipe

    return [(load_recipe(p, overrides), p) for p in _expand(paths)]


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[Any]:
    """With --json, stdout carries one JSON object and nothing else: libraries that print
    (ModelOpt, transformers) are sent to stderr at the file-descriptor level."""
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    old_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout.flush()
        sys.stdout = old_stdout
        os.dup2(saved, 1)
        os.close(saved)


def _apply_env_tracking(recipes: list[tuple[Any, str]]) -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from quantgate.tracking import redact_uri

        for recipe, _ in recipes:
            # The recipe (recipe.yaml, params, show) keeps the URI without
            # user:password; MLflow still reads the real one from MLFLOW_TRACKING_URI.
            recipe.tracking.uri = redact_uri(uri)


def _check_tracking(recipes: list[tuple[Any, str]]) -> None:
    """The store must answer (bounded in time) before any model work."""
    from quantgate.tracking import check_store, resolve_tracking_uri

    seen: set[tuple[str, str]] = set()
    for recipe, _ in recipes:
        if recipe.tracking.enabled:
            key = (resolve_tracking_uri(recipe.tracking), recipe.tracking.experiment)
            if key not in seen:
                seen.add(key)
                check_store(*key)


# ---- commands ---------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    for recipe, path in _load_all(args.recipes, args.set or []):
        print(f"ok  {path}  ({recipe.name}: {recipe.quantization.format}, backend {recipe.engine.backend})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from quantgate.recipe import load_recipe
    from quantgate.sinks import public_recipe_yaml

    recipe = load_recipe(args.recipe, args.set or [])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        recipe.tracking.uri = os.environ["MLFLOW_TRACKING_URI"]
    sys.stdout.write(public_recipe_yaml(recipe))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from quantgate.plan import describe, plan
    from quantgate.runner import run_dir_for

    for recipe, path in _load_all(args.recipes, args.set or []):
        print(f"{path}: {recipe.name} ({recipe.quantization.format}, backend {recipe.engine.backend}) -> {run_dir_for(recipe)}")
        print(describe(plan(recipe)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from quantgate.regate import _from_mlflow
    from quantgate.reports.html import write_matrix_report, write_run_report

    folders = [Path(r) if Path(r).is_dir() else _from_mlflow(r) for r in args.runs]
    if len(folders) == 1:
        print(write_run_report(folders[0]))
    else:
        print(write_matrix_report(folders, Path(args.out)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from quantgate.executors import check_executor

    check_executor(args.executor)  # an unknown name or a missing package: exit 2 before any work
    recipes = _load_all(args.recipes, args.set or [])
    _check_before_work(recipes, args.executor, show_plan=True)
    with _stdout_to_stderr(args.json) as out:
        from quantgate.runner import matrix_table, run_recipes, worst

        outcomes = run_recipes(recipes, fresh=args.fresh, executor=args.executor)
        code = worst([o.exit_code for o in outcomes])
        _write_ci_outputs(args, outcomes)
        if args.json:
            payload: dict[str, Any] = outcomes[0].to_dict() if len(outcomes) == 1 else {"exit_code": code, "recipes": [o.to_dict() for o in outcomes]}
            if len(outcomes) == 1:
                payload = {"verdict": outcomes[0].decision, **payload}
            out.write(json.dumps(payload, default=str) + "\n")
            out.flush()
        else:
            print(matrix_table(outcomes))
            for o in outcomes:
                line = f"{o.recipe}: {o.decision} (exit {o.exit_code})"
                if o.reused:
                    line += " [stored outcome of a complete run directory: nothing re-run or uploaded]"
                if o.reason:
                    line += f" - {o.reason}"
                if o.exit_code == ExitCode.ERROR:
                    line += f" [log: {o.log_file}]"
                print(line)
    for o in outcomes:
        if o.exit_code in (ExitCode.ERROR, ExitCode.BAD_INPUT):
            print(f"quantgate: {o.recipe}: {o.reason} (log: {o.log_file})", file=sys.stderr)
    return code


def _check_before_work(recipes: list[tuple[Any, str]], executor: str, *, show_plan: bool) -> None:
    """Before any model work, cheapest first: unreadable model files and short calibration data
    (bad input, exit 2), then the tracking store (bounded in time, exit 3), then preflight."""
    from quantgate.preflight import check_inputs, preflight

    _apply_env_tracking(recipes)
    for recipe, path in recipes:
        check_inputs(recipe, path)
    _check_tracking(recipes)
    # With a cluster executor, preflight (GPU checks) runs in each task, on the node with the GPU.
    for recipe, _ in recipes if executor == "local" else []:
        report = preflight(recipe)
        for line in report.lines if show_plan else []:
            log.info("[%s] preflight: %s", recipe.name, line)
        for line in report.warnings:
            log.warning("[%s] preflight: %s", recipe.name, line)


def cmd_search(args: argparse.Namespace) -> int:
    """The cheapest candidate of a ladder that passes the gate (quantgate/search/)."""
    from quantgate.executors import check_executor
    from quantgate.search import search
    from quantgate.search.spec import expand, load_spec

    check_executor(args.executor)  # an unknown name or a missing package: exit 2 before any work
    ladder = expand(load_spec(args.spec), args.spec, args.set or [])
    _check_before_work([(c.recipe, args.spec) for c in ladder], args.executor, show_plan=False)
    with _stdout_to_stderr(args.json) as out:
        from quantgate.search.report import search_table

        result = search(args.spec, args.set or [], full=args.full, fresh=args.fresh, candidates=ladder, executor=args.executor)
        if args.json:
            out.write(json.dumps(result.to_dict(), default=str) + "\n")
            out.flush()
        else:
            print(search_table(result))
    return result.exit_code


def _write_ci_outputs(args: argparse.Namespace, outcomes: list[Any]) -> None:
    from quantgate.rundir import atomic_write_text

    if args.junit_xml:
        parts = [Path(o.run_dir, "junit.xml").read_text() for o in outcomes if Path(o.run_dir, "junit.xml").is_file()]
        atomic_write_text(Path(args.junit_xml), _merge_junit(parts, outcomes))
    md_parts = [Path(o.run_dir, "summary.md").read_text() for o in outcomes if Path(o.run_dir, "summary.md").is_file()]
    for o in outcomes:
        if not Path(o.run_dir, "summary.md").is_file():
            md_parts.append(f"### quantgate: {o.recipe}\n\n**{o.decision}**: {o.reason}\n")
    md = "\n\n".join(md_parts)
    if args.summary_md:
        atomic_write_text(Path(args.summary_md), md)
    from quantgate.report import write_github_step_summary

    write_github_step_summary(md)


def _merge_junit(parts: list[str], outcomes: list[Any]) -> str:
    """One <testsuites> document with each recipe's suite; recipes that errored before the gate
    become one failing testcase, so CI never reads an empty report as green."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="quantgate")
    for text in parts:
        el = ET.fromstring(text)
        suites = [el] if el.tag == "testsuite" else list(el)
        root.extend(suites)
    for o in outcomes:
        if not Path(o.run_dir, "junit.xml").is_file():
            suite = ET.SubElement(root, "testsuite", name=o.recipe, tests="1", failures="0", errors="1")
            case = ET.SubElement(suite, "testcase", name="run", classname=f"quantgate.{o.recipe}")
            ET.SubElement(case, "error", message=o.reason or o.decision).text = o.reason
    return ET.tostring(root, encoding="unicode")


def cmd_gate(args: argparse.Namespace) -> int:
    from quantgate.regate import regate

    with _stdout_to_stderr(args.json) as out:
        verdict, table = regate(args.run, args.set or [])
        if args.json:
            out.write(json.dumps(verdict.to_dict(), default=str) + "\n")
        else:
            print(table)
    return int(verdict.exit_code)


def cmd_cache(args: argparse.Namespace) -> int:
    from quantgate import cache

    if args.action == "prepare":
        # Set-up work a first run would otherwise do: the recipes' models converted (the bundled
        # GGUF -> a 16-bit HF checkpoint, once per machine) into the cache.
        from quantgate.models import resolve_model_dir
        from quantgate.recipe import load_recipe

        if not args.recipes:
            raise RecipeError("cli", "cache prepare", "name the recipes whose models to prepare, e.g. quantgate cache prepare recipes/fp8.yaml")
        for path in args.recipes:
            model = load_recipe(path).model
            print(f"{model.source}: {resolve_model_dir(model)}")
        return 0
    if args.action == "ls":
        entries = cache.list_entries()
        if not entries:
            print("baseline cache is empty")
        for e in entries:
            print(f"{e['key']}  {e['model']}  {e['format']}  {e['backend']}  {e['bytes'] / 1e3:.0f} kB")
    else:
        n = cache.clear()
        print(f"removed {n} baseline cache entries")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from quantgate.recipe import TrackingSpec
    from quantgate.tracking import resolve_tracking_uri, run_ui

    uri = resolve_tracking_uri(TrackingSpec(uri=args.uri) if args.uri else TrackingSpec())
    # run_ui stops the server's process group on SIGTERM/SIGINT/SIGHUP
    return run_ui(uri, host="127.0.0.1", port=args.port)


# ---- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantgate", description="Quantization quality gate: calibrate (ModelOpt), export, evaluate (lm-eval + golden diffs), gate, promote (MLflow).")
    p.add_argument("--version", action="version", version=f"quantgate {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = p.add_subparsers(dest="command", required=True)
    set_help = "override a recipe field, e.g. --set calibration.num_samples=16 (repeatable)"

    v = sub.add_parser("validate", help="check recipes without running anything")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("show", help="print the resolved recipe as YAML")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    s.set_defaults(func=cmd_show)

    r = sub.add_parser("run", help="run recipes: calibrate, export, evaluate, gate, promote")
    r.add_argument("recipes", nargs="+", help="recipe files or globs (files named _*.yaml are bases)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    r.add_argument("--json", action="store_true", help="print one JSON object (the outcome) on stdout, nothing else")
    r.add_argument("--junit-xml", metavar="PATH", help="write JUnit XML: one testcase per gate check")
    r.add_argument("--summary-md", metavar="PATH", help="write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY)")
    r.add_argument("--fresh", action="store_true", help="ignore completed stages of an earlier run")
    r.add_argument("--executor", default="local", metavar="NAME", help="where recipes run: local (this process, one after another; default) or ray (one Ray task per recipe on RAY_ADDRESS or a local cluster; docs/cluster.md)")
    r.set_defaults(func=cmd_run)

    se = sub.add_parser("search", help="find the cheapest candidate of a ladder that passes the gate (confirmed on held-out items)")
    se.add_argument("spec", help="search spec YAML (base recipe + candidates; see docs/search.md)")
    se.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of every candidate recipe (repeatable)")
    se.add_argument("--full", action="store_true", help="run the whole ladder (the Pareto front) instead of stopping at the first pass")
    se.add_argument("--json", action="store_true", help="print one JSON object (the search summary) on stdout, nothing else")
    se.add_argument("--fresh", action="store_true", help="ignore completed stages of earlier runs")
    se.add_argument("--executor", default="local", metavar="NAME", help="where candidates run: local (default) or ray (each candidate a Ray task; docs/cluster.md)")
    se.set_defaults(func=cmd_search)

    g = sub.add_parser("gate", help="re-judge stored results (run dir or MLflow run id) with other thresholds")
    g.add_argument("run", help="a run directory (runs/NAME-HASH) or an MLflow run id")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override gate fields, e.g. --set gate.confidence=0.9")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gate)

    pl = sub.add_parser("plan", help="print the stages a run of each recipe will execute")
    pl.add_argument("recipes", nargs="+")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    pl.set_defaults(func=cmd_plan)

    rp = sub.add_parser("report", help="(re)build the HTML report of a run directory or MLflow run id (several: a matrix report)")
    rp.add_argument("runs", nargs="+", help="run directories or MLflow run ids")
    rp.add_argument("--out", default="quantgate-report", help="output folder of a matrix report")
    rp.set_defaults(func=cmd_report)

    c = sub.add_parser("cache", help="list or clear the baseline cache; prepare the recipes' models (set-up)")
    c.add_argument("action", choices=["ls", "clear", "prepare"])
    c.add_argument("recipes", nargs="*", help="prepare: recipe files whose models to convert into the cache")
    c.set_defaults(func=cmd_cache)

    u = sub.add_parser("ui", help="start the MLflow UI on the local store (127.0.0.1)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--uri", help="tracking URI (default: the recipes' default local store)")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return int(args.func(args))
    except QuantgateError as err:
        print(f"quantgate: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("quantgate: interrupted", file=sys.stderr)
        return int(ExitCode.ERROR)
    except Exception as err:  # one line for the user; the traceback goes to the log file
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"quantgate: runtime error: {type(err).__name__}: {first} (log: {_write_traceback()})", file=sys.stderr)
        return int(ExitCode.ERROR)


def _write_traceback() -> str:
    """The traceback of the exception being handled, in ./.quantgate/last-error.log or, where the
    working directory is read-only, the temp folder. Never raises: it runs on the error path."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    for folder in (Path(".quantgate"), Path(tempfile.gettempdir()) / f"quantgate-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "last-error.log"
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "not written: no writable folder"


if __name__ == "__main__":
    sys.exit(main())
