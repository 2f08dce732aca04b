"""The HTML report of a run directory and of a matrix of runs.

Run directories are written here the way the pipeline writes them, from typed objects judged by
the real gate (no stored dumps); one test runs the real pipeline on the tiny model. The browser
tests render the pages with Debian's headless chromium from file:// and check the plots painted;
their screenshots land in the temp folder and their paths are printed (see them with -rP).
"""

from __future__ import annotations

import html
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from quantgate.artifacts import CalibrationInfo, Checkpoint
from quantgate.errors import ExitCode
from quantgate.evaluation.golden import compare_golden
from quantgate.evaluation.results import EvalResults, GoldenOutput, ItemRecord, TaskResult
from quantgate.gate import judge
from quantgate.recipe import Recipe, recipe_to_yaml
from quantgate.reports import (
    ReportError,
    matrix_images,
    plots,
    report_images,
    write_matrix_report,
    write_run_report,
)
from quantgate.reports import html as report_html
from quantgate.reports.rundata import compare_task, load_run
from quantgate.rundir import atomic_write_json, atomic_write_text
from quantgate.runner import RecipeOutcome
from quantgate.sinks.files import write_item_jsonl

FACTS = {"backend": "torch", "device_type": "cpu", "lm_eval_version": "0.4.13", "tokenizer_hash": "abc123"}
NASTY = "</td><script>alert('x')</script> & <b>bold</b>"

# ---- builders: per-item results -------------------------------------------------------------------


def acc_task(task: str, correct: np.ndarray) -> TaskResult:
    items = [ItemRecord(doc_id=i, prompt_hash=f"{task}-{i:05d}", correct=float(v), scores={"acc": float(v)}) for i, v in enumerate(correct)]
    return TaskResult(task=task, version="1", kind="accuracy", config_hash="c", metrics={"acc": float(np.mean(correct))},
                      higher_is_better={"acc": True}, items=items, seconds=1.5, tokens_scored=3000)


def acc_pair(task: str, n: int, bad: int, good: int, acc: float = 0.6) -> tuple[TaskResult, TaskResult]:
    """Exactly `bad` right->wrong and `good` wrong->right flips."""
    base = np.zeros(n)
    base[: int(acc * n)] = 1
    cand = base.copy()
    cand[np.flatnonzero(base == 1)[:bad]] = 0
    cand[np.flatnonzero(base == 0)[:good]] = 1
    return acc_task(task, base), acc_task(task, cand)


def ppl_task(task: str, nll: np.ndarray, words: np.ndarray) -> TaskResult:
    ll = -words * nll
    items = [ItemRecord(doc_id=i, prompt_hash=f"{task}-{i:05d}", loglikelihood=float(a), words=int(w), bytes=int(w) * 5)
             for i, (a, w) in enumerate(zip(ll, words, strict=True))]
    return TaskResult(task=task, version="2", kind="perplexity", config_hash="p",
                      metrics={"word_perplexity": math.exp(-float(ll.sum()) / float(words.sum()))},
                      higher_is_better={"word_perplexity": False}, items=items)


def ppl_pair(task: str, n: int, rel_change: float) -> tuple[TaskResult, TaskResult]:
    rng = np.random.default_rng(0)
    words = rng.integers(100, 600, n)
    nll = rng.normal(3.0, 0.3, n)
    return ppl_task(task, nll, words), ppl_task(task, nll + math.log1p(rel_change) + rng.normal(0, 0.002, n), words)


def golden_outputs(diverge: bool) -> tuple[list[GoldenOutput], list[GoldenOutput]]:
    """Three prompts; with `diverge` the second one's candidate parts from the baseline at token 2."""
    def out(gid: str, prompt: str, ids: list[int], text: str, top: list[list[int]], lps: list[list[float]]) -> GoldenOutput:
        return GoldenOutput(id=gid, prompt=prompt, prompt_ids=[7, 8], output_ids=ids, output_text=text,
                            ref_top_ids=top, ref_top_logprobs=lps, ref_token_logprobs=[lp[0] for lp in lps])

    top = [[1, 5], [2, 5], [3, 5], [4, 5]]
    lps = [[-0.1, -2.5]] * 4
    base = [out("same", "Say hi", [1, 2, 3, 4], "hi there\nfriend", top, lps),
            out("html<&>", NASTY, [1, 2, 3, 4], "Paris is the capital of France.", top, lps),
            out("third", "Count", [1, 2, 3, 4], "1 2 3 4", top, lps)]
    cand = [b.model_copy() for b in base]
    if diverge:
        cand[1] = out("html<&>", NASTY, [1, 2, 9, 9], "Paris is the </td><script>alert(1)</script>",
                      top, [[-0.1, -2.5], [-0.2, -2.0], [-1.5, -0.4], [-0.9, -0.8]])
    return base, cand


