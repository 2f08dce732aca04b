"""The Ray executor: each recipe is one Ray task on a Ray cluster.

Why one task per recipe and not one per stage: the stages of a recipe hand each other an
in-memory calibrated model (calibrate -> probe -> export) that is never written to disk, and a
recipe's stages run one after another anyway; splitting them into tasks would serialize the model
through the object store for no parallelism. Recipes, on the other hand, are independent.

What the cluster must share with the driver (see docs/cluster.md):
- storage: the run directories (`output_dir`), the quantgate cache (QUANTGATE_CACHE: converted
  models, built suites, the baseline cache and exports) and the model and data files, at the same
  paths on every node. A task runs in the driver's working directory, so relative paths in a
  recipe mean the same thing on every node. The run directory's lock and the cache's fill locks
  are `flock`s, which the shared filesystem must honour (local disk, NFSv4, CephFS, Lustre with
  `flock`).
- the MLflow store: every task logs to the store the driver checked, as a child of the matrix's
  parent run (the parent's run id travels with the task, not the parent object).

Environment: the driver's QUANTGATE_*, MLFLOW_*, HF_* and TRANSFORMERS_* variables (and
TORCH_EXTENSIONS_DIR) travel with each task and are set for its duration only; Ray itself sets
CUDA_VISIBLE_DEVICES to the GPU it granted.

Faults: a task whose worker process dies (SIGKILL, OOM killer, a lost node) is retried by Ray
up to QUANTGATE_RAY_MAX_RETRIES times (default 2); the retry resumes from the run directory's
manifest (the dead worker's lock died with it), closes the dead attempt's MLflow run, and
registers at most once (registration is idempotent by the run directory's run key). When the
retries are spent the recipe is reported ERROR with one line; the matrix's exit code is the worst.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from quantgate.errors import ExitCode, PreflightError, QuantgateError
from quantgate.executors import Executor, ExecutorError, Job

if TYPE_CHECKING:
    from quantgate.recipe import Recipe
    from quantgate.runner import RecipeOutcome

log = logging.getLogger("quantgate")

FORWARD_PREFIXES = ("QUANTGATE_", "MLFLOW_", "HF_", "TRANSFORMERS_", "TORCH_EXTENSIONS_DIR")
DEFAULT_MAX_RETRIES = 2

# Baseline results already read in this worker process, by key (a worker may run several recipes).
_WORKER_MEMO: dict[str, Any] = {}


def max_retries() -> int:
    raw = os.environ.get("QUANTGATE_RAY_MAX_RETRIES", str(DEFAULT_MAX_RETRIES))
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ExecutorError(f"QUANTGATE_RAY_MAX_RETRIES={raw!r}: expected a whole number >= 0")
    return n


def task_resources(recipe: Recipe, cluster_gpus: float) -> dict[str, float]:
    """What one recipe's task asks Ray for: its GPUs (tensor_parallel_size of them) when it runs on
    CUDA, else one CPU. `auto` means CUDA when the cluster has GPUs, as it does on one machine."""
    device = recipe.engine.device
    if device == "cuda" and cluster_gpus <= 0:
        raise PreflightError(f"{recipe.name}: engine.device=cuda but the Ray cluster has no GPU resources; use engine.device=cpu or auto, or add GPU nodes")
    if device == "cuda" or (device == "auto" and cluster_gpus > 0):
        return {"num_gpus": float(max(1, recipe.engine.tensor_parallel_size)), "num_cpus": 1.0}
    return {"num_cpus": 1.0}


def job_environment() -> dict[str, str]:
    """The variables a task runs with: the driver's quantgate/MLflow/HF settings, and the driver's
    cache folder made explicit (a node's default ~/.cache would be another cache)."""
    from quantgate.models import cache_root

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    env["QUANTGATE_CACHE"] = str(cache_root().expanduser().resolve())
    return env


class ParentRunRef:
    """The matrix's parent run as a child sees it on a worker: just its id (MlflowSink calls
    `run_id()`); the driver owns and closes the parent."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id

    def run_id(self) -> str:
        return self._run_id


@contextlib.contextmanager
def _task_context(cwd: str, env: dict[str, str]) -> Iterator[None]:
    """The driver's working directory and variables for one task; restored afterwards (a Ray
    worker process is reused for later tasks)."""
    if not os.path.isdir(cwd):
        raise ExecutorError(f"the driver's working directory {cwd} does not exist on this node; quantgate on a cluster needs shared storage at the same paths (docs/cluster.md)")
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    for k in [k for k in os.environ if k.startswith(FORWARD_PREFIXES) and k not in env]:
        del os.environ[k]  # a variable the driver does not set must not leak from an earlier task
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _worker_logging() -> None:
    """INFO to the worker's stderr (Ray streams it to the driver, prefixed with the task) and to
    each run's run.log, as in the CLI."""
    from quantgate.cli import _setup_logging

    _setup_logging(False)


