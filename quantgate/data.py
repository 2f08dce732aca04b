"""Calibration text sources, loaded through `datasets`: local files, hub datasets (when
reachable), and offline text read at run time from installed packages (no text in this repo).

Bundled sources are split by a stable hash of each document's title into 'train' (calibration)
and 'test' halves: the default evaluation suite reads only the 'test' half of the Wikipedia
extract, and its news text (ABC, lee_background.cor) is never offered for calibration.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import RecipeError, StageError

if TYPE_CHECKING:
    from quantgate.recipe import CalibrationSpec

log = logging.getLogger(__name__)

BUNDLED_SOURCES = {
    "wikipedia": "105 English Wikipedia articles (CC BY-SA) shipped in gensim's test data",
    "pydoc": "Python's own documentation topics (pydoc_data.topics), always installed",
}
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _gensim_test_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("data", "bundled text needs gensim: pip install gensim==4.4.0")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name


_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes
    (re.compile(r"^=+[^=]+=+\s*$", re.M), ""),  # section headings
    (re.compile(r"[ \t]+"), " "),
]


def _clean_wiki(text: str) -> list[str]:
    for pat, rep in _MARKUP:
        text = pat.sub(rep, text)
    paras = [p.strip() for p in text.split("\n")]
    # Keep prose: long lines that end like sentences (drops captions, lists, tables).
    return [p for p in paras if len(p) >= 200 and p[-1] in ".!?\"'" and p.count(" ") > 30]


def bundled_documents(name: str) -> list[tuple[str, list[str]]]:
    """[(title, paragraphs)] of a bundled source, in a stable order."""
    if name == "wikipedia":
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        path = _gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
        docs = []
        with bz2.BZ2File(path) as fh:
            for title, raw, *_ in extract_pages(fh):
                paras = _clean_wiki(filter_wiki(raw))
                if paras:
                    docs.append((title, paras))
        return docs
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [(k, [p.strip() for p in topics[k].split("\n\n") if len(p.strip()) >= 200]) for k in sorted(topics)]
    raise KeyError(name)


def in_split(title: str, split: str) -> bool:
    """Stable half split by title hash: 'train' for calibration, 'test' for evaluation."""
    bucket = int(hashlib.sha256(title.encode()).hexdigest(), 16) % 2
    return (bucket == 0) if split == "train" else (bucket == 1) if split == "test" else True


def check_dataset_source(spec: CalibrationSpec, source_name: str) -> None:
    ds = spec.dataset
    if ds.startswith("bundled:"):
        name = ds.split(":", 1)[1]
        if name not in BUNDLED_SOURCES:
            raise RecipeError(source_name, "calibration.dataset", f"unknown bundled dataset {name!r} (known: {', '.join('bundled:' + k for k in BUNDLED_SOURCES)})")
        if name != "pydoc" and importlib.util.find_spec("gensim") is None:
            raise RecipeError(source_name, "calibration.dataset", f"bundled:{name} needs gensim: pip install gensim==4.4.0")
        return
    p = Path(ds).expanduser()
    if p.suffix in LOCAL_SUFFIXES or ds.startswith((".", "/", "~")):
        if not p.is_file():
            raise RecipeError(source_name, "calibration.dataset", f"calibration file {ds!r} does not exist")
        if p.suffix not in LOCAL_SUFFIXES:
            raise RecipeError(source_name, "calibration.dataset", f"unsupported file type {p.suffix!r}; use .txt, .jsonl, .json or .parquet")


def load_texts(spec: CalibrationSpec) -> list[str]:
    """The calibration texts, via a `datasets.Dataset`."""
    import datasets

    ds_name = spec.dataset
    if ds_name.startswith("bundled:"):
        name = ds_name.split(":", 1)[1]
        docs = [d for d in bundled_documents(name) if in_split(d[0], spec.split)]
        dataset = datasets.Dataset.from_dict({"text": ["\n\n".join(paras) for _, paras in docs]})
    else:
        p = Path(ds_name).expanduser()
        try:
            if p.is_file():
                builder = LOCAL_SUFFIXES[p.suffix]
                dataset = datasets.load_dataset(builder, data_files={"train": str(p)}, split="train")
            else:
                dataset = datasets.load_dataset(ds_name, split=spec.split)
        except Exception as err:  # datasets raises many types; one line is what the user needs
            raise StageError("calibrate", f"cannot load calibration dataset {ds_name!r}: {str(err).splitlines()[0]}") from None
    if spec.text_field not in dataset.column_names:
        raise StageError("calibrate", f"calibration dataset {ds_name!r} has no column {spec.text_field!r} (columns: {dataset.column_names}); set calibration.text_field")
    return [t for t in dataset[spec.text_field] if isinstance(t, str) and t.strip()]


@dataclass
class CalibrationBatches:
    batches: list[Any]  # LongTensor [batch, seq_len]
    sha256: str
    tokens: int


def calibration_batches(spec: CalibrationSpec, tokenizer: Any) -> CalibrationBatches:
    """Tokenize the texts as one stream (EOS between documents), cut `seq_len` windows, sample
    `num_samples` of them with `seed`. The hash covers the exact token ids used."""
    import torch

    texts = load_texts(spec)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        stream.append(sep)
    n_windows = len(stream) // spec.seq_len
    if n_windows < spec.num_samples:
        raise StageError("calibrate", f"dataset {spec.dataset!r} gives {n_windows} windows of {spec.seq_len} tokens, fewer than calibration.num_samples={spec.num_samples}")
    windows = torch.tensor(stream[: n_windows * spec.seq_len]).view(n_windows, spec.seq_len)
    g = torch.Generator().manual_seed(spec.seed)
    pick = torch.randperm(n_windows, generator=g)[: spec.num_samples].sort().values
    data = windows[pick]
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    batches = [data[i : i + spec.batch_size] for i in range(0, len(data), spec.batch_size)]
    return CalibrationBatches(batches, digest, int(data.numel()))