def side(name: str, tasks: list[TaskResult], golden: list[GoldenOutput]) -> EvalResults:
    return EvalResults(side=name, tasks={t.task: t for t in tasks}, golden=golden, comparability=dict(FACTS))


# ---- builders: run directories as the pipeline writes them ---------------------------------------------

MIXED_GATE = {
    "confidence": 0.95, "anomaly_margin": 0.05,
    "metrics": {
        "qa_pass/acc": {"max_abs_drop": 0.05}, "qa_fail/acc": {"max_abs_drop": 0.05},
        "qa_small/acc": {"max_abs_drop": 0.05}, "qa_better/acc": {"max_abs_drop": 0.05},
        "wiki/word_perplexity": {"max_rel_drop": 0.05}, "missing/acc": {"max_abs_drop": 0.05},
    },
    "golden": {"max_mean_kl": 0.5, "min_top1_agreement": 0.8},
}
SIMPLE_GATE = {"confidence": 0.95, "metrics": {"qa/acc": {"max_abs_drop": 0.05}, "wiki/word_perplexity": {"max_rel_drop": 0.05}},
               "golden": {"max_mean_kl": 0.5}}


def scenario(kind: str) -> tuple[list[tuple[TaskResult, TaskResult]], dict, bool]:
    """(task pairs, gate, golden diverges) of a named scenario."""
    if kind == "mixed":  # one check of every status
        pairs = [acc_pair("qa_pass", 400, 3, 2), acc_pair("qa_fail", 400, 60, 2), acc_pair("qa_small", 30, 2, 0),
                 acc_pair("qa_better", 400, 0, 60, acc=0.5), ppl_pair("wiki", 60, 0.01)]
        return pairs, MIXED_GATE, True
    if kind == "regression":
        return [acc_pair("qa", 400, 45, 3), ppl_pair("wiki", 60, 0.08)], SIMPLE_GATE, True
    return [acc_pair("qa", 400, 4, 3), ppl_pair("wiki", 60, 0.004)], SIMPLE_GATE, False  # pass / fp16


def make_run(root: Path, name: str, fmt: str, kind: str, ckpt_bytes: int) -> Path:
    """A run directory with the files run_recipe writes, the verdict from the real gate."""
    pairs, gate, diverge = scenario(kind)
    gb, gc = golden_outputs(diverge)
    base = side("baseline", [b for b, _ in pairs], gb)
    same = fmt == "fp16"
    # fp16: the candidate IS the baseline artifact, its results a copy (what the pipeline does).
    cand = base.model_copy(update={"side": "candidate"}) if same else side("candidate", [c for _, c in pairs], gc)
    recipe = Recipe.model_validate({"name": name, "quantization": {"format": fmt}, "gate": gate,
                                    "evaluation": {"limit": 400}, "tracking": {"enabled": False}})
    run_dir = root / f"{name}-{recipe.content_hash()[:10]}"
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    base.save(run_dir / "baseline_results.json")
    cand.save(run_dir / "candidate_results.json")
    write_item_jsonl(run_dir / "items.jsonl", base, cand)
    golden = compare_golden(base.golden, cand.golden)
    atomic_write_text(run_dir / "golden.json", golden.model_dump_json(indent=2))
    verdict = judge(base, cand, golden, recipe.gate)
    atomic_write_json(run_dir / "verdict.json", verdict.to_dict())
    if not same:
        CalibrationInfo(dataset="bundled:pydoc", num_samples=8, seq_len=64, seed=0, content_sha256="ab" * 32,
                        tokens=512, seconds=0.4).save(run_dir / "calibration.json")
        Checkpoint(path=str(run_dir / "checkpoint"), format=fmt, quant_algo=fmt.upper(), dtype="float16",
                   size_bytes=ckpt_bytes).save(run_dir / "checkpoint.json")
    outcome = RecipeOutcome(name, f"{name}.yaml", fmt, verdict.decision.value, int(verdict.exit_code), reason=verdict.reason,
                            run_dir=str(run_dir), checkpoint_bytes=ckpt_bytes, baseline_cache="hit 0123456789abcdef0123",
                            timings={"calibrate": 0.4, "evaluate": 2.5, "gate": 0.01},
                            checks=[c.model_dump(mode="json") for c in verdict.checks],
                            deltas={c.name: c.delta for c in verdict.checks if c.delta is not None})
    atomic_write_json(run_dir / "outcome.json", outcome.to_dict())
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "runs"
    return {
        "mixed": make_run(root, "int8_sq", "int8_sq", "mixed", 140_000_000),
        "fp16": make_run(root, "fp16", "fp16", "pass", 269_000_000),
        "fp8": make_run(root, "fp8", "fp8", "pass", 140_000_000),
        "int4": make_run(root, "int4_awq", "int4_awq", "regression", 117_000_000),
    }


