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


# ---- enough calibration text? (issue 10: bad input before any model work) ------------------------


def read_local_texts(path: Path, text_field: str) -> list[str]:
    """The non-empty texts of a local calibration file, read the way `load_texts` reads them
    (.txt: one text a line; .jsonl/.json: records' `text_field`; .parquet: that column), without
    building a `datasets` cache. ValueError with one line when the file cannot be read so."""
    import json

    suffix = path.suffix
    if suffix == ".txt":
        rows: list[Any] = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [t for t in rows if t.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"has no column {text_field!r} (columns: {table.column_names})")
        rows = table.column(text_field).to_pylist()
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        stripped = text.lstrip()
        try:
            if suffix == ".json" and stripped.startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as err:
            raise ValueError(f"is not JSON lines ({err})") from None
        if rows and not all(isinstance(r, dict) for r in rows):
            raise ValueError("holds JSON values that are not objects")
        if rows and not any(text_field in r for r in rows):
            raise ValueError(f"has no field {text_field!r} (fields: {sorted(rows[0])})")
        rows = [r.get(text_field) for r in rows]
    return [t for t in rows if isinstance(t, str) and t.strip()]


def calibration_tokens_needed(spec: CalibrationSpec) -> int:
    """`calibration_batches` cuts seq_len windows from one token stream and needs num_samples of them."""
    return spec.num_samples * spec.seq_len


def count_tokens_upto(texts: list[str], need: int, tokenizer_file: Path | None) -> tuple[int, bool]:
    """(tokens in the calibration stream, exact?) counted up to `need`. With a tokenizer.json the
    count is exact (the `tokenizers` backend the model's fast tokenizer uses, one EOS between
    texts as `calibration_batches` does); without one it is an upper bound: a token of a byte-level
    or byte-fallback tokenizer covers at least one UTF-8 byte, so tokens <= bytes + separators."""
    if tokenizer_file is None or not tokenizer_file.is_file():
        return sum(len(t.encode("utf-8")) + 1 for t in texts), False
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    total = 0
    for text in texts:
        total += len(tok.encode(text, add_special_tokens=False).ids) + 1
        if total >= need:
            break
    return total, True


def check_calibration_data(spec: CalibrationSpec, source_name: str, tokenizer_file: Path | None = None) -> None:
    """RecipeError (exit 2) when the calibration data is unreadable, empty or too short for
    num_samples x seq_len tokens. Rule: the token stream must hold num_samples windows of seq_len
    tokens (exact with the model's tokenizer.json, else the bytes upper bound). Bundled Wikipedia
    and hub datasets are not checked here (reading them is the slow part); calibration checks them."""
    ds = spec.dataset
    need = calibration_tokens_needed(spec)
    fix = (f"it needs at least {need} tokens (calibration.num_samples {spec.num_samples} x calibration.seq_len "
           f"{spec.seq_len}): give more text or lower calibration.num_samples / calibration.seq_len")
    if ds.startswith("bundled:"):
        name = ds.split(":", 1)[1]
        if name != "pydoc":
            return
        texts = ["\n\n".join(paras) for title, paras in bundled_documents(name) if in_split(title, spec.split)]
        where = f"bundled:pydoc ({spec.split} split)"
    else:
        p = Path(ds).expanduser()
        if not p.is_file():
            return  # a hub dataset: checked when it is loaded
        where = str(p)
        try:
            texts = read_local_texts(p, spec.text_field)
        except (OSError, ValueError) as err:
            raise RecipeError(source_name, "calibration.dataset", f"{where}: {str(err).splitlines()[0]}; give a .txt, .jsonl, .json or .parquet file with a {spec.text_field!r} text field") from None
        if not texts:
            raise RecipeError(source_name, "calibration.dataset", f"{where} holds no text (empty, or only blank lines / empty {spec.text_field!r} fields); {fix}")
    got, exact = count_tokens_upto(texts, need, tokenizer_file)
    if got < need:
        what = f"{got} tokens with the model's tokenizer" if exact else f"at most {got} tokens ({len(texts)} texts, {got - len(texts)} UTF-8 bytes)"
        raise RecipeError(source_name, "calibration.dataset", f"{where} gives {what}; {fix}")
