"""`quantgate search`: spec validation, candidate expansion and order, the search/confirmation
split, a simulation of the selection rule's false-pass rate, and one end-to-end search on a tiny
model with real ModelOpt, lm-eval and MLflow (early stop, one baseline evaluation, held-out
confirmation, registration of the winner only, resume after a kill)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from quantgate import stats
from quantgate.errors import RecipeError
from quantgate.evaluation.results import EvalResults, ItemRecord, TaskResult
from quantgate.recipe import GateSpec
from quantgate.search.select import first_passing, judge_split
from quantgate.search.split import in_search_split, keeper, split_sizes, subset

ROOT = Path(__file__).resolve().parents[1]


# ---- spec validation and expansion ------------------------------------------------------------


def _spec(tmp_path: Path, data: dict, base: dict | None = None) -> Path:
    (tmp_path / "_base.yaml").write_text(yaml.safe_dump(base if base is not None else {
        "model": {"source": "bundled:SmolLM2-135M-Instruct"}, "gate": {"metrics": {"qg_cloze/acc": {"max_abs_drop": 0.05}}}}))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("data,expect", [
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8"}}], "budget": 3},
     "budget: unknown key"),
    ({"name": "s", "base": "missing.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8"}}]},
     "base: base recipe 'missing.yaml' not found"),
    ({"name": "s", "base": "_base.yaml", "candidates": []}, "candidates:"),
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8", "gate.confidence": 0.5}}]},
     "candidates.0.gate.confidence: the gate, promotion, tracking and output are the search's"),
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp9"}}]},
     "quantization.format"),
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp16"}}]},
     "not a candidate"),
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8", "quantization.smoothquant_alpha": 0.5}}]},
     "only for SmoothQuant formats"),
    ({"name": "s", "base": "_base.yaml", "split": {"fraction": 1.0}, "candidates": [{"name": "a", "set": {"quantization.format": "fp8"}}]},
     "split.fraction"),
    ({"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8"}}, {"name": "a", "set": {"quantization.format": "fp8"}}]},
     "appears twice"),
])
def test_bad_spec_is_one_line_and_exit_2(tmp_path, capsys, data, expect):
    from quantgate.cli import main

    assert main(["search", str(_spec(tmp_path, data))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantgate: error: ") and expect in lines[0], lines


def test_expansion_orders_cheapest_first_and_switches_promotion_off(tmp_path):
    from quantgate.search.spec import expand, load_spec

    path = _spec(tmp_path, {"name": "s", "base": "_base.yaml", "candidates": [
        {"name": "int8_sq", "set": {"quantization.format": "int8_sq"}, "grid": {"quantization.smoothquant_alpha": [0.5, 1.0]}},
        {"name": "fp8", "set": {"quantization.format": "fp8"}},
        {"name": "int4", "set": {"quantization.format": "int4_awq"}, "grid": {"quantization.awq_block_size": [32, 64]}},
    ]})
    ladder = expand(load_spec(path), path, ["evaluation.limit=5"])
    assert [c.name for c in ladder] == ["int4-b64", "int4-b32", "int8_sq-a0.5", "int8_sq-a1.0", "fp8"]
    assert [c.bits_estimate for c in ladder] == [4.25, 4.5, 8.0, 8.0, 8.0]
    sq = ladder[2].recipe
    assert sq.name == "int8_sq-a0.5" and sq.quantization.smoothquant_alpha == 0.5 and sq.evaluation.limit == 5
    assert all(not c.recipe.promotion.enabled and c.promotion.enabled for c in ladder)
    # The given order, when asked for.
    data = yaml.safe_load(path.read_text()) | {"order": "given"}
    path.write_text(yaml.safe_dump(data))
    assert [c.name for c in expand(load_spec(path), path)][:2] == ["int8_sq-a0.5", "int8_sq-a1.0"]


def test_auto_quantize_candidates_take_their_budget_as_cost_estimate(tmp_path):
    from quantgate.search.spec import expand, load_spec

    path = _spec(tmp_path, {"name": "s", "base": "_base.yaml", "candidates": [
        {"name": "fp8", "set": {"quantization.format": "fp8"}},
        {"name": "auto", "set": {"quantization.format": "auto_quantize", "quantization.auto_quantize": {"formats": ["fp8", "int4_awq"]},
                                 "quantization.awq_block_size": 64},
         "grid": {"quantization.auto_quantize.effective_bits": [8.5, 7.5]}},
    ]})
    ladder = expand(load_spec(path), path)
    assert [(c.name, c.bits_estimate) for c in ladder] == [("auto-eb7.5", 7.5), ("fp8", 8.0), ("auto-eb8.5", 8.5)]
    aq = ladder[0].recipe.quantization
    assert aq.format == "auto_quantize" and aq.auto_quantize.formats == ["fp8", "int4_awq"] and aq.awq_block_size == 64
    bad = _spec(tmp_path, {"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "auto_quantize"}}]})
    with pytest.raises(RecipeError, match="needs quantization.auto_quantize.effective_bits"):
        expand(load_spec(bad), bad)


def test_shipped_default_search_validates_with_at_least_six_candidates():
    from quantgate.search.spec import expand, load_spec

    path = ROOT / "searches" / "default.yaml"
    ladder = expand(load_spec(path), path)
    assert len(ladder) >= 6
    names = [c.name for c in ladder]
    assert names[0].startswith("int4_awq") and {"int8_sq-a0.5", "int8_sq-a1.0", "fp8"} <= set(names)
    assert [c.bits_estimate for c in ladder] == sorted(c.bits_estimate for c in ladder)


def test_a_search_that_fails_closes_its_parent_run_failed(tmp_path, monkeypatch):
    import quantgate.search as qs
    from quantgate.search.record import SearchParent

    class Tracker:  # records what the search does to its MLflow parent run
        run_id, tags, status = "r1", {}, None

        def set_tags(self, tags: dict) -> None:
            self.tags.update(tags)

        def end(self, status: str) -> None:
            self.status = status

    tracker = Tracker()

    def broken_ladder(spec, key, ladder, parent: SearchParent, *args, **kwargs):
        parent.tracker = tracker  # a child opened the parent run, then the search broke
        raise RuntimeError("judge exploded\nsecond line")

    monkeypatch.setattr(qs, "_run_ladder", broken_ladder)
    path = _spec(tmp_path, {"name": "s", "base": "_base.yaml", "candidates": [{"name": "a", "set": {"quantization.format": "fp8"}}]})
    with pytest.raises(RuntimeError, match="judge exploded"):
        qs.search(path)
    assert tracker.status == "FAILED" and tracker.tags["quantgate.failure"] == "RuntimeError: judge exploded"


# ---- the split ------------------------------------------------------------------------------------


def _acc_task(name: str, base: list[float], cand: list[float]) -> tuple[TaskResult, TaskResult]:
    def tr(vals: list[float]) -> TaskResult:
        items = [ItemRecord(doc_id=i, prompt_hash=f"h{i}", correct=v, scores={"acc": v}) for i, v in enumerate(vals)]
        return TaskResult(task=name, version="1", kind="accuracy", metrics={"acc": float(np.mean(vals))}, higher_is_better={"acc": True}, items=items)

    return tr(base), tr(cand)


def _results(tasks: dict[str, tuple[TaskResult, TaskResult]]) -> tuple[EvalResults, EvalResults]:
    return (EvalResults(side="baseline", tasks={k: v[0] for k, v in tasks.items()}),
            EvalResults(side="candidate", tasks={k: v[1] for k, v in tasks.items()}))


def test_split_is_deterministic_disjoint_and_near_its_fraction():
    ids = range(4000)
    search = {i for i in ids if in_search_split("qg_cloze", i, fraction=0.5, seed=0)}
    confirm = {i for i in ids if keeper("confirm", fraction=0.5, seed=0)("qg_cloze", i)}
    assert search.isdisjoint(confirm) and search | confirm == set(ids)
    assert abs(len(search) / 4000 - 0.5) < 0.03
    assert search == {i for i in ids if in_search_split("qg_cloze", i, fraction=0.5, seed=0)}  # deterministic
    assert search != {i for i in ids if in_search_split("qg_cloze", i, fraction=0.5, seed=1)}  # the seed draws another
    assert search != {i for i in ids if in_search_split("qg_ppl", i, fraction=0.5, seed=0)}  # per task
    assert abs(sum(in_search_split("t", i, fraction=0.3, seed=0) for i in ids) / 4000 - 0.3) < 0.03


def test_subset_rebuilds_metrics_and_the_gate_judges_only_that_split():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 200).astype(float)
    cand = base.copy()
    words = rng.integers(50, 300, 40)
    ll_b = -words * rng.normal(3.0, 0.2, 40)
    ppl = lambda ll: TaskResult(task="ppl", version="1", kind="perplexity", higher_is_better={"word_perplexity": False},  # noqa: E731
                                metrics={"word_perplexity": stats.corpus_metric(ll, words, None, None, "word_perplexity")},
                                items=[ItemRecord(doc_id=i, prompt_hash=f"p{i}", loglikelihood=float(x), words=int(w)) for i, (x, w) in enumerate(zip(ll, words, strict=True))])
    b, c = _results({"acc": _acc_task("acc", list(base), list(cand))})
    b.tasks["ppl"], c.tasks["ppl"] = ppl(ll_b), ppl(ll_b * 1.01)
    keep = keeper("search", fraction=0.5, seed=0)
    sub = subset(b, keep)
    kept = [it for it in b.tasks["acc"].items if keep("acc", it.doc_id)]
    assert [it.doc_id for it in sub.tasks["acc"].items] == [it.doc_id for it in kept]
    assert sub.tasks["acc"].metrics["acc"] == pytest.approx(np.mean([it.correct for it in kept]))
    kd = [it for it in b.tasks["ppl"].items if keep("ppl", it.doc_id)]
    assert sub.tasks["ppl"].metrics["word_perplexity"] == pytest.approx(
        stats.corpus_metric([it.loglikelihood for it in kd], [it.words for it in kd], None, None, "word_perplexity"))
    assert split_sizes(b, keep) == {"acc": len(kept), "ppl": len(kd)}
    gate = GateSpec(metrics={"acc/acc": {"max_abs_drop": 0.1}, "ppl/word_perplexity": {"max_rel_drop": 0.05}})
    for side in ("search", "confirm"):
        v = judge_split(b, c, gate, side, fraction=0.5, seed=0)
        n = {ch.name: ch.n for ch in v.checks if ch.gated}
        assert n["acc/acc"] == split_sizes(b, keeper(side, fraction=0.5, seed=0))["acc"] < 200
        assert v.decision.value == "PASS", v.reason


def test_a_candidate_whose_own_run_said_error_is_not_rejudged_on_a_split(tmp_path):
    """Its stored metric is NaN: its own gate said ERROR. Judged again from items on a split, it
    would PASS (a split rebuilds metrics from items); the search must keep the ERROR."""
    from types import SimpleNamespace

    from quantgate.search import judge_candidate
    from quantgate.search.spec import Candidate

    rng = np.random.default_rng(0)
    vals = list(rng.integers(0, 2, 400).astype(float))
    b, c = _results({"acc": _acc_task("acc", vals, vals)})
    c.tasks["acc"].metrics["acc"] = float("nan")
    (tmp_path / "baseline_results.json").write_text(b.model_dump_json())
    (tmp_path / "candidate_results.json").write_text(c.model_dump_json())
    gate = GateSpec(metrics={"acc/acc": {"max_abs_drop": 0.05}})
    assert judge_split(b, c, gate, "search", fraction=0.5, seed=0).decision.value == "PASS"  # what the split alone says
    recipe = SimpleNamespace(gate=gate)
    cand = Candidate(name="fp8", recipe=recipe, overrides=[], bits_estimate=8.0, promotion=None)  # type: ignore[arg-type]
    outcome = SimpleNamespace(format="fp8", run_dir=str(tmp_path), checkpoint_bytes=1, decision="ERROR", exit_code=3,
                              reason="candidate acc is not finite", mlflow_run_id=None, reused=False, timings={})
    row = judge_candidate(cand, outcome, 0.5, 0)
    assert (row.decision, row.exit_code) == ("ERROR", 3) and "not finite" in row.reason


# ---- the selection rule, simulated ----------------------------------------------------------------

ALPHA, N_CANDIDATES, N_ITEMS, MARGIN, DISCORDANCE, REPS = 0.05, 6, 600, 0.05, 0.2, 4000


def _simulate(seed: int = 2026) -> dict[str, float]:
    """Every candidate's true accuracy drop is exactly the margin. Items are split by the search's
    own hash; each split is judged by the gate's own statistic (Tango score test at the margin,
    the same decision as 'upper bound < margin'); the selection rule is the search's own."""
    rng = np.random.default_rng(seed)
    p_bad, p_good = (DISCORDANCE + MARGIN) / 2, (DISCORDANCE - MARGIN) / 2
    cat = rng.choice(3, p=[p_bad, p_good, 1 - DISCORDANCE], size=(REPS, N_CANDIDATES, N_ITEMS)).astype(np.int8)
    mask = np.array([in_search_split("t", i, fraction=0.5, seed=0) for i in range(N_ITEMS)])
    z = sps.norm.ppf(1 - ALPHA)

    def passes(m: np.ndarray) -> np.ndarray:
        b, c = ((cat == 0) & m).sum(-1), ((cat == 1) & m).sum(-1)
        return stats.tango_score_statistic(b, c, int(m.sum()), MARGIN) < -z

    on_search, on_confirm, on_all = passes(mask), passes(~mask), passes(np.ones(N_ITEMS, bool))
    chosen = first_passing(on_search)
    picked = np.where(chosen >= 0, on_confirm[np.arange(REPS), np.maximum(chosen, 0)], False)
    return {"search_confirmed": float(picked.mean()), "best_of_n_same_items": float(on_all.any(-1).mean()),
            "single_candidate": float(on_all[:, 0].mean()), "any_on_search_split": float(on_search.any(-1).mean())}