class Marks(HTMLParser):
    """Start tags with their attributes, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.tags if t == tag and all(
            (v in a.get(k, "").split()) if k == "class" else a.get(k) == v for k, v in want.items())]


def parse(text: str) -> Marks:
    m = Marks()
    m.feed(text)
    return m


# ---- unit tests -----------------------------------------------------------------------------------------


def test_forest_rows_are_the_gated_checks_and_agree_with_their_status(runs):
    run = load_run(runs["mixed"])
    v = run.verdict
    gated = [c for c in v.checks if c.gated and c.kind in ("metric", "golden")]
    rows = plots.forest_rows(v)
    assert [r.name for r in rows] == [c.name for c in gated]
    by = {r.name: r for r in rows}
    assert {r.status for r in rows} == {"pass", "fail", "inconclusive", "anomalous", "error"}
    assert v.decision.value == "ERROR"  # missing/acc has no results: fail closed
    # The geometry says what the status says: pass = interval left of the margin (1), fail = right of 0 and
    # point past the margin, anomalous = significantly better (left of 0), error = nothing to draw.
    assert by["qa_pass/acc"].hi < 1 and by["qa_pass/acc"].status == "pass"
    assert by["qa_fail/acc"].lo > 0 and by["qa_fail/acc"].x > 1 and by["qa_fail/acc"].status == "fail"
    assert by["qa_small/acc"].lo < 1 < by["qa_small/acc"].hi and by["qa_small/acc"].status == "inconclusive"
    assert by["qa_better/acc"].hi < 0 and by["qa_better/acc"].status == "anomalous"
    assert by["missing/acc"].x is None and by["missing/acc"].status == "error"
    # rel margin: the row is the relative worsening over the 5 % margin
    wiki = next(c for c in gated if c.name == "wiki/word_perplexity")
    assert by["wiki/word_perplexity"].x == pytest.approx(wiki.rel_delta / 0.05)
    # golden thresholds: a point (no interval) at worsening / (ideal - threshold)
    top1 = next(c for c in gated if c.name == "golden/top1_agreement")
    assert by["golden/top1_agreement"].lo is None
    assert by["golden/top1_agreement"].x == pytest.approx(top1.delta / 0.2)
    info = plots.forest_rows(v, gated=False)
    assert info and all(r.status == "not gated" for r in info)


def test_flips_are_counted_both_ways_from_the_items():
    b, c = acc_pair("qa", 100, bad=7, good=3)
    t = compare_task(b, c, "qa")
    assert (t.worse, t.better, t.n_paired, t.binary) == (7, 3, 100, True)
    assert t.flip_words == ("right → wrong", "wrong → right")
    # an item whose prompt changed is not paired
    c.items[0] = c.items[0].model_copy(update={"prompt_hash": "other"})
    assert compare_task(b, c, "qa").n_paired == 99
    pb, pc = ppl_pair("wiki", 50, 0.05)
    t = compare_task(pb, pc, "wiki")
    assert t.kind == "perplexity" and t.worse + t.better == 50 and t.worse > 40
    assert "log-likelihood" in t.flip_words[0]


def test_run_report_is_self_contained_and_shows_every_part(runs):
    path = write_run_report(runs["mixed"])
    assert path == runs["mixed"] / "report.html"
    text = path.read_text(encoding="utf-8")
    m = parse(text)
    # self-contained: no script, no external resource of any kind
    assert not m.having("script") and not m.having("link") and not m.having("img") and not m.having("iframe")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text) and "@import" not in text and "url(" not in text
    assert set(re.findall(r"https?://[^\"'\s<>]+", text)) <= {"http://www.w3.org/2000/svg"}
    # header: verdict with its colour and reason
    verdict = m.having("div", id="verdict")[0]
    assert verdict["data-decision"] == "ERROR" and plots.decision_colour("ERROR") in verdict["style"]
    v = load_run(runs["mixed"]).verdict
    assert html.escape(v.reason) in text
    assert "140.00 MB" in text and "hit 0123456789abcdef0123" in text and "lm_eval_version 0.4.13" in text
    # forest: one row per gated metric/golden check, coloured by status
    rows = m.having("g", **{"class": "forest-row", "data_gated": "true"})
    gated = [c for c in v.checks if c.gated and c.kind in ("metric", "golden")]
    assert [r["data-check"] for r in rows] == [c.name for c in gated]
    assert [r["data-status"] for r in rows] == [c.status for c in gated]
    for status in ("fail", "inconclusive", "anomalous"):
        assert plots.STATUS_COLOURS[status] in text
    assert len(m.having("g", **{"class": "forest-row", "data_gated": "false"})) == len(plots.forest_rows(v, gated=False))
    # tasks: flips both ways from the items
    flips = {a["data-task"]: (int(a["data-worse"]), int(a["data-better"])) for a in m.having("g", **{"class": "flip-row"})}
    assert flips["qa_fail"] == (60, 2) and flips["qa_better"] == (0, 60) and flips["qa_pass"] == (3, 2)
    # golden prompts side by side, the first divergence marked, calibration facts
    assert [a["data-id"] for a in m.having("tr", **{"class": "golden-row"})] == ["same", "html<&>", "third"]
    assert len(m.having("span", **{"class": "div"})) == 2 + 1  # baseline + candidate cell, + the legend
    assert "bundled:pydoc" in text and "8 × 64 tokens" in text


def test_every_text_from_the_run_is_escaped(runs):
    text = write_run_report(runs["mixed"]).read_text(encoding="utf-8")
    assert "<script" not in text and "</td><script" not in text
    assert html.escape(NASTY) in text  # the prompt, escaped
    assert "<b>bold</b>" not in text
    # the candidate's text after the divergence, escaped and highlighted
    assert '<mark class="c">' + html.escape("</td><script>alert(1)</script>") + "</mark>" in text
    assert 'data-id="html&lt;&amp;&gt;"' in text


def test_first_divergence_is_marked_where_the_texts_part(runs):
    text = write_run_report(runs["mixed"]).read_text(encoding="utf-8")
    row = re.search(r'<tr class="golden-row diff" data-id="html&lt;&amp;&gt;">(.*?)</tr>', text, re.S).group(1)
    cells = re.findall(r'<td class="text"><div>(.*?)</div></td>', row, re.S)
    assert len(cells) == 3  # prompt, baseline, candidate
    marker = re.compile(r'<span class="div" title="first divergence: token 2">▍</span>')
    assert marker.search(cells[1]) and marker.search(cells[2])
    assert cells[1].split("<span")[0] == "Paris is the " == cells[2].split("<span")[0]
    assert '<mark class="b">capital of France.</mark>' in cells[1]
    identical = re.search(r'<tr class="golden-row same" data-id="same">(.*?)</tr>', text, re.S).group(1)
    assert 'class="div"' not in identical and "identical" in identical


def test_images_are_written_and_listed(runs):
    assert report_images(runs["mixed"]) == []
    write_run_report(runs["mixed"])
    images = report_images(runs["mixed"])
    assert [p.name for p in images] == ["report_forest.png", "report_flips.png"]
    for p in images:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_without_matplotlib_the_report_is_svg_only(runs, monkeypatch):
    write_run_report(runs["mixed"])
    assert report_images(runs["mixed"])
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    text = write_run_report(runs["mixed"]).read_text(encoding="utf-8")
    assert report_images(runs["mixed"]) == []  # no stale image of the earlier report stays
    assert 'class="forest"' in text


def test_candidate_equal_to_the_baseline_artifact_says_so(runs):
    text = write_run_report(runs["fp16"]).read_text(encoding="utf-8")
    m = parse(text)
    assert m.having("div", id="same-artifact")
    assert "candidate = baseline artifact, no statistics" in text
    assert not m.having("g", **{"class": "forest-row"}) and not m.having("g", **{"class": "flip-row"})
    assert report_images(runs["fp16"]) == []  # no plot of a thing compared with itself
    assert not load_run(runs["fp8"]).candidate_is_baseline and load_run(runs["fp16"]).candidate_is_baseline


def test_run_flagged_as_same_artifact_is_shown_so_whatever_its_format(runs):
    # a newer pipeline may say it outright: honoured from verdict.json or outcome.json
    import json

    vpath = runs["fp8"] / "verdict.json"
    data = json.loads(vpath.read_text())
    data["candidate_is_baseline"] = True
    vpath.write_text(json.dumps(data))
    assert "candidate = baseline artifact, no statistics" in write_run_report(runs["fp8"]).read_text(encoding="utf-8")


def test_a_run_that_stopped_before_the_gate_still_reports(tmp_path):
    run_dir = tmp_path / "int4_awq-0123456789"
    run_dir.mkdir()
    outcome = RecipeOutcome("int4_awq", "int4_awq.yaml", "int4_awq", "ERROR", int(ExitCode.ERROR),
                            reason="export: partial blocks are not supported <576 % 128>", run_dir=str(run_dir))
    atomic_write_json(run_dir / "outcome.json", outcome.to_dict())
    (run_dir / "candidate_results.json").write_text("{not json")
    text = write_run_report(run_dir).read_text(encoding="utf-8")
    assert "No verdict" in text and html.escape("partial blocks are not supported <576 % 128>") in text
    assert "candidate_results.json: unreadable" in text
    assert parse(text).having("div", id="verdict")[0]["data-decision"] == "ERROR"


def test_mlflow_artifact_layout_is_read_too(runs, tmp_path):
    """A run's artifacts downloaded from MLflow: recipe.yaml on top, the rest under results/."""
    import shutil

    dl = tmp_path / "artifacts"
    (dl / "results").mkdir(parents=True)
    shutil.copy(runs["int4"] / "recipe.yaml", dl / "recipe.yaml")
    for f in runs["int4"].iterdir():
        if f.name != "recipe.yaml":
            shutil.copy(f, dl / "results" / f.name)
    run = load_run(dl)
    assert run.name == "int4_awq" and run.decision == "REGRESSION" and run.golden is not None and not run.problems
    assert len(parse(write_run_report(dl).read_text(encoding="utf-8")).having("g", **{"class": "forest-row", "data_gated": "true"})) == 3


