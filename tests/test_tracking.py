"""quantgate.tracking against a real MLflow sqlite store in a temporary folder (no mocks)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.errors import RecipeError
from quantgate.recipe import PromotionSpec, TrackingSpec, flatten
from quantgate.tracking import (
    TAG_FAILURE,
    TAG_MISSING_METRICS,
    RunTracker,
    TrackingError,
    alias_version,
    default_artifact_root,
    download_artifacts,
    is_sensitive_name,
    redact,
    redact_params,
    register_checkpoint,
    resolve_tracking_uri,
    sanitize_key,
    server_command,
    version_tags,
)

SECRET = "hunter2"
SECRET_URI = f"https://alice:{SECRET}@models.example.com/org/model?token=tok{SECRET}&rev=main"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module (creating the schema costs ~1 s); tests use own experiments."""
    return tmp_path_factory.mktemp("mlstore")


@pytest.fixture
def spec(store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> TrackingSpec:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store)  # the default-style relative URI resolves against the cwd
    return TrackingSpec(uri="sqlite:///mlruns/mlflow.db", experiment=f"exp_{request.node.name}")


def _text_of_tree(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


# ---- URIs and redaction (no MLflow) ------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(TrackingSpec())
    db = tmp_path.resolve() / "mlruns" / "mlflow.db"
    assert uri == f"sqlite:///{db.as_posix()}" and uri.startswith("sqlite:////")
    assert db.parent.is_dir()
    assert resolve_tracking_uri(TrackingSpec(uri=uri)) == uri  # absolute stays as is
    assert default_artifact_root(uri) == str(db.parent / "artifacts")
    assert default_artifact_root("http://127.0.0.1:5000") is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other/x.db")
    assert resolve_tracking_uri(TrackingSpec()) == f"sqlite:///{(tmp_path.resolve() / 'other/x.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(TrackingSpec()) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    for bad in ("mlruns", "./mlruns", "file:///tmp/mlruns", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(RecipeError) as info:
            resolve_tracking_uri(TrackingSpec(uri=bad))
        assert "tracking.uri" in str(info.value)
    with pytest.raises(RecipeError, match=r"sqlite:///mlruns/mlflow\.db"):
        resolve_tracking_uri(TrackingSpec(uri="mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri(TrackingSpec(uri="mlruns")) == (tmp_path.resolve() / "mlruns").as_uri()


def test_redact() -> None:
    assert redact(SECRET_URI) == "https://***@models.example.com/org/model?token=***&rev=main"
    assert redact("postgresql://u:pw@db:5432/x") == "postgresql://***@db:5432/x"
    assert redact("dsn host=db password=pw user=u") == "dsn host=db password=*** user=u"
    assert redact('{"hf_token": "abc", "max_new_tokens": "48"}') == '{"hf_token": "***", "max_new_tokens": "48"}'
    assert redact("hf_token: abc\nmax_new_tokens: 48\napi_key: null\n") == (
        "hf_token: '***'\nmax_new_tokens: 48\napi_key: null\n"
    )
    assert "hf_" + "a" * 30 not in redact("use hf_" + "a" * 30)
    assert redact("Authorization Bearer abcdefghijkl") == "Authorization Bearer ***"
    plain = "http://127.0.0.1:5000/#/models/x  git@github.com:org/repo.git  design=ok"
    assert redact(plain) == plain
    assert redact(redact(SECRET_URI)) == redact(SECRET_URI)
    # Whole-word matching: secrets are caught, ordinary params that contain 'token' are not.
    assert all(map(is_sensitive_name, ["hf_token", "HF_TOKEN", "apiKey", "db.password", "aws_secret_access_key"]))
    assert not any(map(is_sensitive_name, ["evaluation.golden.max_new_tokens", "model.tokenizer", "top_k", "monkey"]))
    assert redact_params({"hf_token": "x", "n": 3, "uri": SECRET_URI, "l": [1, 2]}) == {
        "hf_token": "***",
        "n": "3",
        "uri": "https://***@models.example.com/org/model?token=***&rev=main",
        "l": "[1, 2]",
    }
    assert sanitize_key("qg_cloze/acc,none") == "qg_cloze/acc_none"
    assert sanitize_key("/a//b/../c") == "a/b/c"


def test_import_does_not_load_mlflow() -> None:
    code = "import sys, quantgate.tracking; sys.exit(1 if 'mlflow' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_version_tags(tmp_path: Path) -> None:
    import mlflow

    tags = version_tags(cwd=tmp_path)  # not a git repo: no sha, no error
    assert tags["quantgate.version.mlflow"] == mlflow.__version__
    for name in ("quantgate", "nvidia-modelopt", "transformers", "lm-eval", "torch"):
        assert tags[f"quantgate.version.{name}"]
    assert "quantgate.git.sha" not in tags
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "m"], cwd=tmp_path, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    tags = version_tags(cwd=tmp_path)
    assert tags["quantgate.git.sha"] == sha == tags["mlflow.source.git.commit"]
    assert tags["quantgate.git.dirty"] == "false"


# ---- runs --------------------------------------------------------------------------------------


def test_run_logs_params_metrics_tags_artifacts(spec: TrackingSpec, store: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    nested = {
        "model": {"source": SECRET_URI, "hf_token": f"hf_{SECRET}xxxxxxxxxxxxxxxxxxxxxxxx"},
        "evaluation": {"golden": {"max_new_tokens": 48}},
        "notes": "x" * 7000,
        "many": {f"p{i:03d}": i for i in range(150)},  # > 100: several batches
    }
    report = tmp_path / "report.md"
    report.write_text(f"# report\nmodel: {SECRET_URI}\nacc 0.5\n")
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text('{"a": 1}')
    (ckpt / "sub" / "recipe.yaml").write_text(f"source: {SECRET_URI}\nhf_token: abc\n")

    with RunTracker(spec, "int4_awq", tags={"quantgate.recipe": "int4_awq", "url": SECRET_URI}) as run:
        run.log_params(flatten(nested))
        run.log_params({"evaluation.golden.max_new_tokens": 48})  # same value again: fine
        with pytest.raises(TrackingError, match="cannot change"):
            run.log_params({"evaluation.golden.max_new_tokens": 49})
        skipped = run.log_metrics({"qg_cloze/acc": 0.5, "ppl": float("nan"), "kl": None, "n": 3})
        assert skipped == ["ppl", "kl"]
        run.log_metrics({"qg_cloze/acc": 0.625}, step=1)
        run.set_tags({"quantgate.decision": "PASS"})
        run.log_artifact(report)
        run.log_artifacts(ckpt, "inputs")
        run.log_text(f"log line {SECRET_URI}\n", "logs/run.log")
        run.log_dict({"uri": SECRET_URI, "password": "pw"}, "summary.json")
        run_id, artifact_uri = run.run_id, run.artifact_uri

    assert run.status == "FINISHED"
    # Artifacts are pinned next to the db: <store>/mlruns/artifacts/<experiment>/<run>/artifacts
    pinned = (store / "mlruns" / "artifacts" / spec.experiment).resolve()
    assert artifact_uri == str(pinned / run_id / "artifacts")
    client = MlflowClient(tracking_uri=resolve_tracking_uri(spec))
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    params = got.data.params
    assert len(params) >= 150 + 3
    assert params["evaluation.golden.max_new_tokens"] == "48"
    assert params["model.hf_token"] == "***"
    assert params["model.source"] == "https://***@models.example.com/org/model?token=***&rev=main"
    assert len(params["notes"]) == 6000
    assert not any(SECRET in v for v in params.values())
    assert got.data.metrics["qg_cloze/acc"] == 0.625 and got.data.metrics["n"] == 3.0
    history = client.get_metric_history(run_id, "qg_cloze/acc")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.625)]
    assert "ppl" not in got.data.metrics
    assert got.data.tags[TAG_MISSING_METRICS] == "kl,ppl"
    assert got.data.tags["quantgate.decision"] == "PASS"
    assert got.data.tags["url"] == redact(SECRET_URI)
    assert got.info.run_name == "int4_awq"

    files = {p.relative_to(pinned / run_id / "artifacts").as_posix() for p in (pinned / run_id).rglob("*") if p.is_file()}
    assert files == {"report.md", "inputs/config.json", "inputs/sub/recipe.yaml", "logs/run.log", "summary.json"}
    text = _text_of_tree(pinned / run_id)
    assert SECRET not in text and "***@models.example.com" in text
    assert SECRET in report.read_text()  # the local file itself is left alone


def _status(spec: TrackingSpec, run_id: str) -> tuple[str, dict[str, str]]:
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=resolve_tracking_uri(spec)).get_run(run_id)
    return run.info.status, run.data.tags


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError(f"boom at {SECRET_URI}\nsecond line"), "RuntimeError: boom at https://***@models"),
        (KeyboardInterrupt(), "KeyboardInterrupt: interrupted"),
        (SystemExit(3), "SystemExit: exit code 3"),
    ],
)
def test_failed_run_records_reason(spec: TrackingSpec, exc: BaseException, expected: str) -> None:
    tracker = RunTracker(spec, "failing")
    with pytest.raises(type(exc)), tracker:
        raise exc
    status, tags = _status(spec, tracker.run_id)
    assert status == "FAILED" and tracker.status == "FAILED"
    assert tags[TAG_FAILURE].startswith(expected)
    assert "\n" not in tags[TAG_FAILURE] and SECRET not in tags[TAG_FAILURE]


