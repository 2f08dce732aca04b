"""Redaction: remove credentials, and nothing else, from text that leaves the process.

What counts as a credential:
- URI userinfo (`scheme://user:pass@host` -> `scheme://***@host`);
- bearer/basic authorization values and well-known token shapes (hf_, ghp_/gho_/ghu_/ghs_/ghr_,
  github_pat_, sk-, xox?-, AWS AKIA/ASIA access key ids);
- the value of a key whose *whole* name is a secret name (password, token, api_key,
  client_secret, aws_secret_access_key, hf_token ...), in `k=v` / query, JSON and YAML form.
Names are compared whole (case-insensitive, `-`, `.`, space and camelCase read as `_`; for a
dotted path the last part): `quantgate.run_key`, `baseline_key`, `passed`, `pad_token`,
`max_new_tokens`, `key_parts` keep their values, and so do hashes, run keys and verdict text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from quantgate.tracking.common import MAX_KEY_LENGTH, REDACTED, _truncate

log = logging.getLogger("quantgate.tracking")

# Whole names (after normalising) whose values are secrets.
_SECRET_NAMES = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "secret", "token", "api_key", "apikey", "api_token",
        "access_key", "access_key_id", "secret_key", "secret_access_key", "private_key", "client_secret",
        "authorization", "auth_token", "access_token", "refresh_token", "id_token", "session_token",
        "bearer_token", "credentials", "credential", "cookie", "set_cookie", "x_api_key", "signature",
        "sig", "x_amz_signature", "x_amz_security_token", "sas_token", "connection_string",
    }
)
# `<prefix>_<suffix>` is a secret for these suffixes whatever the prefix (db_password, hf_api_key).
_SECRET_SUFFIXES = ("_password", "_passwd", "_secret", "_api_key", "_apikey", "_access_key", "_secret_key",
                    "_private_key", "_client_secret", "_secret_access_key", "_access_token", "_auth_token")
# `<prefix>_token` only for prefixes that name a service: `pad_token`, `eos_token` are tokenizer
# settings, not secrets.
_TOKEN_PREFIXES = frozenset(
    {"hf", "huggingface", "hugging_face_hub", "github", "gh", "gitlab", "mlflow_tracking", "tracking",
     "databricks", "wandb", "slack", "npm", "pypi", "oauth", "api", "bearer", "service", "personal"}
)

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"]+)@")
_NAME = r"[A-Za-z_][\w.-]*"
_PAIR = re.compile(rf"(?P<name>(?<![\w.-]){_NAME})=(?P<val>[^&\s;,'\"#]+)")
_JSON_PAIR = re.compile(r'(?P<name>"[^"\n]{1,80}")(?P<sep>\s*:\s*)"(?P<val>[^"\n]*)"')
_YAML_PAIR = re.compile(
    rf"(?m)^(?P<lead>[ \t]*(?:-[ \t]+)?)(?P<name>{_NAME})(?P<sep>[ \t]*:[ \t]+)(?P<val>[^\s#][^#\n]*?)[ \t]*$"
)
# HTTP spells the schemes capitalised; lower-case "basic" is far more often plain English.
_BEARER = re.compile(r"\b(?P<kind>Bearer|BEARER|bearer|Basic|BASIC)\s+(?P<val>[A-Za-z0-9._~+/=-]{8,})")
_KNOWN_TOKENS = re.compile(
    r"(?<![A-Za-z0-9])(?P<prefix>hf_|gh[pousr]_|github_pat_|sk-(?:proj-|ant-)?|xox[abposr]-)[A-Za-z0-9_-]{16,}"
    r"|(?<![A-Z0-9])(?P<aws>(?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Z0-9])"
)
_KEEP_VALUES = frozenset({"null", "~", "''", '""', "none", "None", "", REDACTED, f"'{REDACTED}'"})


def _normal_name(name: str) -> str:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name.strip().strip("\"'"))
    last = re.split(r"[./]", spaced)[-1] if "." in spaced or "/" in spaced else spaced
    return re.sub(r"[^a-z0-9]+", "_", last.lower()).strip("_")


def is_sensitive_name(name: str) -> bool:
    """True for the names of secrets (password, HF_TOKEN, apiKey, db.password, aws_secret_access_key),
    never for names that merely contain such a word (run_key, passed, max_new_tokens, pad_token)."""
    n = _normal_name(name)
    if not n:
        return False
    if n in _SECRET_NAMES or n.endswith(_SECRET_SUFFIXES):
        return True
    return n.endswith("_token") and n[: -len("_token")] in _TOKEN_PREFIXES


def redact_uri(uri: str) -> str:
    """`uri` with its userinfo removed (not masked) and secret query values masked: what may be
    printed or stored wherever the tracking URI is shown (`http://u:p@h:5000` -> `http://h:5000`)."""
    uri = uri.strip()
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return redact(uri)
    if parts.scheme and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        uri = urllib.parse.urlunsplit(parts)
    return redact(uri)


def redact(value: str) -> str:
    """Strip credentials from a string (see the module docstring). Idempotent."""
    if not value:
        return value
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
    out = _PAIR.sub(lambda m: f"{m['name']}={REDACTED}" if is_sensitive_name(m["name"]) else m[0], out)
    out = _JSON_PAIR.sub(
        lambda m: f'{m["name"]}{m["sep"]}"{REDACTED}"'
        if is_sensitive_name(m["name"].strip('"')) and m["val"] not in _KEEP_VALUES
        else m[0],
        out,
    )
    out = _YAML_PAIR.sub(
        lambda m: f"{m['lead']}{m['name']}{m['sep']}'{REDACTED}'"
        if is_sensitive_name(m["name"]) and m["val"] not in _KEEP_VALUES
        else m[0],
        out,
    )
    out = _BEARER.sub(lambda m: m[0] if m["val"] == REDACTED else f"{m['kind']} {REDACTED}", out)
    return _KNOWN_TOKENS.sub(lambda m: f"{m['prefix']}{REDACTED}" if m["prefix"] else REDACTED, out)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Every value as redacted text; values of secret-named keys become '***'."""
    return {
        str(k): REDACTED if is_sensitive_name(str(k)) else redact(_to_text(v)) for k, v in params.items()
    }


def sanitize_key(key: str) -> str:
    """A name MLflow accepts for a param/metric/tag: allowed characters, no '..', '//' or leading '/'."""
    cleaned = re.sub(r"[^/\w.\- :]", "_", str(key))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    return _truncate("/".join(parts), MAX_KEY_LENGTH) or "_"


_TEXT_SUFFIXES = frozenset(
    [".txt", ".log", ".json", ".jsonl", ".yaml", ".yml", ".md", ".csv", ".tsv", ".html", ".htm"]
    + [".ini", ".cfg", ".toml", ".xml", ".env", ".sh", ".py"]
)
_REDACT_MAX_BYTES = 50 * 1024 * 1024


@contextlib.contextmanager
def _redacted_copy(src: Path, enabled: bool) -> Iterator[Path]:
    """`src`, or a redacted copy with the same file name when redaction changes its text."""
    if not enabled or src.suffix.lower() not in _TEXT_SUFFIXES or src.stat().st_size > _REDACT_MAX_BYTES:
        yield src
        return
    try:
        text = src.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        yield src
        return
    clean = redact(text)
    if clean == text:
        yield src
        return
    log.info("redacted credentials in %s before logging it", src.name)
    with tempfile.TemporaryDirectory(prefix="qg_redact_") as tmp:
        copy = Path(tmp) / src.name
        copy.write_text(clean, encoding="utf-8")
        yield copy