def test_not_a_run_directory_is_bad_input(tmp_path):
    with pytest.raises(ReportError, match="no such run directory") as err:
        write_run_report(tmp_path / "nope")
    assert err.value.exit_code == ExitCode.BAD_INPUT
    with pytest.raises(ReportError, match="not a quantgate run directory"):
        write_run_report(tmp_path)
    with pytest.raises(ReportError):
        write_matrix_report([], tmp_path)


def test_matrix_report_plots_size_against_each_gated_check(runs, tmp_path):
    dirs = [runs["fp16"], runs["fp8"], runs["int4"]]
    out = tmp_path / "matrix"
    path = write_matrix_report(dirs, out)
    assert path == out / "matrix_report.html"
    text = path.read_text(encoding="utf-8")
    m = parse(text)
    panels = m.having("svg", **{"class": "scatter"})
    assert [p["data-check"] for p in panels] == ["qa/acc", "wiki/word_perplexity", "golden/mean_kl"]
    points = m.having("g", **{"class": "scatter-point"})
    assert len(points) == 3 * 3
    assert {(p["data-recipe"], p["data-decision"]) for p in points} == {("fp16", "PASS"), ("fp8", "PASS"), ("int4_awq", "REGRESSION")}
    rows = m.having("tr", **{"class": "recipe-row"})
    assert [r["data-recipe"] for r in rows] == ["fp16", "fp8", "int4_awq"]
    links = [a["href"] for a in m.having("a")]
    assert len(links) == 3 and all(not Path(h).is_absolute() for h in links)
    for link in links:  # each run's report was written so the link works
        assert (out / link).resolve().is_file()
    assert "0.43×" in text  # int4: 117 MB of the baseline's 269 MB
    assert "candidate = baseline artifact, no statistics" in text
    assert [p.name for p in matrix_images(out)] == ["matrix_scatter.png"]