def test_system_exit_zero_finishes_and_explicit_fail(spec: TrackingSpec) -> None:
    with pytest.raises(SystemExit), RunTracker(spec, "exit0") as ok:
        raise SystemExit(0)
    assert _status(spec, ok.run_id)[0] == "FINISHED"

    with RunTracker(spec, "gave-up") as run:
        run.fail("preflight: no GPU\nfor fp8")
        run.set_tags({"after": "fail"})  # the run can still be annotated after it ended
    status, tags = _status(spec, run.run_id)
    assert status == "FAILED" and tags[TAG_FAILURE] == "preflight: no GPU for fp8"


def test_parent_and_children(spec: TrackingSpec) -> None:
    from mlflow import MlflowClient

    with RunTracker(spec, "matrix") as parent:
        with parent.child("fp8") as a:
            a.log_metrics({"acc": 0.5})
        with RunTracker(spec, "int4_awq", parent_run_id=parent.run_id) as b:
            b.log_metrics({"acc": 0.4})
    client = MlflowClient(tracking_uri=resolve_tracking_uri(spec))
    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["fp8", "int4_awq"]
    assert a.experiment_id == b.experiment_id == parent.experiment_id
    assert all(r.info.status == "FINISHED" for r in children)


# ---- registry ----------------------------------------------------------------------------------