def test_search_false_pass_rate_at_the_margin_stays_below_alpha():
    """alpha = 0.05, N = 6 candidates all exactly at the margin (600 items, 50/50 split): the
    search confirms a winner (a false pass) at most alpha of the time; choosing the best of the
    six on the same items without a held-out confirmation passes far more often."""
    r = _simulate()
    assert 0.03 < r["single_candidate"] < 0.07, r  # one candidate alone: the gate's own ~alpha
    assert r["search_confirmed"] <= ALPHA, r  # ~ P(any passes the search split) x alpha ~ 0.013
    assert r["best_of_n_same_items"] > 2.5 * ALPHA, r  # ~ 1 - 0.95^6 ~ 0.26: the winner's curse
    assert r["search_confirmed"] < r["any_on_search_split"] * ALPHA * 1.6 + 0.005, r


def test_simulated_decisions_are_the_gates_own():
    """The vectorized statistic of the simulation gives the same pass/fail as judge_split (split,
    subset, the pure gate) on the same items, for a few draws."""
    rng = np.random.default_rng(5)
    gate = GateSpec(confidence=1 - ALPHA, anomaly_margin=1.0, metrics={"t/acc": {"max_abs_drop": MARGIN}})
    z = sps.norm.ppf(1 - ALPHA)
    mask = np.array([in_search_split("t", i, fraction=0.5, seed=0) for i in range(N_ITEMS)])
    for _ in range(12):
        cat = rng.choice(3, p=[0.125, 0.075, 0.8], size=N_ITEMS)
        base = np.where(cat == 0, 1.0, np.where(cat == 1, 0.0, rng.integers(0, 2, N_ITEMS)))
        cand = np.where(cat == 0, 0.0, np.where(cat == 1, 1.0, base))
        b, c = _results({"t": _acc_task("t", list(base), list(cand))})
        for side, m in (("search", mask), ("confirm", ~mask)):
            expect = stats.tango_score_statistic(((cat == 0) & m).sum(), ((cat == 1) & m).sum(), int(m.sum()), MARGIN) < -z
            got = judge_split(b, c, gate, side, fraction=0.5, seed=0).decision.value == "PASS"
            assert got == bool(expect)