def test_scatter_point_of_the_baseline_artifact_has_no_interval(runs):
    panels = report_html.scatter_panels([load_run(runs["fp16"]), load_run(runs["int4"])])
    qa = panels[0]
    fp16, int4 = qa.points
    assert fp16.same_artifact and fp16.y == 0.0 and fp16.lo is None and fp16.hi is None
    assert not int4.same_artifact and int4.lo > 0 and int4.status == "fail" and int4.margin == pytest.approx(0.05)
    assert int4.mb == pytest.approx(117.0)


# ---- the real pipeline on the tiny model ---------------------------------------------------------------


def test_report_of_real_pipeline_runs(tmp_path, tiny_model_dir):
    """fp16 and fp8 through `quantgate run` (real ModelOpt and lm-eval, no tracking), then the reports."""
    base = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 12, "golden": {"max_new_tokens": 6}},
        "gate": {"confidence": 0.9, "anomaly_margin": 10.0, "metrics": {"qg_ppl/word_perplexity": {"max_rel_drop": 5.0},
                                                                        "qg_cloze/acc": {"max_abs_drop": 1.0}},
                 "golden": {"max_mean_kl": 50.0}},
        "tracking": {"enabled": False}, "promotion": {"enabled": False}, "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "_base.yaml").write_text(yaml.safe_dump(base))
    for fmt in ("fp16", "fp8"):
        (tmp_path / f"{fmt}.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", "name": fmt, "quantization": {"format": fmt}}))
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", "fp16.yaml", "fp8.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    everything = sorted((tmp_path / "runs").iterdir())
    assert [d.name.split("-")[0] for d in everything] == ["fp16", "fp8", "matrix"]
    assert (everything[-1] / "matrix_report.html").is_file()  # the run's own matrix report
    dirs = everything[:2]
    for d in dirs:
        text = write_run_report(d).read_text(encoding="utf-8")
        run = load_run(d)
        assert not run.problems, run.problems
        m = parse(text)
        rows = m.having("g", **{"class": "forest-row", "data_gated": "true"})
        if run.candidate_is_baseline:
            assert not rows and "candidate = baseline artifact, no statistics" in text
        else:
            assert len(rows) == len([c for c in run.verdict.checks if c.gated and c.kind in ("metric", "golden")]) == 3
            assert len(m.having("tr", **{"class": "golden-row"})) == len(run.golden.records) > 0
            assert len(m.having("g", **{"class": "flip-row"})) == len(run.baseline.tasks)
    text = write_matrix_report(dirs, tmp_path / "matrix").read_text(encoding="utf-8")
    assert len(parse(text).having("svg", **{"class": "scatter"})) == 3