def _candidate(spec: TrackingSpec, tmp_path: Path, label: str, *, passed: bool, promotion: PromotionSpec):
    ckpt = tmp_path / f"ckpt_{label}"
    ckpt.mkdir()
    (ckpt / "weights.txt").write_text(f"weights of {label}\n")
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    decision = "PASS" if passed else "REGRESSION"
    lineage = {"quantgate.recipe": label, "quantgate.format": "int4_awq", "quantgate.recipe_hash": "abc",
               "quantgate.calibration_hash": "def", "quantgate.baseline_run_id": "base123"}
    with RunTracker(spec, label) as run:
        path = run.log_checkpoint(ckpt)
        run.set_tags({"quantgate.decision": decision})
        if passed:
            reg = register_checkpoint(run, path, promotion, passed=passed, decision=decision, tags=lineage)
    if not passed:  # by run id, after the run ended, as a later `quantgate promote` would
        reg = register_checkpoint(
            run.run_id, path, promotion, passed=passed, decision=decision, tags=lineage,
            tracking_uri=run.uri,
        )
    return run, reg


def test_promotion_moves_alias_only_on_pass(spec: TrackingSpec, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    promotion = PromotionSpec(registered_model=f"qg-{spec.experiment}")
    name = promotion.registered_model
    run1, reg1 = _candidate(spec, tmp_path, "good", passed=True, promotion=promotion)
    assert reg1 is not None
    assert (reg1.version, reg1.aliases_set, reg1.promoted, reg1.previous_alias_version) == (
        "1", ["candidate", "production"], True, None
    )
    assert reg1.source == f"{run1.artifact_uri}/checkpoint"

    run2, reg2 = _candidate(spec, tmp_path, "bad", passed=False, promotion=promotion)
    assert reg2 is not None
    assert (reg2.version, reg2.aliases_set, reg2.promoted, reg2.previous_alias_version) == (
        "2", ["candidate"], False, "1"
    )
    uri = resolve_tracking_uri(spec)
    assert alias_version(name, "production", tracking_uri=uri) == "1"
    assert alias_version(name, "candidate", tracking_uri=uri) == "2"
    assert alias_version(name, "staging", tracking_uri=uri) is None
    assert alias_version("no-such-model", "production", tracking_uri=uri) is None

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v2 = client.get_model_version(name, "2")
    assert v2.tags["quantgate.decision"] == "REGRESSION" and v2.tags["quantgate.passed"] == "false"
    assert v2.tags["quantgate.baseline_run_id"] == "base123" and v2.run_id == run2.run_id
    assert client.get_run(run2.run_id).data.tags["quantgate.model_version"] == "2"

    prod = download_artifacts(f"models:/{name}@production", tmp_path / "dl", tracking_uri=uri)
    assert (prod / "weights.txt").read_text() == "weights of good\n"
    cand = download_artifacts(f"models:/{name}@candidate", tmp_path / "dl2", tracking_uri=uri)
    assert (cand / "weights.txt").read_text() == "weights of bad\n"
    got = download_artifacts(f"runs:/{run1.run_id}/checkpoint/weights.txt", tmp_path / "dl3", tracking_uri=uri)
    assert got.read_text() == "weights of good\n"
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # nothing global was changed


def test_registration_guards(spec: TrackingSpec, tmp_path: Path) -> None:
    assert register_checkpoint("x", "checkpoint", PromotionSpec(enabled=False), passed=True, decision="PASS", tags={}) is None
    with pytest.raises(RecipeError, match="promotion.alias"):
        register_checkpoint("x", "checkpoint", PromotionSpec(alias="candidate"), passed=True, decision="PASS", tags={})
    with pytest.raises(RecipeError, match="reserved"):
        register_checkpoint("x", "checkpoint", PromotionSpec(alias="latest"), passed=True, decision="PASS", tags={})
    with RunTracker(spec, "no-ckpt") as run:
        with pytest.raises(ValueError, match="only PASS"):
            register_checkpoint(run, "checkpoint", PromotionSpec(), passed=True, decision="INCONCLUSIVE", tags={})
        with pytest.raises(TrackingError, match="no artifacts"):
            register_checkpoint(run, "checkpoint", PromotionSpec(), passed=False, decision="ERROR", tags={})


def test_missing_metric_tag_clears_when_logged_later(spec: TrackingSpec) -> None:
    with RunTracker(spec, "late") as run:
        run.log_metrics({"a": math.nan, "b": None})
        run.log_metrics({"a": 1.0})
    assert _status(spec, run.run_id)[1][TAG_MISSING_METRICS] == "b"


def test_experiment_made_by_a_proxying_server_is_refused_locally(spec: TrackingSpec) -> None:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(spec)
    MlflowClient(tracking_uri=uri).create_experiment(spec.experiment, artifact_location="mlflow-artifacts:/9")
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"), RunTracker(spec, "x"):
        pass


def test_server_command_pins_artifacts_next_to_the_db(tmp_path: Path) -> None:
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    cmd = server_command(uri, port=5123)
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--artifacts-destination" not in server_command("postgresql://db/mlflow")


def test_package_keeps_every_name_of_the_old_module() -> None:
    """quantgate.tracking became a package (uri, redaction, versions, runs, registry, ui); every
    name the single module offered is still importable from it."""
    import quantgate.tracking as tracking

    old = ["CANDIDATE_ALIAS", "Registration", "RunTracker", "TrackingError", "alias_version",
           "default_artifact_root", "download_artifacts", "experiment_artifact_location", "failure_reason",
           "free_port", "is_sensitive_name", "model_url", "normalize_tracking_uri", "redact", "redact_params",
           "register_checkpoint", "resolve_tracking_uri", "run_url", "serve_ui", "server_command", "start_ui",
           "stop_ui", "version_tags", "wait_healthy", "_mlflow_client", "sanitize_key", "TAG_FAILURE",
           "TAG_MISSING_METRICS", "ensure_experiment", "check_alias", "is_remote", "sqlite_path"]
    assert [n for n in old if not hasattr(tracking, n)] == []
    assert set(tracking.__all__) <= set(dir(tracking))


def test_a_rejudged_version_carries_its_latest_verdict(spec: TrackingSpec, tmp_path: Path, caplog) -> None:
    """The same artifacts (one run key) judged again with other gate settings: the existing
    version is reused, and its tags must say the latest verdict (was: promoted while tagged
    REGRESSION), with the earlier ones in quantgate.verdict_history."""
    from mlflow import MlflowClient

    promotion = PromotionSpec(registered_model=f"qg-rejudge-{spec.experiment}")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    key = {"quantgate.run_key": "fp8-0123456789-abcdef0123"}
    with RunTracker(spec, "rejudge") as run:
        path = run.log_checkpoint(ckpt)
        first = register_checkpoint(run, path, promotion, passed=False, decision="REGRESSION", tags=key)
        again = register_checkpoint(run, path, promotion, passed=True, decision="PASS", tags=key)
        assert first.version == again.version and again.promoted
        uri = resolve_tracking_uri(spec)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        tags = client.get_model_version(promotion.registered_model, again.version).tags
        assert (tags["quantgate.decision"], tags["quantgate.passed"]) == ("PASS", "true")
        assert tags["quantgate.verdict_history"].startswith("REGRESSION -> PASS at ")
        with caplog.at_level("WARNING", logger="quantgate"):
            third = register_checkpoint(run, path, promotion, passed=False, decision="REGRESSION", tags=key)
        tags = client.get_model_version(promotion.registered_model, third.version).tags
        assert (tags["quantgate.decision"], tags["quantgate.passed"]) == ("REGRESSION", "false")
        assert tags["quantgate.verdict_history"].count(" -> ") == 2
        assert alias_version(promotion.registered_model, "production", tracking_uri=uri) == third.version
        assert "still @production" in caplog.text