def _error_outcome(recipe: Recipe, source: str, code: int, reason: str) -> RecipeOutcome:
    from quantgate import formats
    from quantgate.runner import RecipeOutcome, run_dir_for

    run_dir = run_dir_for(recipe)
    decision = "BAD_INPUT" if code == ExitCode.BAD_INPUT else "ERROR"
    try:
        fmt = formats.get_format(recipe.quantization.format).name
    except Exception:
        fmt = recipe.quantization.format
    return RecipeOutcome(recipe.name, source, fmt, decision, int(code), reason=reason, run_dir=str(run_dir), log_file=str(run_dir / "run.log"))


def run_job(recipe: Recipe, source: str, fresh: bool, parent_run_id: str | None, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    """The body of one Ray task: preflight on the node that runs it (where the GPU is), then the
    recipe in its run directory. Returns the outcome as a dict (plain data across processes)."""
    with _task_context(cwd, env):
        _worker_logging()
        from quantgate.preflight import preflight
        from quantgate.runner import run_recipe

        try:
            report = preflight(recipe)
            for line in report.lines:
                log.info("[%s] preflight (pid %d): %s", recipe.name, os.getpid(), line)
            for line in report.warnings:
                log.warning("[%s] preflight: %s", recipe.name, line)
            parent = ParentRunRef(parent_run_id) if parent_run_id else None
            outcome = run_recipe(recipe, source, fresh=fresh, baseline_memo=_WORKER_MEMO, parent=parent)
        except QuantgateError as err:  # bad input or a failure before the run's own error handling
            outcome = _error_outcome(recipe, source, int(err.exit_code), str(err))
        return outcome.to_dict()


class RayExecutor(Executor):
    name = "ray"

    def __init__(self) -> None:
        self._started_here = False

    def _connect(self) -> Any:
        # Ray folds log lines of different workers that differ only in numbers ("[repeated 2x
        # across cluster]"); quantgate's per-recipe lines are exactly that, so show them all.
        # Read when ray is first imported; a user's own setting wins.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        if ray.is_initialized():
            return ray
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, log_to_driver=True)
                log.info("ray: connected to the cluster at %s", address)
            else:
                cpus = os.environ.get("QUANTGATE_RAY_NUM_CPUS")
                ray.init(include_dashboard=False, log_to_driver=True, num_cpus=int(cpus) if cpus else None)
                log.info("ray: started a local cluster (RAY_ADDRESS is not set)")
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise QuantgateError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: {first}") from None
        self._started_here = True
        return ray

    def run(self, jobs: list[Job], *, parent: Any = None) -> list[RecipeOutcome]:
        from quantgate.runner import RecipeOutcome

        retries = max_retries()
        ray = self._connect()
        gpus = float(ray.cluster_resources().get("GPU", 0))
        resources = [task_resources(j.recipe, gpus) for j in jobs]  # refuse before submitting anything
        # Opened before the tasks (they need its id); if every recipe turns out complete on disk,
        # the driver deletes the empty parent again (MatrixParent.discard_if_empty).
        parent_id = parent.run_id() if parent is not None else None
        env, cwd = job_environment(), os.getcwd()
        task = ray.remote(run_job)
        refs = []
        for job, res in zip(jobs, resources, strict=True):
            opts = {**res, "max_retries": retries, "retry_exceptions": False, "name": f"quantgate:{job.recipe.name}"}
            log.info("ray: submitting %s (%s, max_retries %d)", job.recipe.name, ", ".join(f"{k}={v:g}" for k, v in res.items()), retries)
            refs.append(task.options(**opts).remote(job.recipe, job.source, job.fresh, parent_id, cwd, env))
        outcomes = []
        for job, ref in zip(jobs, refs, strict=True):
            try:
                outcomes.append(RecipeOutcome.from_dict(ray.get(ref)))
            except ray.exceptions.RayError as err:
                outcomes.append(_lost(job, err, retries))
        return outcomes

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()  # a local cluster stops; a remote one only loses this driver
            self._started_here = False


def _lost(job: Job, err: BaseException, retries: int) -> RecipeOutcome:
    """A task Ray gave up on: its worker died on every attempt, or the task raised."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, QuantgateError):
        return _error_outcome(job.recipe, job.source, int(cause.exit_code), str(cause))
    text = str(cause or err).strip().splitlines()
    first = next((line for line in text if line.strip()), type(err).__name__)
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError) and cause is not None:
        reason = f"Ray task raised {type(cause).__name__}: {first}"
    else:
        reason = f"Ray task lost after {retries + 1} attempt(s) ({type(err).__name__}): {first}"
    log.error("[%s] %s", job.recipe.name, reason)
    return _error_outcome(job.recipe, job.source, int(ExitCode.ERROR), reason)