# ---- in a browser --------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def chromium(tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per call
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def painted(png: Path, colour: str) -> int:
    """Pixels of exactly `colour` (#rrggbb) in a screenshot."""
    from PIL import Image

    rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    img = np.asarray(Image.open(png).convert("RGB"))
    return int(np.all(img == rgb, axis=-1).sum())


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("which", ["mixed", "fp16"])
def test_run_report_renders_in_chromium(runs, tmp_path_factory, which):
    shots = tmp_path_factory.mktemp("report_shots")
    page = write_run_report(runs[which])
    dom = chromium(shots, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = parse(dom.stdout)
    v = load_run(runs[which]).verdict
    gated = [c for c in v.checks if c.gated and c.kind in ("metric", "golden")]
    rows = m.having("g", **{"class": "forest-row", "data_gated": "true"})
    png = shots / f"report_{which}.png"
    shot = chromium(shots, page, f"--screenshot={png}", "--window-size=1200,1500")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    print(f"screenshot: {png}")
    if which == "fp16":
        assert not rows and m.having("div", id="same-artifact")
        assert painted(png, "#e3f2fd") > 10_000  # the banner's background is on screen
        return
    assert len(rows) == len(gated) == 8
    assert len(m.having("g", **{"class": "flip-row"})) == 5
    # the plot painted: each status colour of the gated rows shows in the screenshot
    for status in {c.status for c in gated}:
        assert painted(png, plots.STATUS_COLOURS[status]) > 20, status


@pytest.mark.browser
@needs_chromium
def test_matrix_report_renders_in_chromium(runs, tmp_path_factory):
    shots = tmp_path_factory.mktemp("report_shots")
    page = write_matrix_report([runs["fp16"], runs["fp8"], runs["int4"], runs["mixed"]], shots / "matrix")
    dom = chromium(shots, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = parse(dom.stdout)
    assert len(m.having("svg", **{"class": "scatter"})) == 9  # union of the runs' gated checks
    png = shots / "report_matrix.png"
    shot = chromium(shots, page, f"--screenshot={png}", "--window-size=1200,1500")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    print(f"screenshot: {png}")
    for decision in ("PASS", "REGRESSION"):
        assert painted(png, plots.decision_colour(decision)) > 50, decision