def test_selection_rule_and_exit_codes():
    from quantgate.search.select import no_winner_code

    assert first_passing([False, True, True]) == 1 and first_passing([False, False]) == -1
    assert list(first_passing(np.array([[False, True], [True, True], [False, False]]))) == [1, 0, -1]
    assert no_winner_code(["REGRESSION", "INCONCLUSIVE"]) == 4
    assert no_winner_code(["REGRESSION", "ERROR"]) == 1
    assert no_winner_code(["ERROR"]) == 3


# ---- end to end on a tiny model ------------------------------------------------------------------


@pytest.mark.slow
def test_search_end_to_end_early_stop_confirmation_registration_and_resume(tmp_path_factory, tiny_model_dir):
    from quantgate.tracking import _mlflow_client, alias_version
    from tests.test_pipeline import LOOSE_GATE, quantgate

    ws = tmp_path_factory.mktemp("search_ws")
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    # Golden KL 1e-4 separates the tiny model's INT4 AWQ (~5e-4) from INT8-SQ (~2e-5).
    gate = {**LOOSE_GATE, "golden": {"max_mean_kl": 1e-4}}
    base = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        # 24 items: each split keeps >= 10 perplexity documents (fewer decide nothing: gate.MIN_BOOTSTRAP_ITEMS)
        "evaluation": {"limit": 24, "golden": {"max_new_tokens": 6}},
        "gate": gate, "promotion": {"registered_model": "tiny-search"},
        "tracking": {"uri": uri, "experiment": "qg-search"}, "output_dir": str(ws / "runs"),
    }
    (ws / "_base.yaml").write_text(yaml.safe_dump(base))
    (ws / "search.yaml").write_text(yaml.safe_dump({"name": "tiny", "base": "_base.yaml", "candidates": [
        {"name": "int8_sq", "set": {"quantization.format": "int8_sq", "quantization.smoothquant_alpha": 1.0}},
        {"name": "fp8", "set": {"quantization.format": "fp8"}},
        {"name": "int4_awq", "set": {"quantization.format": "int4_awq", "quantization.awq_block_size": 128}},
    ]}, sort_keys=False))

    # Killed (SIGKILL) between candidates: after INT4 AWQ (the cheapest) finished.
    killed = quantgate(ws, "search", "search.yaml", "--json", env={"QUANTGATE_KILL_IN": "candidate:int8_sq"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert killed.stderr.count("baseline: cache miss") == 1

    proc = quantgate(ws, "search", "search.yaml", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["name"]: r for r in out["rows"]}
    assert out["ladder"] == ["int4_awq", "int8_sq", "fp8"]  # cheapest first; ties keep the given order
    assert list(rows) == ["int4_awq", "int8_sq"] and out["not_run"] == ["fp8"]  # early stop
    assert rows["int4_awq"]["reused"] and rows["int4_awq"]["decision"] == "REGRESSION"  # resumed from disk
    assert rows["int8_sq"]["decision"] == "PASS" and not rows["int8_sq"]["reused"]
    assert out["winner"] == "int8_sq" and out["confirmation"]["decision"] == "PASS" and out["exit_code"] == 0
    # Judged on disjoint halves: the search split's and the confirmation's item counts add up to the run's.
    search_n = {c["name"]: c["n"] for c in rows["int8_sq"]["checks"]}
    confirm_n = {c["name"]: c["n"] for c in out["confirmation"]["checks"]}
    assert search_n["qg_cloze/acc"] + confirm_n["qg_cloze/acc"] == 24 and search_n["qg_cloze/acc"] < 24
    # One baseline evaluation in the whole search: the resumed process reads the cache.
    assert "baseline: cache miss" not in proc.stderr and "baseline: cache hit" in proc.stderr
    assert "[int4_awq] calibrate: start" not in proc.stderr and "[fp8] calibrate: start" not in proc.stderr

    # The registry holds exactly the winner, with the search's lineage.
    client = _mlflow_client(uri)
    versions = client.search_model_versions("name='tiny-search'")
    assert len(versions) == 1, [v.tags for v in versions]
    tags = versions[0].tags
    assert tags["quantgate.recipe"] == "int8_sq" and tags["quantgate.search"] == "tiny"
    assert "int4_awq=REGRESSION" in tags["quantgate.search_candidates_tried"]
    assert alias_version("tiny-search", "production", tracking_uri=uri) == str(versions[0].version)

    # MLflow: the parent run of the search with a child per candidate that ran; the killed
    # attempt's parent is closed as FAILED.
    exp = client.get_experiment_by_name("qg-search")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("quantgate.search_hash") == out["key"] and "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]
    finished = next(r for r in parents if r.info.status == "FINISHED")
    assert finished.info.run_id == out["mlflow_parent_run_id"] and finished.data.tags["mlflow.runName"] == "search: tiny [PASS]"
    child = client.get_run(rows["int8_sq"]["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == finished.info.run_id
    assert child.data.tags["quantgate.search_split_verdict"] == "PASS"

    summary = Path(out["out_dir"])
    assert json.loads((summary / "search.json").read_text())["winner"] == "int8_sq"
    page = (summary / "search.html").read_text()
    assert page.count('class="candidate-row"') == 2 and 'data-candidate="int8_sq" data-decision="PASS"' in page
    assert "held-out" in page and 'class="scatter"' in page

    # The same command again: everything is complete on disk; nothing runs, nothing new is registered.
    again = quantgate(ws, "search", "search.yaml", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["winner"] == "int8_sq"
    assert again.stderr.count("reporting the stored outcome") == 2
    assert not any(f"{stage}: start" in again.stderr for stage in ("calibrate", "export", "evaluate", "gate"))
    assert len(client.search_model_versions("name='tiny-search'")) == 1


def test_summary_without_a_winner_exits_with_the_most_informative_code(tmp_path):
    from quantgate.search.model import CandidateRow, SearchResult
    from quantgate.search.report import SEARCH_HTML, SEARCH_JSON, search_table, write_summary
    from quantgate.search.spec import SearchSpec

    spec = SearchSpec(name="s", base="b.yaml", candidates=[{"name": "a"}])

    def row(name: str, rung: int, decision: str, size: int, delta: float) -> CandidateRow:
        check = {"name": "qg_cloze/acc", "kind": "metric", "status": "fail" if decision == "REGRESSION" else "inconclusive",
                 "delta": delta, "ci_low": delta - 0.01, "ci_high": delta + 0.01, "margin": 0.05, "n": 100, "detail": ""}
        return CandidateRow(name=name, format="fp8", rung=rung, bits_estimate=8.0, overrides=[], run_dir=str(tmp_path / name),
                            checkpoint_bytes=size, decision=decision, exit_code=1, reason=decision, run_decision="PASS", checks=[check])

    rows = [row("small", 0, "REGRESSION", 100, 0.2), row("big", 1, "INCONCLUSIVE", 200, 0.04), row("worse", 2, "REGRESSION", 300, 0.3)]
    result = SearchResult.build(spec, "k", [], rows, None, None, full=True, seconds=1.0)
    assert (result.exit_code, result.decision, result.winner) == (4, "INCONCLUSIVE", None)
    assert [r.pareto for r in rows] == [True, True, False]  # 'worse' is bigger and worse than both
    write_summary(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / SEARCH_JSON).read_text())["exit_code"] == 4
    assert "No candidate passed the search split" in (tmp_path / "out" / SEARCH_HTML).read_text()
    assert "winner: none" in search_table(result)


def test_a_winner_above_an_unjudged_cheaper_rung_says_so(tmp_path):
    """A cheaper candidate that ended ERROR might have passed: the winner is not 'the cheapest'."""
    from quantgate.gate import Decision, Verdict
    from quantgate.search.model import CandidateRow, Confirmation, SearchResult
    from quantgate.search.spec import SearchSpec

    spec = SearchSpec(name="s", base="b.yaml", candidates=[{"name": "a"}])

    def row(name: str, rung: int, decision: str) -> CandidateRow:
        return CandidateRow(name=name, format="fp8", rung=rung, bits_estimate=8.0, overrides=[], run_dir=str(tmp_path / name),
                            checkpoint_bytes=100 * (rung + 1), decision=decision, exit_code=0 if decision == "PASS" else 3,
                            reason=decision, run_decision=decision, checks=[])

    rows = [row("int4", 0, "ERROR"), row("fp8", 1, "PASS")]
    confirmed = Confirmation.from_verdict("fp8", Verdict(decision=Decision.PASS, confidence=0.95, power=0.8, reason="PASS: ok", checks=[]))
    result = SearchResult.build(spec, "k", [], rows, rows[1], confirmed, full=False, seconds=1.0)
    assert result.winner == "fp8" and result.exit_code == 0
    assert "cheaper but not judged (ERROR): int4" in result.reason and "cheapest of" not in result.reason
    clean = SearchResult.build(spec, "k", [], [row("fp8", 0, "PASS")], row("fp8", 0, "PASS"), confirmed, full=False, seconds=1.0)
    assert "cheapest of 1 tried" in clean.reason
